"""The ILLUME loop end to end on a tiny model: rounds, results, resuming after kill -9 without loss or duplicates."""

import json
import os
import signal
import subprocess
import sys

import pytest

from illume.cli import main
from illume.feedback.store import FeedbackStore
from tests.conftest import REPO, tiny_overrides

# The random tiny model's rationales score low: a threshold of 0.1 still selects, and lets rounds train.
LOOP = ["critic.threshold=0.1", "loop.stop_when_nothing_new=false", "train.num_epochs=2", "train.batch_size=8",
        "sample.samples_per_temperature=2", "sample.max_new_tokens=6"]


def _config(tmp_path, name, rounds):
    return [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *LOOP, f"name={name}",
            f"loop.num_rounds={rounds}"]


def _judgments(run_dir):
    store = FeedbackStore(run_dir / "feedback.db")
    rows = [(r["round_idx"], r["example_id"], r["annotator"], r["text"], r["accepted"], r["none_fit"])
            for r in store.judgments_table()]
    return sorted(rows)


def test_run_completes_two_rounds(finished_run_copy):
    """The session's finished run (tests/conftest.py: `finished_run`): 2 rounds with this file's LOOP settings."""
    assert set(LOOP) <= set(finished_run_copy.args)
    run_dir = finished_run_copy.run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1]
    for r in results[1:]:
        assert r["trained"] and r["judgments"] > 0 and {"bleu_4", "rouge_l", "cider"} <= set(r["val"])
    assert results[2]["judgments"] == 2 * 12  # one simulated judgment per train question per round
    for round_idx in (0, 1):
        folder = run_dir / f"round_{round_idx:02d}"
        for name in ("adapters.safetensors", "metrics.json", "training_set.jsonl", "training.json"):
            assert (folder / name).is_file(), folder / name
    assert (run_dir / "config.yaml").is_file()
    # Running the finished run again changes nothing.
    before = _judgments(run_dir)
    assert main(["run", *finished_run_copy.args]) == 0
    assert _judgments(run_dir) == before


@pytest.mark.slow
def test_a_first_round_that_accepts_nothing_stops_the_run_cleanly(tmp_path):
    """Round 0 accepts nothing (ROUGE-L 1.0: a copy of a reference, which the barely trained model never writes): the run stops after it, writing its round
    metrics (the round has no folder of its own until something trains) and results.json."""
    args = [str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *LOOP[2:], "critic.threshold=1.0",
            "name=none", "loop.num_rounds=3"]
    assert main(["run", *args]) == 0
    run_dir = tmp_path / "runs" / "none"
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0]
    assert results[1]["trained"] is False and results[1]["new_rationales"] == 0
    assert json.loads((run_dir / "round_00" / "metrics.json").read_text())["trained"] is False
    assert main(["run", *args]) == 0  # run again: resumes from the metrics and stops at the same place
    assert [r["round"] for r in json.loads((run_dir / "results.json").read_text())] == ["base", 0]


@pytest.mark.slow
def test_kill_during_training_then_rerun_loses_and_duplicates_nothing(tmp_path):
    main(["pretrain", *_config(tmp_path, "warm", 3)])  # cache the base model for both runs
    assert main(["run", *_config(tmp_path, "clean", 3)]) == 0

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "illume.cli", "run", *_config(tmp_path, "killed", 3)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        for line in process.stdout:
            if "round 1: training on" in line:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    run_dir = tmp_path / "runs" / "killed"
    if (run_dir / "round_01" / "metrics.json").exists():
        pytest.fail("the kill came after round 1 finished; the test did not interrupt training")
    assert (run_dir / "round_01" / "training_set.jsonl").is_file()  # it was training

    assert main(["run", *_config(tmp_path, "killed", 3)]) == 0
    clean, resumed = _judgments(tmp_path / "runs" / "clean"), _judgments(run_dir)
    assert resumed == clean
    keys = [(r, e, a, t) for r, e, a, t, _, _ in resumed]
    assert len(keys) == len(set(keys))  # no judgment twice
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1, 2]
    # The same command gives the same results.json, byte for byte, killed and resumed or not (wall-clock
    # times live in each round's metrics.json).
    assert (run_dir / "results.json").read_bytes() == (tmp_path / "runs" / "clean" / "results.json").read_bytes()
    assert json.loads((run_dir / "round_02" / "metrics.json").read_text())["seconds"] > 0


