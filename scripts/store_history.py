"""A VQA-X-sized feedback store, written fast, and the loop's per-round bookkeeping timed on it.

    python scripts/store_history.py --items 30000 --out runs/bench_store/bookkeeping.json          # SQLite
    python scripts/store_history.py --items 7500 15000 30000 --backend sqlite postgresql

`fill_history(url, ...)` writes the history of a study: `rounds` rounds of `items_per_round` train items with
`candidates` distinct candidates each, judged by `annotators` people, the last round left open for the
annotation page. `measure_bookkeeping(url, round_idx=None, steps=None, repeats=1, memory=False)` times what
the loop, `illume export`, `illume status` and the admin page read from the store each round, step by step
(BOOKKEEPING_STEPS; BEFORE_STEPS time status and the admin summary as they were computed before
illume.feedback.figures). `scripts/bench_store.py` calls both (their signatures and results are stable); run
on its own, this script prints the figures per size and the slope (seconds per 1,000 items per round, by
least squares, and the largest size's time over the linear prediction from the two smaller ones).

Assumptions, up front:
- `fill_history` writes into a store with no items (a fresh file or database; it refuses otherwise): it
  assigns every row id itself (1..n per table), so the rows can be bulk-inserted (SQLAlchemy Core
  executemany, a few large batches per transaction, one transaction per round) rather than through
  `FeedbackStore.add_candidate_sets` / `add_judgments`, which validate and look up per call and would take
  far longer at this size. The schema is created by `FeedbackStore` itself (so it is exactly ours, indexes
  included), and the rows are those the store's own writers would have written (see `fill_history`).
  On PostgreSQL the id sequences are moved past the assigned ids afterwards (so that the page's own inserts
  work) and the tables are VACUUMed and ANALYZEd (what autovacuum does to a database that has lived: without
  the VACUUM, autovacuum's insert-triggered pass over the fresh 10^6-row tables and the first reads' hint-bit
  writes ran during the page benchmark's first minutes, issue 24); SQLite gets neither, as a run's
  `feedback.db` never gets one.
- Everything is deterministic given `seed` (texts, who judges what, what is accepted, seconds), except the
  wall-clock figures.
- The texts have VQA-X's lengths: a question of ~6 words, a one-word answer, the prompt
  "Q: <question> A: <answer>, seeing that", rationales of ~10 words. Each example has a pool of
  `POOL_PER_EXAMPLE` possible rationales and each round draws `candidates` distinct ones from it, so, as
  with a real model, the same rationale of an example comes back in later rounds (rule 6 of
  illume.feedback.verdicts sees repeats).
- For PostgreSQL outside the tests, `postgres_database()` starts the throw-away cluster of tests/postgres.py
  (Debian's server binaries; as root it runs the server as the `postgres` user) and yields a fresh database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, text

from illume.data.records import POLICY_MODEL, Example
from illume.exports import export
from illume.feedback.schema import AnnotatorRow, CandidateRow, DecisionRow, ItemRow, JudgmentRow, RoundRow
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import PEOPLE, read_feedback, reference_explanations
from illume.status import summarize
from illume.training import build_training_set

REPO = Path(__file__).resolve().parents[1]
POOL_PER_EXAMPLE = 40
"""Possible rationales per example; a round draws `candidates` distinct ones of them (repeats across rounds)."""
TEMPERATURES = (0.3, 0.7, 1.0)
BATCH_ITEMS = 2_000
"""Items (with their candidates, judgments and decisions) per executemany batch."""
START = datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc)

_SUBJECTS = ("man", "woman", "boy", "girl", "dog", "cat", "player", "person", "child", "horse", "bus", "train",
             "skier", "surfer", "cook", "people", "bird", "giraffe", "elephant", "truck")
_QUESTIONS = ("what is the {s} doing", "what sport is the {s} playing", "is the {s} happy",
              "what is the {s} holding", "where is the {s}", "what color is the {s}", "why is the {s} here",
              "what room is this", "is it raining", "what time of day is it", "is the {s} moving",
              "what is the {s} wearing")
_ANSWERS = ("yes", "no", "surfing", "skiing", "tennis", "kitchen", "umbrella", "red", "night", "eating",
            "baseball", "frisbee", "beach", "standing", "blue", "sleeping", "bathroom", "riding", "two", "snow")
_WORDS = ("he", "she", "they", "is", "are", "the", "a", "on", "in", "with", "holding", "wearing", "standing",
          "sitting", "riding", "board", "wave", "ocean", "racket", "court", "ball", "snow", "mountain", "skis",
          "table", "food", "plate", "street", "sky", "dark", "light", "sun", "water", "grass", "field", "bat",
          "glove", "helmet", "jacket", "smiling", "looking", "at", "there", "shirt", "kitchen", "stove",
          "oven", "sink", "bed", "pillow", "umbrella", "rain", "wet", "people", "crowd", "game", "playing",
          "running", "jumping", "air", "under", "behind", "front", "of", "his", "her", "their", "hand",
          "hands", "open", "mouth", "eyes", "closed", "many", "two", "three", "white", "red", "blue", "green")


def _rationale(example: int, draw: int, seed: int) -> str:
    """Draw `draw` of the example's pool: ~10 words (7-13), the same text whenever it is drawn again."""
    rng = random.Random((seed * 1_000_003 + example) * 101 + draw)
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(7, 13)))


