"""The study's pieces (scripts/compare.py): the supervised curve, held-out scoring, seeds that keep the base
model, the answer metric of ILLUME's notebook, and `compare.py --quick` end to end."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from illume.config import load_config
from illume.data.shapes import ShapesWorld
from illume.metrics.answer_accuracy import answer_containment
from tests.conftest import REPO


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare", REPO / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_answer_containment_is_illumes_notebook_metric():
    predictions = ["red", "a red one", "blue", "", "two"]
    references = [["red"], "red", ["green", "blue green"], ["red"], ["three"]]
    # red in red; red in "a red one"; blue in "blue green"; empty scores 0; two vs three: neither contains
    assert answer_containment(predictions, references) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="differ in length"):
        answer_containment(["a"], [])


def test_match_k_interpolates_in_log_k():
    match_k = _compare_module().match_k
    curve = {25: [10.0, 10.0], 100: [30.0, 30.0], 400: [50.0, 50.0]}
    assert match_k(20.0, curve) == "50"  # halfway between 25 and 100 in log k: sqrt(25 * 100)
    assert match_k(30.0, curve) == "100"
    assert match_k(5.0, curve) == "< 25"
    assert match_k(60.0, curve) == "> 400"


def test_a_study_seed_changes_the_questions_and_keeps_the_base_model(tmp_path):
    from illume.demo.pretrain import demo_model_dir

    seed0 = ShapesWorld(seed=0)
    seed1 = ShapesWorld(seed=1, pretrain_seed=0)
    assert seed1.scene("pretrain", 7) == seed0.scene("pretrain", 7)
    assert [seed1.scene("train", i) for i in range(20)] != [seed0.scene("train", i) for i in range(20)]
    assert ShapesWorld(seed=1).scene("pretrain", 7) != seed0.scene("pretrain", 7)
    base = load_config(REPO / "configs" / "demo.yaml", [f"model.cache_dir={tmp_path}"])
    other = load_config(REPO / "configs" / "demo.yaml", [f"model.cache_dir={tmp_path}", "data.shapes.seed=1",
                                                         "data.shapes.pretrain_seed=0"])
    assert demo_model_dir(other) == demo_model_dir(base)  # the same cached base model
    unpinned = load_config(REPO / "configs" / "demo.yaml", [f"model.cache_dir={tmp_path}", "data.shapes.seed=1"])
    assert demo_model_dir(unpinned) != demo_model_dir(base)


def test_written_rationales_are_one_reference_for_each_of_k_questions():
    from illume.data.datasets import load_split
    from illume.supervised import written_rationales
    from illume.training import build_training_set

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.shapes.num_train_scenes=40"])
    train = load_split(cfg.data, "train")
    chosen = written_rationales(train, 10, seed=3)
    by_id = {e.id: e for e in train}
    assert len({example_id for example_id, _ in chosen}) == 10
    assert all(text in by_id[example_id].explanations for example_id, text in chosen)
    assert written_rationales(train, 10, seed=3) == chosen and written_rationales(train, 10, seed=4) != chosen
    rows = build_training_set(chosen, train)  # the loop's rule: the other 30 questions as answer-only rows
    assert sum(r.kind == "rationale" for r in rows) == 10 and sum(r.kind == "answer" for r in rows) == 30
    with pytest.raises(ValueError, match="41"):
        written_rationales(train, 41, seed=0)


@pytest.mark.slow
def test_heldout_scores_of_val_equal_what_the_run_recorded(finished_run_copy):
    """Scoring a finished run's folders again on val gives exactly the val scores the run recorded for its base
    model and each round's kept epoch: the right adapters are loaded, in the right order. Test scores are
    cached. The run: tests/conftest.py's `finished_run`, 2 rounds, both trained."""
    from illume.heldout import heldout_scores

    cfg = finished_run_copy.config()
    results = json.loads((cfg.run_dir / "results.json").read_text())
    scores = heldout_scores(cfg, ["base", "round_00", "round_01"], split="val")
    assert scores["base"] == json.loads((cfg.run_dir / "base_metrics.json").read_text())
    for folder, row in zip(("round_00", "round_01"), results[1:], strict=True):
        assert {k: scores[folder][k] for k in row["val"]} == row["val"]
    test = heldout_scores(cfg)  # default: test, base and every trained folder
    assert set(test) == {"base", "round_00", "round_01"} and (cfg.run_dir / "heldout_test.json").is_file()
    cached = json.loads((cfg.run_dir / "heldout_test.json").read_text())
    assert cached == test
    with pytest.raises(FileNotFoundError, match="round_05"):
        heldout_scores(cfg, ["round_05"])


@pytest.mark.slow
def test_compare_quick_end_to_end_and_resumes(tmp_path):
    compare = _compare_module()
    docs, out = tmp_path / "docs", tmp_path / "runs"
    args = ["--quick", "--seeds", "2", "--out", str(out), "--docs", str(docs), "--set",
            f"model.cache_dir={tmp_path / 'cache'}"]
    assert compare.main(args) == 0
    text = (docs / "results.md").read_text()
    for heading in ("| variant |", "Paired comparisons", "Data efficiency", "≈ SFT on k questions",
                    "Settings chosen on val", "judgments", "written"):
        assert heading in text, heading
    summary = json.loads((docs / "study.json").read_text())
    assert set(summary["variants"]) == {"illume-sft", "dpo", "sft-4", "sft-8"}
    for variant in summary["variants"].values():
        assert variant["seeds"] == [0, 1] and len(variant["test"]["cider"]) == 2
    assert [r["round"] for r in summary["data_efficiency"]["rounds"]] == [0, 1]
    assert summary["variants"]["sft-8"]["rationales_written"] == 8
    assert set(summary["comparisons"]) == {"dpo", "sft-4", "sft-8"}
    assert summary["chosen"]["dpo"]["setting"] in ("policy.dpo.beta=0.1", "policy.dpo.beta=0.3")
    for name in ("compare_cider.png", "data_efficiency.png"):
        assert (docs / name).stat().st_size > 1000
    # Test scores come from the test split (8 questions per seed in --quick), not val.
    held = json.loads((out / "illume-sft__seed0" / "heldout_test.json").read_text())
    assert set(held) == {"base", "round_00", "round_01"}
    # Every run is reused when asked again: nothing is trained twice.
    walls = {p: p.read_text() for p in out.glob("*/wall_seconds.json")}
    assert len(walls) == 2 + 2 * 2 + 2 * 2  # the sweep's two points, two variants and two ks on two seeds
    assert compare.main(args) == 0
    assert {p: p.read_text() for p in out.glob("*/wall_seconds.json")} == walls
    # --report-only writes the docs from finished runs and says which are missing (here: a third seed).
    report = tmp_path / "report"
    assert compare.main([*args[:-4], "--seeds", "3", "--docs", str(report), "--report-only", *args[-2:]]) == 0
    assert {p: p.read_text() for p in out.glob("*/wall_seconds.json")} == walls  # nothing ran
    text = (report / "results.md").read_text()
    assert "Not finished when this was written" in text and "illume-sft__seed2" in text