def test_malformed_dataset_fails_with_file_and_row_named(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"image": "a.png", "question": "q?", "answer": "yes"}\n{"image": "b.png", "answer": "no"}\n')
    code = main(["run", *_config(tmp_path, "bad", 1), "data.kind=jsonl", f"data.train_path={bad}",
                 f"data.val_path={bad}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "line 2" in err and "question" in err


@pytest.mark.slow
def test_human_web_critic_stops_waiting_then_continues_from_the_store(tmp_path, capsys):
    args = ["run", *_config(tmp_path, "people", 2), "critic.kind=person", "critic.wait=false"]
    assert main(args) == 0
    assert "illume annotate" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "people"
    assert not (run_dir / "round_00" / "metrics.json").exists()
    store = FeedbackStore(run_dir / "feedback.db")
    sets = store.candidate_sets(0)
    assert len(sets) == 12 and all((run_dir / "images" / f"{cs.example_id}.png").is_file() for cs in sets)
    for cs in sets:  # a person accepts the first candidate of every item
        assert store.add_judgment(0, cs.example_id, "alice", [cs.candidates[0].text])
    assert main(args) == 0  # trains round 0, samples round 1, stops to wait again
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0]
    assert results[1]["train_rationales"] == 12 and results[1]["trained"]
    assert store.is_sampled(1) and store.round_counts(1)["judgments"] == 0


@pytest.mark.slow
def test_terminal_critic_records_each_answer(tmp_path, monkeypatch):
    replies = iter(["x", "9", "1 2"] + ["0"] * 20)  # two bad replies first, re-asked; then 1 and 2; then none
    monkeypatch.setattr("rich.prompt.Prompt.ask", lambda *a, **k: next(replies))
    args = ["run", *_config(tmp_path, "ssh", 1), "critic.kind=person", "critic.ui=terminal", "critic.annotator=bob",
            "sample.samples_per_temperature=3"]
    assert main(args) == 0
    store = FeedbackStore(tmp_path / "runs" / "ssh" / "feedback.db")
    rows = store.judgments_table()
    assert {r["annotator"] for r in rows} == {"bob"}
    first = min((r for r in rows), key=lambda r: r["created_at"])["example_id"]
    accepted_first = sorted(r["text"] for r in rows if r["example_id"] == first and r["accepted"])
    shown_first = store.candidate_sets(0)[[cs.example_id for cs in store.candidate_sets(0)].index(first)]
    assert accepted_first == sorted(c.text for c in shown_first.candidates[:2])
    others = [r for r in rows if r["example_id"] != first]
    assert others and all(r["none_fit"] and not r["accepted"] for r in others)
    assert all(r["seconds"] is not None for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reward", "hybrid"])
def test_reward_and_hybrid_critics_take_over_after_the_people_rounds(tmp_path, kind):
    args = ["run", *_config(tmp_path, kind, 2), f"critic.kind={kind}", "reward.people_rounds=1",
            "reward.num_epochs=1", "reward.batch_size=8", "reward.hybrid_band=0.05"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / kind
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1]
    judgments = _judgments(run_dir)
    with FeedbackStore(run_dir / "feedback.db") as store:
        kinds = store.annotator_kinds()  # who judged is stored data, not a name prefix
    assert kinds == {"simulated:rouge_l>=0.1": "simulated", f"reward:{kind}": "reward"}, kinds
    people = {(r, e) for r, e, a, *_ in judgments if kinds[a] == "simulated"}
    by_rm = {(r, e) for r, e, a, *_ in judgments if kinds[a] == "reward"}
    assert {r for r, _ in people} >= {0} and not {r for r, _ in by_rm} & {0}  # round 0: people only
    assert len({e for r, e in people | by_rm if r == 1}) == 12  # every round-1 item judged once, by someone
    assert not people & by_rm
    if kind == "reward":
        assert {e for r, e in by_rm if r == 1} and not {e for r, e in people if r == 1}
    assert results[2]["human_judgments"] == len(people)
    assert "rm_threshold" in results[2] and (run_dir / "reward" / "round_01" / "reward_critic.json").is_file()
