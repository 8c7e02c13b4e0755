"""What keeps the annotation page fast on a big store: the judgment counts the database keeps per item
(`items.num_judgments`), the indexes the page's queries use, an older store brought up to them, the hand-out
order read one judgment count at a time, and this process's queue for SQLite's write lock.

The figures themselves are scripts/bench_store.py's; nothing here is timed."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, inspect, text

from illume.data.records import Candidate, CandidateSet
from illume.feedback.engine import process_write_lock
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from tests.postgres import is_postgres, sqlalchemy_url

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
NEW_INDEXES = {"items": {"ix_items_handout", "ix_items_round"}, "judgments": {"ix_judgments_annotator"},
               "leases": {"ix_leases_annotator"}}


def make_sets(example_ids, num_candidates=3):
    return [CandidateSet(example_id=e, answer="red", predicted_answer="red", prompt=f"Q: {e}? A: red, seeing that",
                         seed=i, candidates=[Candidate(text=f"{e} rationale {k}", temperature=0.7, seed=i,
                                                       sample_idx=k, logprob=-1.0) for k in range(num_candidates)])
            for i, example_id in enumerate(example_ids) for e in [example_id]]


@pytest.fixture
def store(store_url):
    with FeedbackStore(store_url) as store:
        yield store


def counts(store_url):
    """example_id -> (items.num_judgments, judgments counted), for every item."""
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT example_id, num_judgments, (SELECT count(*) FROM judgments WHERE item_id = items.id) "
            "FROM items ORDER BY id")).all()
    engine.dispose()
    return {example_id: (kept, counted) for example_id, kept, counted in rows}


def test_every_writer_keeps_the_judgment_counts(store_url):
    """Bulk judgments, a single one, the page's submission, and rows deleted or moved behind the store's back:
    the count the database keeps is the number of judgments, whoever wrote."""
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(["a", "b", "c", "d"]))
        ids = store.candidate_ids(0)
        assert set(counts(store_url).values()) == {(0, 0)}
        store.add_judgments(0, [("a", [ids["a"][0]], False, 1.0), ("b", [], True, None)], "sim", kind="simulated")
        store.add_judgment(0, "a", "alice", [ids["a"][1]])
        queue = AnnotationQueue(store)
        lease = queue.lease_item(0, "bob", 3, 60)
        assert queue.submit_judgment(lease.item_id, "bob", [lease.shown_order[0]], annotations_per_item=3)
        assert not queue.submit_judgment(lease.item_id, "bob", [lease.shown_order[0]])  # a repeat: not counted
    expected = {"a": 3 if lease.item_id == 1 else 2, "b": 1 + (lease.item_id == 2), "c": int(lease.item_id == 3),
                "d": int(lease.item_id == 4)}
    assert counts(store_url) == {e: (n, n) for e, n in expected.items()}
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM decisions WHERE judgment_id IN "
                                "(SELECT id FROM judgments WHERE annotator = 'alice')"))
        connection.execute(text("DELETE FROM judgments WHERE annotator = 'alice'"))
        connection.execute(text("UPDATE judgments SET item_id = (SELECT id FROM items WHERE example_id = 'd') "
                                "WHERE annotator = 'sim' AND item_id = (SELECT id FROM items WHERE example_id = 'b')"))
    engine.dispose()
    assert all(kept == counted for kept, counted in counts(store_url).values())
    assert counts(store_url)["d"][0] == expected["d"] + 1


def test_an_older_store_gets_the_counts_the_triggers_and_the_indexes(store_url):
    """A store from before `items.num_judgments`, its triggers and the page's indexes (removed here with the
    backend's own SQL) gets them when opened: counts right at once and kept right after."""
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(["a", "b", "c"]))
        store.add_judgments(0, [("a", [], True, None), ("b", [], True, None)], "alice")
        store.add_judgment(0, "a", "bob", [])
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))  # written before the migrations
        for indexes in NEW_INDEXES.values():
            for index in indexes:
                connection.execute(text(f"DROP INDEX {index}"))
        if is_postgres(store_url):
            connection.execute(text("DROP TRIGGER judgments_count ON judgments"))
            connection.execute(text("DROP FUNCTION illume_count_judgments()"))
        else:
            for event in ("insert", "delete", "move"):
                connection.execute(text(f"DROP TRIGGER judgments_count_{event}"))
        connection.execute(text("ALTER TABLE items DROP COLUMN num_judgments"))

    def indexes(table):
        with engine.connect() as connection:
            return {index["name"] for index in inspect(connection).get_indexes(table)}

    assert not any(names & indexes(table) for table, names in NEW_INDEXES.items())
    with FeedbackStore(store_url) as store:
        assert counts(store_url) == {"a": (2, 2), "b": (1, 1), "c": (0, 0)}
        for table, names in NEW_INDEXES.items():
            assert names <= indexes(table), table
        store.add_judgment(0, "c", "bob", [])  # the triggers are back
        assert counts(store_url)["c"] == (1, 1)
        queue = AnnotationQueue(store)
        assert queue.open_round(2) == 0
        assert queue.annotation_progress(0, 2, "bob") == {
            "items": 3, "complete_items": 1, "judgments": 4, "counted_judgments": 4, "needed_judgments": 6,
            "mine": 2}
    with FeedbackStore(store_url):  # opening again changes nothing
        assert counts(store_url)["c"] == (1, 1)
    engine.dispose()


