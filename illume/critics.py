"""Critics: who decides which candidate rationales are acceptable, behind one interface.

A critic gets one round's candidate sets (`CritiqueContext`) and puts its judgments (`NewJudgment`s, accepted
candidates by text) into the feedback store (`FeedbackStore.add_judgments`);
`review` says whether the round is judged (False: people have not finished and the run should stop and be
continued later). The loop calls `review` on every process and uses rank 0's answer; a critic that only
one process may run (a person, the simulated critic) works on rank 0. Each critic is created from the run
config by `illume.critic_registry.CRITICS[critic.kind]`, and the loop asks nothing else about it.

Here: the simulated critic standing in for people, as in the paper's experiments (it accepts a candidate
whose score against any single reference explanation reaches a threshold, ROUGE-L >= 0.7), and people
(`person`) in the annotation page (the loop waits on the store, or stops and resumes) or in the terminal. The
reward-model critics (reward, hybrid) are in `reward.critic`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from illume import distributed
from illume.config import CriticConfig, RunConfig
from illume.data.records import CandidateSet, Example
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from illume.feedback.writes import NewJudgment
from illume.metrics.caption_scores import caption_scores, rouge_l_per_item

CRITIQUE_CHUNK = 100
"""Judgments stored per transaction by the simulated critic: a kill loses at most the chunk under way."""


@dataclass
class CritiqueContext:
    """One round's inputs to a critic."""

    cfg: RunConfig
    store: FeedbackStore
    round_idx: int
    sets: dict[str, CandidateSet]
    """The round's train candidate sets, by example id, in the order stored."""
    train_by_id: dict[str, Example]
    """The train examples by id (what `RoundContext.train_by_id` holds for the policies)."""
    image_refs: dict[str, str] = field(default_factory=dict)
    """Example id -> image path (relative to the run directory unless absolute), for people."""
    say: Callable[[str], None] = print
    track: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    """Where a critic reports progress (metrics, step = the round) to the run's trackers (illume.tracking)."""

    def image_path(self, example_id: str) -> str | None:
        image = self.image_refs.get(example_id)
        if image and not Path(image).is_absolute():
            image = str(self.cfg.run_dir / image)
        return image


@dataclass
class Critique:
    """What a critic's review gives back to the loop (and a model critic gets back from the people critic it
    hands items to)."""

    done: bool = True
    """False when people have not judged everything and the run should stop, to be continued (critic.wait)."""
    report: dict = field(default_factory=dict)
    """Keys for the round's row of results.json (the reward model's threshold, ...)."""


class Critic(Protocol):
    """What the loop needs from a critic."""

    def review(self, context: CritiqueContext) -> Critique:
        """Get the round's judgments into the store; say whether people are done, and what to report."""
        ...


class PeopleCritic(Protocol):
    """A critic standing for people (`PEOPLE_CRITICS`: simulated, person), which a model critic (reward model,
    hybrid, AI judge) hands the items it leaves: what it hands over is the `order` argument, nothing shared."""

    def review(self, context: CritiqueContext, order: list[str] | None = None) -> Critique:
        """As `Critic.review`. `order`: example ids of the items a model critic left for people, in the order
        to hand them out (it chose them: `reward.critic`); None: every item no model decided, in
        `annotate.order` (`left_for_people`)."""
        ...


