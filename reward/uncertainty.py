"""How sure the reward model is of its decision on an item: the estimate behind annotate.order=uncertainty.

`UNCERTAINTY[reward.uncertainty](cfg, rm, threshold, store, round_idx, candidate_sets, examples_by_id, kinds)`
returns
the reward model's scores of the items' candidates (exactly `reward.model.score`'s) and, per item, how
uncertain its accept/reject decision is (higher: less sure). `illume.critics.order_items` hands people the
least certain items first, ties broken by the smallest distance of a candidate's score to the threshold.

Estimators:
- `ensemble` (default): a second opinion. K = `reward.ensemble_size` linear heads are fitted on the frozen
  features of the fitted reward model (`RewardModel.pooled`: its backbone, adapters included, stays as
  fitted), each on a bootstrap resample of the training pairs (Bradley-Terry, L2), and each calibrated like
  the reward model: its own threshold at `reward.target_precision` on the held-out judged candidates. A
  candidate's uncertainty is the share of heads whose accept/reject differs from the reward model's
  decision (the decision that would be stored); an item's is the largest over its candidates.
- `margin`: no second opinion: every item 0, so the order is the distance to the threshold alone, the band
  rule's ranking (`reward.hybrid_band`). With `annotate.budget_per_round` it is the band rule at a fixed
  budget: the baseline that separates "a fixed budget" from "the ensemble's choice".

Why not the distance to the threshold for `ensemble` too: a budget spent on the items closest to the
threshold picks what the band rule picks, so the comparison would be empty. The heads disagree where the
training pairs leave the decision under-determined (few or conflicting pairs like the item's candidates),
which can be far from the threshold.

Assumptions, up front:
- The training pairs and held-out candidates are rebuilt from this run's store exactly as
  `reward.train.fit_reward_from_store` builds them (people's judgments of rounds before `round_idx`, the same
  split by example and seed), also for a `reward.checkpoint`; so the ensemble needs people's judgments of
  earlier rounds (`reward.pairs.RewardDataError` otherwise).
- Deterministic: the resamples come from a generator seeded with `reward.seed`, each head is the unique
  minimiser of a strictly convex loss (L-BFGS in float64), so every process and every resumed run gets the
  same order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence

import torch
import torch.nn.functional as F

from illume.config import RunConfig
from illume.data.records import CandidateSet, Example
from illume.feedback.store import FeedbackStore

L2 = 1e-3
"""Weight of |w|^2 in each head's loss: keeps the bootstrap fits unique where the pairs do not pin w down."""

Estimate = tuple[list[list[float]], list[float]]
"""(scores per item, parallel to its candidates; uncertainty per item, higher: less sure)."""


def _items(candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example]):
    return [(examples_by_id[cs.example_id], cs.prompt, [c.text for c in cs.candidates]) for cs in candidate_sets]


def margin_uncertainty(cfg: RunConfig, rm, threshold: float, store: FeedbackStore, round_idx: int,
                       candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example],
                       kinds: Collection[str]) -> Estimate:
    """reward.uncertainty=margin: every item 0 (the order falls to the distance to the threshold)."""
    from reward.model import score

    return score(rm, _items(candidate_sets, examples_by_id)), [0.0] * len(candidate_sets)


def ensemble_uncertainty(cfg: RunConfig, rm, threshold: float, store: FeedbackStore, round_idx: int,
                         candidate_sets: Sequence[CandidateSet], examples_by_id: dict[str, Example],
                         kinds: Collection[str]) -> Estimate:
    """reward.uncertainty=ensemble (module doc); `kinds`: whose judgments the reward model learns from."""
    from reward.model import score_with_features

    heads = fit_heads(cfg, rm, store, round_idx, examples_by_id, kinds)
    scores, features = score_with_features(rm, _items(candidate_sets, examples_by_id))
    return scores, [item_disagreement(heads, item_features, item_scores, threshold)
                    for item_scores, item_features in zip(scores, features)]


def item_disagreement(heads: Sequence[tuple[torch.Tensor, float]], features: torch.Tensor,
                      scores: Sequence[float], threshold: float) -> float:
    """The largest share, over the item's candidates, of heads whose accept/reject differs from the reward
    model's (score >= threshold); 0 for an item without candidates.

    Args:
        heads: (weights (D,), threshold) per head.
        features: (C, D) the candidates' features.
        scores: The reward model's C scores.
        threshold: The reward model's accept threshold.
    """
    if not len(scores):
        return 0.0
    decided = torch.tensor(list(scores)) >= threshold  # (C,) the reward model's decision
    votes = torch.stack([features.double() @ w >= t for w, t in heads])  # (K, C) each head's
    return float((votes != decided).double().mean(0).max())  # share of heads against the decision, worst candidate


