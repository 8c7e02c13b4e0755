"""The reward model as a critic: critic.kind=reward (it judges every item) and hybrid (the items it is sure of).

Per round, from round `reward.human_rounds` on:
- **Fit or reuse.** The reward model is fitted on every judgment by people (`feedback.people`, by default
  `verdicts.PEOPLE`; `reward.learn_from` overrides it: the annotators' stored kind, never their name) in
  earlier rounds, with its accept threshold calibrated on held-out examples
  (`reward.train.fit_reward_from_store`), and saved to RUN_DIR/reward/round_NN with `reward_critic.json`. A
  round whose earlier rounds brought no new judgment by people reuses the latest fit on exactly as many
  (also on resume), so the model is fitted once per new batch of people's work.
- **Or a saved one.** `reward.checkpoint` names a reward model fitted elsewhere (another run, `illume reward
  train`); it is used as it is, every round, after `check_reward_checkpoint` made sure (before any model
  loads) that it was fitted on this run's base model.
- **Judge.** Every process fits (together, through the Trainer) and scores identically; rank 0 stores the
  verdicts under the annotator "reward:<kind>" of kind "reward". Items already judged this round (a resumed
  run, people on the annotation page meanwhile) are left alone.
- **People for the rest.** `critic.people` (the simulated critic standing in for them, or real people)
  judges what the reward model left: everything in rounds before `reward.human_rounds`, the items it was not
  sure of (hybrid: a candidate within `reward.hybrid_band` of the threshold), or with
  `annotate.budget_per_round: N` (hybrid) the first N items in `annotate.order` (`uncertainty`: the least
  certain by `reward.uncertainty.UNCERTAINTY`; `random`: a seeded draw; `stored`: the first N sampled), less
  those people already judged this round. People get their items in `annotate.order` (the annotation page
  by `items.priority`).
- **Report.** The round's row of results.json gets the threshold, the held-out precision/recall/ROC-AUC and
  how many items the reward model decided; where the references are known (the demo), also the precision and
  recall of its accepts against the simulated critic's. With a budget or an order other than `stored`, also
  `people_items` (left to people by the split) and `people_items_rm_wrong` (the share of them where the
  reward model's decision differs from the simulated critic's: whether the order found its mistakes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from illume import distributed
from illume.config import ConfigError, RunConfig
from illume.critics import (
    PEOPLE_CRITICS,
    CritiqueContext,
    Review,
    SimulatedCritic,
    order_items,
    store_reviews,
)
from illume.data.records import CandidateSet, Example
from illume.feedback.store import FeedbackStore
from illume.tracking import trainer_report
from reward.uncertainty import UNCERTAINTY

REWARD_CRITIC_FILE = "reward_critic.json"


class RewardDecider:
    """Accepts a candidate when the reward model's score reaches the calibrated threshold.

    With `band`, it only decides items whose every candidate scores at least `band` away from the threshold
    (the confident ones); `decide` leaves the others out, for people.
    """

    def __init__(self, reward_model, threshold: float, band: float | None = None):
        self.reward_model, self.threshold, self.band = reward_model, threshold, band

    def scores(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[list[float]]:
        from reward.model import score

        items = [(examples_by_id[cs.example_id], cs.prompt, [c.text for c in cs.candidates]) for cs in candidate_sets]
        return score(self.reward_model, items)

    def confident(self, scores: Sequence[float]) -> bool:
        """Whether the item is the model's to decide: every candidate at least `band` from the threshold."""
        return self.band is None or all(abs(s - self.threshold) >= self.band for s in scores)

    def review(self, example_id: str, scores: Sequence[float]) -> Review:
        """The model's verdict on one item from its candidates' scores."""
        accepted = [i for i, s in enumerate(scores) if s >= self.threshold]
        return Review(example_id, accepted, none_fit=not accepted)

    def decide(self, candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]) -> list[Review]:
        return [self.review(cs.example_id, scores)
                for cs, scores in zip(candidate_sets, self.scores(candidate_sets, examples_by_id))
                if self.confident(scores)]  # the others: not confident, people decide them


def learn_from(cfg: RunConfig) -> list[str]:
    """Annotator kinds whose judgments the reward model learns from: `reward.learn_from`, else
    `feedback.people`."""
    return list(cfg.reward.learn_from if cfg.reward.learn_from is not None else cfg.feedback.people)


def _saved_config(directory: Path) -> dict:
    from reward.model import CONFIG_FILE

    return json.loads((directory / CONFIG_FILE).read_text())


