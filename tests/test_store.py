"""The feedback store: round trips, idempotent writes, atomic transactions, concurrent writers, kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from illume.data.records import Candidate, CandidateSet
from illume.store import FeedbackStore
from tests.conftest import REPO


def make_sets(example_ids, num_candidates=3, prefix="because"):
    """Candidate sets with 63-bit seeds and non-round floats, so that lossy storage would show."""
    return [
        CandidateSet(
            example_id=example_id, answer="red", predicted_answer="blue",
            prompt=f"Q: what colour is {example_id}? A: red, seeing that", seed=2**62 + 12345 + i,
            candidates=[
                Candidate(text=f"{prefix} {example_id} {k}", temperature=(0.3, 0.8)[k % 2],
                          seed=2**62 + 12345 + i, sample_idx=k, logprob=-1.2345678901234567 * (k + 1))
                for k in range(num_candidates)
            ],
        )
        for i, example_id in enumerate(example_ids)
    ]


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as store:
        yield store


def test_candidate_sets_round_trip(store, tmp_path):
    train, val = make_sets(["a", "b", "c"]), make_sets(["v1", "v2"], num_candidates=2)
    train[1].candidates = []  # an example without a distinct rationale is still an item
    assert store.url == f"sqlite:///{tmp_path / 'feedback.db'}"
    assert store.add_candidate_sets(0, "train", train, image_refs={"a": "img/a.png"}) == 3
    assert store.add_candidate_sets(0, "val", val) == 2
    assert store.candidate_sets(0) == train
    assert store.candidate_sets(0, "val") == val
    assert store.candidate_sets(1) == []
    ids = store.candidate_ids(0)
    assert list(ids) == ["a", "c"] and [len(v) for v in ids.values()] == [3, 3]
    assert store.rounds() == [0] and not store.is_sampled(0)
    with pytest.raises(ValueError, match="split"):
        store.add_candidate_sets(0, "training", train)


def test_duplicate_texts_stored_once(store):
    [candidate_set] = make_sets(["a"])
    candidate_set.candidates.insert(1, Candidate(candidate_set.candidates[0].text, 0.8, 1, 5, -9.0))
    store.add_candidate_sets(0, "train", [candidate_set])
    [stored] = store.candidate_sets(0)
    assert [c.text for c in stored.candidates] == ["because a 0", "because a 1", "because a 2"]
    assert stored.candidates[0].sample_idx == 0  # the first draw is kept


def test_re_adding_is_idempotent(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    assert store.add_candidate_sets(0, "train", make_sets(["a", "b"], prefix="other")) == 0
    assert store.add_candidate_sets(0, "train", make_sets(["a", "b", "c", "c"])) == 1
    assert [s.example_id for s in store.candidate_sets(0)] == ["a", "b", "c"]
    assert store.candidate_sets(0)[0] == make_sets(["a"])[0]  # the stored one wins
    store.mark_sampled(0)
    sampled_at = store.round_status(0)["sampled_at"]
    store.mark_sampled(0)
    assert store.is_sampled(0) and store.round_status(0)["sampled_at"] == sampled_at


def test_judgments_unique_per_annotator(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    ids = store.candidate_ids(0)
    assert store.unjudged_items(0, "alice") == ["a", "b"]
    assert store.add_judgment(0, "a", "alice", [ids["a"][1]], seconds=4.5, client_token="t1")
    table = store.judgments_table()
    assert [(r["text"], r["accepted"]) for r in table] == [
        ("because a 0", False), ("because a 1", True), ("because a 2", False)
    ]
    assert table[0]["annotator"] == "alice" and table[0]["seconds"] == 4.5 and table[0]["created_at"].tzinfo
    # A second judgment by alice, or a resubmitted token, writes nothing.
    assert not store.add_judgment(0, "a", "alice", [ids["a"][0]], none_fit=False)
    assert not store.add_judgment(0, "b", "bob", [], none_fit=True, client_token="t1")
    assert store.judgments_table() == table
    assert store.unjudged_items(0, "alice") == ["b"] and store.unjudged_items(0, "bob") == ["a", "b"]


def test_two_annotators_on_one_item(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    ids = store.candidate_ids(0)
    assert store.add_judgment(0, "a", "alice", [ids["a"][0]])
    assert store.add_judgment(0, "a", "bob", ["because a 0", "because a 2"])  # texts work too
    assert store.add_judgment(0, "b", "bob", [], none_fit=True)
    assert store.judgment_counts(0) == {
        "items": 2, "judged_items": 2, "judgments": 3, "accepted_candidates": 2, "items_with_accepted": 1
    }
    assert store.num_judgments() == 3 and store.num_judgments(upto_round=-1) == 0
    assert [r["accepted"] for r in store.judgments_table() if r["example_id"] == "b"] == [False] * 3


def test_invalid_judgments_raise_and_write_nothing(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    ids = store.candidate_ids(0)
    with pytest.raises(ValueError, match="none_fit"):
        store.add_judgment(0, "a", "alice", [ids["a"][0]], none_fit=True)
    with pytest.raises(ValueError, match="not one of this item's candidates"):
        store.add_judgment(0, "a", "alice", [ids["b"][0]])
    with pytest.raises(ValueError, match="not one of this item's candidates"):
        store.add_judgment(0, "a", "alice", ["because b 0"])
    with pytest.raises(ValueError, match="list of candidate ids or texts"):
        store.add_judgment(0, "a", "alice", "because a 0")
    with pytest.raises(ValueError, match="not in the feedback store"):
        store.add_judgment(0, "zzz", "alice", [])
    with pytest.raises(ValueError, match="not in the feedback store"):
        store.add_judgment(1, "a", "alice", [])
    assert store.num_judgments() == 0


def test_bulk_judgments(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b", "c"]))
    ids = store.candidate_ids(0)
    rows = [("a", [np.int64(ids["a"][0])], False, None), ("b", [], True, 0.1), ("a", [], True, None)]
    assert store.add_judgments(0, rows, "simulated:rouge_l>=0.7") == 2  # "a" twice: the first counts
    assert store.add_judgments(0, rows + [("c", ["because c 2"], False, None)], "simulated:rouge_l>=0.7") == 1
    assert store.unjudged_items(0, "simulated:rouge_l>=0.7") == []
    assert store.accepted_rationales(0) == [("a", "because a 0", 0), ("c", "because c 2", 0)]


def test_failed_transaction_leaves_nothing(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b", "c"]))
    ids = store.candidate_ids(0)
    good = [("a", [ids["a"][0]], False, None), ("b", [], True, None)]
    with pytest.raises(ValueError, match="'c'"):
        store.add_judgments(0, good + [("c", [ids["a"][1]], False, None)], "sim")
    assert store.num_judgments() == 0 and store.judgments_table() == []
    # A database error midway (the last set's NOT NULL text) rolls back the items, candidates and round.
    broken = make_sets(["x", "y"])
    broken[1].candidates[2].text = None
    with pytest.raises(IntegrityError):
        store.add_candidate_sets(1, "train", broken)
    assert store.rounds() == [0] and store.candidate_sets(1) == []


def test_accepted_rationales_dedup_across_rounds_and_annotators(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    round_1 = make_sets(["b", "a"])
    round_1[0].candidates[0].text = "new for b"
    store.add_candidate_sets(1, "train", round_1)
    ids0, ids1 = store.candidate_ids(0), store.candidate_ids(1)
    store.add_judgment(0, "a", "alice", [ids0["a"][1]])
    store.add_judgment(0, "a", "bob", [ids0["a"][1], ids0["a"][0]])
    store.add_judgment(0, "b", "alice", [], none_fit=True)
    store.add_judgment(1, "b", "alice", [ids1["b"][0], ids1["b"][1]])
    store.add_judgment(1, "a", "alice", [ids1["a"][1]])  # the same text as round 0's: kept once, round 0
    assert store.accepted_rationales(0) == [("a", "because a 0", 0), ("a", "because a 1", 0)]
    assert store.accepted_rationales(1) == [
        ("a", "because a 0", 0), ("a", "because a 1", 0), ("b", "new for b", 1), ("b", "because b 1", 1)
    ]
    assert store.accepted_rationales(1, min_accepts=2) == [("a", "because a 1", 0)]
    assert store.accepted_rationales(1, split="val") == []
    assert store.accepted_rationales(1)[0].example_id == "a"


def test_rounds_and_reopening(store, tmp_path):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    store.add_candidate_sets(0, "val", make_sets(["v"]))
    store.mark_sampled(0)
    store.add_judgment(0, "a", "alice", ["because a 1"], seconds=3.0)
    store.set_round_metrics(0, {"rouge_l": 0.42, "accepted": [1, 2]})
    store.mark_trained(0)
    store.set_round_metrics(2, {"note": "metrics may come first"})
    status = store.round_status(0)
    with pytest.raises(KeyError):
        store.round_status(1)
    store.close()

    reopened = FeedbackStore(store.url)
    assert reopened.rounds() == [0, 2]
    assert reopened.round_status(0) == status
    assert status["metrics"] == {"rouge_l": 0.42, "accepted": [1, 2]}
    assert status["num_items"] == {"train": 2, "val": 1} and status["num_judgments"] == 1
    assert status["sampled_at"] <= status["trained_at"]
    assert reopened.is_sampled(0) and not reopened.is_sampled(2)
    assert reopened.candidate_sets(0) == make_sets(["a", "b"])
    assert reopened.accepted_rationales(0) == [("a", "because a 1", 0)]
    assert reopened.judgments_table() == store.judgments_table()
    reopened.close()


def test_concurrent_writers(tmp_path):
    """8 threads, each with its own store on one file: 200 submissions of 100 distinct (item, annotator)."""
    path = tmp_path / "feedback.db"
    example_ids = [f"e{i}" for i in range(50)]
    with FeedbackStore(path) as store:
        store.add_candidate_sets(0, "train", make_sets(example_ids))
        ids = store.candidate_ids(0)
    # Pair i = (example i % 50, annotator i // 50), submitted twice; even pairs carry a client token.
    submissions = [(i, copy) for i in range(100) for copy in range(2)]
    submissions = submissions[::2] + submissions[1::2][::-1]  # the two copies far apart
    stored, errors = [], []
    barrier = threading.Barrier(8)

    def work(thread_idx):
        try:
            with FeedbackStore(path) as own:
                barrier.wait()
                for i, copy in submissions[thread_idx::8]:
                    example_id = example_ids[i % 50]
                    token = f"token-{i}" if i % 2 == 0 else None
                    accepted = [ids[example_id][i % 3]] if i % 5 else []
                    if own.add_judgment(0, example_id, f"annotator-{i // 50}", accepted,
                                        none_fit=not accepted, seconds=float(copy), client_token=token):
                        stored.append(i)
        except Exception as error:  # collected: an exception in a thread would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(stored) == list(range(100))
    with FeedbackStore(path) as store:
        assert store.num_judgments() == 100
        assert store.judgment_counts(0)["judged_items"] == 50
        assert len(store.judgments_table()) == 100 * 3
        assert store.unjudged_items(0, "annotator-0") == store.unjudged_items(0, "annotator-1") == []


KILLED_WRITER = """
import sys
from illume.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
ids = store.candidate_ids(0)
print("ready", flush=True)
for n in range(10**6):
    for example_id, candidate_ids in list(ids.items())[:5]:
        store.add_judgment(0, example_id, f"person-{n}", candidate_ids[:1], client_token=f"t{n}-{example_id}")
    store.add_judgments(0, [(e, c[n % 8:n % 8 + 2], False, None) for e, c in ids.items()], f"bulk-{n}")