def _annotator(k: int) -> str:
    return f"annotator-{k}"


def fill_history(url: str, items_per_round: int = 30_000, rounds: int = 4, candidates: int = 10,
                 annotators: int = 5, overlap: float = 0.1, open_round: bool = True, seed: int = 0,
                 progress: bool = True) -> dict:
    """Write a study's history into the empty store at `url` (a SQLite path or URL, or a PostgreSQL URL).

    What it writes, as the loop, the sampler and the annotation page would have:
    - `rounds` rows 0..rounds-1, each `sampled_at` set (candidates stored, `mark_sampled`); every round but an
      open one also `trained_at` and `metrics` (`mark_trained`, `set_round_metrics`).
    - Per round, `items_per_round` train items for the same examples "vqax-00000".. (as every round samples
      the whole train split): question, prompt "Q: <question> A: <answer>, seeing that", answer,
      predicted_answer, a seed, an image path; priority None.
    - Per item `candidates` distinct candidates (drawn from the example's pool of `POOL_PER_EXAMPLE`
      rationales, so texts come back in other rounds), position 0.., temperature, seed, sample_idx, a
      logprob, model "policy".
    - `annotators` people "annotator-0".. registered with kind person (`annotators` rows).
    - In every judged round (all of them, or all but the last when `open_round`): each item judged by
      annotator item_index % annotators; a share `overlap` of the items (every round(1/overlap)-th) also by
      the next min(3, annotators) - 1 annotators (round robin). A judgment accepts 0-3 of the candidates
      (probabilities .35/.35/.2/.1 for the first annotator; the others flip each of its decisions with
      probability .15), `none_fit` when it accepts none, `seconds` ~ lognormal (median ~15 s), a page
      `client_token`, `created_at` inside the round's day; one decision per candidate with `position_shown`
      (a shuffled order), as the annotation page writes them.
    - When `open_round`, round `rounds - 1` is sampled but has no judgment and no lease: what the page hands
      out (AnnotationQueue.open_round).

    Returns:
        {"url", "rounds", "judged_rounds" (list), "open_round" (int | None), "items_per_round", "items",
        "candidates", "judgments", "decisions", "accepted_decisions", "none_fit", "overlap_items_per_round",
        "judged_items_per_round" {round: n}, "judgments_per_round" {round: n}, "people" {name: {"judgments",
        "total_seconds"}}, "seconds" (wall clock of the fill)}.

    Raises:
        ValueError: The store already has items, or a size below 1.
    """
    if min(items_per_round, rounds, candidates, annotators) < 1 or not 0 <= overlap <= 1:
        raise ValueError("items_per_round, rounds, candidates and annotators must be >= 1, overlap in [0, 1]")
    if candidates > POOL_PER_EXAMPLE:
        raise ValueError(f"at most {POOL_PER_EXAMPLE} candidates per item")
    start = time.perf_counter()
    store = FeedbackStore(url)  # creates (or migrates) the schema: exactly ours
    engine = store.engine.execution_options(illume_begin="IMMEDIATE")  # our own write lock on SQLite
    with engine.connect() as connection:
        if connection.scalar(select(func.count()).select_from(ItemRow)):
            raise ValueError(f"{store.url} already has items: fill_history writes into an empty store")
    rng = random.Random(seed)
    names = [_annotator(k) for k in range(annotators)]
    every = round(1 / overlap) if overlap > 0 else 0
    per_extra = min(3, annotators) - 1
    judged_rounds = list(range(rounds - 1 if open_round else rounds))
    counts: dict[str, Any] = {
        "url": store.url, "rounds": rounds, "judged_rounds": judged_rounds,
        "open_round": rounds - 1 if open_round else None, "items_per_round": items_per_round,
        "items": 0, "candidates": 0, "judgments": 0, "decisions": 0, "accepted_decisions": 0, "none_fit": 0,
        "overlap_items_per_round": len(range(0, items_per_round, every)) if every and per_extra else 0,
        "judged_items_per_round": {}, "judgments_per_round": {},
        "people": {name: {"judgments": 0, "total_seconds": 0.0} for name in names},
    }
    # The examples: the same for every round (the loop samples the whole train split each round).
    examples = []
    for e in range(items_per_round):
        subject = rng.choice(_SUBJECTS)
        question = rng.choice(_QUESTIONS).format(s=subject) + "?"
        answer = rng.choice(_ANSWERS)
        examples.append((f"vqax-{e:05d}", question, answer, rng.randrange(2**31)))
    with engine.begin() as connection:
        connection.execute(insert(AnnotatorRow.__table__), [
            {"name": name, "kind": "person", "created_at": START} for name in names])
    ids = {"item": 0, "candidate": 0, "judgment": 0}
    for round_idx in range(rounds):
        judged = round_idx in judged_rounds
        day = START + timedelta(days=7 * round_idx)
        with engine.begin() as connection:
            connection.execute(insert(RoundRow.__table__).values(
                round_idx=round_idx, created_at=day, sampled_at=day + timedelta(hours=1),
                trained_at=day + timedelta(days=6) if judged else None,
                metrics={"round": round_idx, "trained": True, "val": {}} if judged else None))
            for batch_start in range(0, items_per_round, BATCH_ITEMS):
                rows = _round_batch(examples[batch_start:batch_start + BATCH_ITEMS], batch_start, round_idx,
                                    judged, candidates, names, every, per_extra, day, seed, rng, ids, counts)
                for table, table_rows in rows.items():
                    if table_rows:
                        connection.execute(insert(table), table_rows)
        counts["items"] += items_per_round
        if progress:
            print(f"  round {round_idx}: {ids['item']} items, {ids['candidate']} candidates, "
                  f"{ids['judgment']} judgments ({time.perf_counter() - start:.0f} s)", flush=True)
    if store.engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            for table in ("items", "candidates", "judgments"):
                connection.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM (ANALYZE)"))
    store.close()
    counts["seconds"] = round(time.perf_counter() - start, 2)
    return counts