def order_items(order: str, example_ids: Sequence[str], seed: int, round_idx: int,
                uncertainty: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
    """`example_ids` in the order people should get them (`annotate.order`, by `ITEM_ORDERS`).

    Args:
        order: `stored` (as given), `random` (shuffled by a generator seeded with (seed, round_idx), so a
            resumed run draws the same order) or `uncertainty` (highest uncertainty first, then the smallest
            distance to the threshold, then as given; as given when `uncertainty` is None: no reward model yet).
        uncertainty: Example id -> (uncertainty of the reward model's decision, its score's distance to the
            threshold), from `reward.uncertainty`.
    """
    return ITEM_ORDERS[order](list(example_ids), seed, round_idx, uncertainty)


def _stored_order(ids: list[str], seed: int, round_idx: int, uncertainty) -> list[str]:
    return ids


def _random_order(ids: list[str], seed: int, round_idx: int, uncertainty) -> list[str]:
    random.Random(f"annotate.order/{seed}/{round_idx}").shuffle(ids)  # a str seed hashes the same in every process
    return ids


def _uncertain_first(ids: list[str], seed: int, round_idx: int, uncertainty) -> list[str]:
    if uncertainty is None:
        return ids
    position = {example_id: i for i, example_id in enumerate(ids)}
    return sorted(ids, key=lambda i: (-uncertainty[i][0], uncertainty[i][1], position[i]))


ITEM_ORDERS: dict[str, Callable[[list[str], int, int, Mapping[str, tuple[float, float]] | None], list[str]]] = {
    "stored": _stored_order,
    "random": _random_order,
    "uncertainty": _uncertain_first,
}
"""annotate.order -> the rule ordering the items people get (`order_items`)."""


def left_for_people(context: CritiqueContext, annotator: str, order: list[str] | None = None) -> list[CandidateSet]:
    """The round's items `annotator` has not judged, less those a model critic (reward model, AI judge: a kind
    not in `feedback.people`) decided in this round: in `order` when a model critic gave one (`PeopleCritic`),
    else in `annotate.order` (stored, or a seeded shuffle; uncertainty needs a reward model: stored)."""
    people = context.cfg.feedback.people
    decided = {item.example_id for item in context.store.judged_items("train", round_idx=context.round_idx)
               if any(j.annotator_kind not in people for j in item.judgments)}
    todo = [example_id for example_id in context.store.unjudged_items(context.round_idx, annotator, "train")
            if example_id not in decided]
    if order is not None:
        left = set(todo)
        todo = [example_id for example_id in order if example_id in left]
    else:
        todo = order_items(context.cfg.annotate.order, todo, context.cfg.seed, context.round_idx)
    return [context.sets[example_id] for example_id in todo]


def candidate_scores(candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example],
                     metric: str = "rouge_l") -> list[list[float]]:
    """For every candidate, its best score against any single reference of its example."""
    predictions, references, owners = [], [], []
    for set_idx, cs in enumerate(candidate_sets):
        for cand_idx, cand in enumerate(cs.candidates):
            for ref in examples_by_id[cs.example_id].explanations:
                predictions.append(cand.text)
                references.append([ref])
                owners.append((set_idx, cand_idx))
    scores = [[0.0] * len(cs.candidates) for cs in candidate_sets]
    if not predictions:
        return scores
    if metric == "rouge_l":
        flat = rouge_l_per_item(predictions, references)
    else:
        flat = caption_scores(predictions, references, per_example=True)["per_example"][metric]
    for (set_idx, cand_idx), score in zip(owners, flat):
        scores[set_idx][cand_idx] = max(scores[set_idx][cand_idx], score)
    return scores


