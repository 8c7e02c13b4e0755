"""Critics: who decides which candidate rationales are acceptable.

A critic reviews candidate sets and returns one `Review` per item: the candidates it accepts (zero, one or
several) or "none fits". The simulated critic stands in for people, as in the paper's experiments: it accepts
a candidate whose score against any single reference explanation reaches a threshold (ROUGE-L >= 0.7).
People (the annotation page), the reward model and the hybrid critic come in as further kinds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from illume.config import CriticConfig
from illume.data.records import CandidateSet, Example
from illume.metrics.caption_scores import caption_scores, rouge_l_per_item


@dataclass
class Review:
    """One critic's verdict on one item (an example's candidate set in a round)."""

    example_id: str
    accepted: list[int]
    """Indices into the candidate set's `candidates` that are accepted."""
    none_fit: bool
    """True when no candidate is acceptable."""
    seconds: float | None = None
    """Time the critic spent (people only)."""


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
    """Accepts a candidate when its metric against any reference explanation is >= the threshold."""

    def __init__(self, cfg: CriticConfig):
        self.cfg = cfg
        self.annotator = f"simulated:{cfg.metric}>={cfg.threshold:g}"

    def review(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[Review]:
        missing = [cs.example_id for cs in candidate_sets if not examples_by_id[cs.example_id].explanations]
        if missing:
            raise ValueError(f"the simulated critic needs reference explanations; {len(missing)} examples have "
                             f"none, e.g. {missing[:3]}")
        reviews = []
        for cs, scores in zip(candidate_sets, candidate_scores(candidate_sets, examples_by_id, self.cfg.metric)):
            accepted = [i for i, score in enumerate(scores) if score >= self.cfg.threshold]
            reviews.append(Review(cs.example_id, accepted, none_fit=not accepted))
        return reviews


class TerminalCritic:
    """A person judging in the terminal (for work over SSH): the image path, the question, the answer and the
    numbered candidates; they type the numbers they accept, or 0 for none."""

    def __init__(self, cfg: CriticConfig, ask: Callable[[str], str] | None = None, console=None):
        from rich.console import Console
        from rich.prompt import Prompt

        self.console = console or Console()
        self.ask = ask or (lambda prompt: Prompt.ask(prompt, console=self.console))
        self.annotator = cfg.annotator or self.ask("Your name (recorded with your judgments)").strip()
        if not self.annotator:
            raise ValueError("an annotator name is needed to record judgments")

    def review_one(self, cs: CandidateSet, example: Example, image_path: str | None = None) -> Review:
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
                return Review(cs.example_id, [], True, time.monotonic() - start)
            if numbers and all(1 <= n <= len(cs.candidates) for n in numbers):
                return Review(cs.example_id, [n - 1 for n in numbers], False, time.monotonic() - start)
            self.console.print(f"numbers must be 1..{len(cs.candidates)}, or 0 alone")





class RewardCritic:
    """Accepts a candidate when the reward model's score reaches the calibrated threshold.

    With `band`, it only decides items whose every candidate scores at least `band` away from the threshold
    (the confident ones); `review` leaves the others out, for people (critic.kind=hybrid).
    """

    def __init__(self, reward_model, threshold: float, band: float | None = None, annotator: str = "reward"):
        self.reward_model, self.threshold, self.band, self.annotator = reward_model, threshold, band, annotator

    def scores(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[list[float]]:
        from reward.model import score

        items = [(examples_by_id[cs.example_id], cs.prompt, [c.text for c in cs.candidates]) for cs in candidate_sets]
        return score(self.reward_model, items)

    def review(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[Review]:
        reviews = []
        for cs, scores in zip(candidate_sets, self.scores(candidate_sets, examples_by_id)):
            if self.band is not None and any(abs(s - self.threshold) < self.band for s in scores):
                continue  # not confident: people decide this item
            accepted = [i for i, s in enumerate(scores) if s >= self.threshold]
            reviews.append(Review(cs.example_id, accepted, none_fit=not accepted))
        return reviews
CRITICS = {"simulated": SimulatedCritic, "terminal": TerminalCritic, "reward": RewardCritic}
