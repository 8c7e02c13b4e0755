"""scripts/store_history.py: the history it writes is what the store's own readers see (both backends)."""

from __future__ import annotations

import importlib.util

import pytest

from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import read_feedback
from illume.status import summarize
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("store_history", REPO / "scripts" / "store_history.py")
store_history = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_history)


def test_fill_history_is_what_the_readers_see(store_url):
    written = store_history.fill_history(store_url, items_per_round=20, rounds=3, candidates=3, annotators=4,
                                         overlap=0.25, seed=1, progress=False)
    store = FeedbackStore(store_url)
    assert store.rounds() == [0, 1, 2]
    assert written["judged_rounds"] == [0, 1] and written["open_round"] == 2
    assert written["overlap_items_per_round"] == 5
    for round_idx in range(3):
        status = store.round_status(round_idx)
        assert status["sampled_at"] is not None
        assert (status["trained_at"] is not None) == (round_idx < 2)
        counts = store.round_counts(round_idx)
        judged = written["judged_items_per_round"].get(round_idx, 0)
        assert counts == {"items": 20, "judged_items": judged,
                          "judgments": written["judgments_per_round"].get(round_idx, 0)}
        sets = store.candidate_sets(round_idx)
        assert len(sets) == 20 and all(len(s.candidates) == 3 for s in sets)
    assert written["judged_items_per_round"] == {0: 20, 1: 20}
    assert written["judgments_per_round"] == {0: 20 + 5 * 2, 1: 20 + 5 * 2}

    items = store.judged_items("train")
    judgments = [j for item in items for j in item.judgments]
    assert len(items) == 40 and len(judgments) == written["judgments"]
    assert sum(len(j.decisions) for j in judgments) == written["decisions"]
    assert sum(sum(j.decisions.values()) for j in judgments) == written["accepted_decisions"]
    assert sum(j.none_fit for j in judgments) == written["none_fit"]
    assert all(not j.none_fit or not any(j.decisions.values()) for j in judgments)
    # Every candidate shown, each at one place of a shuffled order, as the annotation page records it.
    for item in items:
        for judgment in item.judgments:
            assert set(judgment.decisions) == {c.id for c in item.candidates}
            assert sorted(judgment.positions_shown.values()) == list(range(3))
    assert len({len(item.judgments) for item in items}) == 2  # some items by several people
    assert store.annotator_kinds() == {f"annotator-{k}": "person" for k in range(4)}
    assert store.num_judgments(kinds="person") == written["judgments"]

    feedback = read_feedback(store)
    assert len(feedback.items) == 40 and feedback.accepted()
    summary = summarize(store)
    assert {name: p["judgments"] for name, p in summary["people"].items()} == {
        name: p["judgments"] for name, p in written["people"].items()}
    for name, person in summary["people"].items():
        assert person["kind"] == "person"
        assert person["total_seconds"] == pytest.approx(written["people"][name]["total_seconds"])
    assert summary["rounds"][0]["alpha"] is not None and summary["rounds"][2]["judgments"] == 0
    # The open round is what the annotation page hands out, and new judgments get fresh ids.
    queue = AnnotationQueue(store)
    assert queue.open_round(annotations_per_item=1) == 2
    lease = queue.lease_item(2, "someone-new", annotations_per_item=1, lease_seconds=60)
    assert lease is not None
    assert queue.submit_judgment(lease.item_id, "someone-new", [lease.shown_order[0]],
                                 shown_order=lease.shown_order)
    assert store.round_counts(2)["judgments"] == 1
    store.close()


def test_fill_history_refuses_a_store_with_items(tmp_path):
    url = str(tmp_path / "feedback.db")
    store_history.fill_history(url, items_per_round=2, rounds=1, candidates=2, progress=False)
    with pytest.raises(ValueError, match="already has items"):
        store_history.fill_history(url, items_per_round=2, rounds=1, candidates=2, progress=False)
