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
    # --jobs' spawned workers import the module by name: scripts/ must be on the path they inherit.
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
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


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    """In the workers, a run that raises (here: its config does not exist) is named with its error; the run
    beside it still reports (not finished: report-only, None)."""
    compare = _compare_module()
    broken = compare.Job("broken", 0, "configs/no_such.yaml", [])
    absent = compare.Job("illume-sft", 0, "configs/demo.yaml", [])
    pool = compare.worker_pool(1)
    try:
        study = compare.Study(tmp_path, compare.QUICK, False, [broken, absent], pool, 1)
        assert study.run_all([(broken, False), (absent, True)]) == [None, None]
    finally:
        pool.shutdown()
    assert list(study.failed) == ["broken__seed0"] and "no_such.yaml" in study.failed["broken__seed0"]
    assert "[study] FAILED broken seed 0" in capsys.readouterr().out


def test_rl_curves_pair_each_rounds_reward_with_its_acceptance():
    compare = _compare_module()
    rows = [{"round": "base"}, {"round": 0, "grpo_reward": -2.0, "grpo_accept": 0.05},
            {"round": 1, "grpo_reward": -1.0, "grpo_accept": 0.04}]
    runs = {"grpo": [{"seed": 1, "results": rows}, {"seed": 0, "results": rows[:2]}],
            "dpo": [{"seed": 0, "results": [{"round": "base"}, {"round": 0, "val": {}}]}]}
    curves = compare.rl_curves(runs)
    assert list(curves) == ["grpo"] and list(curves["grpo"]) == ["0", "1"]
    assert curves["grpo"]["1"] == [{"round": 0, "reward": -2.0, "accept": 5.0},
                                   {"round": 1, "reward": -1.0, "accept": 4.0}]
    lines = compare._rl_lines(curves)
    assert "| grpo | 1 | -2.00 / -1.00 | 5 / 4 |" in lines


def test_pairs_beside_illume_sft_are_paired_on_common_seeds(tmp_path):
    """summarise's PAIRS: GRPO against DPO on the reward model's judgments, on the seeds both ran."""
    compare = _compare_module()

    def run(variant, seed, cider):
        final = {"round": 0, "trained": True, "val": {"cider": cider}, "human_judgments": 400}
        scores = {key: cider for key, _ in compare.METRICS}
        return {"variant": variant, "seed": seed, "setting": [], "seconds": 60.0,
                "results": [{"round": "base"}, final], "test": {"base": scores, "0": scores}}

    runs = ([run("illume-sft", s, 0.9) for s in range(3)] + [run("dpo-rm", s, 0.8 + 0.01 * s) for s in range(3)]
            + [run("grpo", s, 0.6 + 0.02 * s) for s in range(1, 3)] + [run("hf-sft", s, 0.3) for s in range(3)]
            + [run("hf-grpo-trl", s, 0.25 + 0.01 * s) for s in range(3)])
    summary = compare.summarise(runs, [0, 1, 2], {})
    pair = summary["pairs"]["grpo vs dpo-rm"]["cider"]
    assert pair["seeds"] == [1, 2] and pair["difference"] == pytest.approx(100 * (0.62 + 0.64 - 0.81 - 0.82) / 2)
    assert "grpo vs dpo" not in summary["pairs"]  # dpo did not run
    assert set(summary["comparisons"]) == {"dpo-rm", "grpo"}  # the HF demo's: another base model
    assert summary["pairs"]["hf-grpo-trl vs hf-sft"]["cider"]["difference"] == pytest.approx(-4.0)
    compare.write_markdown(summary, tmp_path / "results.md", quick=True, seeds=[0, 1, 2], minutes=1.0, command="x")
    assert "| grpo vs dpo-rm | -18.5 ± " in (tmp_path / "results.md").read_text()


def test_a_stopped_runs_time_so_far_is_kept_and_summed_when_it_resumes(tmp_path, monkeypatch):
    import time

    import illume.loop

    compare = _compare_module()
    job = compare.Job("illume-sft", 0, "configs/demo.yaml", [], score_test=False)

    def stopped(cfg):
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        time.sleep(0.2)
        raise KeyboardInterrupt

    monkeypatch.setattr(illume.loop, "run", stopped)
    with pytest.raises(KeyboardInterrupt):
        compare.run_job(job, tmp_path, compare.QUICK, fresh=False)
    wall_path = tmp_path / job.name / "wall_seconds.json"
    first = json.loads(wall_path.read_text())
    assert first["seconds"] >= 0.2 and "complete" not in first
    monkeypatch.setattr(illume.loop, "run", lambda cfg: time.sleep(0.1) or [{"round": "base", "val": {}}])
    result = compare.run_job(job, tmp_path, compare.QUICK, fresh=False)
    assert json.loads(wall_path.read_text())["complete"] and result["seconds"] >= first["seconds"] + 0.1


def test_the_workers_end_when_the_study_is_killed(tmp_path):
    """A study stopped with SIGKILL (no `finally` runs) leaves no worker training on: each ends within seconds
    of its parent (compare._exit_with_parent)."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "study.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
        "import compare\n"
        "if __name__ == '__main__':\n"
        "    pool = compare.worker_pool(1)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    study = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(study.stdout.readline())
        os.kill(study.pid, signal.SIGKILL)
        study.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{worker}/stat") as stat:  # a zombie waiting for init to reap it has ended too
                if stat.read().split(") ")[1].startswith("Z"):
                    break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived the killed study by 20 s")
    finally:
        study.kill()


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


def _without_times(value):
    """A run's recorded numbers less its wall times (which differ between any two executions)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _run_record(run_dir):
    """What a finished run left: its files (names) and its numbers (results.json, heldout_test.json)."""
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()
                   and p.name not in ("wall_seconds.json",) and "logs" not in p.parts)
    numbers = {name: _without_times(json.loads((run_dir / name).read_text()))
               for name in ("results.json", "heldout_test.json") if (run_dir / name).is_file()}
    return files, numbers


