"""Preference pairs and per-candidate labels for the reward model, read from the feedback store.

Assumptions, up front:
- An item is one (round, example) of a split; its candidates all continue the item's prompt. Only judgments
  by annotators that `annotators` lets through count (the loop passes `not_reward_annotator`, so the reward
  model never trains on its own verdicts).
- A candidate is *accepted* when at least one counted judgment accepted it (a candidate accepted by one
  person and rejected by another counts as accepted), *rejected* when it was shown in a counted judgment
  and nobody accepted it.
- Pairs: for an item with accepted candidates, every (accepted, rejected) pair of its candidates. For an
  item judged "none fits" (no accepted candidate), with `include_reference_pairs`, each candidate is paired
  as rejected with a reference explanation of the example as chosen (candidate i with reference
  i mod #references, so every reference is used and the number of pairs stays that of the candidates).
- Pairs are deduplicated on (example_id, prompt, chosen, rejected), keeping the earliest round.
- The held-out split is by example, never by pair: `split_by_example` holds out the ids with the smallest
  seeded hash, so the split ignores the order ids come in, and later rounds over the same examples (the
  loop re-samples the same train split) hold out the same examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from illume.data.records import Example
from illume.store import FeedbackStore


class RewardDataError(ValueError):
    """Feedback the reward model cannot be trained or evaluated on; the message says what is missing."""


@dataclass
class PreferencePair:
    """One comparison: `chosen` is preferred to `rejected` as a continuation of `prompt` for the example."""

    example_id: str
    prompt: str
    """The text prompt (`Q: ... A: ..., seeing that`), without image tokens."""
    chosen: str
    rejected: str
    round_idx: int
    source: str = "judged"
    """"judged": both candidates were judged; "reference": chosen is a reference explanation of a
    "none fits" item."""


@dataclass
class _JudgedItem:
    round_idx: int
    example_id: str
    prompt: str
    labels: dict[str, bool] = field(default_factory=dict)
    """Candidate text -> accepted by >= 1 counted judgment, in the order the candidates were drawn."""


def not_reward_annotator(annotator: str) -> bool:
    """Counts every judgment except the reward model's own ("reward", "reward:...")."""
    return not annotator.startswith("reward")


def _judged_items(store: FeedbackStore, upto_round: int | None, annotators: Callable[[str], bool] | None,
                  split: str, from_round: int | None = None) -> list[_JudgedItem]:
    """The items with >= 1 counted judgment, in round order, with their candidates' labels.

    Raises:
        RewardDataError: no counted judgment in the store (rounds <= upto_round).
    """
    items: dict[tuple[int, str], _JudgedItem] = {}
    prompts: dict[int, dict[str, str]] = {}
    for row in store.judgments_table(upto_round=upto_round):
        if row["split"] != split or (annotators is not None and not annotators(row["annotator"])):
            continue
        if from_round is not None and row["round_idx"] < from_round:
            continue
        round_idx, example_id = row["round_idx"], row["example_id"]
        if round_idx not in prompts:
            prompts[round_idx] = {s.example_id: s.prompt for s in store.candidate_sets(round_idx, split)}
        item = items.setdefault((round_idx, example_id),
                                _JudgedItem(round_idx, example_id, prompts[round_idx][example_id]))
        if row["text"] is not None:  # a judgment of an item without candidates has one empty row
            item.labels[row["text"]] = item.labels.get(row["text"], False) or bool(row["accepted"])
    if not items:
        rounds = "" if upto_round is None else f" in rounds <= {upto_round}"
        rounds += "" if from_round is None else f" and >= {from_round}"
        counted = "" if annotators is None else " (from the annotators counted)"
        raise RewardDataError(f"no judgments in {store.url}{rounds}{counted}: judge a round first")
    return sorted(items.values(), key=lambda item: item.round_idx)


def _check_known(items: list[_JudgedItem], examples_by_id: dict[str, Example], store: FeedbackStore) -> None:
    unknown = sorted({item.example_id for item in items} - set(examples_by_id))
    if unknown:
        raise RewardDataError(f"{len(unknown)} judged examples in {store.url} are not in the dataset given, "
                              f"e.g. {unknown[:3]}: is it the run's dataset and split?")


