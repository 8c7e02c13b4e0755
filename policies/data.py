"""The feedback as DPO pairs and KTO rows: from the feedback the loop read, the feedback store, or a saved
TRL-format dataset.

Assumptions, up front:
- From the store, pairs and rows are exactly what `illume.feedback.verdicts` gives (its docstring has the
  rules): `Feedback.pairs` (accepted x rejected candidates of one item, deduplicated; with
  `reference_as_chosen`, a reference explanation as chosen against each rejected candidate of an item with
  no accepted candidate) and `Feedback.labelled` (one row per rationale that is not contested). Every
  annotator kind counts, the reward model's too: when it is the critic, its verdicts are the feedback. So
  a loop round, `illume dpo RUN_DIR` and `illume dpo` on `illume export --format dpo` see the same pairs.
- A saved dataset is what `illume export --format dpo|kto` writes or any TRL preference/unpaired dataset:
  `prompt`, `chosen`/`rejected` or `completion`/`label`, an `images` column with one image per row, and an
  optional `example_id` column (rows without one become their own examples).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from illume import distributed
from illume.data.records import Example
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import (
    DEFAULT_AGGREGATE,
    Feedback,
    FeedbackDataError,
    PreferencePair,
    check_both_labels,
    read_feedback,
    reference_explanations,
)
from policies.base import RoundContext


class PolicyDataError(ValueError):
    """Feedback a policy cannot be optimised on; the message says what is missing and where."""


@dataclass
class UnpairedRow:
    """One KTO row (TRL's unpaired preference row): a rationale for the example's prompt, accepted (desirable)
    or rejected."""

    example_id: str
    prompt: str
    completion: str
    accepted: bool


ROUNDS_SAID = {"latest": "this round", "all": "every round so far"}
"""policy.rounds, as the console says it."""


def trained_on(context: RoundContext) -> Feedback:
    """The part of the round's feedback DPO/KTO train on (`policy.rounds`): every round so far, or this one."""
    if context.cfg.policy.rounds == "latest":
        return context.feedback.since(context.round_idx)
    return context.feedback


def _usable(feedback: Feedback, examples_by_id: dict[str, Example]) -> Feedback:
    if not feedback.items:
        raise FeedbackDataError(f"no judgments in {feedback.source}: judge a round first")
    feedback.require_examples(examples_by_id)
    return feedback


def preference_pairs(feedback: Feedback, examples_by_id: dict[str, Example],
                     reference_as_chosen: bool = False) -> list[PreferencePair]:
    """DPO pairs of `feedback` (`Feedback.usable_pairs`).

    Raises:
        PolicyDataError: no judgment, no accepted or no rejected rationale, or no pair.
    """
    try:
        return _usable(feedback, examples_by_id).usable_pairs(
            reference_explanations(examples_by_id) if reference_as_chosen else None)
    except FeedbackDataError as error:
        raise PolicyDataError(f"DPO needs preference pairs: {error}") from error


def unpaired_rows(feedback: Feedback, examples_by_id: dict[str, Example]) -> list[UnpairedRow]:
    """KTO rows of `feedback`, one per rationale that is not contested (`Feedback.labelled`).

    Raises:
        PolicyDataError: no judgment, or no accepted / no rejected rationale at all.
    """
    try:
        _usable(feedback, examples_by_id)
    except FeedbackDataError as error:
        raise PolicyDataError(f"KTO needs judged rationales: {error}") from error
    rows = [UnpairedRow(row.example_id, row.prompt, row.text, row.accepted) for row in feedback.labelled()]
    _check_labels(rows, feedback.source)
    return rows


def store_pairs(store: FeedbackStore, examples_by_id: dict[str, Example], upto_round: int | None = None,
                from_round: int | None = None, reference_as_chosen: bool = False,
                aggregate: str = DEFAULT_AGGREGATE) -> list[PreferencePair]:
    """DPO pairs from the store's judgments of rounds from_round..upto_round (`preference_pairs`)."""
    feedback = read_feedback(store, upto_round=upto_round, from_round=from_round, aggregate=aggregate)
    return preference_pairs(feedback, examples_by_id, reference_as_chosen)


def store_unpaired_rows(store: FeedbackStore, examples_by_id: dict[str, Example], upto_round: int | None = None,
                        from_round: int | None = None, aggregate: str = DEFAULT_AGGREGATE) -> list[UnpairedRow]:
    """KTO rows from the store's judgments of rounds from_round..upto_round (`unpaired_rows`)."""
    feedback = read_feedback(store, upto_round=upto_round, from_round=from_round, aggregate=aggregate)
    return unpaired_rows(feedback, examples_by_id)


def write_jsonl(records, path: Path) -> None:
    """What was trained on, one JSON object per pair / row (for audits, like SFT's training_set.jsonl)."""
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            # The record's own fields; a pair's provenance (its item and judgments, compare=False) stays out.
            f.write(json.dumps({field.name: getattr(record, field.name) for field in fields(record)
                                if field.compare}) + "\n")


def _check_labels(rows: list[UnpairedRow], where: str) -> None:
    try:
        check_both_labels([row.accepted for row in rows], where)
    except FeedbackDataError as error:
        raise PolicyDataError(f"KTO needs judged rationales: {error}") from error


def _dataset_examples(dataset, path: Path) -> tuple[list[str], dict[str, Example]]:
    """Example ids per row and one Example per id (its image from the row's `images`)."""
    if "images" not in dataset.column_names:
        raise PolicyDataError(f"{path}: no `images` column; export with images (drop --no-images)")
    ids, examples = [], {}
    for index, row in enumerate(dataset):
        if not isinstance(row["prompt"], str):
            raise PolicyDataError(f"{path}: row {index}: field `prompt` is not plain text; conversational "
                                  "datasets are not supported here (export without --conversational)")
        if len(row["images"]) != 1:
            raise PolicyDataError(f"{path}: row {index}: field `images` holds {len(row['images'])} images, "
                                  "expected exactly 1")
        example_id = str(row.get("example_id") or f"row-{index}")
        ids.append(example_id)
        if example_id not in examples:
            examples[example_id] = Example(example_id, row["images"][0], row["prompt"], [""],
                                           source=f"{path}:{index}")
    return ids, examples


def _load(path: str | Path, columns: tuple[str, ...]):
    from datasets import load_from_disk

    path = Path(path)
    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise PolicyDataError(f"{path}: not a dataset saved with datasets.save_to_disk ({error})") from error
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise PolicyDataError(f"{path}: missing column(s) {missing}; found {dataset.column_names}")
    return path, dataset


def dataset_pairs(path: str | Path) -> tuple[list[PreferencePair], dict[str, Example]]:
    """DPO pairs from a saved TRL preference dataset (prompt, chosen, rejected, images)."""
    path, dataset = _load(path, ("prompt", "chosen", "rejected"))
    ids, examples = _dataset_examples(dataset, path)
    pairs = [PreferencePair(example_id, row["prompt"], row["chosen"].strip(), row["rejected"].strip(),
                            int(row.get("round_idx") or 0), "dataset")
             for example_id, row in zip(ids, dataset)]
    if not pairs:
        raise PolicyDataError(f"{path}: the dataset has no rows")
    return pairs, examples


def dataset_unpaired_rows(path: str | Path) -> tuple[list[UnpairedRow], dict[str, Example]]:
    """KTO rows from a saved TRL unpaired dataset (prompt, completion, label, images)."""
    path, dataset = _load(path, ("prompt", "completion", "label"))
    ids, examples = _dataset_examples(dataset, path)
    rows = [UnpairedRow(example_id, row["prompt"], row["completion"].strip(), bool(row["label"]))
            for example_id, row in zip(ids, dataset)]
    _check_labels(rows, str(path))
    return rows, examples
