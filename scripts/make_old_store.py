"""Write a small feedback store with the code of the illume it is run with: the test asset of a store made before
the store's schema went through Alembic (tests/assets/store-68697c1.db, read by tests/test_store_migrations.py).

The committed file was made by illume at commit 68697c1 (main before the feedback package and its migrations),
from a snapshot outside the working tree:

    git archive 68697c1 | tar -x -C /tmp/illume-68697c1
    PYTHONPATH=/tmp/illume-68697c1 .venv/bin/python scripts/make_old_store.py tests/assets/store-68697c1.db

What it holds: two rounds of items (train and val, one without a question, one candidate written by another
model), judgments by a simulated critic, the reward model and two people (one through the annotation page with
the order shown, one revised, one "none fits" with a written correction), a lease, an account and its priorities.
Its clock is not fixed (created_at and friends are when it ran); tests compare what they read back with what the
same code wrote (`judgments_table`, `judged_items`), which the script also saves as JSON beside the database.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from illume.data.records import Candidate, CandidateSet

try:  # the layout this script was run with: illume/store.py before the feedback package
    from illume.store import FeedbackStore
except ImportError:  # the feedback package (a store in today's layout, for comparison)
    from illume.feedback.store import FeedbackStore
from illume.feedback.queue import AnnotationQueue

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def candidate_sets(example_ids: list[str], model: str | None = None) -> list[CandidateSet]:
    return [
        CandidateSet(
            example_id=example_id, answer="red", predicted_answer="blue",
            prompt=f"Q: what colour is {example_id}? A: red, seeing that", seed=2**62 + i,
            candidates=[Candidate(text=f"because {example_id} {k}", temperature=(0.3, 0.8)[k % 2], seed=2**62 + i,
                                  sample_idx=k, logprob=-1.2345678901234567 * (k + 1),
                                  **({"model": model} if model and k == 2 else {}))
                        for k in range(3)],
        )
        for i, example_id in enumerate(example_ids)
    ]


def main(path: Path) -> None:
    if path.exists():
        raise SystemExit(f"{path} exists: remove it first")
    with FeedbackStore(path) as store:
        store.add_candidate_sets(0, "train", candidate_sets(["a", "b", "c", "d"]),
                                 image_refs={"a": "img/a.png"}, questions={"a": "What colour is a?", "b": "And b?"})
        store.add_candidate_sets(0, "val", candidate_sets(["v1"]))
        store.set_priorities(0, {"c": 0.5, "a": 1.5})
        ids = store.candidate_ids(0)
        store.add_judgments(0, [("a", [ids["a"][0]], False, None), ("b", [], True, None),
                                ("c", ["because c 1"], False, 0.5)], "simulated:rouge_l>=0.7", kind="simulated")
        store.add_judgment(0, "a", "alice", [ids["a"][1], ids["a"][2]], seconds=3.25, client_token="tok-1")
        queue = AnnotationQueue(store)
        first = queue.lease_item(0, "bob", 2, 600, now=NOW)  # c (priority 0.5)
        candidates = [candidate_id for candidate_id, _ in queue.item(first.item_id)["candidates"]]
        queue.submit_judgment(first.item_id, "bob", [candidates[2]], seconds=4.0, client_token="tok-2",
                              annotations_per_item=2, now=NOW + timedelta(seconds=5))
        queue.replace_judgment(first.item_id, "bob", [candidates[0]], seconds=1.5, now=NOW + timedelta(seconds=30))
        second = queue.lease_item(0, "bob", 2, 600, now=NOW + timedelta(seconds=40))  # a (priority 1.5)
        queue.submit_judgment(second.item_id, "bob", [], none_fit=True, correction="because a is red all over",
                              now=NOW + timedelta(seconds=60))
        queue.lease_item(0, "bob", 2, 600, now=NOW + timedelta(seconds=70))  # b: held, not judged
        store.add_judgments(0, [("d", [], True, None)], "reward:hybrid", kind="reward")
        store.mark_sampled(0)
        store.set_round_metrics(0, {"val_accuracy": 0.5, "num_pairs": 3})
        store.mark_trained(0)
        store.add_candidate_sets(1, "train", candidate_sets(["a", "e"], model="judge-model"))
        store.add_judgments(1, [("e", ["because e 2"], False, 1.0)], "simulated:rouge_l>=0.7", kind="simulated")
        store.add_account("alice")
        expected = {
            "judgments_table": store.judgments_table(),
            "judged_items": [repr(item) for item in store.judged_items(split=None)],
            "annotator_kinds": store.annotator_kinds(),
            "history": store.judgment_history(first.item_id, "bob"),
            "candidate_sets": [repr(s) for r in store.rounds() for s in store.candidate_sets(r)],
        }
    path.with_suffix(".json").write_text(json.dumps(expected, indent=1, default=str) + "\n")
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
