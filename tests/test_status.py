"""`illume status`: agreement statistics and per-person figures."""

import pytest

from illume.data.records import Candidate, CandidateSet
from illume.feedback.store import FeedbackStore
from illume.status import krippendorff_alpha_nominal, summarize


def test_alpha_matches_krippendorffs_worked_example():
    """Krippendorff (2011), 'Computing Krippendorff's Alpha-Reliability', binary data, two observers:
    A = 0100000010, B = 1110010000 gives alpha = 0.095."""
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert krippendorff_alpha_nominal([[x, y] for x, y in zip(a, b)]) == pytest.approx(0.095, abs=5e-4)


def test_alpha_edge_cases():
    assert krippendorff_alpha_nominal([[1, 1], [0, 0], [1, 1, 1]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([[1, 0], [0, 1]]) < 0  # systematic disagreement
    assert krippendorff_alpha_nominal([[1], [0]]) is None  # nothing pairable
    assert krippendorff_alpha_nominal([[1, 1], [1, 1]]) is None  # no variation: undefined


def test_summary_counts_people_and_agreement(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    sets = [CandidateSet(f"ex{i}", "red", "red", "Q: q A: red, seeing that", 7,
                         [Candidate("the circle is red", 0.3, 7, 0, -1.0), Candidate("a square", 0.8, 7, 1, -2.0)])
            for i in range(3)]
    store.add_candidate_sets(0, "train", sets)
    for i in range(3):
        store.add_judgment(0, f"ex{i}", "ann", ["the circle is red"], seconds=2.0 + i)
        store.add_judgment(0, f"ex{i}", "bob", ["the circle is red"] if i < 2 else [], none_fit=i == 2, seconds=4.0)
    summary = summarize(store)
    r0 = summary["rounds"][0]
    assert (r0["items"], r0["judged_items"], r0["judgments"]) == (3, 3, 6)
    # units: 3 items x 2 candidates; ann and bob disagree only on ex2's first candidate
    expected = krippendorff_alpha_nominal([[1, 1], [0, 0], [1, 1], [0, 0], [1, 0], [0, 0]])
    assert r0["alpha"] == pytest.approx(expected)
    assert summary["people"]["ann"] == {"kind": "person", "judgments": 3, "total_seconds": 9.0, "median_seconds": 3.0}
    # ex2's first candidate: ann accepts, bob rejects: a tie, contested by majority and unanimous, accepted by any.
    assert r0["items_with_accepted"] == 2
    assert summarize(store, aggregate="unanimous")["rounds"][0]["items_with_accepted"] == 2
    assert summarize(store, aggregate="any")["rounds"][0]["items_with_accepted"] == 3
    assert summary["people"]["bob"]["judgments"] == 3


def test_status_command_prints_rounds_and_people(tmp_path, capsys):
    from illume.cli import main

    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_candidate_sets(0, "train", [CandidateSet("ex0", "red", "red", "Q: q A: red, seeing that", 1,
                                                       [Candidate("the circle is red", 0.3, 1, 0, -1.0)])])
    store.add_judgment(0, "ex0", "ada", ["the circle is red"], seconds=3.0)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Rounds" in out and "ada" in out and "3.0" in out


def test_online_rl_figures_show_in_status_and_the_round_table(tmp_path):
    """A GRPO round's reward, simulated acceptance and KL are columns wherever rounds are listed."""
    from rich.console import Console

    from illume.loop import results_table
    from illume.status import print_status

    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_candidate_sets(0, "train", [CandidateSet("ex0", "red", "red", "Q: q A: red, seeing that", 1,
                                                       [Candidate("the circle is red", 0.3, 1, 0, -1.0)])])
    store.set_round_metrics(0, {"grpo_reward": 0.25, "grpo_accept": 0.125, "grpo_kl": 0.002})
    console = Console(record=True, width=200)
    summary = print_status(store, console)
    assert summary["rounds"][0]["grpo_reward"] == 0.25
    text = console.export_text()
    assert "sim. accept %" in text and "12.5" in text and "0.0020" in text
    rows = [{"round": "base", "val": {}}, {"round": 0, "val": {}, "grpo_reward": 0.25, "grpo_accept": 0.5}]
    console = Console(record=True, width=200)
    console.print(results_table(rows))
    text = console.export_text()
    assert "reward" in text and "50.0" in text
    console = Console(record=True, width=200)
    console.print(results_table(rows[:1]))  # other policies: no such columns
    assert "sim. accept" not in console.export_text()
