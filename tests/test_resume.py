"""Continuing a run: with the settings it was started with, or with a change that is allowed and recorded."""

import json

import pytest

from illume.cli import main
from illume.config import load_config
from illume.feedback.store import FeedbackStore
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture
def run(finished_run_copy):
    """A copy of the session's finished run for one test to change (tests/conftest.py: `finished_run`: 2 rounds,
    critic.threshold=0.1, sample.samples_per_temperature=2): (its folder, the arguments that continue it)."""
    return finished_run_copy.run_dir, finished_run_copy.args


def _rounds(run_dir) -> list:
    return [r["round"] for r in json.loads((run_dir / "results.json").read_text())]


def test_same_settings_resume(run):
    run_dir, args = run
    assert main(["run", *args]) == 0
    assert _rounds(run_dir) == ["base", 0, 1]
    assert not (run_dir / "settings_changes.jsonl").exists()


@pytest.mark.slow
def test_more_rounds_resume(run):
    run_dir, args = run
    assert main(["run", *args, "loop.num_rounds=3"]) == 0
    assert _rounds(run_dir) == ["base", 0, 1, 2]
    assert not (run_dir / "settings_changes.jsonl").exists()


def test_settings_that_do_not_change_results_may_differ(run):
    run_dir, args = run
    neutral = ["critic.wait=false", "annotate.port=9999", "annotate.host=0.0.0.0", "sample.batch_size=3",
               "train.gradient_checkpointing=true", "loop.patience=2"]
    assert main(["run", *args, *neutral]) == 0
    assert not (run_dir / "settings_changes.jsonl").exists()


def test_changed_settings_refuse_naming_each_key_and_leave_the_run_untouched(run, capsys):
    run_dir, args = run
    before = {name: (run_dir / name).read_bytes() for name in ("feedback.db", "config.yaml", "results.json")}
    changed = ["sample.samples_per_temperature=3", "critic.threshold=0.2", "loop.num_rounds=3"]
    assert main(["run", *args, *changed]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {run_dir} was started with other settings: "
                          "sample.samples_per_temperature 2 -> 3; critic.threshold 0.1 -> 0.2;")
    assert "loop.allow_changed_settings=true" in err and "num_rounds" not in err
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (run_dir / "round_02").exists()


@pytest.mark.slow
def test_allowed_change_continues_and_is_recorded(run):
    run_dir, args = run
    changed = [*args, "sample.samples_per_temperature=3", "loop.num_rounds=3"]
    assert main(["run", *changed, "loop.allow_changed_settings=true"]) == 0
    assert _rounds(run_dir) == ["base", 0, 1, 2]
    assert FeedbackStore(run_dir / "feedback.db").is_sampled(2)
    records = [json.loads(line) for line in (run_dir / "settings_changes.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["from_round"] == 2
    assert records[0]["changes"] == {"sample.samples_per_temperature": {"old": 2, "new": 3}}
    # config.yaml holds the settings the run goes on with, so the same command continues without the opt-in.
    assert load_config(run_dir / "config.yaml").sample.samples_per_temperature == 3
    assert main(["run", *changed]) == 0


def test_fewer_rounds_may_not_drop_finished_ones():
    from illume.resume import setting_changes

    old = load_config(DEMO, ["loop.num_rounds=4"])
    assert setting_changes(old, load_config(DEMO, ["loop.num_rounds=6"]), finished_rounds=3) == {}
    assert setting_changes(old, load_config(DEMO, ["loop.num_rounds=3"]), finished_rounds=3) == {}
    assert setting_changes(old, load_config(DEMO, ["loop.num_rounds=2"]), finished_rounds=3) == {
        "loop.num_rounds": (4, 2)}


def test_where_things_are_kept_is_not_a_change():
    from illume.resume import setting_changes

    old = load_config(DEMO, ["model.cache_dir=/a", "output_dir=runs", "name=x"])
    new = load_config(DEMO, ["output_dir=/elsewhere", "name=y", "loop.allow_changed_settings=true"])
    assert setting_changes(old, new, finished_rounds=0) == {}


def test_pretrain_and_baseline_leave_a_started_runs_config_alone(run):
    run_dir, args = run
    before = (run_dir / "config.yaml").read_text()
    assert main(["pretrain", *args, "sample.samples_per_temperature=3"]) == 0
    assert (run_dir / "config.yaml").read_text() == before