def _round_batch(examples, first_index, round_idx, judged, candidates, names, every, per_extra, day, seed, rng,
                 ids, counts) -> dict:
    """The rows of one batch of a round's items: table -> list of dicts (ids taken from `ids`)."""
    items, candidate_rows, judgments, decisions = [], [], [], []
    for offset, (example_id, question, answer, example_seed) in enumerate(examples):
        index = first_index + offset
        ids["item"] += 1
        item_id = ids["item"]
        items.append({
            "id": item_id, "round_idx": round_idx, "example_id": example_id, "split": "train",
            "prompt": f"Q: {question} A: {answer}, seeing that", "answer": answer,
            "predicted_answer": answer if rng.random() < 0.8 else rng.choice(_ANSWERS), "seed": example_seed,
            "image_ref": f"/data/coco/train2014/COCO_train2014_{example_seed % 600_000:012d}.jpg",
            "created_at": day, "question": question, "priority": None,
        })
        candidate_ids = []
        for position, draw in enumerate(rng.sample(range(POOL_PER_EXAMPLE), candidates)):
            ids["candidate"] += 1
            candidate_ids.append(ids["candidate"])
            candidate_rows.append({
                "id": ids["candidate"], "item_id": item_id, "text": _rationale(index, draw, seed),
                "temperature": TEMPERATURES[position % len(TEMPERATURES)], "seed": example_seed,
                "sample_idx": position // len(TEMPERATURES), "logprob": -rng.uniform(5.0, 40.0),
                "position": position, "model": POLICY_MODEL,
            })
        counts["candidates"] += candidates
        if not judged:
            continue
        first = index % len(names)
        who = [first] + ([(first + k) % len(names) for k in range(1, per_extra + 1)]
                         if every and index % every == 0 else [])
        counts["judged_items_per_round"][round_idx] = counts["judged_items_per_round"].get(round_idx, 0) + 1
        base = set(rng.sample(candidate_ids, rng.choices((0, 1, 2, 3), (0.35, 0.35, 0.2, 0.1))[0]))
        for k, annotator in enumerate(who):
            accepted = base if k == 0 else {c for c in candidate_ids if (c in base) != (rng.random() < 0.15)}
            seconds = round(min(600.0, rng.lognormvariate(2.7, 0.6)), 1)
            ids["judgment"] += 1
            judgments.append({
                "id": ids["judgment"], "item_id": item_id, "annotator": names[annotator],
                "none_fit": not accepted, "seconds": seconds,
                "created_at": day + timedelta(days=1, seconds=3 * index + k), "client_token":
                f"fill-{seed}-{ids['judgment']:09d}", "updated_at": None, "correction": None,
            })
            shown = list(candidate_ids)
            rng.shuffle(shown)
            place = {candidate_id: i for i, candidate_id in enumerate(shown)}
            decisions += [{"judgment_id": ids["judgment"], "candidate_id": c, "accepted": c in accepted,
                           "position_shown": place[c]} for c in candidate_ids]
            person = counts["people"][names[annotator]]
            person["judgments"] += 1
            person["total_seconds"] += seconds
            counts["judgments"] += 1
            counts["judgments_per_round"][round_idx] = counts["judgments_per_round"].get(round_idx, 0) + 1
            counts["decisions"] += len(candidate_ids)
            counts["accepted_decisions"] += len(accepted)
            counts["none_fit"] += not accepted
    return {ItemRow.__table__: items, CandidateRow.__table__: candidate_rows, JudgmentRow.__table__: judgments,
            DecisionRow.__table__: decisions}


