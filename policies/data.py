"""The feedback as DPO pairs and KTO rows, from the feedback store or from a saved TRL-format dataset.

Assumptions, up front:
- Pairs come from `reward.pairs.to_preference_pairs` (accepted x rejected candidates of one item, deduplicated;
  with `reference_as_chosen`, a reference explanation as chosen against each candidate of a "none fits"
  item). Every judgment counts, the reward model's too: when it is the critic, its verdicts are the feedback.
- KTO rows are the judged candidates themselves (a selection is exactly an unpaired accept/reject label):
  one row per (example, prompt, rationale), accepted when any judgment accepted it.
- A saved dataset is what `illume export --format dpo|kto` writes or any TRL preference/unpaired dataset:
  `prompt`, `chosen`/`rejected` or `completion`/`label`, an `images` column with one image per row, and an
  optional `example_id` column (rows without one become their own examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from illume.data.records import Example
from illume.store import FeedbackStore
from reward.pairs import PreferencePair, RewardDataError, judged_candidates, to_preference_pairs


class PolicyDataError(ValueError):
    """Feedback a policy cannot be optimised on; the message says what is missing and where."""


@dataclass
class LabelledRationale:
    """One KTO row: a rationale for the example's prompt, accepted (desirable) or rejected."""

    example_id: str
    prompt: str
    completion: str
    accepted: bool


def store_pairs(store: FeedbackStore, examples_by_id: dict[str, Example], upto_round: int | None = None,
                from_round: int | None = None, reference_as_chosen: bool = False) -> list[PreferencePair]:
    """DPO pairs from the judgments of rounds from_round..upto_round.

    Raises:
        PolicyDataError: no judgment, no accepted or no rejected candidate, or no pair.
    """
    try:
        return to_preference_pairs(store, examples_by_id, upto_round=upto_round, from_round=from_round,
                                   include_reference_pairs=reference_as_chosen)
    except RewardDataError as error:
        raise PolicyDataError(f"DPO needs preference pairs: {error}") from error


def store_labelled_rationales(store: FeedbackStore, examples_by_id: dict[str, Example],
                              upto_round: int | None = None,
                              from_round: int | None = None) -> list[LabelledRationale]:
    """KTO rows from the judgments of rounds from_round..upto_round, one per distinct rationale of a prompt.

    Raises:
        PolicyDataError: no judgment, or no accepted / no rejected rationale at all.
    """
    try:
        judged = judged_candidates(store, examples_by_id, upto_round=upto_round, from_round=from_round)
    except RewardDataError as error:
        raise PolicyDataError(f"KTO needs judged rationales: {error}") from error
    rows: dict[tuple[str, str, str], LabelledRationale] = {}
    for example_id, prompt, text, accepted in judged:
        row = rows.setdefault((example_id, prompt, text), LabelledRationale(example_id, prompt, text, False))
        row.accepted = row.accepted or accepted
    _check_both_labels([row.accepted for row in rows.values()], str(store.url))
    return list(rows.values())


def _check_both_labels(labels: list[bool], where: str) -> None:
    if not any(labels) or all(labels):
        only = "accepted" if labels and all(labels) else "rejected"
        raise PolicyDataError(f"KTO needs both accepted and rejected rationales, but all {len(labels)} "
                              f"in {where} are {only}")


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


def dataset_labelled_rationales(path: str | Path) -> tuple[list[LabelledRationale], dict[str, Example]]:
    """KTO rows from a saved TRL unpaired dataset (prompt, completion, label, images)."""
    path, dataset = _load(path, ("prompt", "completion", "label"))
    ids, examples = _dataset_examples(dataset, path)
    rows = [LabelledRationale(example_id, row["prompt"], row["completion"].strip(), bool(row["label"]))
            for example_id, row in zip(ids, dataset)]
    _check_both_labels([row.accepted for row in rows], str(path))
    return rows, examples