def check_reward_checkpoint(cfg: RunConfig) -> None:
    """`reward.checkpoint`, checked from the files alone (before any model loads): a saved reward model,
    calibrated when a reward or hybrid critic must threshold it, fitted on the base model this run loads.

    Raises:
        ConfigError: naming the folder and what is wrong with it.
    """
    from illume.loading import model_identity
    from reward.model import CONFIG_FILE

    if cfg.reward.checkpoint is None:
        return
    directory = Path(cfg.reward.checkpoint)
    if not (directory / CONFIG_FILE).is_file():
        raise ConfigError(f"reward.checkpoint={directory}: no saved reward model there ({CONFIG_FILE} missing); "
                          "name a folder written by a run (RUN_DIR/reward/round_NN) or `illume reward train`")
    saved = _saved_config(directory)
    ours = model_identity(cfg)
    if saved.get("backbone") is None:
        raise ConfigError(f"reward.checkpoint={directory}: {CONFIG_FILE} does not say which base model it was "
                          f"fitted on (written before that was recorded); fit it again on {ours}")
    if saved["backbone"] != ours:
        raise ConfigError(f"reward.checkpoint={directory} was fitted on another base model ({saved['backbone']}); "
                          f"this run's model is {ours}. Fit a reward model on this run's judgments (leave "
                          "reward.checkpoint unset) or set model.* to the base model it was fitted on")
    if cfg.critic.kind in ("reward", "hybrid") and saved.get("threshold") is None:
        raise ConfigError(f"reward.checkpoint={directory} has no calibrated accept threshold, which critic.kind="
                          f"{cfg.critic.kind} needs; calibrate it with `illume reward eval`")


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


def _load_checkpoint(cfg: RunConfig) -> tuple[object, dict]:
    from illume.loading import load_vlm
    from reward.model import RewardModel

    directory = Path(cfg.reward.checkpoint)
    rm = RewardModel.load(directory, load_vlm(cfg))
    info_path = directory / REWARD_CRITIC_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {
        "threshold": rm.threshold, "heldout_precision": None, "heldout_recall": None, "heldout_roc_auc": None,
        "heldout_pairwise_accuracy": None, "num_people_judgments": None}
    return rm, {**info, "checkpoint": str(directory)}


def fit_or_reuse(cfg: RunConfig, round_idx: int, store: FeedbackStore, examples_by_id: dict[str, Example],
                 say: Callable[[str], None] = print) -> tuple[object, dict]:
    """The reward model for round `round_idx` (fitted on the judgments of earlier rounds) and its
    `reward_critic.json` facts (see the module doc). GRPO asks for round r + 1 to score round r's samples."""
    from illume.loading import load_vlm, model_identity
    from reward.model import RewardModel
    from reward.train import fit_reward_from_store

    if cfg.reward.checkpoint is not None:
        return _load_checkpoint(cfg)
    kinds = learn_from(cfg)
    backbone = model_identity(cfg)
    # Rank 0's count, so that every rank takes the same reuse-or-fit decision below.
    num_people = distributed.broadcast_object(store.num_judgments(upto_round=round_idx - 1, kinds=kinds))
    reward_root = cfg.run_dir / "reward"
    for earlier in range(round_idx, -1, -1):  # reuse a fit on exactly these judgments (also on resume)
        info_path = reward_root / f"round_{earlier:02d}" / REWARD_CRITIC_FILE
        if (info_path.is_file() and json.loads(info_path.read_text())["num_people_judgments"] == num_people
                and _saved_config(info_path.parent).get("backbone") in (backbone, None)):
            # (None: fitted before the base model was recorded, by this run and so on its model.) A fit on
            # another base model (a run continued with a changed model.*) is not reused: it is fitted again.
            return RewardModel.load(info_path.parent, load_vlm(cfg)), json.loads(info_path.read_text())
    out_dir = reward_root / f"round_{round_idx:02d}"
    say(f"round {round_idx}: fitting the reward model on {num_people} judgments by people")
    rm, result = fit_reward_from_store(store, examples_by_id, load_vlm(cfg), cfg.reward, out_dir,
                                       upto_round=round_idx - 1, kinds=kinds, aggregate=cfg.feedback.aggregate,
                                       deepspeed=cfg.train.deepspeed, bf16=cfg.train.bf16, fp16=cfg.train.fp16,
                                       backbone_id=backbone, report=trainer_report(cfg, out_dir))
    report = result["eval"]
    info = {"threshold": report["threshold"], "heldout_precision": report["precision"],
            "heldout_recall": report["recall"], "heldout_roc_auc": report["roc_auc"],
            "heldout_pairwise_accuracy": report["pairwise_accuracy"], "num_people_judgments": num_people}
    if distributed.is_main():
        _write_json(out_dir / REWARD_CRITIC_FILE, info)
    return rm, info


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