"""


def test_kill_9_leaves_a_consistent_store(tmp_path):
    path = tmp_path / "feedback.db"
    example_ids = [f"e{i}" for i in range(40)]
    with FeedbackStore(path) as store:
        store.add_candidate_sets(0, "train", make_sets(example_ids, num_candidates=8))
        process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 15
            while store.num_judgments() < 300 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.013)  # land somewhere inside a transaction, probably
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            process.stdout.close()
    assert process.returncode == -signal.SIGKILL

    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    # Every judgment has one decision per candidate of its item, and every bulk call is all or nothing.
    assert connection.execute(
        "SELECT COUNT(*) FROM judgments j"
        " WHERE (SELECT COUNT(*) FROM decisions d WHERE d.judgment_id = j.id) != 8"
    ).fetchone() == (0,)
    bulk_sizes = connection.execute(
        "SELECT annotator, COUNT(*) FROM judgments WHERE annotator LIKE 'bulk-%' GROUP BY annotator"
    ).fetchall()
    connection.close()
    assert len(bulk_sizes) >= 5 and {size for _, size in bulk_sizes} == {40}

    with FeedbackStore(path) as reopened:  # resuming: the store still takes writes
        assert reopened.num_judgments() >= 300
        assert reopened.candidate_sets(0) == make_sets(example_ids, num_candidates=8)
        assert reopened.add_judgments(0, [(e, [], True, None) for e in example_ids], "after-the-kill") == 40