class SimulatedCritic:
    """critic.kind=simulated: accepts a candidate when its metric against any reference explanation is >= the
    threshold (annotator kind "simulated"). Works on rank 0, in chunks of CRITIQUE_CHUNK items."""

    kind = "simulated"

    def __init__(self, cfg: CriticConfig):
        self.cfg = cfg
        self.annotator = f"simulated:{cfg.metric}>={cfg.threshold:g}"

    def decide(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[NewJudgment]:
        """The judgments of these candidate sets, accepted candidates by text (nothing is stored)."""
        missing = [cs.example_id for cs in candidate_sets if not examples_by_id[cs.example_id].explanations]
        if missing:
            raise ValueError(f"the simulated critic needs reference explanations; {len(missing)} examples have "
                             f"none, e.g. {missing[:3]}")
        judgments = []
        for cs, scores in zip(candidate_sets, candidate_scores(candidate_sets, examples_by_id, self.cfg.metric)):
            accepted = [c.text for c, score in zip(cs.candidates, scores) if score >= self.cfg.threshold]
            judgments.append(NewJudgment(cs.example_id, accepted, none_fit=not accepted))
        return judgments

    def review(self, context: CritiqueContext, order: list[str] | None = None) -> Critique:
        if not distributed.is_main():
            return Critique()
        todo = left_for_people(context, self.annotator, order)
        for start in tqdm(range(0, len(todo), CRITIQUE_CHUNK), desc=f"critique ({self.annotator})", unit="chunk",
                          disable=not todo):
            judgments = self.decide(todo[start:start + CRITIQUE_CHUNK], context.train_by_id)
            context.store.add_judgments(context.round_idx, judgments, self.annotator, kind=self.kind)
        return Critique()


class TerminalCritic:
    """critic.kind=person, critic.ui=terminal: a person judging in the terminal (for work over SSH): the image
    path, the question, the answer and the numbered candidates; they type the numbers they accept, or 0 for
    none. Each judgment is stored as it is made: a person's work is never lost to a crash or Ctrl-C."""

    kind = "person"

    def __init__(self, cfg: CriticConfig, ask: Callable[[str], str] | None = None, console=None):
        from rich.console import Console
        from rich.prompt import Prompt

        self.console = console or Console()
        self.ask = ask or (lambda prompt: Prompt.ask(prompt, console=self.console))
        self.annotator = cfg.annotator or self.ask("Your name (recorded with your judgments)").strip()
        if not self.annotator:
            raise ValueError("an annotator name is needed to record judgments")

    def review_one(self, cs: CandidateSet, example: Example, image_path: str | None = None) -> NewJudgment:
        from rich.markup import escape

        self.console.rule(f"item {escape(cs.example_id)}")
        if image_path:
            self.console.print(f"image: {escape(str(image_path))}")
        # escape(): model-generated text is shown as text, never interpreted as rich markup.
        self.console.print(f"Q: {escape(example.question)}\nA: {escape(cs.answer)}")
        for i, cand in enumerate(cs.candidates, start=1):
            self.console.print(f"  [bold]{i}[/bold]  {escape(cand.text)}")
        start = time.monotonic()
        while True:
            reply = self.ask("Accepted numbers (e.g. 1 3), or 0 for none fits").replace(",", " ").split()
            try:
                numbers = sorted({int(x) for x in reply})
            except ValueError:
                self.console.print("type numbers separated by spaces")
                continue
            if numbers == [0]:
                return NewJudgment(cs.example_id, [], True, time.monotonic() - start)
            if numbers and all(1 <= n <= len(cs.candidates) for n in numbers):
                return NewJudgment(cs.example_id, [cs.candidates[n - 1].text for n in numbers], False,
                                   time.monotonic() - start)
            self.console.print(f"numbers must be 1..{len(cs.candidates)}, or 0 alone")

    def review(self, context: CritiqueContext, order: list[str] | None = None) -> Critique:
        if not distributed.is_main():
            return Critique()
        todo = left_for_people(context, self.annotator, order)
        for cs in tqdm(todo, desc=f"critique ({self.annotator})", unit="item", disable=not todo):
            judgment = self.review_one(cs, context.train_by_id[cs.example_id], context.image_path(cs.example_id))
            context.store.add_judgments(context.round_idx, [judgment], self.annotator, kind=self.kind)
        return Critique()


class WebCritic:
    """critic.kind=person, critic.ui=web: people judge in the annotation page (`illume annotate RUN_DIR`); the
    loop waits until every item of the round has `annotate.annotations_per_item` judgments, or (critic.wait
    false) stops, to be continued by running the same command again."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def review(self, context: CritiqueContext, order: list[str] | None = None) -> Critique:
        if not distributed.is_main():
            return Critique()
        cfg, round_idx = self.cfg, context.round_idx
        queue = AnnotationQueue(context.store)
        if cfg.annotate.order != "stored" or order is not None:
            # The page hands items out by `items.priority`: the people's items in their order, first.
            ranked = [cs.example_id for cs in left_for_people(context, annotator="", order=order)]
            context.store.set_priorities(round_idx, {example_id: float(rank) for rank, example_id in
                                                     enumerate(ranked)})
        wanted = cfg.annotate.annotations_per_item
        progress = queue.annotation_progress(round_idx, wanted)
        context.track(_progress_metrics(progress), round_idx)
        if progress["complete_items"] == progress["items"]:
            return Critique()
        context.say(f"round {round_idx}: {progress['items']} items wait for {wanted} judgment(s) each "
                    f"({progress['counted_judgments']} of {progress['needed_judgments']} so far). "
                    f"People judge them in the annotation page:\n    illume annotate {cfg.run_dir}")
        if not cfg.critic.wait:
            context.say("critic.wait=false: stopping here; run the same command again to continue")
            return Critique(done=False)
        with tqdm(total=progress["needed_judgments"], initial=progress["counted_judgments"],
                  desc="waiting for judgments") as bar:
            while progress["complete_items"] < progress["items"]:
                time.sleep(cfg.critic.poll_seconds)
                progress = queue.annotation_progress(round_idx, wanted)
                if progress["counted_judgments"] != bar.n:
                    context.track(_progress_metrics(progress), round_idx)
                bar.update(progress["counted_judgments"] - bar.n)
        return Critique()


def _progress_metrics(progress: dict[str, int]) -> dict[str, float]:
    """The annotation progress a tracker gets: judgments counted / needed, items complete / all."""
    return {"annotation/judged": progress["counted_judgments"], "annotation/needed": progress["needed_judgments"],
            "annotation/complete_items": progress["complete_items"], "annotation/items": progress["items"]}


PERSON_UIS: dict[str, Callable[[RunConfig], Critic]] = {
    "web": WebCritic,
    "terminal": lambda cfg: TerminalCritic(cfg.critic),
}
"""critic.ui -> the critic for people."""


def simulated_critic(cfg: RunConfig) -> Critic:
    return SimulatedCritic(cfg.critic)


def person_critic(cfg: RunConfig) -> Critic:
    return PERSON_UIS[cfg.critic.ui](cfg)


PEOPLE_CRITICS: dict[str, Callable[[RunConfig], PeopleCritic]] = {"simulated": simulated_critic, "person": person_critic}
"""critic.people_kind -> who judges what a reward-model critic leaves to people."""