class RewardCritic:
    """critic.kind=reward: the reward model judges every item from round `reward.human_rounds` on; people
    (`critic.people`) judge the rounds before."""

    kind = "reward"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.annotator = f"reward:{cfg.critic.kind}"
        self.people = PEOPLE_CRITICS[cfg.critic.people](cfg)

    def band(self) -> float | None:
        """Distance from the threshold within which an item goes to people (None: the model decides all)."""
        return None

    def review(self, context: CritiqueContext) -> bool:
        if context.round_idx >= self.cfg.reward.human_rounds:
            context.report.update(self._critique(context))
        return self.people.review(context)

    def _critique(self, context: CritiqueContext) -> dict:
        cfg, store, round_idx, sets = self.cfg, context.store, context.round_idx, context.sets
        rm, info = fit_or_reuse(cfg, round_idx, store, context.examples_by_id, context.say)
        decider = RewardDecider(rm, info["threshold"], self.band())
        # Rank 0's view, taken before it writes: people may be judging on the annotation page meanwhile.
        # Example id -> whether people judged it.
        judged = distributed.broadcast_object(
            {item.example_id: any(j.annotator_kind in cfg.feedback.people for j in item.judgments)
             for item in store.judged_items("train", round_idx=round_idx)})
        todo = [cs for example_id, cs in sets.items() if example_id not in judged]
        reviews, people_order, split_report = self._split(context, decider, todo, sum(judged.values()))
        context.people_order = people_order
        if distributed.is_main():
            store_reviews(context, reviews, self.annotator, self.kind)
        distributed.barrier()  # the others read these judgments below
        decided_by_models = sum(any(j.annotator_kind not in cfg.feedback.people for j in item.judgments)
                                for item in store.judged_items("train", round_idx=round_idx))
        report = {"rm_threshold": info["threshold"], "rm_heldout_precision": info["heldout_precision"],
                  "rm_heldout_recall": info["heldout_recall"], "rm_heldout_roc_auc": info["heldout_roc_auc"],
                  "rm_decided_items": decided_by_models, **split_report}
        # Where the references are known (the demo), say how the reward model's decisions compare with the
        # simulated critic's: the achieved precision and recall of its accepts.
        decided_ids = {r.example_id for r in reviews}
        decided = [cs for cs in todo if cs.example_id in decided_ids]
        if decided and all(context.examples_by_id[cs.example_id].explanations for cs in decided):
            oracle = SimulatedCritic(cfg.critic).decide(decided, context.examples_by_id)
            by_id = {r.example_id: r for r in reviews}
            pairs = [(i in set(by_id[o.example_id].accepted), i in set(o.accepted))
                     for o in oracle for i in range(len(sets[o.example_id].candidates))]
            true_pos = sum(rm and ref for rm, ref in pairs)
            report["rm_precision_vs_simulated"] = true_pos / max(1, sum(rm for rm, _ in pairs))
            report["rm_recall_vs_simulated"] = true_pos / max(1, sum(ref for _, ref in pairs))
        return report

    def _split(self, context: CritiqueContext, decider: RewardDecider, todo: list[CandidateSet],
               num_by_people: int) -> tuple[list[Review], list[str] | None, dict]:
        """Which of the items nobody judged yet the reward model decides and which go to people.

        Returns:
            (the model's reviews; the people's items in hand-out order, None when the order is today's (no
            budget, `annotate.order: stored`); report keys for such runs, see the module doc).
        """
        cfg, round_idx = self.cfg, context.round_idx
        order, budget = cfg.annotate.order, cfg.annotate.budget_per_round
        uncertainty = None
        if order == "uncertainty" and todo:
            scores, values = UNCERTAINTY[cfg.reward.uncertainty](
                cfg, decider.reward_model, decider.threshold, context.store, round_idx, todo,
                context.examples_by_id, learn_from(cfg))
            uncertainty = {cs.example_id: (value, min((abs(s - decider.threshold) for s in item_scores),
                                                      default=float("inf")))
                           for cs, item_scores, value in zip(todo, scores, values)}
        else:
            scores = decider.scores(todo, context.examples_by_id) if todo else []
        ordered = order_items(order, [cs.example_id for cs in todo], cfg.seed, round_idx, uncertainty)
        if budget is None:  # the band rule (critic.kind=reward: no band, the model decides all)
            people = {cs.example_id for cs, item_scores in zip(todo, scores) if not decider.confident(item_scores)}
        else:  # the first items in annotate.order, up to what people have left of the round's budget
            people = set(ordered[:max(0, budget - num_by_people)])
        reviews = [decider.review(cs.example_id, item_scores) for cs, item_scores in zip(todo, scores)
                   if cs.example_id not in people]
        if budget is None and order == "stored":
            return reviews, None, {}  # today's behaviour: results.json of such runs is unchanged
        people_order = [example_id for example_id in ordered if example_id in people]
        report = {"people_items": len(people)}
        people_sets = [cs for cs in todo if cs.example_id in people]
        if people_sets and all(context.examples_by_id[cs.example_id].explanations for cs in people_sets):
            model = {cs.example_id: decider.review(cs.example_id, item_scores).accepted
                     for cs, item_scores in zip(todo, scores) if cs.example_id in people}
            oracle = SimulatedCritic(cfg.critic).decide(people_sets, context.examples_by_id)
            report["people_items_rm_wrong"] = sum(model[o.example_id] != o.accepted for o in oracle) / len(oracle)
        return reviews, people_order, report


class HybridCritic(RewardCritic):
    """critic.kind=hybrid: the reward model decides the items it is sure of (every candidate at least
    `reward.hybrid_band` from the threshold), people the rest; with `annotate.budget_per_round: N`, people the
    first N items in `annotate.order` and the reward model the rest."""

    def band(self) -> float | None:
        return self.cfg.reward.hybrid_band
