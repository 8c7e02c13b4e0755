"""illume.feedback.figures: the database's counts equal the Python computation over every judged item."""

from __future__ import annotations

import random
import statistics
from collections import defaultdict

import pytest

from illume.data.records import Candidate, CandidateSet
from illume.feedback import agreement, figures
from illume.feedback.agreement import krippendorff_alpha
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import AGGREGATES, read_feedback
from illume.status import summarize
from tests import team_summary_oracle

ANNOTATORS = {"ann": "person", "bob": "person", "cy": "person", "sim": "simulated", "reward": "reward"}


def random_store(url: str, seed: int) -> FeedbackStore:
    """3 rounds (the last one unjudged), 2 splits, 5 annotators of 3 kinds with random overlap, "none fits",
    corrections, missing times and revised judgments."""
    rng = random.Random(seed)
    store = FeedbackStore(url)
    for round_idx in range(3):
        for split in ("train", "val"):
            sets = [CandidateSet(f"ex{i}", "red", "red", f"Q: q{i} A: red, seeing that", i,
                                 [Candidate(f"reason {rng.randrange(6)} {k}", 0.5, i, k, -1.0)
                                  for k in range(rng.randint(1, 4))]) for i in range(12)]
            store.add_candidate_sets(round_idx, split, sets)
            if round_idx == 2:
                continue
            ids = store.candidate_ids(round_idx, split)
            for name, kind in ANNOTATORS.items():
                rows = []
                for example_id, candidate_ids in ids.items():
                    if rng.random() < 0.6:
                        accepted = [c for c in candidate_ids if rng.random() < 0.4]
                        seconds = None if rng.random() < 0.2 else round(rng.uniform(1, 30), 1)
                        rows.append((example_id, accepted, not accepted and rng.random() < 0.5, seconds))
                for example_id, accepted, none_fit, seconds in rows:
                    correction = "my own reason" if none_fit and kind == "person" and rng.random() < 0.3 else None
                    store.add_judgment(round_idx, example_id, name, accepted, none_fit=none_fit or bool(correction),
                                       seconds=seconds, split=split, kind=kind, correction=correction)
    queue = AnnotationQueue(store)
    for item in rng.sample(store.judged_items("train"), 5):  # revisions: updated_at, new decisions
        judgment = item.judgments[0]
        if ANNOTATORS[judgment.annotator] == "person":
            queue.replace_judgment(item.item_id, judgment.annotator, [item.candidates[0].id], seconds=3.0)
    return store


def old_summarize(store: FeedbackStore, aggregate: str) -> dict:
    """`illume status`'s figures as they were computed before illume.feedback.figures: over every item."""
    feedback = read_feedback(store, split="train", aggregate=aggregate)
    rounds = {}
    for round_idx in store.rounds():
        decisions = [[int(j.decisions[c.id]) for j in item.judgments if c.id in j.decisions]
                     for item in feedback.items if item.round_idx == round_idx for c in item.candidates]
        overlap = any(len(values) > 1 for values in decisions)
        rounds[round_idx] = {"items_with_accepted": feedback.items_with_accepted(round_idx),
                             "alpha": krippendorff_alpha(decisions) if overlap else None}
    people = defaultdict(lambda: {"kind": None, "judgments": 0, "seconds": []})
    for item in feedback.items:
        for judgment in item.judgments:
            person = people[judgment.annotator]
            person["kind"] = judgment.annotator_kind
            person["judgments"] += 1
            if judgment.seconds is not None:
                person["seconds"].append(judgment.seconds)
    return {"rounds": rounds, "people": {
        name: {"kind": p["kind"], "judgments": p["judgments"], "total_seconds": sum(p["seconds"]),
               "median_seconds": statistics.median(p["seconds"]) if p["seconds"] else None}
        for name, p in people.items()}}


def approx(value):
    """Floats compared to the last bits (the database adds in its own order); everything else exactly."""
    if isinstance(value, dict):
        return {key: approx(item) for key, item in value.items()}
    if isinstance(value, list):
        return [approx(item) for item in value]
    return pytest.approx(value, rel=1e-12, abs=1e-12) if isinstance(value, float) else value


@pytest.mark.parametrize("seed", [0, 1])
def test_status_figures_match_the_python_computation(store_url, seed):
    store = random_store(store_url, seed)
    for aggregate in AGGREGATES:
        new, old = summarize(store, aggregate), old_summarize(store, aggregate)
        assert new["people"] == approx(old["people"])
        assert {r: {key: row[key] for key in ("items_with_accepted", "alpha")}
                for r, row in new["rounds"].items()} == approx(old["rounds"])
    assert any(row["alpha"] is not None for row in new["rounds"].values())
    assert new["rounds"][2]["judgments"] == 0 and new["rounds"][2]["items_with_accepted"] == 0
    store.close()


@pytest.mark.parametrize("kinds", [agreement.PEOPLE, None, frozenset({"person"})])
def test_team_summary_matches_the_python_computation(store_url, kinds):
    store = random_store(store_url, 2)
    items_per_round = {r: store.round_counts(r)["items"] for r in store.rounds()}
    for split in ("train", "val"):
        expected = team_summary_oracle.team_summary(store.judged_items(split), items_per_round, kinds)
        assert figures.team_summary(store, items_per_round, kinds, split) == approx(expected)
    expected = team_summary_oracle.team_summary(store.judged_items("train"), None, kinds)
    assert figures.team_summary(store, None, kinds) == approx(expected)
    assert expected["total"]["paired_items"] and expected["total"]["disagreement_items"]
    assert any(p["corrections"] for p in expected["total"]["annotators"])
    store.close()


def test_an_empty_store_has_no_figures(store_url):
    store = FeedbackStore(store_url)
    assert figures.team_summary(store, {}) == team_summary_oracle.team_summary([], {})
    assert figures.items_with_accepted(store) == {} and figures.coincidences(store) == {}
    assert summarize(store) == {"rounds": {}, "people": {}}
    store.close()
