"""What was accepted: the one module that turns judgments into verdicts and into training and export rows.

Selection-SFT, the reward model, DPO, KTO, the exports, the loop's report and `illume status` all read
feedback through `Feedback` (usually `read_feedback(store, ...)`), so they can never disagree. The rules:

1. **Items and judgments.** An item is one example in one round and split; its candidates were judged side
   by side. A judgment is one annotator's decision on one item: each candidate shown accepted or not.
2. **Revisions.** An annotator has at most one current judgment per item: a revision (the annotation page's
   "go back", `AnnotationQueue.replace_judgment`) replaces it, and only the latest version counts. The store
   keeps the earlier versions (`FeedbackStore.judgment_history`); nothing here reads them.
3. **Who judged.** Whether a judgment counts is decided by its annotator's *kind*, stored with the
   annotator (`illume.data.records.ANNOTATOR_KINDS`), never by the annotator's name. `PEOPLE` = person and
   simulated (the simulated critic stands in for people in the demo and the paper's experiments): the
   reward model learns from these only, never from its own verdicts or an AI judge's. Policies and exports
   count every kind by default: when the reward model is the critic, its verdicts are the feedback.
4. **Several annotators on one item** are combined per candidate by `feedback.aggregate`, with `a` counted
   judgments accepting the candidate and `r` rejecting it:
   - `majority` (default): accepted if a > r, rejected if r > a; a tie (one of two people each way) is
     *contested*.
   - `any`: accepted if a >= 1, else rejected (one person's accept is enough; never contested).
   - `unanimous`: accepted if r = 0, rejected if a = 0, else contested.
   With one annotator per item (the demo, most runs) the three agree. A candidate no counted judgment saw
   has no verdict.
5. **"None fits"** is a judgment that accepts nothing: it rejects every candidate it saw. An item with no
   accepted candidate can lend its example's reference explanation as the chosen side of pairs (rule 7).
6. **The same rationale in several items** (the model samples the same text for the same question in
   another round): a rationale is (split, example, prompt, text). It is *accepted* if it is accepted in any
   item: ILLUME's training set only grows, what was accepted once stays a target (to withdraw it, revise
   that judgment). It is *rejected* only if it is rejected in every item where it has a verdict, and
   *contested* otherwise. Contested rationales are left out of everything below: they are neither SFT
   targets, nor rejected sides of pairs, nor KTO rows.
7. **What each consumer gets.**
   - SFT (`Feedback.accepted`): every accepted rationale once, in the order of its first accepted occurrence
     (round, item, drawn position).
   - Pairs (`Feedback.pairs`, reward model and DPO): within one item, every (candidate accepted in the
     item, candidate whose rationale is rejected); with references, for an item with no accepted candidate,
     reference i mod #references (chosen) against its i-th rejected candidate. Deduplicated on (split,
     example, prompt, chosen, rejected), keeping the earliest; so a rationale is never on both sides, every
     judged `chosen` is an SFT rationale and every `rejected` a rejected one.
   - KTO rows and labelled candidates (`Feedback.labelled`): every rationale that is not contested, once,
     in order of first occurrence, label True when accepted.
8. **Corrections** (`annotate.corrections`): a person who found that none fits may write the rationale
   (or edit a candidate into it). The judgment is a "none fits" (rule 5: it rejects every candidate it saw)
   that carries the text, and the text is an *accepted* rationale of the item: nobody else was shown it,
   so it is not put to the vote of rule 4. It is an SFT target (after the item's accepted candidates), a
   KTO row labelled True, and the chosen side of pairs against the item's rejected candidates (source
   "correction"); an item with a correction needs no reference pairs. Counted like its judgment (rule 3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from illume.config import ConfigError, RunConfig
from illume.feedback.reads import JudgedItem, Judgment
from illume.feedback.store import FeedbackStore

ACCEPTED, REJECTED, CONTESTED = "accepted", "rejected", "contested"

PEOPLE = frozenset({"person", "simulated"})
"""Annotator kinds whose judgments the reward model learns from (rule 3)."""


def _majority(accepts: int, rejects: int) -> str:
    return ACCEPTED if accepts > rejects else REJECTED if rejects > accepts else CONTESTED


def _any(accepts: int, rejects: int) -> str:
    return ACCEPTED if accepts else REJECTED


def _unanimous(accepts: int, rejects: int) -> str:
    return ACCEPTED if not rejects else REJECTED if not accepts else CONTESTED


AGGREGATES: dict[str, Callable[[int, int], str]] = {"majority": _majority, "any": _any, "unanimous": _unanimous}
"""feedback.aggregate -> (accepts, rejects) of one candidate in one item -> its verdict there (rule 4)."""
DEFAULT_AGGREGATE = "majority"


def check_aggregate(cfg: RunConfig) -> None:
    """`feedback.aggregate` names one of `AGGREGATES` (checked before any work)."""
    if cfg.feedback.aggregate not in AGGREGATES:
        raise ConfigError(f"feedback.aggregate={cfg.feedback.aggregate!r} is not one of {', '.join(AGGREGATES)}")


RationaleKey = tuple[str, str, str, str]
"""(split, example_id, prompt, text): one rationale of one example (rule 6)."""


def rationale_key(item: JudgedItem, text: str) -> RationaleKey:
    return (item.split, item.example_id, item.prompt, text)


class FeedbackDataError(ValueError):
    """Feedback that cannot give a consumer what it needs; the message says what is missing and where.
    Consumers re-raise it as their own error (RewardDataError, PolicyDataError) with what they needed it for."""


class OneSidedFeedback(FeedbackDataError):
    """Judged rationales that are all accepted or all rejected: more judgments may bring the other side."""


def check_both_labels(labels: Sequence[bool], where: str) -> None:
    """Preference learning needs accepted and rejected rationales both; OneSidedFeedback otherwise."""
    if not any(labels) or all(labels):
        only = "contested" if not labels else "accepted" if all(labels) else "rejected"
        raise OneSidedFeedback(f"both accepted and rejected rationales are needed, but all {len(labels)} "
                               f"in {where} are {only}")


def reference_explanations(examples_by_id: Mapping[str, object]) -> dict[str, list[str]]:
    """Example id -> its reference explanations: the chosen side of reference pairs (`Feedback.pairs`)."""
    return {example_id: list(example.explanations) for example_id, example in examples_by_id.items()}


@dataclass
class AcceptedRationale:
    """An SFT target: an accepted rationale, the item it was first accepted in, and who accepted it."""

    item: JudgedItem
    text: str
    judgments: list[Judgment]
    """Every counted judgment that accepted it, in any item."""

    @property
    def example_id(self) -> str:
        return self.item.example_id


@dataclass
class LabelledRationale:
    """A KTO row: a rationale that is not contested, accepted or rejected, and the judgments behind that."""

    item: JudgedItem
    """The item it was first accepted in (accepted) or first judged in (rejected)."""
    text: str
    accepted: bool
    judgments: list[Judgment]
    """The counted judgments that accepted it (accepted) or rejected it (rejected), in every item."""

    @property
    def example_id(self) -> str:
        return self.item.example_id

    @property
    def prompt(self) -> str:
        return self.item.prompt


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
    """"judged": both candidates were judged; "correction": chosen is a rationale a person wrote (rule 8);
    "reference": chosen is a reference explanation of an item with no accepted candidate; "dataset": read
    from a saved preference dataset."""
    item: JudgedItem | None = field(default=None, repr=False, compare=False)
    """The earliest item the pair comes from (None for dataset pairs)."""
    judgments: list[Judgment] = field(default_factory=list, repr=False, compare=False)
    """The counted judgments of every item the pair comes from (they saw both candidates)."""


class Feedback:
    """The verdicts of a set of judged items under one aggregation rule and one set of counted kinds.

    Args:
        items: Judged items in (round, item) order, as `FeedbackStore.judged_items` gives them.
        aggregate: `feedback.aggregate`, a key of AGGREGATES.
        kinds: The annotator kinds whose judgments count (None: every kind). Items left without a counted
            judgment are dropped.
        source: Where the items come from (the store's URL), for error messages.
    """

    def __init__(self, items: Sequence[JudgedItem], aggregate: str = DEFAULT_AGGREGATE,
                 kinds: Collection[str] | None = None, source: str = "the feedback") -> None:
        self.source = source
        if aggregate not in AGGREGATES:
            raise ValueError(f"feedback.aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.aggregate = aggregate
        combine = AGGREGATES[aggregate]
        self.items: list[JudgedItem] = []
        for item in items:
            counted = [j for j in item.judgments if kinds is None or j.annotator_kind in kinds]
            if counted:
                self.items.append(item if len(counted) == len(item.judgments)
                                  else dataclasses.replace(item, judgments=counted))
        # Per item (by position in self.items): candidate id -> verdict in that item (rule 4).
        self._verdicts: list[dict[int, str]] = []
        # Per item: the distinct corrections written in it, in judgment order (rule 8).
        self._corrections: list[list[str]] = []
        self._status: dict[RationaleKey, set[str]] = {}
        self._accepting: dict[RationaleKey, list[Judgment]] = {}
        self._rejecting: dict[RationaleKey, list[Judgment]] = {}
        for item in self.items:
            corrections: list[str] = []
            for judgment in item.judgments:
                text = (judgment.correction or "").strip()
                if not text:
                    continue
                key = rationale_key(item, text)
                self._status.setdefault(key, set()).add(ACCEPTED)
                self._accepting.setdefault(key, []).append(judgment)
                if text not in corrections:
                    corrections.append(text)
            self._corrections.append(corrections)
            verdicts = {}
            for candidate in item.candidates:
                accepting, rejecting = item.accepting(candidate.id), item.rejecting(candidate.id)
                if not accepting and not rejecting:
                    continue
                verdicts[candidate.id] = verdict = combine(len(accepting), len(rejecting))
                key = rationale_key(item, candidate.text)
                self._status.setdefault(key, set()).add(verdict)
                self._accepting.setdefault(key, []).extend(accepting)
                self._rejecting.setdefault(key, []).extend(rejecting)
            self._verdicts.append(verdicts)

    def since(self, round_idx: int) -> Feedback:
        """The verdicts of this feedback's items of round `round_idx` and later, as if only they had been read
        (what `read_feedback(..., from_round=round_idx)` gives): on-policy DPO/KTO's `policy.rounds=latest`."""
        items = [item for item in self.items if item.round_idx >= round_idx]
        return Feedback(items, self.aggregate, None, f"{self.source} (rounds >= {round_idx})")

    # ---------------------------------------------------------------- verdicts

    def status(self, item: JudgedItem, text: str) -> str | None:
        """The rationale's verdict over every item (rule 6); None if it has a verdict nowhere."""
        verdicts = self._status.get(rationale_key(item, text))
        if not verdicts:
            return None
        if ACCEPTED in verdicts:
            return ACCEPTED
        return REJECTED if verdicts == {REJECTED} else CONTESTED

    def item_verdicts(self) -> list[tuple[JudgedItem, dict[int, str]]]:
        """Each counted item with its candidates' verdicts there (candidate id -> verdict; rule 4)."""
        return list(zip(self.items, self._verdicts))

    def corrections(self, item_index: int) -> list[str]:
        """The distinct corrections written in `self.items[item_index]`, in judgment order (rule 8)."""
        return self._corrections[item_index]

    def items_with_accepted(self, round_idx: int | None = None) -> int:
        """How many items (of round `round_idx`, if given) have at least one candidate accepted in them."""
        return sum(ACCEPTED in verdicts.values() for item, verdicts in self.item_verdicts()
                   if round_idx is None or item.round_idx == round_idx)

    # ---------------------------------------------------------------- what consumers train on

    def accepted(self) -> list[AcceptedRationale]:
        """The SFT targets: each accepted rationale once, by first accepted occurrence (rule 7)."""
        rows: dict[RationaleKey, AcceptedRationale] = {}
        for index, (item, verdicts) in enumerate(self.item_verdicts()):
            for candidate in item.candidates:
                key = rationale_key(item, candidate.text)
                if verdicts.get(candidate.id) == ACCEPTED and key not in rows:
                    rows[key] = AcceptedRationale(item, candidate.text, self._accepting[key])
            for text in self._corrections[index]:
                key = rationale_key(item, text)
                if key not in rows:
                    rows[key] = AcceptedRationale(item, text, self._accepting[key])
        return list(rows.values())

    def labelled(self) -> list[LabelledRationale]:
        """Each rationale that is not contested once, by first occurrence, label True = accepted (rule 7)."""
        rows: dict[RationaleKey, LabelledRationale] = {}
        first_accepted = {rationale_key(r.item, r.text): r.item for r in self.accepted()}
        for index, (item, verdicts) in enumerate(self.item_verdicts()):
            for candidate in item.candidates:
                key = rationale_key(item, candidate.text)
                status = self.status(item, candidate.text) if candidate.id in verdicts else None
                if key in rows or status in (None, CONTESTED):
                    continue
                if status == ACCEPTED:
                    rows[key] = LabelledRationale(first_accepted[key], candidate.text, True, self._accepting[key])
                else:
                    rows[key] = LabelledRationale(item, candidate.text, False, self._rejecting[key])
            for text in self._corrections[index]:
                key = rationale_key(item, text)
                if key not in rows:
                    rows[key] = LabelledRationale(first_accepted[key], text, True, self._accepting[key])
        return list(rows.values())

    def pairs(self, references: Mapping[str, Sequence[str]] | None = None) -> list[PreferencePair]:
        """Chosen/rejected pairs within items (rule 7).

        Args:
            references: Example id -> reference explanations, to pair them (chosen) with the rejected
                candidates of items that have no accepted candidate; None: no reference pairs.
        """
        pairs: dict[tuple[str, str, str, str, str], PreferencePair] = {}

        def add(item: JudgedItem, chosen: str, rejected: str, source: str) -> None:
            if chosen == rejected:
                return
            key = (item.split, item.example_id, item.prompt, chosen, rejected)
            if key not in pairs:
                pairs[key] = PreferencePair(item.example_id, item.prompt, chosen, rejected, item.round_idx,
                                            source, item)
            pairs[key].judgments.extend(item.judgments)

        for index, (item, verdicts) in enumerate(self.item_verdicts()):
            chosen = [c.text for c in item.candidates if verdicts.get(c.id) == ACCEPTED]
            rejected = [c.text for c in item.candidates
                        if c.id in verdicts and self.status(item, c.text) == REJECTED]
            for good in chosen:
                for bad in rejected:
                    add(item, good, bad, "judged")
            for good in self._corrections[index]:
                for bad in rejected:
                    add(item, good, bad, "correction")
            chosen += self._corrections[index]
            if not chosen and references is not None:
                explanations = references.get(item.example_id) or []
                for i, bad in enumerate(rejected if explanations else []):
                    add(item, explanations[i % len(explanations)].strip(), bad, "reference")
        return list(pairs.values())

    # ---------------------------------------------------------------- checked reads for trainers

    def require_examples(self, examples_by_id: Mapping[str, object]) -> None:
        """FeedbackDataError if a judged example is not in `examples_by_id` (the wrong dataset or split)."""
        unknown = sorted({item.example_id for item in self.items} - set(examples_by_id))
        if unknown:
            raise FeedbackDataError(f"{len(unknown)} judged examples in {self.source} are not in the dataset "
                                    f"given, e.g. {unknown[:3]}: is it the run's dataset and split?")

    def usable_pairs(self, references: Mapping[str, Sequence[str]] | None = None) -> list[PreferencePair]:
        """`pairs(references)`, or FeedbackDataError when there are no judgments, no accepted or no rejected
        rationale, or no pair."""
        if not self.items:
            raise FeedbackDataError(f"no judgments in {self.source}: judge a round first")
        check_both_labels([row.accepted for row in self.labelled()], self.source)
        pairs = self.pairs(references)
        if not pairs:
            raise FeedbackDataError(
                f"no preference pairs in {self.source}: no item has both an accepted and a rejected candidate"
                + ("" if references is not None else " (reference pairs are off)"))
        return pairs


def read_feedback(store: FeedbackStore, *, split: str | None = "train", round_idx: int | None = None,
                  upto_round: int | None = None, from_round: int | None = None,
                  aggregate: str = DEFAULT_AGGREGATE, kinds: Collection[str] | None = None) -> Feedback:
    """The verdicts of the store's judged items in a range of rounds (None: no bound; split None: all)."""
    items = store.judged_items(split, round_idx=round_idx, upto_round=upto_round, from_round=from_round)
    scope = [f"round {round_idx}" if round_idx is not None else "",
             f"rounds <= {upto_round}" if upto_round is not None else "",
             f"rounds >= {from_round}" if from_round is not None else "",
             f"by annotators of kind {', '.join(sorted(kinds))}" if kinds is not None else ""]
    scope = ", ".join(filter(None, scope))
    return Feedback(items, aggregate, kinds, f"{store.url}" + (f" ({scope})" if scope else ""))
