"""Preference pairs and per-candidate labels for the reward model, read from the feedback store.

Which candidates count as accepted or rejected, how several annotators and rounds combine, and how pairs
are formed is decided in one place, `illume.feedback.verdicts` (its docstring has the rules); this module
adds what is the reward model's own:
- By default only people's judgments count (`verdicts.PEOPLE`: person and simulated), so the reward model
  never trains on its own verdicts; the kind is the annotator's stored kind, not its name.
- Reference pairs (`include_reference_pairs`): an item with no accepted candidate pairs its example's
  reference explanations (chosen) with its rejected candidates.
- The held-out split is by example, never by pair: `split_by_example` holds out the ids with the smallest
  seeded hash, so the split ignores the order ids come in, and later rounds over the same examples (the
  loop re-samples the same train split) hold out the same examples. `calibration_split` (what the fits use)
  swaps one example in when that split would hold out no accepted (or no rejected) candidate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence

from illume.data.records import Example
from illume.feedback.store import FeedbackStore
from illume.feedback.verdicts import (
    ACCEPTED,
    DEFAULT_AGGREGATE,
    PEOPLE,
    REJECTED,
    Feedback,
    FeedbackDataError,
    OneSidedFeedback,
    PreferencePair,
    read_feedback,
    reference_explanations,
)

__all__ = ["OneSidedJudgments", "PreferencePair", "RewardDataError", "calibration_split", "judged_candidates",
           "judged_example_ids", "reward_feedback", "split_by_example", "to_preference_pairs"]


class RewardDataError(ValueError):
    """Feedback the reward model cannot be trained or evaluated on; the message says what is missing."""


class OneSidedJudgments(RewardDataError):
    """Judged rationales (all of them, or the held-out ones) that are all accepted or all rejected: judging more
    items may bring the other side (reward.critic extends a budgeted round 0 on it)."""


def reward_feedback(store: FeedbackStore, upto_round: int | None = None, kinds: Collection[str] | None = PEOPLE,
                    split: str = "train", from_round: int | None = None,
                    aggregate: str = DEFAULT_AGGREGATE) -> Feedback:
    """The verdicts the reward model learns from: rounds from_round..upto_round, judgments by `kinds`.

    Raises:
        RewardDataError: no counted judgment in those rounds.
    """
    feedback = read_feedback(store, split=split, upto_round=upto_round, from_round=from_round,
                             aggregate=aggregate, kinds=kinds)
    if not feedback.items:
        raise RewardDataError(f"no judgments in {feedback.source}: judge a round first")
    return feedback


def preference_pairs(feedback: Feedback, examples_by_id: dict[str, Example],
                     include_reference_pairs: bool = True) -> list[PreferencePair]:
    """Chosen/rejected pairs of `feedback` (verdicts rule 7), with reference pairs if asked.

    Raises:
        RewardDataError: a judged example missing from `examples_by_id`; no accepted or no rejected rationale
            at all; no pair.
    """
    try:
        feedback.require_examples(examples_by_id)
        return feedback.usable_pairs(reference_explanations(examples_by_id) if include_reference_pairs else None)
    except OneSidedFeedback as error:
        raise OneSidedJudgments(f"preference learning: {error}") from error
    except FeedbackDataError as error:
        raise RewardDataError(f"preference learning: {error}") from error


def labelled_candidates(feedback: Feedback, example_ids: Iterable[str] | None = None
                        ) -> list[tuple[str, str, str, bool]]:
    """(example_id, prompt, text, accepted) per judged candidate per item, in round and drawing order; the
    label is the rationale's verdict (verdicts rule 6), contested ones left out. The data for ROC-AUC,
    precision/recall and thresholds."""
    keep = None if example_ids is None else set(example_ids)
    rows = []
    for item, verdicts in feedback.item_verdicts():
        if keep is not None and item.example_id not in keep:
            continue
        for candidate in item.candidates:
            status = feedback.status(item, candidate.text) if candidate.id in verdicts else None
            if status in (ACCEPTED, REJECTED):
                rows.append((item.example_id, item.prompt, candidate.text, status == ACCEPTED))
    return rows


def to_preference_pairs(store: FeedbackStore, examples_by_id: dict[str, Example], upto_round: int | None = None,
                        include_reference_pairs: bool = True, kinds: Collection[str] | None = PEOPLE,
                        split: str = "train", from_round: int | None = None,
                        aggregate: str = DEFAULT_AGGREGATE) -> list[PreferencePair]:
    """`preference_pairs` of the store's judgments (kinds None: every annotator's).

    Raises:
        RewardDataError: no counted judgment, or as `preference_pairs`.
    """
    feedback = reward_feedback(store, upto_round, kinds, split, from_round, aggregate)
    return preference_pairs(feedback, examples_by_id, include_reference_pairs)


def judged_candidates(store: FeedbackStore, examples_by_id: dict[str, Example] | None = None,
                      upto_round: int | None = None, kinds: Collection[str] | None = PEOPLE,
                      example_ids: Iterable[str] | None = None, split: str = "train",
                      from_round: int | None = None, aggregate: str = DEFAULT_AGGREGATE
                      ) -> list[tuple[str, str, str, bool]]:
    """`labelled_candidates` of the store's judgments.

    Args:
        examples_by_id: The split's examples; a judged example missing from it is an error (None: no check).
        example_ids: Keep only these examples (e.g. the held-out split); None: all.

    Raises:
        RewardDataError: no counted judgment in the store.
    """
    feedback = reward_feedback(store, upto_round, kinds, split, from_round, aggregate)
    if examples_by_id is not None:
        try:
            feedback.require_examples(examples_by_id)
        except FeedbackDataError as error:
            raise RewardDataError(str(error)) from error
    return labelled_candidates(feedback, example_ids)


def judged_example_ids(feedback: Feedback) -> list[str]:
    """Distinct ids of the examples with >= 1 counted judgment (what `split_by_example` splits)."""
    return list(dict.fromkeys(item.example_id for item in feedback.items))


def _rank(seed: int, example_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{example_id}".encode()).digest()[:8], "little")


def split_by_example(example_ids: Sequence[str], heldout_fraction: float,
                     seed: int = 0) -> tuple[list[str], list[str]]:
    """Split example ids into (train, held-out), deterministically, whatever their order.

    round(n * heldout_fraction) ids with the smallest seeded hash are held out (at least 1 and at most n - 1
    when the fraction is > 0 and n >= 2).

    Returns:
        (train_ids, heldout_ids), each sorted.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    ids = sorted(set(example_ids))
    num_heldout = round(len(ids) * heldout_fraction)
    if heldout_fraction > 0 and len(ids) >= 2:
        num_heldout = min(max(num_heldout, 1), len(ids) - 1)
    heldout = set(sorted(ids, key=lambda example_id: _rank(seed, example_id))[:num_heldout])
    return [i for i in ids if i not in heldout], [i for i in ids if i in heldout]


