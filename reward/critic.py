"""The reward model as a critic: critic.kind=reward (it judges every item) and hybrid (the items it is sure of).

Per round, from round `reward.people_rounds` on:
- **Its reward model** is the one fitted on people's judgments of the earlier rounds, or reused, or the saved
  `reward.checkpoint`: `reward.fitted.reward_model_on(cfg, round - 1, ...)`, where GRPO gets its own too.
- **Judge.** Every process fits (together, through the Trainer) and scores identically; rank 0 stores the
  verdicts under the annotator "reward:<kind>" of kind "reward". Items already judged this round (a resumed
  run, people on the annotation page meanwhile) are left alone.
- **People for the rest.** `critic.people_kind` (the simulated critic standing in for them, or real people)
  judges what the reward model left: everything in rounds before `reward.people_rounds`, the items it was not
  sure of (hybrid: a candidate within `reward.hybrid_band` of the threshold), or with
  `annotate.budget_per_round: N` (hybrid) the first N items in `annotate.order` (`uncertainty`: the least
  certain by `reward.uncertainty.UNCERTAINTY`; `random`: a seeded draw; `stored`: the first N sampled), less
  those people already judged this round. People get their items in `annotate.order` (the annotation page
  by `items.priority`).
- **Round 0 on a budget.** With a budget and `reward.people_rounds: 0` (hybrid, no checkpoint) there is no
  earlier judgment to fit a model on: people judge N items of round 0 first (a seeded draw:
  `first_round_draw`), a reward model is fitted on those (saved as reward/round_01, which round 1 reuses
  unless people judged more) and decides the rest of round 0 (`budgets_first_round`, `check_first_round`).
  When those judgments are one-sided (no accepted rationale, say), people judge the draw's next budget's worth
  until a model can be fitted (`RewardCritic._first_round`).
- **Report.** The round's row of results.json gets the threshold, the held-out precision/recall/ROC-AUC and
  how many items the reward model decided; where the references are known (the demo), also the precision and
  recall of its accepts against the simulated critic's. With a budget or an order other than `stored`, also
  `people_items` (left to people by the split) and `people_items_rm_wrong` (the share of them where the
  reward model's decision differs from the simulated critic's: whether the order found its mistakes).
"""

from __future__ import annotations

from collections.abc import Sequence

from illume import distributed
from illume.config import ConfigError, RunConfig
from illume.critics import (
    PEOPLE_CRITICS,
    Critique,
    CritiqueContext,
    SimulatedCritic,
    order_items,
)
from illume.data.records import CandidateSet, Example
from illume.feedback.writes import NewJudgment
from reward.fitted import learn_from, reward_model_on
from reward.pairs import OneSidedJudgments
from reward.uncertainty import UNCERTAINTY