# -------------------------------------------------------------------- the bookkeeping, timed


def _loop_counts(store: FeedbackStore, round_idx: int) -> dict:
    """What the loop and the round table count with the database each round (illume.loop)."""
    return {"rounds": {r: {**store.round_counts(r), "status": store.round_status(r)} for r in store.rounds()},
            "judgments": store.num_judgments(), "people": store.num_judgments(kinds=PEOPLE)}


def _loop_verdicts(store: FeedbackStore, round_idx: int) -> dict:
    """The loop's round row (illume.loop.read_verdicts): accepted %, new and total rationales."""
    feedback = read_feedback(store, upto_round=round_idx)
    accepted = feedback.accepted()
    return {"items_with_accepted": feedback.items_with_accepted(round_idx), "train_rationales": len(accepted),
            "new_rationales": sum(row.item.round_idx == round_idx for row in accepted)}


def _training_sets(store: FeedbackStore, round_idx: int) -> dict:
    """Each policy's training set from the store (selection-SFT, DPO and reward-model pairs, KTO rows)."""
    feedback = read_feedback(store, upto_round=round_idx)
    examples = {item.example_id: Example(item.example_id, Path("unused.jpg"), item.question or "", [item.answer],
                                         ["a reference explanation"]) for item in feedback.items}
    rows = build_training_set([(row.example_id, row.text) for row in feedback.accepted()],
                              list(examples.values()), None, None, seed=round_idx)
    return {"sft_rows": len(rows), "pairs": len(feedback.pairs(reference_explanations(examples))),
            "kto_rows": len(feedback.labelled()),
            "reward_pairs": len(read_feedback(store, upto_round=round_idx, kinds=PEOPLE).pairs())}


