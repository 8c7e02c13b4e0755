"""The feedback rules (illume.feedback.verdicts) and every consumer agreeing on them.

One store, built through the store's public API, holds each case the rules cover:
- q1, the divergence: round 0 accepts A and rejects B; round 1 (A and B sampled again) accepts B and rejects
  A and C. By rule 6, A and B stay accepted and C is rejected, so the only pair is (B > C); the old
  `illume dpo RUN_DIR` trained on (A > B), (B > A) and (B > C).
- q2, a revision: bob accepts X, then goes back and accepts Y instead; only Y counts, the history keeps both.
- q3, two people who disagree: alice accepts P and carol rejects it (a tie: contested under majority), both
  reject Q.
- q4, "none fits" in round 1: both candidates rejected; with references, reference pairs.
- q5, a person called "reward-team" accepts R and rejects S, the reward model accepts both: with every kind
  counted S is a tie (contested); for the reward model only the person counts, so (R > S) is its pair.
"""

from __future__ import annotations

import pytest
from datasets import load_from_disk
from PIL import Image

from illume.data.records import Candidate, CandidateSet, Example
from illume.exports import export
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import AGGREGATES, PEOPLE, Feedback, read_feedback
from policies.data import dataset_pairs, dataset_unpaired_rows, store_pairs, store_unpaired_rows
from reward.pairs import judged_candidates, to_preference_pairs

A, B, C = "the circle is red", "the square is blue", "there are two shapes"
X, Y = "it is on the left", "it is on the right"
P, Q = "the sky is clear", "a dog sleeps"
M, N = "nothing fits here", "neither does this"
R, S = "the cat is black", "the cat is white"
REFERENCE = "the ball is green"


def prompt(example_id: str) -> str:
    return f"Q: what about {example_id}? A: yes, seeing that"


def candidate_set(example_id: str, texts: list[str]) -> CandidateSet:
    return CandidateSet(example_id, "yes", "yes", prompt(example_id), 7,
                        [Candidate(t, 0.7, 7, k, -1.0 - k) for k, t in enumerate(texts)])


EXAMPLES = {f"q{i}": Example(f"q{i}", "unused.png", f"what about q{i}?", ["yes"], [REFERENCE]) for i in range(1, 6)}


@pytest.fixture
def run_dir(tmp_path):
    image = tmp_path / "images" / "q.png"
    image.parent.mkdir()
    Image.new("RGB", (8, 8), (0, 128, 0)).save(image)
    refs = {example_id: "images/q.png" for example_id in EXAMPLES}
    questions = {example_id: e.question for example_id, e in EXAMPLES.items()}
    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_candidate_sets(0, "train", [candidate_set("q1", [A, B]), candidate_set("q2", [X, Y]),
                                          candidate_set("q3", [P, Q])], image_refs=refs, questions=questions)
    store.add_candidate_sets(1, "train", [candidate_set("q1", [A, B, C]), candidate_set("q4", [M, N]),
                                          candidate_set("q5", [R, S])], image_refs=refs, questions=questions)
    store.add_judgment(0, "q1", "alice", [A], kind="person")
    store.add_judgment(1, "q1", "alice", [B], kind="person")
    store.add_judgment(0, "q2", "bob", [X], kind="person")
    queue = AnnotationQueue(store)
    [bob] = queue.judgments_by(0, "bob")
    x_id, y_id = store.candidate_ids(0)["q2"]
    assert queue.replace_judgment(bob["item_id"], "bob", [y_id])
    store.add_judgment(0, "q3", "alice", [P], kind="person")
    store.add_judgment(0, "q3", "carol", [], kind="person")
    store.add_judgment(1, "q4", "alice", [], none_fit=True, kind="person")
    store.add_judgment(1, "q5", "reward-team", [R], kind="person")
    store.add_judgments(1, [("q5", [R, S], False, None)], "reward:reward", kind="reward")
    (tmp_path / "config.yaml").write_text("feedback:\n  aggregate: majority\n")
    store.close()
    return tmp_path


def _pairs(pairs) -> list[tuple[str, str, str]]:
    return [(p.example_id, p.chosen, p.rejected) for p in pairs]


