"""The feedback store: round trips, idempotent writes, atomic transactions, concurrent writers, kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timezone

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from illume.data.records import Candidate, CandidateSet
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import read_feedback
from tests.conftest import REPO
from tests.postgres import is_postgres, sqlalchemy_url


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
def store(store_url):
    """A store on each backend: a SQLite file, and a fresh PostgreSQL database (tests/postgres.py)."""
    with FeedbackStore(store_url) as store:
        yield store


def test_candidate_sets_round_trip(store, store_url, tmp_path):
    train, val = make_sets(["a", "b", "c"]), make_sets(["v1", "v2"], num_candidates=2)
    train[1].candidates = []  # an example without a distinct rationale is still an item
    if is_postgres(store_url):
        assert store.url.startswith("postgresql+psycopg://")
    else:
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
    assert table[0]["annotator"] == "alice" and table[0]["seconds"] == 4.5
    assert table[0]["created_at"].tzinfo is timezone.utc  # UTC on every backend, whatever the server's zone
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
    assert store.round_counts(0) == {"items": 2, "judged_items": 2, "judgments": 3}
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
    assert accepted(store, 0) == [("a", "because a 0", 0), ("c", "because c 2", 0)]


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


def accepted(store, upto_round: int, aggregate: str = "majority") -> list[tuple[str, str, int]]:
    """(example id, text, round first accepted) of every accepted rationale, as selection-SFT reads them."""
    feedback = read_feedback(store, upto_round=upto_round, aggregate=aggregate)
    return [(row.example_id, row.text, row.item.round_idx) for row in feedback.accepted()]


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
    # Read through the verdict rules (illume.feedback.verdicts), as every trainer reads the store. By majority
    # "because a 0" (bob accepts, alice does not) is a tie; by "any" it counts.
    assert accepted(store, 0) == [("a", "because a 1", 0)]
    assert accepted(store, 0, "any") == [("a", "because a 0", 0), ("a", "because a 1", 0)]
    assert accepted(store, 1, "any") == [
        ("a", "because a 0", 0), ("a", "because a 1", 0), ("b", "new for b", 1), ("b", "because b 1", 1)
    ]
    assert accepted(store, 1, "unanimous") == [("a", "because a 1", 0), ("b", "new for b", 1),
                                               ("b", "because b 1", 1)]
    assert read_feedback(store, split="val", upto_round=1).accepted() == []


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
    assert accepted(reopened, 0) == [("a", "because a 1", 0)]
    assert reopened.judgments_table() == store.judgments_table()
    reopened.close()


def test_concurrent_writers(store_url):
    """8 threads, each with its own store on one database: 200 submissions of 100 distinct (item, annotator).

    On SQLite writers take turns at BEGIN; on PostgreSQL they run at once and the unique constraints decide
    which copy of a pair is stored."""
    path = store_url
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
        assert store.round_counts(0)["judged_items"] == 50
        assert len(store.judgments_table()) == 100 * 3
        assert store.unjudged_items(0, "annotator-0") == store.unjudged_items(0, "annotator-1") == []


KILLED_WRITER = """
import sys
from illume.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
ids = store.candidate_ids(0)
print("ready", flush=True)
for n in range(10**6):
    for example_id, candidate_ids in list(ids.items())[:5]:
        store.add_judgment(0, example_id, f"person-{n}", candidate_ids[:1], client_token=f"t{n}-{example_id}")
    store.add_judgments(0, [(e, c[n % 8:n % 8 + 2], False, None) for e, c in ids.items()], f"bulk-{n}")