def fit_heads(cfg: RunConfig, rm, store: FeedbackStore, round_idx: int, examples_by_id: dict[str, Example],
              kinds: Collection[str]) -> list[tuple[torch.Tensor, float]]:
    """The `reward.ensemble_size` bootstrap heads (weights (D,) float64, calibrated threshold) on the reward
    model's frozen features, from people's judgments of the rounds before `round_idx` (module doc).

    Raises:
        RewardDataError: no judgments by people before `round_idx`, no pair, or no accepted held-out candidate.
    """
    from reward.model import score_with_features
    from reward.pairs import (
        RewardDataError,
        calibration_split,
        labelled_candidates,
        preference_pairs,
        reward_feedback,
    )

    rcfg = cfg.reward
    feedback = reward_feedback(store, upto_round=round_idx - 1, kinds=kinds,
                               aggregate=cfg.feedback.aggregate)
    pairs = preference_pairs(feedback, examples_by_id, rcfg.include_reference_pairs)
    _, heldout_ids = calibration_split(feedback, rcfg.heldout_fraction, rcfg.seed)
    heldout = set(heldout_ids)
    pairs = [p for p in pairs if p.example_id not in heldout]
    judged = labelled_candidates(feedback, example_ids=heldout)
    if not pairs or not any(accepted for *_, accepted in judged):
        raise RewardDataError(f"reward.uncertainty=ensemble before round {round_idx}: {len(pairs)} training "
                              f"pairs and {sum(a for *_, a in judged)} accepted held-out candidates; it needs both")
    # Every distinct (example, prompt, text) once: an item's candidates appear in many pairs.
    texts: dict[tuple[str, str], dict[str, int]] = {}
    for example_id, prompt, text in ([(p.example_id, p.prompt, t) for p in pairs for t in (p.chosen, p.rejected)]
                                     + [(e, p, t) for e, p, t, _ in judged]):
        texts.setdefault((example_id, prompt), {}).setdefault(text, 0)
    keys = list(texts)
    _, features = score_with_features(rm, [(examples_by_id[e], p, list(texts[(e, p)])) for e, p in keys])
    row = {}
    for (example_id, prompt), item_features in zip(keys, features):
        for text, vector in zip(texts[(example_id, prompt)], item_features.double()):
            row[(example_id, prompt, text)] = vector
    differences = torch.stack([row[(p.example_id, p.prompt, p.chosen)] - row[(p.example_id, p.prompt, p.rejected)]
                               for p in pairs])  # (P, D) chosen - rejected
    heldout_features = torch.stack([row[(e, p, t)] for e, p, t, _ in judged])  # (H, D)
    return fit_ensemble(differences, heldout_features, [accepted for *_, accepted in judged], rcfg.ensemble_size,
                        rcfg.seed, rcfg.target_precision)


def fit_ensemble(differences: torch.Tensor, heldout_features: torch.Tensor, labels: Sequence[bool], size: int,
                 seed: int, target_precision: float) -> list[tuple[torch.Tensor, float]]:
    """`size` heads, each fitted (`_fit_head`) on a bootstrap resample of the pairs and calibrated on the
    held-out candidates (`reward.evaluate.calibrate_threshold`).

    Args:
        differences: (P, D) chosen minus rejected features of the training pairs.
        heldout_features: (H, D) features of the held-out judged candidates.
        labels: Their H verdicts (accepted or not).
        size: How many heads.
        seed: Seed of the resamples.
        target_precision: The held-out precision each head's threshold is calibrated to.

    Returns:
        (weights (D,) float64, threshold) per head.
    """
    from reward.evaluate import calibrate_threshold

    generator = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(size):
        sample = torch.randint(len(differences), (len(differences),), generator=generator)
        weights = _fit_head(differences[sample].double())
        with warnings.catch_warnings():  # a head short of the target precision: the best one is fine here
            warnings.simplefilter("ignore", RuntimeWarning)
            threshold = calibrate_threshold((heldout_features.double() @ weights).tolist(), labels,
                                            target_precision)
        heads.append((weights, threshold))
    return heads


def _fit_head(differences: torch.Tensor) -> torch.Tensor:
    """argmin_w mean(-log sigmoid(w . d)) + L2 |w|^2 over the rows d of `differences` (P, D): Bradley-Terry on
    fixed features (no bias: it cancels in a pair; the calibrated threshold takes its place)."""
    weights = torch.zeros(differences.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.softplus(-(differences @ weights)).mean() + L2 * weights.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return weights.detach()


UNCERTAINTY: dict[str, Callable[..., Estimate]] = {
    "ensemble": ensemble_uncertainty,
    "margin": margin_uncertainty,
}
"""reward.uncertainty -> the estimator (module doc)."""
