"""Top-k and top-p (nucleus) filters on temperature-scaled logits: the one implementation every backend uses.

Both take the scores a token is drawn from, i.e. logits already divided by the row's temperature (as
transformers' warpers are applied after its TemperatureLogitsWarper), and set the tokens they remove to -inf.
The most probable token is never removed, so a greedy argmax is the same with or without a filter.

- top-k keeps the k highest scores and every token tied with the k-th (transformers' TopKLogitsWarper).
- top-p keeps the smallest set of most probable tokens whose total probability is >= p, the nucleus of
  Holtzman et al. (2020) and transformers' TopPLogitsWarper: a token is removed exactly when the tokens more
  probable than it already reach p (sums in float64). E.g. probabilities [.5, .3, .1, .1] at p = 0.9 keep the
  first three (.9 is reached) and remove the last. Ties in probability are ordered by token id (the lower id
  counts as more probable, as argmax picks it), so at the boundary the lower id is kept; transformers' sort
  leaves that order unspecified (on CPU it keeps the higher id). Otherwise the kept sets equal
  TopPLogitsWarper's (tests/test_decoding.py), up to its float32 rounding.

MAGMA's `top_p_filter` (Aleph-Alpha/magma) marks `cumsum < 1 - p` instead, which for any peaked distribution
removes nothing (README, "Generation recipes"); we do not reproduce that.
"""

from __future__ import annotations

import torch


def top_k_active(top_k: int | None) -> bool:
    return top_k is not None and top_k > 0


def top_p_active(top_p: float | None) -> bool:
    return top_p is not None and top_p < 1.0


def filters_active(top_k: int | None, top_p: float | None) -> bool:
    """Whether `filter_logits` would change anything (callers skip it otherwise: no work, same bits)."""
    return top_k_active(top_k) or top_p_active(top_p)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """(R, V) scores with all but the `top_k` highest of each row (and ties with the k-th) set to -inf."""
    if top_k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(R, V) scores with every token outside each row's nucleus of mass `top_p` set to -inf (module doc)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(scores.double(), dim=-1)
    # Descending by probability, ties by token id: a stable sort of the ids' negated probabilities.
    order = torch.sort(-probs, dim=-1, stable=True).indices
    sorted_probs = probs.gather(-1, order)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens more probable than each
    remove_sorted = before >= top_p
    remove_sorted[..., 0] = False  # the most probable token always stays
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def filter_logits(scores: torch.Tensor, top_k: int | None = None, top_p: float | None = 1.0) -> torch.Tensor:
    """Top-k then top-p on (R, V) temperature-scaled scores; top_k 0 / None and top_p 1.0 / None: off."""
    if top_k_active(top_k):
        scores = top_k_filter(scores, top_k)
    if top_p_active(top_p):
        scores = top_p_filter(scores, top_p)
    return scores