"""


def test_kill_9_leaves_a_consistent_store(store_url):
    path = store_url
    example_ids = [f"e{i}" for i in range(40)]
    with FeedbackStore(path) as store:
        store.add_candidate_sets(0, "train", make_sets(example_ids, num_candidates=8))
        process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path], cwd=REPO,
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

    if not is_postgres(path):  # PostgreSQL enforces foreign keys always, and has no such check to run
        connection = sqlite3.connect(path)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        connection.close()
    engine = create_engine(sqlalchemy_url(path))
    with engine.connect() as connection:
        # Every judgment has one decision per candidate of its item, and every bulk call is all or nothing.
        assert connection.execute(text(
            "SELECT COUNT(*) FROM judgments j"
            " WHERE (SELECT COUNT(*) FROM decisions d WHERE d.judgment_id = j.id) != 8"
        )).one() == (0,)
        bulk_sizes = connection.execute(text(
            "SELECT annotator, COUNT(*) FROM judgments WHERE annotator LIKE 'bulk-%' GROUP BY annotator"
        )).all()
    engine.dispose()
    assert len(bulk_sizes) >= 5 and {size for _, size in bulk_sizes} == {40}

    with FeedbackStore(path) as reopened:  # resuming: the store still takes writes
        assert reopened.num_judgments() >= 300
        assert reopened.candidate_sets(0) == make_sets(example_ids, num_candidates=8)
        assert reopened.add_judgments(0, [(e, [], True, None) for e in example_ids], "after-the-kill") == 40


# ---------------------------------------------------------------- annotator kinds


def test_annotator_kinds_are_data_registered_by_the_first_judgment(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b", "c"]))
    ids = store.candidate_ids(0)
    assert store.annotator_kinds() == {}
    assert store.add_judgment(0, "a", "alice", [ids["a"][0]])  # default: a person
    both = [("a", [], True, None), ("b", [], True, None)]
    assert store.add_judgments(0, both, "rouge", kind="simulated") == 2
    # The name says nothing: "reward-fan" is a person, "critic-7" the reward model.
    assert store.add_judgment(0, "b", "reward-fan", [], none_fit=True, kind="person")
    assert store.add_judgments(0, [("c", [ids["c"][1]], False, None)], "critic-7", kind="reward") == 1
    assert store.annotator_kinds() == {"alice": "person", "critic-7": "reward", "reward-fan": "person",
                                       "rouge": "simulated"}
    kinds = {(item.example_id, j.annotator): j.annotator_kind
             for item in store.judged_items() for j in item.judgments}
    assert kinds == {("a", "alice"): "person", ("a", "rouge"): "simulated", ("b", "rouge"): "simulated",
                     ("b", "reward-fan"): "person", ("c", "critic-7"): "reward"}
    assert {r["annotator"]: r["annotator_kind"] for r in store.judgments_table()}["critic-7"] == "reward"

    # A later write under a name with another kind is refused, naming the annotator and both kinds.
    before = store.judgments_table()
    with pytest.raises(ValueError, match=r"'alice'.*'person'.*'reward'"):
        store.add_judgment(0, "b", "alice", [], none_fit=True, kind="reward")
    with pytest.raises(ValueError, match=r"'rouge'.*'simulated'.*'person'"):
        store.add_judgments(0, [("c", [], True, None)], "rouge")
    with pytest.raises(ValueError, match=r"'rouge'.*'simulated'.*'person'"):  # even a repeat is checked
        store.add_judgments(0, [("a", [], True, None)], "rouge")
    # An unknown kind is refused with the list of kinds.
    with pytest.raises(ValueError, match=r"one of \('person', 'simulated', 'reward', 'judge'\).*'human'"):
        store.add_judgment(0, "c", "bob", [], none_fit=True, kind="human")
    assert store.judgments_table() == before and "bob" not in store.annotator_kinds()
    # The same kind again is fine.
    assert store.add_judgment(0, "b", "alice", [], none_fit=True, kind="person")


def test_registration_is_part_of_the_judgments_transaction(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    ids = store.candidate_ids(0)
    with pytest.raises(ValueError, match="not one of this item's candidates"):
        store.add_judgments(0, [("a", [], True, None), ("b", [ids["a"][0]], False, None)], "judge-1",
                            kind="judge")
    assert store.annotator_kinds() == {}  # nothing written: not even the annotator
    assert store.add_judgments(0, [], "nobody", kind="judge") == 0
    assert store.annotator_kinds() == {}  # registered by a judgment, not by a call
    assert store.add_judgments(0, [("a", [], True, None)], "judge-1", kind="judge") == 1
    assert store.annotator_kinds() == {"judge-1": "judge"}


def test_num_judgments_counts_by_kind_and_round(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    store.add_candidate_sets(1, "train", make_sets(["a"]))
    store.add_candidate_sets(1, "val", make_sets(["v"]))
    store.add_judgments(0, [("a", [], True, None), ("b", [], True, None)], "alice")
    store.add_judgments(0, [("a", [], True, None)], "sim", kind="simulated")
    store.add_judgments(1, [("a", [], True, None)], "rm", kind="reward")
    store.add_judgments(1, [("v", [], True, None)], "alice", split="val")
    assert store.num_judgments() == 5
    assert store.num_judgments(kinds=["person"]) == 3 and store.num_judgments(kinds="person") == 3
    assert store.num_judgments(kinds={"person", "simulated"}) == 4
    assert store.num_judgments(kinds=["reward"]) == 1 and store.num_judgments(kinds=["judge"]) == 0
    assert store.num_judgments(kinds=[]) == 0
    assert store.num_judgments(round_idx=1) == 2 and store.num_judgments(round_idx=0) == 3
    assert store.num_judgments(upto_round=0) == 3
    assert store.num_judgments(upto_round=0, kinds=["simulated"]) == 1
    assert store.num_judgments(round_idx=1, kinds=["person"]) == 1  # all splits
    with pytest.raises(ValueError, match="annotator kind must be one of"):
        store.num_judgments(kinds=["people"])


def test_an_older_store_registers_its_annotators_once_with_the_kind_their_names_implied(tmp_path):
    """A database written before kinds were stored: no `annotators`, no `judgment_revisions`, no question."""
    path = tmp_path / "feedback.db"
    names = ["alice", "simulated:rouge_l>=0.7", "reward:hybrid", "reward", "bob-simulated"]
    with FeedbackStore(path) as store:
        store.add_candidate_sets(0, "train", make_sets(["a", "b"]), questions={"a": "what colour is a?"})
        for name in names:  # the kind given here is forgotten below: the old code never stored one
            store.add_judgments(0, [("a", [], True, None)], name, kind="judge")
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("DROP TABLE alembic_version")  # written before the migrations
        connection.execute("DROP TABLE annotators")
        connection.execute("DROP TABLE judgment_revisions")
        if sqlite3.sqlite_version_info >= (3, 35):
            connection.execute("ALTER TABLE items DROP COLUMN question")
    connection.close()

    with FeedbackStore(path) as store:
        assert store.annotator_kinds() == {
            "alice": "person", "bob-simulated": "person", "reward": "reward", "reward:hybrid": "reward",
            "simulated:rouge_l>=0.7": "simulated",
        }
        assert store.num_judgments(kinds=["person"]) == 2 and store.num_judgments(kinds=["reward"]) == 2
        # The registered kind stays: another one is refused; a new name is registered as given.
        with pytest.raises(ValueError, match="'reward:hybrid'.*'reward'.*'simulated'"):
            store.add_judgments(0, [("b", [], True, None)], "reward:hybrid", kind="simulated")
        assert store.add_judgments(0, [("b", [], True, None)], "reward:hybrid", kind="reward") == 1
        assert store.add_judgments(0, [("b", [], True, None)], "reward-2", kind="person") == 1
        if sqlite3.sqlite_version_info >= (3, 35):
            assert [item.question for item in store.judged_items()] == [None, None]  # the column is back
        # The new tables work on the old database: a revision is kept.
        from illume.feedback.queue import AnnotationQueue
        item_id = AnnotationQueue(store).judgments_by(0, "alice")[0]["item_id"]
        assert AnnotationQueue(store).replace_judgment(item_id, "alice", [store.candidate_ids(0)["a"][0]])
        assert len(store.judgment_history(item_id, "alice")) == 2
    def registered():
        connection = sqlite3.connect(path)
        rows = connection.execute("SELECT name, kind, created_at FROM annotators ORDER BY name").fetchall()
        connection.close()
        return rows

    before = registered()
    assert len(before) == 6
    with FeedbackStore(path) as store:  # registered once: reopening changes nothing
        assert store.annotator_kinds()["reward-2"] == "person"
    assert registered() == before


# ---------------------------------------------------------------- questions, judged items, revisions


def test_questions_are_stored_with_the_items(store):
    sets = make_sets(["a", "b"])
    assert store.add_candidate_sets(0, "train", sets, questions={"a": "What colour is a?"}) == 2
    store.add_judgments(0, [("a", [], True, None), ("b", [], True, None)], "alice")
    assert [(item.example_id, item.question) for item in store.judged_items()] == [
        ("a", "What colour is a?"), ("b", None)]
    from illume.feedback.queue import AnnotationQueue
    queue = AnnotationQueue(store)
    assert [queue.item(i)["question"] for i in (1, 2)] == ["What colour is a?", None]
    assert queue.item(1)["prompt"] == sets[0].prompt  # the prompt is kept as sampled


def test_judged_items_order_filters_and_contents(store):
    store.add_candidate_sets(0, "train", make_sets(["a", "b", "c"]), image_refs={"b": "images/b.png"})
    store.add_candidate_sets(1, "train", make_sets(["b", "a"]))
    store.add_candidate_sets(2, "train", make_sets(["a"]))
    store.add_candidate_sets(1, "val", make_sets(["v"]))
    ids0, ids1 = store.candidate_ids(0), store.candidate_ids(1)
    store.add_judgment(1, "a", "alice", [ids1["a"][2]], seconds=2.0)
    store.add_judgment(0, "b", "bob", [ids0["b"][1], ids0["b"][0]], kind="simulated")
    store.add_judgment(0, "b", "alice", [], none_fit=True)
    store.add_judgment(1, "b", "alice", [ids1["b"][0]])
    store.add_judgment(2, "a", "alice", [])
    store.add_judgment(1, "v", "alice", [], none_fit=True, split="val")
    items = store.judged_items()
    # (round, item id) order; c was not judged
    assert [(i.round_idx, i.example_id) for i in items] == [(0, "b"), (1, "b"), (1, "a"), (2, "a")]
    first = items[0]
    assert first.image_ref == "images/b.png" and first.prompt == make_sets(["b"])[0].prompt
    assert [c.text for c in first.candidates] == ["because b 0", "because b 1", "because b 2"]
    assert [c.position for c in first.candidates] == [0, 1, 2] and first.candidates[0].seed == 2**62 + 12346
    assert [(j.annotator, j.annotator_kind, j.none_fit) for j in first.judgments] == [
        ("bob", "simulated", False), ("alice", "person", True)]
    assert first.judgments[0].decisions == {ids0["b"][0]: True, ids0["b"][1]: True, ids0["b"][2]: False}
    assert [j.annotator for j in first.accepting(ids0["b"][0])] == ["bob"]
    assert [j.annotator for j in first.rejecting(ids0["b"][2])] == ["bob", "alice"]
    assert not hasattr(first, "verdict")  # the verdict rules live in illume.feedback.verdicts
    assert [(i.round_idx, i.example_id) for i in store.judged_items(round_idx=1)] == [(1, "b"), (1, "a")]
    assert [i.round_idx for i in store.judged_items(upto_round=1)] == [0, 1, 1]
    assert [i.round_idx for i in store.judged_items(from_round=1)] == [1, 1, 2]
    assert [i.round_idx for i in store.judged_items(from_round=1, upto_round=1)] == [1, 1]
    assert [(i.split, i.example_id) for i in store.judged_items("val")] == [("val", "v")]
    assert len(store.judged_items(None)) == 5 and store.judged_items("test") == []


def test_a_revision_keeps_the_history_and_readers_see_only_the_latest(store):
    from datetime import datetime, timedelta, timezone

    from illume.feedback.queue import AnnotationQueue

    store.add_candidate_sets(0, "train", make_sets(["a"]))
    [c0, c1, c2] = store.candidate_ids(0)["a"]
    queue = AnnotationQueue(store)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert queue.submit_judgment(1, "ann", [c0], seconds=4.0, client_token="first", now=t0)
    assert store.judgment_history(1, "ann") == [
        {"accepted": [c0], "none_fit": False, "seconds": 4.0, "judged_at": t0, "revised_at": None, "correction": None}]
    t1, t2 = t0 + timedelta(minutes=1), t0 + timedelta(minutes=2)
    assert queue.replace_judgment(1, "ann", [], none_fit=True, seconds=1.0, client_token="second", now=t1)
    assert not queue.replace_judgment(1, "ann", [c0], client_token="second", now=t2)  # a repeat: no version
    assert queue.replace_judgment(1, "ann", [c2, c1], seconds=2.0, client_token="third", now=t2)
    assert store.judgment_history(1, "ann") == [
        {"accepted": [c0], "none_fit": False, "seconds": 4.0, "judged_at": t0, "revised_at": t1, "correction": None},
        {"accepted": [], "none_fit": True, "seconds": 5.0, "judged_at": t1, "revised_at": t2, "correction": None},
        {"accepted": [c1, c2], "none_fit": False, "seconds": 7.0, "judged_at": t2, "revised_at": None, "correction": None},
    ]
    # Every reader sees the current version only.
    assert store.num_judgments() == 1 and store.unjudged_items(0, "ann") == []
    assert [(r["text"], r["accepted"]) for r in store.judgments_table()] == [
        ("because a 0", False), ("because a 1", True), ("because a 2", True)]
    [item] = store.judged_items()
    [judgment] = item.judgments
    assert judgment.decisions == {c0: False, c1: True, c2: True} and not judgment.none_fit
    assert judgment.updated_at == t2 and judgment.created_at == t0 and judgment.seconds == 7.0
    assert AnnotationQueue(store).annotation_progress(0, 1)["judgments"] == 1
    # Nothing to show for an annotator who did not judge the item, or an item that is not there.
    assert store.judgment_history(1, "bob") == [] and store.judgment_history(99, "ann") == []
    assert store.judgment_history("1", "ann") == []


def test_page_submissions_register_their_kind(store):
    from illume.feedback.queue import AnnotationQueue

    store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
    queue = AnnotationQueue(store)
    assert queue.submit_judgment(1, "ann", [], none_fit=True)
    assert queue.submit_judgment(2, "gpt-judge", [], none_fit=True, kind="judge")
    assert store.annotator_kinds() == {"ann": "person", "gpt-judge": "judge"}
    with pytest.raises(ValueError, match="'ann'.*'person'.*'simulated'"):
        queue.submit_judgment(2, "ann", [], none_fit=True, kind="simulated")
    with pytest.raises(ValueError, match="annotator kind must be one of"):
        queue.submit_judgment(2, "carol", [], none_fit=True, kind="robot")
    assert store.num_judgments() == 2 and "carol" not in store.annotator_kinds()


def test_only_the_store_and_the_queue_open_its_sessions():
    """Every other module reads feedback through the store's public reads."""
    import re

    allowed = {REPO / "illume" / "feedback" / "store.py", REPO / "illume" / "feedback" / "queue.py",
               REPO / "illume" / "feedback" / "figures.py"}  # the store's GROUP BY counts (status, admin page)
    pattern = re.compile(r"\._(read|write)\b")
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for folder in ("illume", "reward", "policies", "scripts")
                 for path in sorted((REPO / folder).rglob("*.py")) if path not in allowed
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_a_registration_race_is_settled_by_the_kind_that_won(store):
    """Off SQLite two first judgments by one name can both find it unregistered; the loser's insert fails
    inside a savepoint, its transaction goes on if the winner registered the same kind, else it is refused."""
    from sqlalchemy import insert as sql_insert

    from illume.feedback.schema import AnnotatorRow
    from illume.feedback.writes import register_annotator

    store.add_candidate_sets(0, "train", make_sets(["a"]))
    with store._write.begin() as session:
        session.execute(sql_insert(AnnotatorRow).values(name="twin", kind="person"))  # the winner
        register_annotator(session, "twin", "person")  # the loser, same kind: fine
        with pytest.raises(ValueError, match="'twin'.*'person'.*'reward'"):
            register_annotator(session, "twin", "reward")
    assert store.annotator_kinds() == {"twin": "person"}
    assert store.add_judgment(0, "a", "twin", [], none_fit=True)