def to_preference_pairs(store: FeedbackStore, examples_by_id: dict[str, Example], upto_round: int | None = None,
                        include_reference_pairs: bool = True, annotators: Callable[[str], bool] | None = None,
                        split: str = "train", from_round: int | None = None) -> list[PreferencePair]:
    """Chosen/rejected pairs from the judgments in the store (rules in the module docstring).

    Args:
        store: The run's feedback store.
        examples_by_id: The split's examples (their reference explanations for "none fits" items).
        upto_round: Last round to read (None: all).
        from_round: First round to read (None: from round 0).
        include_reference_pairs: Pair references (chosen) with the candidates of "none fits" items.
        annotators: Which annotators' judgments count (None: all).
        split: The items' split.

    Raises:
        RewardDataError: no counted judgment; a judged example missing from `examples_by_id`; no accepted or
            no rejected candidate at all; no pair.
    """
    items = _judged_items(store, upto_round, annotators, split, from_round)
    _check_known(items, examples_by_id, store)
    num_accepted = sum(accepted for item in items for accepted in item.labels.values())
    num_rejected = sum(not accepted for item in items for accepted in item.labels.values())
    if not num_accepted or not num_rejected:
        only = "accepted" if num_accepted else "rejected"
        raise RewardDataError(
            f"preference learning needs both accepted and rejected candidates, but every one of the "
            f"{num_accepted + num_rejected} candidates judged in {len(items)} items of {store.url} was {only}")
    pairs: dict[tuple[str, str, str, str], PreferencePair] = {}

    def add(item: _JudgedItem, chosen: str, rejected: str, source: str) -> None:
        key = (item.example_id, item.prompt, chosen, rejected)
        if chosen != rejected and key not in pairs:
            pairs[key] = PreferencePair(item.example_id, item.prompt, chosen, rejected, item.round_idx, source)

    for item in items:
        accepted = [text for text, ok in item.labels.items() if ok]
        rejected = [text for text, ok in item.labels.items() if not ok]
        for chosen in accepted:
            for other in rejected:
                add(item, chosen, other, "judged")
        if not accepted and include_reference_pairs:
            references = examples_by_id[item.example_id].explanations
            for i, other in enumerate(rejected if references else []):
                add(item, references[i % len(references)].strip(), other, "reference")
    if not pairs:
        raise RewardDataError(
            f"no preference pairs in {store.url}: no item has both an accepted and a rejected candidate"
            + ("" if include_reference_pairs else " (reference pairs are off)"))
    return list(pairs.values())


def judged_candidates(store: FeedbackStore, examples_by_id: dict[str, Example] | None = None,
                      upto_round: int | None = None, annotators: Callable[[str], bool] | None = None,
                      example_ids: Iterable[str] | None = None, split: str = "train",
                      from_round: int | None = None) -> list[tuple[str, str, str, bool]]:
    """Every judged candidate with its human label: the data for ROC-AUC, precision/recall and thresholds.

    Args:
        examples_by_id: The split's examples; a judged example missing from it is an error (None: no check).
        example_ids: Keep only these examples (e.g. the held-out split); None: all.

    Returns:
        (example_id, prompt, text, accepted) per candidate per item, in round and drawing order.

    Raises:
        RewardDataError: no counted judgment in the store.
    """
    keep = None if example_ids is None else set(example_ids)
    items = _judged_items(store, upto_round, annotators, split, from_round)
    if examples_by_id is not None:
        _check_known(items, examples_by_id, store)
    return [(item.example_id, item.prompt, text, accepted)
            for item in items
            if keep is None or item.example_id in keep
            for text, accepted in item.labels.items()]


def judged_example_ids(store: FeedbackStore, upto_round: int | None = None,
                       annotators: Callable[[str], bool] | None = None, split: str = "train") -> list[str]:
    """Distinct ids of the examples with >= 1 counted judgment (what `split_by_example` splits)."""
    return list(dict.fromkeys(item.example_id for item in _judged_items(store, upto_round, annotators, split)))


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