def test_the_rules_on_each_case(run_dir):
    with FeedbackStore(run_dir / "feedback.db") as store:
        feedback = read_feedback(store)
        assert [(r.example_id, r.text) for r in feedback.accepted()] == [
            ("q1", A), ("q2", Y), ("q1", B), ("q5", R)]
        labels = {(r.example_id, r.text): r.accepted for r in feedback.labelled()}
        assert labels == {("q1", A): True, ("q1", B): True, ("q2", X): False, ("q2", Y): True, ("q3", Q): False,
                          ("q1", C): False, ("q4", M): False, ("q4", N): False, ("q5", R): True}
        # Ties are contested and left out: alice and carol on P; reward-team and the reward model on S.
        assert ("q3", P) not in labels and ("q5", S) not in labels
        # The divergence: one pair; A is never a rejected side, B never both.
        assert _pairs(feedback.pairs()) == [("q2", Y, X), ("q1", B, C)]
        assert _pairs(feedback.pairs({"q4": [REFERENCE]})) == [
            ("q2", Y, X), ("q1", B, C), ("q4", REFERENCE, M), ("q4", REFERENCE, N)]
        # The revision: only bob's latest judgment counts, the store keeps both versions.
        [bob] = AnnotationQueue(store).judgments_by(0, "bob")
        x_id, y_id = store.candidate_ids(0)["q2"]
        assert [v["accepted"] for v in store.judgment_history(bob["item_id"], "bob")] == [[x_id], [y_id]]
        # Who judged is the stored kind: "reward-team" is a person, the reward model is not.
        assert store.annotator_kinds()["reward-team"] == "person"
        people = read_feedback(store, kinds=PEOPLE)
        assert ("q5", S) not in {(r.example_id, r.text) for r in people.accepted()}
        assert _pairs(people.pairs()) == [("q2", Y, X), ("q1", B, C), ("q5", R, S)]


def test_aggregates_differ_only_where_annotators_disagree(run_dir):
    with FeedbackStore(run_dir / "feedback.db") as store:
        items = store.judged_items()
    accepted = {name: {(r.example_id, r.text) for r in Feedback(items, name).accepted()} for name in AGGREGATES}
    disputed = {("q3", P), ("q5", S)}  # one accept and one reject each
    assert disputed <= accepted["any"]
    assert not disputed & (accepted["majority"] | accepted["unanimous"])
    assert accepted["any"] - disputed == accepted["majority"] == accepted["unanimous"]
    with pytest.raises(ValueError, match="feedback.aggregate must be one of"):
        Feedback(items, "most")


def test_every_consumer_agrees(run_dir):
    """SFT, reward-model pairs, DPO pairs, KTO rows and every export format: the same verdicts."""
    with FeedbackStore(run_dir / "feedback.db") as store:
        feedback = read_feedback(store)
        sft = [(r.example_id, r.text) for r in feedback.accepted()]
        dpo = _pairs(store_pairs(store, EXAMPLES))
        kto = [(r.example_id, r.completion, r.accepted) for r in store_unpaired_rows(store, EXAMPLES)]
        reward_pairs = _pairs(to_preference_pairs(store, EXAMPLES, include_reference_pairs=False))
        reward_labels = judged_candidates(store, EXAMPLES)
    # Exports: saved datasets and JSONL.
    exported = {fmt: load_from_disk(str(export(run_dir, fmt).path)) for fmt in ("sft", "dpo", "kto")}
    assert [(r["example_id"], r["completion"].strip()) for r in exported["sft"]] == sft
    assert [(r["example_id"], r["chosen"].strip(), r["rejected"].strip()) for r in exported["dpo"]] == dpo
    assert [(r["example_id"], r["completion"].strip(), r["label"]) for r in exported["kto"]] == kto
    # `illume dpo RUN_DIR` trains on store_pairs, `illume dpo EXPORT` on dataset_pairs: the same pairs.
    from_dataset, _ = dataset_pairs(run_dir / "exports" / "dpo")
    assert _pairs(from_dataset) == dpo == [("q2", Y, X), ("q1", B, C)]
    rows, _ = dataset_unpaired_rows(run_dir / "exports" / "kto")
    assert [(r.example_id, r.completion, r.accepted) for r in rows] == kto
    # Consistency between them: every chosen is an SFT target, every rejected a KTO False row, nothing both.
    rejected = {(e, t) for e, t, ok in kto if not ok}
    assert {(e, c) for e, c, _ in dpo} <= set(sft) and {(e, r) for e, _, r in dpo} <= rejected
    assert not rejected & set(sft)
    # The reward model (people only) sees the same verdicts, less the reward model's own.
    assert reward_pairs == dpo + [("q5", R, S)]
    assert {(e, t, ok) for e, _, t, ok in reward_labels} == set(kto) | {("q5", S, False)}
    # The flat JSONL: every current judgment's decisions, with the annotator's kind.
    lines = export(run_dir, "jsonl").path.read_text().splitlines()
    import json

    decisions = [json.loads(line) for line in lines]
    assert {(d["annotator"], d["annotator_kind"]) for d in decisions} >= {("reward-team", "person"),
                                                                           ("reward:reward", "reward")}
    assert [d["accepted"] for d in decisions if d["annotator"] == "bob"] == [False, True]  # latest version


def test_export_follows_the_runs_aggregate(run_dir):
    (run_dir / "config.yaml").write_text("feedback:\n  aggregate: any\n")
    sft = load_from_disk(str(export(run_dir, "sft").path))
    assert ("q3", P) in {(r["example_id"], r["completion"].strip()) for r in sft}
    sft = load_from_disk(str(export(run_dir, "sft", aggregate="unanimous", force=True).path))
    assert ("q3", P) not in {(r["example_id"], r["completion"].strip()) for r in sft}