def test_concurrent_first_opens_create_the_tables_once(store_url):
    """6 threads open one new database at once (several ranks or servers starting together), then all add
    items to the same new round at once: each gets a working store and every item is kept. PostgreSQL does not
    serialise the CREATE TABLEs, nor the round's first row, by itself (`illume.feedback.migrations._lock_schema`,
    `_get_or_add_round`)."""
    errors = []
    opening, adding = threading.Barrier(6, timeout=60), threading.Barrier(6, timeout=60)

    def open_and_write(thread_idx):
        try:
            opening.wait()
            with FeedbackStore(store_url) as own:
                adding.wait()
                own.add_candidate_sets(0, "train", make_sets([f"e{thread_idx}"]))
        except Exception as error:  # collected: an exception in a thread would not fail the test
            errors.append(error)
            adding.abort()  # the others stop waiting for this one

    threads = [threading.Thread(target=open_and_write, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with FeedbackStore(store_url) as store:
        assert sorted(s.example_id for s in store.candidate_sets(0)) == [f"e{t}" for t in range(6)]


def test_opening_waits_for_a_lock_held_while_it_switches_to_wal(tmp_path):
    """Switching a new SQLite file to WAL needs it to itself, and SQLite answers "database is locked" at once
    (no busy handler) while another connection holds a write lock: the flaky failure of the test above, seen in
    CI. Here another connection holds that lock for 0.3 s: the opener waits for it and opens."""
    path = tmp_path / "feedback.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # a writer's (reserved) lock on the new file, not yet in WAL mode
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        with FeedbackStore(path) as store:
            assert store.candidate_sets(0) == []
    finally:
        release.join()
        holder.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_an_older_store_gets_the_added_columns_on_each_backend(store_url):
    """A database from before every column of `_ADDED_COLUMNS` and the `annotators` table (dropped here with
    the backend's own SQL) is brought up to date when opened: the same rows read back, and it takes writes
    that use the new columns."""
    from sqlalchemy import inspect

    from illume.feedback.migrations.versions.r0002_added_columns import ADDED_COLUMNS as _ADDED_COLUMNS
    from illume.feedback.queue import AnnotationQueue

    if not is_postgres(store_url) and sqlite3.sqlite_version_info < (3, 35):
        pytest.skip("SQLite before 3.35 cannot DROP COLUMN")
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
        ids = store.candidate_ids(0)
        store.add_judgment(0, "a", "alice", [ids["a"][1]], seconds=2.0)
        store.add_judgments(0, [("b", [], True, None)], "simulated:rouge_l>=0.7", kind="simulated")
        before = store.judgments_table()
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))  # written before the migrations
        connection.execute(text("DROP TABLE annotators"))
        for index in ("ix_items_handout", "ix_items_round", "ix_judgments_annotator"):  # on added columns, or later
            connection.execute(text(f"DROP INDEX {index}"))
        for table, columns in _ADDED_COLUMNS.items():
            for column in columns:
                connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))

    def columns(table):
        with engine.connect() as connection:
            return {c["name"]: c["type"] for c in inspect(connection).get_columns(table)}

    assert not any(set(names) & set(columns(table)) for table, names in _ADDED_COLUMNS.items())
    with FeedbackStore(store_url) as store:
        assert store.judgments_table() == before
        assert store.annotator_kinds() == {"alice": "person", "simulated:rouge_l>=0.7": "simulated"}
        queue = AnnotationQueue(store)
        item_id = queue.judgments_by(0, "alice")[0]["item_id"]
        assert queue.replace_judgment(item_id, "alice", [ids["a"][0]], shown_order=ids["a"][::-1])
        [_, current] = store.judgment_history(item_id, "alice")
        assert current["accepted"] == [ids["a"][0]] and current["judged_at"].tzinfo is timezone.utc
        assert queue.judgments_by(0, "alice")[0]["shown_order"] == ids["a"][::-1]
    for table, names in _ADDED_COLUMNS.items():
        assert set(names) <= set(columns(table)), table
    if is_postgres(store_url):  # the added columns have the types the tables declare
        assert columns("judgments")["updated_at"].timezone
    engine.dispose()