def _exports(store: FeedbackStore, round_idx: int, run_dir: Path) -> dict:
    """`illume export` of every judgment (jsonl) and of the SFT rows (as JSONL, without images)."""
    jsonl = export(run_dir, "jsonl", run_dir / "judgments.jsonl", upto_round=round_idx, images=False)
    sft = export(run_dir, "sft", run_dir / "sft.jsonl", upto_round=round_idx, as_jsonl=True, images=False)
    return {"judgment_rows": jsonl.num_rows, "sft_rows": sft.num_rows}


def _admin_summary(client: Any) -> dict:
    """The admin page's GET /api/admin/summary (recomputed: the cache is cleared by a new client)."""
    response = client.get("/api/admin/summary")
    response.raise_for_status()
    return response.json()


def _status_before(store: FeedbackStore) -> dict:
    """`illume status`'s figures computed as before illume.feedback.figures (every judged item read into
    Python and looped over), for comparison only."""
    import statistics

    from illume.feedback.agreement import krippendorff_alpha

    feedback = read_feedback(store, split="train")
    rounds = {}
    for round_idx in store.rounds():
        decisions = [[int(j.decisions[c.id]) for j in item.judgments if c.id in j.decisions]
                     for item in feedback.items if item.round_idx == round_idx for c in item.candidates]
        rounds[round_idx] = {**store.round_counts(round_idx), "status": store.round_status(round_idx),
                             "items_with_accepted": feedback.items_with_accepted(round_idx),
                             "alpha": krippendorff_alpha(decisions) if any(len(d) > 1 for d in decisions) else None}
    seconds: dict[str, list[float]] = {}
    for item in feedback.items:
        for judgment in item.judgments:
            seconds.setdefault(judgment.annotator, [])
            if judgment.seconds is not None:
                seconds[judgment.annotator].append(judgment.seconds)
    return {"rounds": len(rounds), "people": {name: statistics.median(values) if values else None
                                              for name, values in seconds.items()}}


def _admin_summary_before(store: FeedbackStore) -> dict:
    """The admin summary's team figures as computed before illume.feedback.figures (the team summary in Python
    over every judged train item, kept as the tests' oracle), for comparison only."""
    from illume.feedback.agreement import reward_vs_people

    if str(REPO) not in sys.path:  # tests/ importable when run as `python scripts/store_history.py`
        sys.path.insert(0, str(REPO))
    from tests.team_summary_oracle import team_summary

    items = store.judged_items("train")
    team = team_summary(items, {r: store.round_counts(r)["items"] for r in store.rounds()})
    return {"rounds": len(team["rounds"]), "reward_vs_people": reward_vs_people(items) is not None}


