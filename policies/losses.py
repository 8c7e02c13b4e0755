"""Preference losses on sequence log-probabilities: DPO (and relatives) and KTO, with TRL's names and maths.

Everything here works on per-sequence sums of completion-token log-probabilities, so it is independent of
the model backend. `tests/test_policies.py` runs TRL 1.16's own `DPOTrainer._compute_loss` and
`KTOTrainer._compute_loss` on identical log-probabilities and checks that these functions give the same loss.

One deliberate difference: TRL >= 1.0 ignores `label_smoothing` for `sigmoid`; here it gives conservative
DPO (cDPO, Mitchell 2023), which is what `sigmoid` with `label_smoothing` meant in TRL < 1.0. With
label_smoothing = 0 both agree.

GRPO (`group_advantages`, `grpo_loss`) works on per-token log-probabilities of the completions instead;
tests/test_grpo.py drives TRL 1.16's own `GRPOTrainer._compute_loss` on identical per-token log-probs and
advantages.
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


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
GRPO_STD_EPSILON = 1e-4
"""Added to each group's reward std before dividing, as TRL's GRPOTrainer does."""


def group_advantages(rewards: torch.Tensor, group_size, scale: bool = True, baseline: str = "group") -> torch.Tensor:
    """Advantages within each group of samples of one question.

    Args:
        rewards: (N,) rewards, the samples of one group contiguous (B groups of G: N = B * G).
        group_size: G (every group the same size, TRL's layout), or a sequence with each group's size (groups
            of distinct rationales, policies/grpo.py).
        scale: "group" only: TRL's scale_rewards="group" (True: divide by the group's std + 1e-4) or "none".
        baseline: "group": GRPO's, each reward minus its group's mean (then `scale`); "rloo": REINFORCE
            leave-one-out (Ahmadian et al. 2024), each reward minus the mean of the *other* samples of its group,
            never scaled (G/(G-1) times the group-centred reward).

    The std is the unbiased one (torch.std, as TRL's `nanstd`); a group of one sample has advantage 0.
    """
    if baseline not in ("group", "rloo"):
        raise ValueError(f"baseline must be 'group' or 'rloo', got {baseline!r}")
    sizes = [group_size] * (len(rewards) // group_size) if isinstance(group_size, int) else list(group_size)
    if sum(sizes) != len(rewards):
        raise ValueError(f"group sizes {sizes} do not add up to the {len(rewards)} rewards")
    out = []
    for group in rewards.float().split(sizes):
        if baseline == "rloo":
            others = (group.sum() - group) / (len(group) - 1) if len(group) > 1 else group
            out.append(group - others)
            continue
        centred = group - group.mean()
        if scale:
            std = group.std() if len(group) > 1 else torch.zeros((), dtype=group.dtype)
            centred = centred / (std + GRPO_STD_EPSILON)
        out.append(centred)
    return torch.cat(out) if out else rewards.float()


def grpo_per_token_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_per_token_logps - per_token_logps
    return torch.exp(delta) - delta - 1


def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor,
              ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor, completion_mask: torch.Tensor,
              beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float | None = None,
              loss_type: str = "dr_grpo", max_completion_length: int | None = None) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer's clipped surrogate with its k3 KL penalty (token-level importance sampling, no
    entropy mask, no vLLM correction; one accumulation step), on per-token log-probs of the completions.

    Args:
        per_token_logps: (B, T) completion-token log-probs under the policy being trained.
        old_per_token_logps: (B, T) under the policy that drew the samples (here: the model as the round
            found it).
        ref_per_token_logps: (B, T) under the reference (None when beta = 0).
        advantages: (B,) or (B, T).
        completion_mask: (B, T), 1 on completion tokens.
        beta: weight of the KL penalty; 0: none.
        epsilon_low, epsilon_high: the ratio is clipped to [1 - low, 1 + high] (high None: = low).
        loss_type: grpo (per-sequence token mean, then batch mean), bnpo (token mean over the batch),
            dr_grpo (token sum / (B * max_completion_length)).
        max_completion_length: dr_grpo's constant denominator per sequence.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("a KL penalty (beta != 0) needs the reference log-probs")
        per_token_loss = per_token_loss + beta * grpo_per_token_kl(per_token_logps, ref_per_token_logps)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if max_completion_length is None:
        raise ValueError("the dr_grpo loss needs max_completion_length")
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)


def per_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's target-token log-probs gathered to the left: ((B, L), completion mask (B, L)), L the most
    target tokens of any row; the per-token counterpart of `sequence_logps` (GRPO's layout)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    token_logps = -F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    return to_completion_layout(token_logps[mask], mask.sum(-1))


def to_completion_layout(flat: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major completion-token values (sum(lengths),) as a left-aligned (B, max length) tensor + its mask."""
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat), mask