def calibration_split(feedback: Feedback, heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """`split_by_example` of the judged examples, repaired so that the held-out side holds both labels where the
    judgments allow it: a threshold is calibrated on held-out candidates of both kinds.

    When the seeded split holds out no example with an accepted (or a rejected) candidate while the train side
    has two or more, the train example of that kind with the smallest seeded hash swaps with the held-out
    example with the largest whose leaving keeps the other label held out. The sizes stay; a split that held
    out both labels is `split_by_example`'s unchanged. A model whose round 0 accepts one rationale in a hundred
    (the HF demo's) would otherwise hold none out in about one seed in four, and could not calibrate.

    Returns:
        (train_ids, heldout_ids), each sorted.
    """
    train, heldout = split_by_example(judged_example_ids(feedback), heldout_fraction, seed)
    if not heldout:
        return train, heldout
    rows = labelled_candidates(feedback)
    holders = {label: {row[0] for row in rows if row[3] == label} for label in (True, False)}
    for label in (True, False):
        train_side, held = set(train), set(heldout)
        if held & holders[label] or len(train_side & holders[label]) < 2:
            continue
        incoming = min(train_side & holders[label], key=lambda example_id: _rank(seed, example_id))
        other = holders[not label]
        leaving = [e for e in sorted(held, key=lambda example_id: _rank(seed, example_id), reverse=True)
                   if e not in other or incoming in other or len(held & other) >= 2]
        if leaving:
            held = held - {leaving[0]} | {incoming}
            train = sorted(train_side - {incoming} | {leaving[0]})
            heldout = sorted(held)
    return train, heldout