def _timed(step, memory: bool, repeats: int) -> dict:
    """Best wall clock of `repeats` calls of step(); with `memory`, one more call under tracemalloc: its
    peak of Python allocations (MiB)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        best = min(best, time.perf_counter() - start)
    out = {"seconds": round(best, 3)}
    if memory:
        tracemalloc.start()
        step()
        out["peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    out["result"] = result
    return out


def measure_bookkeeping(url: str, round_idx: int | None = None, steps: Sequence[str] | None = None,
                        repeats: int = 1, memory: bool = False) -> dict:
    """Time each piece of a round's bookkeeping on the store at `url`, separately.

    Args:
        url: The store (as `fill_history` left it, or any run's store).
        round_idx: The round the loop has just had judged (the training sets cover rounds <= it); None: the
            latest round with a judgment.
        steps: Which of BOOKKEEPING_STEPS to time (None: all), in that order:
            - "counts": the loop's and round table's counts: `round_counts` + `round_status` of every round,
              `num_judgments()` and `num_judgments(kinds=PEOPLE)`;
            - "candidate_sets": `candidate_sets` of the round (the loop reads them back after sampling);
            - "verdicts": the loop's round row: `read_feedback(upto_round)`, `accepted()`,
              `items_with_accepted`;
            - "training_sets": what the policies build: selection-SFT rows (`build_training_set`), DPO pairs
              with references, KTO rows, the reward model's pairs (people only);
            - "exports": `illume export` (`illume.exports.export`) of every judgment as JSONL and of the SFT
              rows as JSONL, without images, rounds <= round_idx;
            - "status": `illume status` (`illume.status.summarize`);
            - "admin_summary": the admin page's GET /api/admin/summary, recomputed (annotation progress,
              `team_summary`, `reward_vs_people`).
        repeats: Calls per step; the best time is kept.
        memory: Also measure each step's peak of Python allocations (tracemalloc, one extra call).

    Returns:
        {"url", "round_idx", "items" (train items in rounds <= round_idx), "judgments" (all), "steps":
        {name: {"seconds", "peak_mib" (with memory), "result" (small dict of what the step counted, to check
        it did its work)}}, "total_seconds" (sum over steps)}.
    """
    steps = list(BOOKKEEPING_STEPS if steps is None else steps)
    unknown = sorted(set(steps) - set(BOOKKEEPING_STEPS) - set(BEFORE_STEPS))
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {BOOKKEEPING_STEPS + BEFORE_STEPS}")
    store = FeedbackStore(url)
    if round_idx is None:
        judged = [r for r in store.rounds() if store.round_counts(r)["judgments"]]
        if not judged:
            raise ValueError(f"{store.url} has no judgment")
        round_idx = judged[-1]
    with tempfile.TemporaryDirectory(prefix="illume-bookkeeping-") as folder:
        run_dir = Path(folder)
        # `illume export RUN_DIR` finds the store through RUN_DIR/config.yaml's store_url.
        (run_dir / "config.yaml").write_text(json.dumps({"store_url": _plain_url(store)}))
        calls = {
            "counts": lambda: _loop_counts(store, round_idx),
            "candidate_sets": lambda: {"sets": len(store.candidate_sets(round_idx))},
            "verdicts": lambda: _loop_verdicts(store, round_idx),
            "training_sets": lambda: _training_sets(store, round_idx),
            "exports": lambda: _exports(store, round_idx, run_dir),
            "status": lambda: {"rounds": len(summarize(store)["rounds"])},
            "admin_summary": lambda: {"rounds": len(_admin_summary(_admin_client(store, run_dir))["progress"])},
            "status_before": lambda: _status_before(store),
            "admin_summary_before": lambda: _admin_summary_before(store),
        }
        measured = {name: _timed(calls[name], memory, repeats) for name in steps}
    items = sum(store.round_counts(r)["items"] for r in store.rounds() if r <= round_idx)
    judgments = store.num_judgments()
    store.close()
    return {"url": store.url, "round_idx": round_idx, "items": items, "judgments": judgments, "steps": measured,
            "total_seconds": round(sum(step["seconds"] for name, step in measured.items()
                                       if name in BOOKKEEPING_STEPS), 3)}


BOOKKEEPING_STEPS = ("counts", "candidate_sets", "verdicts", "training_sets", "exports", "status", "admin_summary")
"""The steps `measure_bookkeeping` times by default (and sums into total_seconds)."""
BEFORE_STEPS = ("status_before", "admin_summary_before")
"""The same figures as `status` and the team part of `admin_summary`, computed as before
illume.feedback.figures (every judged item read into Python): asked for by name, for comparison."""


def _plain_url(store: FeedbackStore) -> str:
    return store.engine.url.render_as_string(hide_password=False)


def _admin_client(store: FeedbackStore, run_dir: Path) -> Any:
    """A test client of the annotation server without accounts (the admin page is open), fresh cache."""
    from fastapi.testclient import TestClient

    from illume.annotate.server import create_app
    from illume.config import AnnotateConfig

    # The app answers only its bound host's names (127.0.0.1 by default), not TestClient's "testserver".
    return TestClient(create_app(store, run_dir, AnnotateConfig()), base_url="http://127.0.0.1")


@contextlib.contextmanager
def postgres_databases() -> Iterator[Callable[[], str]]:
    """A throw-away PostgreSQL cluster (tests/postgres.py's); yields a function that creates a fresh database
    on it and returns its SQLAlchemy URL. The cluster is removed on exit. RuntimeError without PostgreSQL's
    server binaries."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.postgres import Cluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found; apt-get install postgresql")
    cluster = Cluster(bindir)
    try:
        cluster.start()
        yield lambda: cluster.url(cluster.create_database())
    finally:
        cluster.stop()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on a throw-away PostgreSQL cluster, as a SQLAlchemy URL (`postgres_databases`)."""
    with postgres_databases() as new_database:
        yield new_database()


def slope(sizes: Sequence[float], seconds: Sequence[float]) -> dict:
    """Least-squares line seconds = a + b * size through the points, b per 1,000 items per round, and how
    straight it is: the largest size's seconds over what the line through the two smallest sizes predicts
    (1 = linear, > 1 = worse than linear)."""
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mean_x) ** 2 for x in sizes)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sxx if sxx else 0.0
    out = {"seconds_per_1k_items": round(1000 * b, 4), "intercept_seconds": round(mean_y - b * mean_x, 3)}
    if n >= 3:
        (x0, y0), (x1, y1), (xl, yl) = sorted(zip(sizes, seconds))[0], sorted(zip(sizes, seconds))[1], max(
            zip(sizes, seconds))
        predicted = y0 + (y1 - y0) / (x1 - x0) * (xl - x0) if x1 != x0 else y1
        out["largest_over_linear"] = round(yl / predicted, 2) if predicted > 0 else None
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[7_500, 15_000, 30_000],
                        help="items per round; several sizes give the slope")
    parser.add_argument("--backend", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--annotators", type=int, default=5)
    parser.add_argument("--steps", nargs="+", choices=BOOKKEEPING_STEPS + BEFORE_STEPS, default=None,
                        help="default: every bookkeeping step (not the *_before comparisons)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also each step's tracemalloc peak")
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite stores go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "runs": []}
    with contextlib.ExitStack() as stack:
        folder = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="illume-history-")))
        new_pg = stack.enter_context(postgres_databases()) if "postgresql" in args.backend else None
        for backend in args.backend:
            for items in args.items:
                url = (str(folder / f"history-{items}.db") if backend == "sqlite" else new_pg())
                if backend == "sqlite" and Path(url).exists():
                    for suffix in ("", "-wal", "-shm"):
                        Path(url + suffix).unlink(missing_ok=True)
                print(f"{backend}: filling {items} items x {args.candidates} candidates x {args.rounds} rounds",
                      flush=True)
                filled = fill_history(url, items, args.rounds, args.candidates, args.annotators)
                figures = measure_bookkeeping(url, steps=args.steps, repeats=args.repeats, memory=args.memory)
                run = {"backend": backend, "items_per_round": items, "fill": filled, "bookkeeping": figures}
                results["runs"].append(run)
                print(f"  filled in {filled['seconds']:.0f} s; bookkeeping of round {figures['round_idx']} "
                      f"({figures['items']} judged-round items, {figures['judgments']} judgments):")
                for name, step in figures["steps"].items():
                    memory = f", peak {step['peak_mib']} MiB" if "peak_mib" in step else ""
                    print(f"    {name:15s} {step['seconds']:8.2f} s{memory}", flush=True)
        results["slopes"] = {}
        for backend in args.backend:
            runs = [r for r in results["runs"] if r["backend"] == backend]
            if len(runs) < 2:
                continue
            sizes = [r["items_per_round"] for r in runs]
            per_step = {name: slope(sizes, [r["bookkeeping"]["steps"][name]["seconds"] for r in runs])
                        for name in runs[0]["bookkeeping"]["steps"]}
            per_step["total"] = slope(sizes, [r["bookkeeping"]["total_seconds"] for r in runs])
            results["slopes"][backend] = per_step
            print(f"{backend}: seconds per 1,000 items per round (and largest size / linear prediction)")
            for name, line in per_step.items():
                print(f"    {name:15s} {line['seconds_per_1k_items']:8.3f}  x{line.get('largest_over_linear')}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
