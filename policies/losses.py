"""Preference losses on sequence log-probabilities: DPO (and relatives) and KTO, with TRL's names and maths.

Everything here works on per-sequence sums of completion-token log-probabilities, so it is independent of
the model backend. `tests/test_policies.py` runs TRL 1.16's own `DPOTrainer._compute_loss` and
`KTOTrainer._compute_loss` on identical log-probabilities and checks that these functions give the same loss.

One deliberate difference: TRL >= 1.0 ignores `label_smoothing` for `sigmoid`; here it gives conservative
DPO (cDPO, Mitchell 2023), which is what `sigmoid` with `label_smoothing` meant in TRL < 1.0. With
label_smoothing = 0 both agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the log-probabilities of each row's target tokens, and the number of target tokens.

    Args:
        logits: (B, T, V) for the input (unshifted); labels: (B, T) with -100 where there is no target.

    Returns:
        (logps (B,), num_tokens (B,)); logits are upcast to float32 first (bf16 log-softmax is too coarse for
        the small differences DPO works on).
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    # -cross_entropy is the token log-prob; it avoids materialising a second (B, T, V) log-softmax tensor.
    token_logps = -F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, loss_type: str = "sigmoid", beta: float = 0.1,
               label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
               rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss (B,) from policy and reference sequence log-probs of the chosen and rejected rows.

    Args:
        loss_type: "sigmoid" (DPO; cDPO with label_smoothing), "ipo" (IPO, log-ratios averaged per token as
            TRL does, so it needs the lengths), "hinge" (SLiC), "robust" (robust DPO with label_smoothing).
        beta: TRL's beta (IPO's tau).
        chosen_lengths, rejected_lengths: completion tokens per row (ipo only).
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the completion lengths")
        per_token = (chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1))
        return (per_token - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row KTO loss (Ethayarajh et al., 2024, Eq. 7, as TRL's loss_type="kto"), weighted per side.

    Args:
        logps, ref_logps: (B,) policy and reference sequence log-probs of the rows.
        desirable: (B,) bool, True for accepted rationales.
        kl: scalar reference point z0, the batch estimate of KL(policy || reference) from mismatched
            completions (detached, clamped at 0, as in TRL).

    Returns:
        (B,) losses ordered as TRL's: accepted rows first, then rejected rows.
    """
    logratios = logps - ref_logps
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios[desirable] - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios[~desirable])))
    return torch.cat([chosen, rejected])
