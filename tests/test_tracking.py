"""train.report_to: the loop's round table, the trainers' losses and the annotation progress reach the trackers
(read back from TensorBoard's event files), results.json does not change, and bad names fail early."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

from illume.cli import main
from illume.config import ConfigError, PolicyConfig, RunConfig, load_config
from illume.critics import CritiqueContext, WebCritic
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import PreferencePair
from illume.tracking import report_names, round_scalars, tracking_dir, trainer_report
from policies.dpo import train_dpo
from tests import test_grpo_trl
from tests.conftest import REPO, TINY_MODEL, tiny_overrides
from tests.test_reward import candidate_set, example

questions = test_grpo_trl.questions  # the fixture: three train questions, one val question
EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator

# As tests/test_loop.py: the random tiny model's rationales pass a low threshold, so rounds train.
LOOP = ["critic.threshold=0.1", "loop.stop_when_nothing_new=false", "train.num_epochs=2", "train.batch_size=8",
        "sample.samples_per_temperature=2", "sample.max_new_tokens=6", "loop.num_rounds=2"]


def _config(root, name: str, *extra: str) -> list[str]:
    return [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(root, own_cache=True), *LOOP, f"name={name}", *extra]


def _scalars(folder) -> dict[str, dict[int, list[float]]]:
    """Every scalar in the event files of `folder`: tag -> step -> values (in the order written)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            out.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny 2-round run with train.report_to none and tensorboard (the base model cached first, so
    both load it alike)."""
    root = tmp_path_factory.mktemp("tracking")
    # Pre-training reports too (train.* is not part of the base model's cache key: both runs load this one).
    assert main(["pretrain", *_config(root, "warm", "train.report_to=tensorboard")]) == 0
    assert main(["run", *_config(root, "plain")]) == 0
    assert main(["run", *_config(root, "tracked", "train.report_to=tensorboard")]) == 0
    return root / "runs" / "plain", root / "runs" / "tracked"


@pytest.mark.slow
def test_pretraining_reports_its_loss(two_runs):
    logged = _scalars(tracking_dir(two_runs[0].parent / "warm") / "pretrain")
    assert {"train/loss", "train/learning_rate", "train/train_loss"} <= set(logged)
    assert sorted(logged["train/loss"]) == list(range(1, 21))  # 20 steps, logged every num_steps // 20


@pytest.mark.slow
def test_the_round_table_and_the_sft_loss_reach_tensorboard(two_runs):
    _, run_dir = two_runs
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["round"] for row in results] == ["base", 0, 1]
    logged = _scalars(tracking_dir(run_dir) / "loop")
    # Every number of every round's row (val scores, acceptance, judgments, ...) at step = the round index.
    for row in results[1:]:
        expected = round_scalars(row)
        assert {"round/accepted_pct", "round/judgments", "round/human_judgments", "round/train_rationales",
                "round/val/rouge_l", "round/val/cider", "round/val/answer_accuracy"} <= set(expected)
        for tag, value in expected.items():
            assert logged[tag][row["round"]] == [pytest.approx(value, rel=1e-6, abs=1e-6)], tag
    for tag, value in round_scalars(results[0]).items():  # the base model's val scores
        assert tag.startswith("base/val/") and logged[tag][0] == [pytest.approx(value, rel=1e-6, abs=1e-6)]
    # Each round's selection-SFT trainer in its own folder: its loss, as its training.json logged it.
    for round_idx in (0, 1):
        history = json.loads((run_dir / f"round_{round_idx:02d}" / "training.json").read_text())["log_history"]
        summary = next(entry for entry in history if "train_loss" in entry)
        trainer_logged = _scalars(tracking_dir(run_dir) / f"round_{round_idx:02d}")
        assert trainer_logged["train/train_loss"][summary["step"]] == [pytest.approx(summary["train_loss"],
                                                                                     rel=1e-6)]
        assert set(trainer_logged) >= {"train/train_runtime", "train/epoch"}


@pytest.mark.slow
def test_results_json_is_the_same_with_and_without_tracking(two_runs):
    """results.json holds no wall-clock figure (illume.loop.WALL_CLOCK_KEYS): compared byte for byte."""
    plain, tracked = two_runs
    assert (tracked / "results.json").read_bytes() == (plain / "results.json").read_bytes()
    assert not tracking_dir(plain).exists()  # report_to=none writes nothing
    for round_idx in (0, 1):  # the trainers computed the same losses too
        losses = [json.loads((run / f"round_{round_idx:02d}" / "training.json").read_text())["losses"]
                  for run in (plain, tracked)]
        assert losses[0] == losses[1]


@pytest.mark.slow
def test_dpo_reports_its_loss_and_margins(tiny_vlm, tmp_path):
    """DPO's HF Trainer reports through trainer_report: per-step loss, learning rate and DPO's own metrics."""
    examples = {k: example(k) for k in ("e1", "e2", "e3", "e4")}
    pairs = [PreferencePair(e.id, f"Q: {e.question} A: red, seeing that", e.explanations[0], bad, 0)
             for e in examples.values() for bad in ("the sky is blue", "two dogs")]
    cfg = load_config(REPO / "configs" / "demo.yaml", [*TINY_MODEL, f"output_dir={tmp_path}", "name=dpo_run",
                                                       "train.report_to=tensorboard", "train.batch_size=1",
                                                       "train.num_epochs=2", "sample.max_new_tokens=4"])
    out_dir = cfg.run_dir / "dpo"
    # 8 pairs x 2 epochs = 16 steps at batch 1: the Trainer logs at step 10 (logging_steps) and at the end.
    result = train_dpo(tiny_vlm, pairs, examples, PolicyConfig(kind="dpo"), cfg.train, out_dir,
                       report=trainer_report(cfg, out_dir))
    logged = _scalars(tracking_dir(cfg.run_dir) / "dpo")
    assert logged["train/loss"] == {10: [pytest.approx(result.trained.losses[0], rel=1e-6)]}
    assert logged["train/rewards/margins"][10] == [pytest.approx(result.training["margins"][0], rel=1e-6)]
    assert 10 in logged["train/learning_rate"] and 16 in logged["train/train_loss"]


def test_the_reward_model_reports_its_loss(tiny_vlm, tmp_path):
    from illume.config import save_config
    from tests.test_reward import _run_dir

    run_dir = _run_dir(tmp_path, tiny_vlm)
    save_config(load_config(run_dir / "config.yaml", ["train.report_to=tensorboard"]), run_dir / "config.yaml")
    assert main(["reward", "train", str(run_dir), "--round", "0"]) == 0
    losses = json.loads((run_dir / "reward" / "training.json").read_text())["losses"]
    logged = _scalars(tracking_dir(run_dir) / "reward")
    assert [values for _, values in sorted(logged["train/loss"].items())] == [[pytest.approx(v, rel=1e-6)]
                                                                                for v in losses]


def test_trls_grpo_reports_its_loss(questions, tmp_path):
    from illume.demo.tiny_models import build_tiny_hf_vlm

    cfg = test_grpo_trl._cfg(tmp_path, "train.report_to=tensorboard")
    test_grpo_trl._round(cfg, build_tiny_hf_vlm("qwen2_vl"), questions, tmp_path,
                         {"probe": test_grpo_trl._length_source()})
    steps = json.loads((tmp_path / "round_00" / "training.json").read_text())["steps"]
    logged = _scalars(tracking_dir(cfg.run_dir) / "round_00")  # the round folder lies outside the run here
    # TRL's GRPO metrics (reward, KL, ...) and ours (answer_nll) beside the loss, at its one step.
    assert {"train/train_loss", "train/reward", "train/kl", "train/answer_nll"} <= set(logged)
    assert list(logged["train/train_loss"]) == [len(steps)] == [1]


def test_the_web_critic_reports_annotation_progress_while_it_waits(tmp_path, monkeypatch):
    cfg = RunConfig(output_dir=str(tmp_path), name="people")
    cfg = replace(cfg, critic=replace(cfg.critic, kind="person", wait=True, poll_seconds=0.01))
    with FeedbackStore(tmp_path / "feedback.db") as store:
        store.add_candidate_sets(0, "train", [candidate_set("e1", ["A", "B"]), candidate_set("e2", ["C"])])
        people = iter([("e1", ["A"]), ("e2", [])])

        def someone_judges(seconds):  # each poll of the loop finds one more judgment
            example_id, accepted = next(people)
            store.add_judgments(0, [(example_id, accepted, not accepted, None)], "alice")

        monkeypatch.setattr("illume.critics.time.sleep", someone_judges)
        logged = []
        context = CritiqueContext(cfg, store, 0, {cs.example_id: cs for cs in store.candidate_sets(0, "train")},
                                  {k: example(k) for k in ("e1", "e2")}, say=lambda text: None,
                                  track=lambda metrics, step: logged.append((step, metrics)))
        assert WebCritic(cfg).review(context).done
    assert [(step, m["annotation/judged"], m["annotation/needed"], m["annotation/complete_items"])
            for step, m in logged] == [(0, 0, 2, 0), (0, 1, 2, 1), (0, 2, 2, 2)]
    assert all(m["annotation/items"] == 2 for _, m in logged)


@pytest.mark.parametrize(("value", "message"), [
    ("tensorbord", "train.report_to: unknown integration(s) 'tensorbord'"),
    ("[none,tensorboard]", "train.report_to=['none', 'tensorboard']: 'none' and 'all' stand alone"),
])
def test_a_bad_report_to_fails_before_any_work_naming_the_key(tmp_path, capsys, value, message):
    assert main(["run", *_config(tmp_path, "bad", f"train.report_to={value}")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "bad" / "feedback.db").exists()  # nothing was started


def test_a_missing_package_names_the_extra_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"train.report_to=tensorboard needs `pip install illume-vlm\[tensorboard\]`"):
        report_names("tensorboard")


def test_report_to_takes_a_name_a_list_none_and_all():
    assert report_names("none") == [] and report_names(["none"]) == []
    assert report_names("tensorboard") == report_names(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert "tensorboard" in report_names("all")
    cfg = load_config(REPO / "configs" / "demo.yaml", ["train.report_to=[tensorboard]", "name=x"])
    report = trainer_report(cfg, cfg.run_dir / "reward" / "round_01")
    assert report.logdir == tracking_dir(cfg.run_dir) / "reward" / "round_01"
    assert report.arguments() == {"report_to": "none", "run_name": "x/reward/round_01", "project": "x"}
    assert [type(c).__name__ for c in report.callbacks()] == ["TensorBoardCallback"]


@pytest.mark.slow
def test_the_loops_trackers_are_closed_when_a_round_fails(two_runs, monkeypatch):
    """A round that raises still closes the trackers (TensorBoard files flushed, remote runs ended)."""
    import illume.loop
    from illume.tracking import RunTracker

    closed = []

    class Recording(RunTracker):
        def close(self) -> None:
            closed.append(True)

    def failing_round(*args, **kwargs):
        raise RuntimeError("the round failed")

    monkeypatch.setattr(illume.loop, "open_tracker", lambda cfg, say: Recording())
    monkeypatch.setattr(illume.loop, "sample_round", failing_round)
    root = two_runs[0].parent.parent
    cfg = load_config(REPO / "configs" / "demo.yaml", [*tiny_overrides(root), *LOOP, "name=failing"])
    with pytest.raises(RuntimeError, match="the round failed"):
        illume.loop.run(cfg)
    assert closed == [True]