@pytest.mark.slow
def test_compare_quick_end_to_end_and_resumes(tmp_path):
    """The quick study in 2 worker processes, every section present; runs reused when asked again; --jobs 1
    gives the same runs (folders and numbers) as --jobs 2; --report-only runs nothing."""
    compare = _compare_module()
    docs, out = tmp_path / "docs", tmp_path / "runs"
    args = ["--quick", "--seeds", "2", "--out", str(out), "--docs", str(docs), "--set",
            f"model.cache_dir={tmp_path / 'cache'}"]
    assert compare.main([*args, "--jobs", "2"]) == 0
    text = (docs / "results.md").read_text()
    for heading in ("| variant |", "Paired comparisons", "Data efficiency", "≈ SFT on k questions",
                    "Settings chosen on val", "judgments", "written", "The human-effort curve",
                    "share by people (store)"):
        assert heading in text, heading
    summary = json.loads((docs / "study.json").read_text())
    assert set(summary["variants"]) == {"illume-sft", "dpo", "sft-4", "sft-8", "effort-50"}
    for variant in summary["variants"].values():
        assert variant["seeds"] == [0, 1] and len(variant["test"]["cider"]) == 2
    assert [r["round"] for r in summary["data_efficiency"]["rounds"]] == [0, 1]
    assert summary["variants"]["sft-8"]["rationales_written"] == 8
    assert set(summary["comparisons"]) == {"dpo", "sft-4", "sft-8", "effort-50"}
    assert summary["chosen"]["dpo"]["setting"] in ("policy.dpo.beta=0.1", "policy.dpo.beta=0.3")
    # The effort curve: a budget of 6 of the 12 items in each of 2 rounds (round 0 too) is half of the
    # judgments, counted in the store; 100 % is illume-sft; each share paired with illume-sft.
    curve = {point["variant"]: point for point in summary["effort"]}
    assert list(curve) == ["effort-50", "illume-sft"]
    assert curve["effort-50"]["share_per_seed"] == [50.0, 50.0] and curve["effort-50"]["judgments"] == 12
    assert curve["illume-sft"]["share_per_seed"] == [100.0, 100.0] and curve["illume-sft"]["nominal"] == 100
    assert curve["effort-50"]["vs_people"]["seeds"] == [0, 1] and curve["illume-sft"]["vs_people"] is None
    for name in ("compare_cider.png", "data_efficiency.png", "effort_curve.png"):
        assert (docs / name).stat().st_size > 1000
    # Test scores come from the test split (8 questions per seed in --quick), not val.
    held = json.loads((out / "illume-sft__seed0" / "heldout_test.json").read_text())
    assert set(held) == {"base", "round_00", "round_01"}
    # Every run is reused when asked again: nothing is trained twice.
    walls = {p: p.read_text() for p in out.glob("*/wall_seconds.json")}
    assert len(walls) == 2 + 2 * 2 + 2 * 2 + 2  # the sweep's two points, two variants and two ks, one share
    assert compare.main(args) == 0
    assert {p: p.read_text() for p in out.glob("*/wall_seconds.json")} == walls
    assert json.loads((out / "study_wall.json").read_text())["minutes"] > 0
    # --jobs 1 (one after another, in this process) makes the same runs as --jobs 2 did: same folders, same
    # numbers (the sweep, its choice, a variant and the effort curve).
    serial = tmp_path / "serial"
    assert compare.main(["--quick", "--seeds", "2", "--out", str(serial), "--docs", str(tmp_path / "docs1"),
                         "--only", "dpo,effort", "--jobs", "1", *args[-2:]]) == 0
    names = sorted(p.parent.name for p in serial.glob("*/wall_seconds.json"))
    assert names == sorted(n for n in (p.parent.name for p in walls) if n.startswith(("dpo", "effort")))
    for name in names:
        assert _run_record(serial / name) == _run_record(out / name), name
    serial_summary = json.loads((tmp_path / "docs1" / "study.json").read_text())
    for name in ("dpo", "effort-50"):
        assert serial_summary["variants"][name]["test"] == summary["variants"][name]["test"]
    # --report-only writes the docs from finished runs and says which are missing (here: a third seed).
    report = tmp_path / "report"
    wall = (out / "study_wall.json").read_text()
    assert compare.main([*args[:-4], "--seeds", "3", "--docs", str(report), "--report-only", *args[-2:]]) == 0
    assert {p: p.read_text() for p in out.glob("*/wall_seconds.json")} == walls  # nothing ran
    # ... and it states the study's wall clock so far, adding nothing to it.
    assert (out / "study_wall.json").read_text() == wall
    reported = json.loads((report / "study.json").read_text())["study_wall_minutes"]
    assert reported == json.loads(wall)["minutes"] > 0
    text = (report / "results.md").read_text()
    assert "Not finished when this was written" in text and "illume-sft__seed2" in text
    # A finished run made with other settings than the study's is not reported: it fails, naming the setting,
    # and is not run again over the old one.
    assert compare.main([*args, "--only", "dpo", "--set", "policy.dpo.sft_weight=0.5", "--docs",
                         str(tmp_path / "changed")]) == 1
    assert {p: p.read_text() for p in out.glob("*/wall_seconds.json")} == walls
    failed = json.loads((tmp_path / "changed" / "study.json").read_text())["failed"]
    assert "dpo__seed0" in failed and "policy.dpo.sft_weight 0.0 -> 0.5" in failed["dpo__seed0"]
