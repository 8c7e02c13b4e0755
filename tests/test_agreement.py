"""The admin page's statistics (illume.feedback.agreement): alpha against the `krippendorff` package, and
summaries, disagreements and the reward model's scores on one store built through the public API.

The store (`team`), candidates c0, c1, c2 per item; alice, bob, carol are persons, sim is simulated (both
count as people), "gpt" is an AI judge and "reward:rm" the reward model (neither counts by default):

    round 0  e1: alice {c0} 10s, bob {c0} 5s (revised later, same choice), gpt {c2}, reward {c0, c1}
             e2: alice {c0} 20s, bob {c1} 7s,                                      reward {c1}
             e3: alice none fits 60s, bob none fits (no time), carol {c2} 12s,     reward {}
             e4: alice {c1} (no time)
    round 1  f1: alice {c0} 4s, sim {c0} 2s, reward {}        f2: not judged
    round 2  3 items (items_per_round only), none judged

Alpha by hand, units = candidates seen by >= 2 counted annotators, values accepted 1 / rejected 0:
- round 0: e1 (1,1) (0,0) (0,0); e2 (1,0) (0,1) (0,0); e3 (0,0,0) (0,0,0) (0,0,1); e4 is not pairable.
  n_1 = 5, n_0 = 16, n = 21; o_11 = 2 (e1 c0), o_00 = 2+2+2+3+3+1 = 13.
  alpha = 1 - (n-1)(n - o_11 - o_00) / (n^2 - n_1^2 - n_0^2) = 1 - 20*6/(441-25-256) = 1 - 120/160 = 0.25.
- round 1: every unit unanimous: alpha = 1.
- pooled: n_1 = 7, n_0 = 20, n = 27, diagonal 21: 1 - 26*6/(729-49-400) = 1 - 156/280 = 31/70.

The reward model against people's majority: e1 c0 tp, c1 fp, c2 tn; e2 c0 and c1 contested (1-1, skipped),
c2 tn; e3 tn x3; f1 c0 fn, c1 tn, c2 tn: tp 1, fp 1, fn 1, tn 7.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from datetime import datetime, timezone

import krippendorff
import numpy as np
import pytest

from illume.data.records import Candidate, CandidateSet
from illume.feedback import figures
from illume.feedback.agreement import (
    agreement,
    disagreements,
    item_detail,
    krippendorff_alpha,
    reward_vs_people,
)
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import PEOPLE
from tests.team_summary_oracle import team_summary
from tests.test_figures import approx

REVISED_AT = datetime(2100, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
HAS_CORRECTION = "correction" in inspect.signature(FeedbackStore.add_judgment).parameters


# -------------------------------------------------------------------- Krippendorff's alpha


def _package_alpha(matrix: np.ndarray) -> float | None:
    """The krippendorff package's nominal alpha of a coders x units matrix; None where it is undefined.

    The package refuses data with no pairable unit or one value overall (ValueError), and returns nan
    (0/0) when the values of pairable units are all one value but an unpairable unit has another.
    """
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            alpha = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"))
    except ValueError:  # "more than one value in the domain" / "at least one unit with two coders"
        return None
    return None if np.isnan(alpha) else alpha


def test_alpha_equals_the_krippendorff_package_on_random_data():
    """Many random coders x units matrices with missing values, as arrays, lists with None and dicts."""
    rng = np.random.default_rng(0)
    defined = undefined = 0
    for trial in range(400):
        coders, units = int(rng.integers(2, 7)), int(rng.integers(1, 40))
        categories = int(rng.integers(1, 6))
        matrix = rng.integers(0, categories, size=(coders, units)).astype(float)
        matrix[rng.random((coders, units)) < rng.uniform(0.0, 0.7)] = np.nan
        expected = _package_alpha(matrix)
        as_lists = [[None if np.isnan(v) else int(v) for v in unit] for unit in matrix.T]
        as_dicts = [{f"coder{c}": v for c, v in enumerate(unit) if v is not None} for unit in as_lists]
        for given in (matrix.T, as_lists, as_dicts):
            got = krippendorff_alpha(given)
            if expected is None:
                assert got is None, (trial, matrix)
            else:
                assert got == pytest.approx(expected, abs=1e-9, rel=0), (trial, matrix)
        defined += expected is not None
        undefined += expected is None
    assert defined > 300 and undefined > 5  # both branches were really exercised


def test_alpha_hand_values():
    """Perfect agreement is 1; two coders on four binary units (1,1) (0,0) (1,0) (1,1): n_1 = 5, n_0 = 3,
    o_11 = 4, o_00 = 2, alpha = 1 - 7*(8-6)/(64-25-9) = 1 - 14/30 = 8/15; Krippendorff (2011, "Computing
    Krippendorff's alpha-reliability", section C: 4 coders, 12 units, missing data) gives 0.743."""
    assert krippendorff_alpha([[1, 1], [2, 2, 2], ["x", "x"]]) == 1.0
    assert krippendorff_alpha([[1, 1], [0, 0], [1, 0], [1, 1]]) == pytest.approx(8 / 15, abs=1e-12)
    assert krippendorff_alpha([[1, 0], [0, 1]]) < 0  # systematic disagreement
    n = None
    textbook = [[1, 1, n, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
                [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [n, 5, 5, 5], [n, n, 1, 1], [n, 3, n, n]]
    assert round(krippendorff_alpha(textbook), 3) == 0.743
    assert krippendorff_alpha(textbook) == pytest.approx(113 / 152, abs=1e-12)


def test_alpha_undefined_is_none():
    assert krippendorff_alpha([]) is None
    assert krippendorff_alpha([[1], [2, None], {"a": 3}]) is None  # no pairable unit
    assert krippendorff_alpha([[1, 1], [1, 1, 1]]) is None  # one value throughout
    assert krippendorff_alpha([[1, 1], [2], [None, float("nan")]]) is None  # the 2 is not pairable


# -------------------------------------------------------------------- a team's store


def candidate_set(example_id: str) -> CandidateSet:
    return CandidateSet(example_id, "red", "red", f"Q: what colour is {example_id}? A: red, seeing that", 7,
                        [Candidate(f"because {example_id} {k}", 0.7, 7, k, -1.0 - k) for k in range(3)])


@pytest.fixture
def team(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_candidate_sets(0, "train", [candidate_set(e) for e in ("e1", "e2", "e3", "e4")],
                             questions={e: f"what colour is {e}?" for e in ("e1", "e2", "e3")})
    store.add_candidate_sets(1, "train", [candidate_set(e) for e in ("f1", "f2")])
    ids = {**store.candidate_ids(0), **store.candidate_ids(1)}

    def judge(round_idx, example_id, annotator, accepted, seconds=None, kind="person", none_fit=False):
        assert store.add_judgment(round_idx, example_id, annotator, [ids[example_id][k] for k in accepted],
                                  none_fit=none_fit, seconds=seconds, kind=kind)

    judge(0, "e1", "alice", [0], 10.0)
    judge(0, "e1", "bob", [0], 5.0)
    judge(0, "e1", "gpt", [2], kind="judge")
    judge(0, "e1", "reward:rm", [0, 1], kind="reward")
    judge(0, "e2", "alice", [0], 20.0)
    judge(0, "e2", "bob", [1], 7.0)
    judge(0, "e2", "reward:rm", [1], kind="reward")
    judge(0, "e3", "alice", [], 60.0, none_fit=True)
    judge(0, "e3", "bob", [], none_fit=True)
    judge(0, "e3", "carol", [2], 12.0)
    judge(0, "e3", "reward:rm", [], kind="reward")
    judge(0, "e4", "alice", [1])
    judge(1, "f1", "alice", [0], 4.0)
    judge(1, "f1", "sim", [0], 2.0, kind="simulated")
    judge(1, "f1", "reward:rm", [], kind="reward")
    e1 = next(item for item in store.judged_items(round_idx=0) if item.example_id == "e1")
    # bob goes back to e1 and keeps his choice: only his last activity moves
    assert AnnotationQueue(store).replace_judgment(e1.item_id, "bob", [ids["e1"][0]], now=REVISED_AT)
    yield store, ids
    store.close()


def by_name(rows):
    return {row["annotator"]: row for row in rows}


def test_judged_items_carry_the_store_item_id(team):
    store, ids = team
    for item in store.judged_items(split=None):
        assert isinstance(item.item_id, int)
        assert [c.id for c in item.candidates] == ids[item.example_id]
        for judgment in item.judgments:  # the store's own lookup by item id finds the same judgment
            accepted = sorted(c for c, ok in judgment.decisions.items() if ok)
            assert store.judgment_history(item.item_id, judgment.annotator)[-1]["accepted"] == accepted


def test_agreement_per_round(team):
    store, _ = team
    items = store.judged_items()
    assert agreement(items) == {0: pytest.approx(0.25, abs=1e-12), 1: 1.0}
    # the AI judge's accept of e1 c2 would add a disagreement if every kind counted
    assert agreement(items, kinds=None)[0] < 0.25
    assert agreement(items, kinds={"reward"}) == {0: None, 1: None}  # one reward judgment per item


def test_agreement_equals_the_package_on_the_stores_own_table(team):
    """The same alpha from the store's flat judgments table, as a coders x units matrix for the package."""
    store, _ = team
    rows = [r for r in store.judgments_table() if r["annotator_kind"] in PEOPLE]
    for round_idx, alpha in agreement(store.judged_items()).items():
        in_round = [r for r in rows if r["round_idx"] == round_idx]
        coders = sorted({r["annotator"] for r in in_round})
        units = sorted({r["candidate_id"] for r in in_round})
        matrix = np.full((len(coders), len(units)), np.nan)
        for r in in_round:
            matrix[coders.index(r["annotator"]), units.index(r["candidate_id"])] = float(r["accepted"])
        assert alpha == pytest.approx(float(krippendorff.alpha(reliability_data=matrix,
                                                               level_of_measurement="nominal")), abs=1e-12)


def test_team_summary(team):
    store, _ = team
    items = store.judged_items()
    summary = team_summary(items, {0: 4, 1: 2, 2: 3})
    json.dumps(summary, allow_nan=False)  # the server returns it as it is
    assert figures.team_summary(store, {0: 4, 1: 2, 2: 3}) == approx(summary)  # the one illume computes
    assert summary["kinds"] == ["person", "simulated"]
    round0, round1, round2 = summary["rounds"]
    assert {k: v for k, v in round0.items() if k != "annotators"} == {
        "round_idx": 0, "items": 4, "judged_items": 4, "paired_items": 3, "judgments": 8,
        "alpha": pytest.approx(0.25, abs=1e-12), "disagreement_items": 2}
    people = by_name(round0["annotators"])
    assert list(people) == ["alice", "bob", "carol"]  # the judge and the reward model do not count
    assert {k: v for k, v in people["alice"].items() if k != "last_activity"} == {
        "annotator": "alice", "kind": "person", "items_judged": 4, "none_fit_rate": 0.25, "accept_rate": 0.25,
        "median_seconds": 20.0, "mean_seconds": 30.0, "corrections": 0}
    assert people["bob"]["none_fit_rate"] == pytest.approx(1 / 3)
    assert people["bob"]["accept_rate"] == pytest.approx(2 / 9)
    assert (people["bob"]["median_seconds"], people["bob"]["mean_seconds"]) == (6.0, 6.0)
    assert people["bob"]["last_activity"] == REVISED_AT.isoformat()  # the revision is his latest activity
    assert people["carol"]["accept_rate"] == pytest.approx(1 / 3)
    alice_times = [j.created_at for item in items if item.round_idx == 0
                   for j in item.judgments if j.annotator == "alice"]
    assert datetime.fromisoformat(people["alice"]["last_activity"]) == max(alice_times)

    assert round1["items"] == 2 and round1["judged_items"] == 1 and round1["alpha"] == 1.0
    assert by_name(round1["annotators"])["sim"]["kind"] == "simulated"
    assert round2 == {"round_idx": 2, "items": 3, "judged_items": 0, "paired_items": 0, "judgments": 0,
                      "alpha": None, "disagreement_items": 0, "annotators": []}

    total = summary["total"]
    assert (total["items"], total["judged_items"], total["paired_items"], total["judgments"],
            total["disagreement_items"]) == (9, 5, 4, 10, 2)
    assert total["alpha"] == pytest.approx(31 / 70, abs=1e-12)
    alice = by_name(total["annotators"])["alice"]
    assert (alice["items_judged"], alice["median_seconds"], alice["mean_seconds"]) == (5, 15.0, 23.5)
    assert alice["accept_rate"] == pytest.approx(4 / 15)

    unknown_sizes = team_summary(items)
    assert [r["items"] for r in unknown_sizes["rounds"]] == [None, None]
    assert unknown_sizes["total"]["items"] is None
    everyone = team_summary(items, kinds=None)
    assert "gpt" in by_name(everyone["rounds"][0]["annotators"])
    assert everyone["rounds"][0]["disagreement_items"] == 3  # e1 too: gpt and reward:rm disagree with people


def test_disagreements(team):
    store, ids = team
    found = disagreements(store.judged_items())
    json.dumps(found, allow_nan=False)
    assert [d["example_id"] for d in found] == ["e2", "e3"]  # an even split first, then 1 of 3
    e2, e3 = found
    assert e2["minority_share"] == 0.5 and e2["disputed_candidates"] == 2
    assert e3["minority_share"] == pytest.approx(1 / 3) and e3["disputed_candidates"] == 1
    assert e2["question"] == "what colour is e2?" and e2["round_idx"] == 0 and e2["split"] == "train"
    assert store.judgment_history(e2["item_id"], "bob")[-1]["accepted"] == [ids["e2"][1]]
    assert e2["annotators"] == ["alice", "bob"]
    rows = [(c["id"], c["text"], c["accepted_by"], c["rejected_by"], c["disputed"]) for c in e2["candidates"]]
    assert rows == [
        (ids["e2"][0], "because e2 0", ["alice"], ["bob"], True),
        (ids["e2"][1], "because e2 1", ["bob"], ["alice"], True),
        (ids["e2"][2], "because e2 2", [], ["alice", "bob"], False),
    ]
    assert e3["none_fit_by"] == ["alice", "bob"] and e3["corrections"] == {}
    assert e3["candidates"][2]["accepted_by"] == ["carol"]
    assert [d["example_id"] for d in disagreements(store.judged_items(), limit=1)] == ["e2"]
    everyone = disagreements(store.judged_items(), kinds=None)  # f1: reward:rm rejects what people chose
    assert [d["example_id"] for d in everyone] == ["e2", "f1", "e1", "e3"]
    assert disagreements(store.judged_items(round_idx=1)) == []


def test_item_detail(team):
    store, ids = team
    e1 = next(item for item in store.judged_items() if item.example_id == "e1")
    detail = item_detail(e1)
    json.dumps(detail, allow_nan=False)
    assert (detail["item_id"], detail["example_id"]) == (e1.item_id, "e1")
    assert detail["question"] == "what colour is e1?"
    judgments = by_name(detail["judgments"])
    assert list(judgments) == ["alice", "bob", "gpt", "reward:rm"]  # every kind by default
    assert judgments["reward:rm"]["kind"] == "reward"
    assert judgments["reward:rm"]["accepted_ids"] == ids["e1"][:2]
    assert judgments["reward:rm"]["accepted_texts"] == ["because e1 0", "because e1 1"]
    assert judgments["bob"]["updated_at"] == REVISED_AT.isoformat() and judgments["bob"]["seconds"] == 5.0
    assert judgments["alice"]["none_fit"] is False and judgments["alice"]["correction"] is None
    assert detail["candidates"][2]["accepted_by"] == ["gpt"]
    assert list(by_name(item_detail(e1, kinds=PEOPLE)["judgments"])) == ["alice", "bob"]
    e3 = next(item for item in store.judged_items() if item.example_id == "e3")
    alice = by_name(item_detail(e3)["judgments"])["alice"]
    assert (alice["none_fit"], alice["accepted_ids"], alice["seconds"]) == (True, [], 60.0)


def test_reward_vs_people(team):
    store, _ = team
    items = store.judged_items()
    scores = reward_vs_people(items)
    json.dumps(scores, allow_nan=False)
    assert {k: v for k, v in scores.items() if k != "rounds"} == {
        "aggregate": "majority", "tp": 1, "fp": 1, "fn": 1, "tn": 7, "n": 10, "precision": 0.5, "recall": 0.5,
        "accuracy": 0.8, "items": 4, "contested": 2}
    round0, round1 = scores["rounds"]
    assert (round0["round_idx"], round0["tp"], round0["fp"], round0["fn"], round0["tn"]) == (0, 1, 1, 0, 5)
    assert (round0["recall"], round0["items"], round0["contested"]) == (1.0, 3, 2)
    assert (round1["tp"], round1["fn"], round1["tn"]) == (0, 1, 2)
    assert (round1["precision"], round1["recall"]) == (None, 0.0)
    # with "any", one person's accept is enough: e2 c0, c1 and e3 c2 become accepted, nothing is contested
    any_rule = reward_vs_people(items, aggregate="any")
    assert [any_rule[k] for k in ("tp", "fp", "fn", "tn", "contested")] == [2, 1, 3, 6, 0]
    assert reward_vs_people([item for item in items if item.example_id == "e4"]) is None  # no reward judgment
    assert reward_vs_people([]) is None
    with pytest.raises(ValueError, match="aggregate"):
        reward_vs_people(items, aggregate="mean")
    with pytest.raises(ValueError, match="both"):
        reward_vs_people(items, reward_kinds={"reward", "person"})


def test_a_judgment_without_a_correction_attribute_still_works(team):
    """A Judgment from before `correction` existed (or built elsewhere) has no such attribute."""
    store, _ = team

    @dataclasses.dataclass(frozen=True)
    class OldJudgment:
        id: int
        annotator: str
        annotator_kind: str
        none_fit: bool
        seconds: float | None
        created_at: datetime
        client_token: str | None
        decisions: dict
        updated_at: datetime | None = None

    items = [dataclasses.replace(item, judgments=[
        OldJudgment(j.id, j.annotator, j.annotator_kind, j.none_fit, j.seconds, j.created_at, j.client_token,
                    j.decisions, j.updated_at) for j in item.judgments]) for item in store.judged_items()]
    assert team_summary(items) == team_summary(store.judged_items())
    assert item_detail(items[2])["judgments"][0]["correction"] is None


@pytest.mark.skipif(not HAS_CORRECTION, reason="FeedbackStore.add_judgment has no correction yet")
def test_corrections_are_counted_and_shown(team):
    store, _ = team
    store.add_candidate_sets(3, "train", [candidate_set("g1")])
    store.add_judgment(3, "g1", "alice", [], none_fit=True, seconds=30.0, correction="the ball is green")
    store.add_judgment(3, "g1", "bob", ["because g1 1"], seconds=3.0)
    items = store.judged_items(round_idx=3)
    people = by_name(team_summary(items)["rounds"][0]["annotators"])
    assert (people["alice"]["corrections"], people["bob"]["corrections"]) == (1, 0)
    assert people["alice"]["none_fit_rate"] == 1.0
    (found,) = disagreements(items)
    assert found["corrections"] == {"alice": "the ball is green"} and found["none_fit_by"] == ["alice"]
    assert by_name(item_detail(items[0])["judgments"])["alice"]["correction"] == "the ball is green"