def test_the_hand_out_order_holds_across_judgment_counts(store_url):
    """Items are read one judgment count at a time: the merged order is still priority first (lower first),
    unranked after, each in the order added, whatever each item's count, and items that have their
    judgments, that this person judged or that others hold are passed over."""
    names = [f"e{i}" for i in range(8)]
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(names))
        store.set_priorities(0, {"e5": 0.5, "e2": 1.0, "e7": 2.0, "e0": 3.0})  # then e1, e3, e4, e6 unranked
        for annotator, judged in {"x": ["e5", "e2", "e1", "e4"], "y": ["e5", "e1"], "z": ["e5"]}.items():
            store.add_judgments(0, [(e, [], True, None) for e in judged], annotator)
        queue = AnnotationQueue(store)
        handed = []
        for person in ("x", "p", "q", "r", "s", "t", "u", "v", "w"):
            lease = queue.lease_item(0, person, 3, 60, now=NOW)
            handed.append(None if lease is None else queue.item(lease.item_id)["example_id"])
        # Order e5 e2 e7 e0 | e1 e3 e4 e6. e5 has its 3 judgments, x judged e2, and every live lease takes
        # one of an item's 3 slots; e1 (2 judgments) still comes before e3 (none).
        assert handed == ["e7", "e2", "e2", "e7", "e7", "e0", "e0", "e0", "e1"]
        lease = queue.lease_item(0, "y", 3, 60, now=NOW)  # y judged e1 (and e5): the next one for y is e3
        assert queue.item(lease.item_id)["example_id"] == "e3"
        later = NOW + timedelta(seconds=61)  # every lease expired: x gets the first free item again
        assert queue.item(queue.lease_item(0, "x", 3, 60, now=later).item_id)["example_id"] == "e7"


def test_progress_when_other_items_lie_between_a_rounds_items(store_url):
    """A round's items added in two calls with another split's items between them: a person's judgments are
    counted for the round's items only."""
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
        store.add_candidate_sets(0, "val", make_sets(["v"]))
        store.add_candidate_sets(0, "train", make_sets(["c"]))
        store.add_judgments(0, [("v", [], True, None)], "alice", split="val")
        store.add_judgments(0, [("a", [], True, None), ("c", [], True, None)], "alice")
        progress = AnnotationQueue(store).annotation_progress(0, 1, "alice")
        assert progress == {"items": 3, "complete_items": 2, "judgments": 2, "counted_judgments": 2,
                            "needed_judgments": 3, "mine": 2}
        assert AnnotationQueue(store).annotation_progress(0, 1, "alice", split="val")["mine"] == 1


def test_threads_of_one_process_queue_for_the_sqlite_write_lock(tmp_path, store_url):
    """One lock per SQLite file in a process (shared by every store object on it), none off SQLite; many
    threads writing at once all get through, each judgment stored once."""
    path = tmp_path / "locks.db"
    first, second = FeedbackStore(path), FeedbackStore(str(path))
    assert first._write._lock is second._write._lock is not None
    assert FeedbackStore(tmp_path / "other.db")._write._lock is not first._write._lock
    first.close(), second.close()
    with FeedbackStore(store_url) as store:
        assert (store._write._lock is None) == is_postgres(store_url)
        assert (process_write_lock(store._engine.url) is None) == is_postgres(store_url)
        store.add_candidate_sets(0, "train", make_sets([f"e{i}" for i in range(12)]))
        queue = AnnotationQueue(store)
        errors, stored = [], []

        def person(name):
            try:
                while (lease := queue.lease_item(0, name, 2, 60)) is not None:
                    stored.append(queue.submit_judgment(lease.item_id, name, [], True, annotations_per_item=2))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=person, args=(f"p{i}",)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and stored == [True] * 24
        assert set(counts(store_url).values()) == {(2, 2)}


def test_judgments_by_with_a_limit_reads_the_newest(store):
    """The page's history asks for the newest `limit` judgments: the same rows as the first of all of them."""
    store.add_candidate_sets(0, "train", make_sets(["a", "b", "c"]))
    queue = AnnotationQueue(store)
    for _ in range(3):
        lease = queue.lease_item(0, "ann", 1, 60)
        assert queue.submit_judgment(lease.item_id, "ann", lease.shown_order[:1], shown_order=lease.shown_order[::-1])
    everything = queue.judgments_by(0, "ann")
    assert len(everything) == 3 and all(row["shown_order"] is not None for row in everything)
    assert queue.judgments_by(0, "ann", limit=2) == everything[:2]
    assert queue.judgments_by(0, "ann", limit=5) == everything