class RewardDecider:
    """Accepts a candidate when the reward model's score reaches the calibrated threshold.

    With `band`, it only decides items whose every candidate scores at least `band` away from the threshold
    (the confident ones); `decide` leaves the others out, for people.
    """

    def __init__(self, reward_model, threshold: float, band: float | None = None, accepts: bool = True):
        self.reward_model, self.threshold, self.band = reward_model, threshold, band
        self.accepts = accepts
        """False: it decides every item as none fits (`reward.below_target: reject`); the threshold still ranks
        its uncertainty."""

    def scores(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[list[float]]:
        from reward.model import score

        items = [(examples_by_id[cs.example_id], cs.prompt, [c.text for c in cs.candidates]) for cs in candidate_sets]
        return score(self.reward_model, items)

    def confident(self, scores: Sequence[float]) -> bool:
        """Whether the item is the model's to decide: every candidate at least `band` from the threshold."""
        return self.band is None or all(abs(s - self.threshold) >= self.band for s in scores)

    def decide_item(self, cs: CandidateSet, scores: Sequence[float]) -> NewJudgment:
        """The model's judgment of one item from its candidates' scores (accepted candidates by text)."""
        accepted = [c.text for c, s in zip(cs.candidates, scores) if s >= self.threshold] if self.accepts else []
        return NewJudgment(cs.example_id, accepted, none_fit=not accepted)

    def decide(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[NewJudgment]:
        return [self.decide_item(cs, scores)
                for cs, scores in zip(candidate_sets, self.scores(candidate_sets, examples_by_id))
                if self.confident(scores)]  # the others: not confident, people decide them


def accepts_below_target(cfg: RunConfig, heldout_precision: float | None) -> bool:
    """Whether the reward model's accepts count this round: always with `reward.below_target: threshold`;
    with `reject`, only when its threshold reached `reward.target_precision` on held-out judgments."""
    if cfg.reward.below_target == "threshold":
        return True
    return heldout_precision is not None and heldout_precision >= cfg.reward.target_precision


def check_critique_order(cfg: RunConfig) -> None:
    """`annotate.order` and `annotate.budget_per_round` where they mean something (before any model loads).

    Raises:
        ConfigError: a budget with a critic that does not split a round between people and the reward model,
            order=uncertainty without a reward model whose decision it ranks, an unknown `reward.uncertainty`.
    """
    annotate, kind = cfg.annotate, cfg.critic.kind
    if annotate.budget_per_round is not None and kind != "hybrid":
        raise ConfigError(f"annotate.budget_per_round={annotate.budget_per_round} splits each round between people "
                          f"and the reward model, which only critic.kind=hybrid does (critic.kind={kind}); set "
                          "critic.kind=hybrid or leave annotate.budget_per_round unset")
    if annotate.order == "uncertainty":
        if kind != "hybrid":
            raise ConfigError(f"annotate.order=uncertainty ranks items by the reward model's doubt about them, but "
                              f"critic.kind={kind} has no reward model that leaves items to people; use critic."
                              "kind=hybrid, or annotate.order=stored|random")
        if cfg.reward.uncertainty not in UNCERTAINTY:
            raise ConfigError(f"reward.uncertainty={cfg.reward.uncertainty!r} is not one of {', '.join(UNCERTAINTY)}")


def budgets_first_round(cfg: RunConfig) -> bool:
    """Whether people judge only a budget of round 0 (critic.kind=hybrid, `annotate.budget_per_round` set,
    `reward.people_rounds: 0`, no `reward.checkpoint`): the reward model of round 0 is then fitted on those
    judgments of round 0 itself, there being no earlier ones."""
    return (cfg.critic.kind == "hybrid" and cfg.annotate.budget_per_round is not None
            and cfg.reward.people_rounds == 0 and cfg.reward.checkpoint is None)


def first_round_draw(cfg: RunConfig, example_ids: list[str], size: int | None = None) -> list[str]:
    """The items people judge in round 0 when `budgets_first_round`: the first `size` (default
    `annotate.budget_per_round`) in `annotate.order`, where `uncertainty` (no reward model to be unsure yet) is
    a seeded random draw, so the first reward model learns from an unbiased sample of the round."""
    order = "random" if cfg.annotate.order == "uncertainty" else cfg.annotate.order
    return order_items(order, example_ids, cfg.seed, 0)[:size or cfg.annotate.budget_per_round]


def check_first_round(cfg: RunConfig) -> None:
    """A reward or hybrid critic judging round 0 (`reward.people_rounds: 0`) has a reward model for it: a
    `reward.checkpoint`, or (hybrid) one fitted on people's budget of round 0 (`budgets_first_round`).

    Raises:
        ConfigError: neither; or a budgeted round 0 with people on the annotation page, which waits for every
            item of a round before the reward model could decide any.
    """
    if cfg.critic.kind not in ("reward", "hybrid") or cfg.reward.people_rounds > 0 or cfg.reward.checkpoint:
        return
    if not budgets_first_round(cfg):
        raise ConfigError(f"reward.people_rounds=0 with critic.kind={cfg.critic.kind}: round 0 has no reward model "
                          "(no judgments by people yet); set reward.people_rounds >= 1, a reward.checkpoint, or "
                          "critic.kind=hybrid with annotate.budget_per_round (people judge that many items of "
                          "round 0 and a reward model fitted on them decides the rest)")
    if cfg.critic.people_kind == "person" and cfg.critic.ui == "web":
        raise ConfigError("annotate.budget_per_round with reward.people_rounds=0 and people on the annotation page "
                          "(critic.ui=web): the page waits for every item of round 0, so people would judge all of "
                          "it; set reward.people_rounds=1, or critic.ui=terminal")


class RewardCritic:
    """critic.kind=reward: the reward model judges every item from round `reward.people_rounds` on; people
    (`critic.people_kind`) judge the rounds before."""

    kind = "reward"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.annotator = f"reward:{cfg.critic.kind}"
        self.people = PEOPLE_CRITICS[cfg.critic.people_kind](cfg)

    def band(self) -> float | None:
        """Distance from the threshold within which an item goes to people (None: the model decides all)."""
        return None

    def review(self, context: CritiqueContext) -> Critique:
        cfg = self.cfg
        if context.round_idx < cfg.reward.people_rounds:
            return self.people.review(context)
        upto_round = context.round_idx - 1  # the reward model learns from people's judgments of earlier rounds
        if budgets_first_round(cfg) and context.round_idx == 0:
            return self._first_round(context)
        report, people_order = self._critique(context, upto_round)
        people = self.people.review(context, people_order)  # the items it left, in the order it chose
        return Critique(people.done, {**report, **people.report})

    def _first_round(self, context: CritiqueContext) -> Critique:
        """Round 0 on a budget (`budgets_first_round`): no reward model yet, so people judge the round's first
        `budget_per_round` items (a seeded draw, `first_round_draw`), then the model fitted on those judgments
        decides the rest. A small budget can bring only rejected rationales (or a held-out share without an
        accepted one), on which no model can be fitted or calibrated: people then judge the next
        `budget_per_round` items of the same draw, until the fit succeeds (their extra judgments are counted in
        the store like any other) or the round has no item left."""
        cfg, budget = self.cfg, self.cfg.annotate.budget_per_round
        size = budget
        while True:
            first = self.people.review(context, first_round_draw(cfg, list(context.sets), size))
            if not first.done:
                return first
            try:
                report, people_order = self._critique(context, upto_round=0)
                break
            except OneSidedJudgments as error:
                if size >= len(context.sets):
                    raise
                size += budget
                context.say(f"round 0: no reward model from people's judgments so far ({error}); people judge "
                            f"{budget} more items of the draw ({min(size, len(context.sets))} in all)")
        people = self.people.review(context, people_order)  # the items it left, in the order it chose
        return Critique(people.done, {**report, **people.report})

    def _critique(self, context: CritiqueContext, upto_round: int) -> tuple[dict, list[str] | None]:
        """Decide the items the reward model (fitted on people's judgments of rounds 0..`upto_round`) is sure
        of; returns (the round's report keys, the items left for people in hand-out order:
        `PeopleCritic.review`'s `order`)."""
        cfg, store, round_idx, sets = self.cfg, context.store, context.round_idx, context.sets
        rm, info = reward_model_on(cfg, upto_round, store, context.train_by_id, context.say)
        trusted = accepts_below_target(cfg, info["heldout_precision"])
        decider = RewardDecider(rm, info["threshold"], self.band(), accepts=trusted)
        # Rank 0's view, taken before it writes: people may be judging on the annotation page meanwhile.
        # Example id -> whether people judged it.
        judged = distributed.broadcast_object(
            {item.example_id: any(j.annotator_kind in cfg.feedback.people for j in item.judgments)
             for item in store.judged_items("train", round_idx=round_idx)})
        todo = [cs for example_id, cs in sets.items() if example_id not in judged]
        judgments, people_order, split_report = self._split(context, decider, todo, sum(judged.values()))
        if distributed.is_main():
            store.add_judgments(round_idx, judgments, self.annotator, kind=self.kind)
        distributed.barrier()  # the others read these judgments below
        decided_by_models = sum(any(j.annotator_kind not in cfg.feedback.people for j in item.judgments)
                                for item in store.judged_items("train", round_idx=round_idx))
        report = {"rm_threshold": info["threshold"], "rm_heldout_precision": info["heldout_precision"],
                  "rm_heldout_recall": info["heldout_recall"], "rm_heldout_roc_auc": info["heldout_roc_auc"],
                  "rm_decided_items": decided_by_models, **split_report}
        if cfg.reward.below_target == "reject":
            report["rm_accepts"] = trusted  # whether this round's reward model reached the target
        # Where the references are known (the demo), say how the reward model's decisions compare with the
        # simulated critic's: the achieved precision and recall of its accepts.
        decided_ids = {j.example_id for j in judgments}
        decided = [cs for cs in todo if cs.example_id in decided_ids]
        if decided and all(context.train_by_id[cs.example_id].explanations for cs in decided):
            oracle = SimulatedCritic(cfg.critic).decide(decided, context.train_by_id)
            by_id = {j.example_id: set(j.accepted) for j in judgments}
            pairs = [(c.text in by_id[o.example_id], c.text in set(o.accepted))
                     for o in oracle for c in sets[o.example_id].candidates]
            true_pos = sum(rm and ref for rm, ref in pairs)
            report["rm_precision_vs_simulated"] = true_pos / max(1, sum(rm for rm, _ in pairs))
            report["rm_recall_vs_simulated"] = true_pos / max(1, sum(ref for _, ref in pairs))
        return report, people_order

    def _split(self, context: CritiqueContext, decider: RewardDecider, todo: list[CandidateSet],
               num_by_people: int) -> tuple[list[NewJudgment], list[str] | None, dict]:
        """Which of the items nobody judged yet the reward model decides and which go to people.

        Returns:
            (the model's judgments; the people's items in hand-out order, None when the order is today's (no
            budget, `annotate.order: stored`); report keys for such runs, see the module doc).
        """
        cfg, round_idx = self.cfg, context.round_idx
        order, budget = cfg.annotate.order, cfg.annotate.budget_per_round
        uncertainty = None
        left = None if budget is None else max(0, budget - num_by_people)  # what people have left of the budget
        if order == "uncertainty" and todo and left != 0:  # (nothing left: no order to choose)
            scores, values = UNCERTAINTY[cfg.reward.uncertainty](
                cfg, decider.reward_model, decider.threshold, context.store, round_idx, todo,
                context.train_by_id, learn_from(cfg))
            uncertainty = {cs.example_id: (value, min((abs(s - decider.threshold) for s in item_scores),
                                                      default=float("inf")))
                           for cs, item_scores, value in zip(todo, scores, values)}
        else:
            scores = decider.scores(todo, context.train_by_id) if todo else []
        ordered = order_items(order, [cs.example_id for cs in todo], cfg.seed, round_idx, uncertainty)
        if budget is None:  # the band rule (critic.kind=reward: no band, the model decides all)
            people = {cs.example_id for cs, item_scores in zip(todo, scores) if not decider.confident(item_scores)}
        else:  # the first items in annotate.order, up to what people have left of the round's budget
            people = set(ordered[:left])
        judgments = [decider.decide_item(cs, item_scores) for cs, item_scores in zip(todo, scores)
                     if cs.example_id not in people]
        if budget is None and order == "stored":
            return judgments, None, {}  # today's behaviour: results.json of such runs is unchanged
        people_order = [example_id for example_id in ordered if example_id in people]
        report = {"people_items": len(people)}
        people_sets = [cs for cs in todo if cs.example_id in people]
        if people_sets and all(context.train_by_id[cs.example_id].explanations for cs in people_sets):
            model = {cs.example_id: decider.decide_item(cs, item_scores).accepted
                     for cs, item_scores in zip(todo, scores) if cs.example_id in people}
            oracle = SimulatedCritic(cfg.critic).decide(people_sets, context.train_by_id)
            report["people_items_rm_wrong"] = sum(model[o.example_id] != o.accepted for o in oracle) / len(oracle)
        return judgments, people_order, report


class HybridCritic(RewardCritic):
    """critic.kind=hybrid: the reward model decides the items it is sure of (every candidate at least
    `reward.hybrid_band` from the threshold), people the rest; with `annotate.budget_per_round: N`, people the
    first N items in `annotate.order` and the reward model the rest."""

    def band(self) -> float | None:
        return self.cfg.reward.hybrid_band
