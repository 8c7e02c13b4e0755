"""MAGMA's decoding for the sampler: pre-fill once, repeat the KV cache, draw every row with Gumbel-max.

`MagmaVLM.decode` calls `decode`. Each prompt (image features included) is pre-filled once and its KV cache is
then repeated `num_copies` times, one row per candidate, so K rationales of one example cost one pre-fill;
every row is decoded with its own temperature until it emits a stop token, and then leaves the batch (its
cache rows too), so a step costs what the rows still running cost. Sampled rows may be restricted to their
top-k / top-p tokens (illume.models.logits_filters), applied to the temperature-scaled logits.

Randomness is per prompt: the rows of prompt e draw their Gumbel noise from e's generator, so a candidate
depends only on (model, prompt, seed, row), not on the batch it was drawn in. Every prompt's generator draws
its whole (num_copies, V) block each step until the last row stops, finished rows included, so a row's noise
does not depend on when the others stopped. (Float32 logits of a row may differ in the last bits with the
number of rows in the batch, so a log-probability may too, by ~1e-6, as between two batch sizes.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from illume.models.logits_filters import filter_logits, filters_active
from illume.models.magma import MagmaForCausalLM


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):] = torch.as_tensor(s)
        mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def decode(model: MagmaForCausalLM, prompts: list[list[int]], image_embeds: torch.Tensor, num_copies: int,
           temperatures: torch.Tensor, generators: list[torch.Generator] | None, max_new_tokens: int,
           stop_token_ids: Sequence[int], pad_token_id: int,
           banned_token_ids: Sequence[int], top_k: int | None = None,
           top_p: float = 1.0) -> tuple[list[list[int]], list[float]]:
    """Pre-fill each prompt once, repeat its cache `num_copies` times, decode every row until a stop token.

    Args:
        prompts: One token-id list per example, image slots included.
        image_embeds: (B, P, D) image features, one per prompt.
        temperatures: (B * num_copies,) per-row temperatures; 0 means greedy.
        generators: One per example (row block), for its Gumbel noise; None for greedy decoding.
        banned_token_ids: Tokens never drawn (padding, the image slot).
        top_k, top_p: Sampled rows draw from their top-k / top-p tokens of logits / T (0 or None / 1.0: all);
            greedy rows are unaffected (a filter always keeps the most probable token).

    Returns:
        The new tokens of every row (stop token excluded) and their summed log-probabilities at T = 1
        (stop token included).
    """
    device = image_embeds.device
    input_ids, attention_mask = _left_pad(prompts, pad_token_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                image_embeds=image_embeds, use_cache=True, logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1].float()  # (B, V)
    if num_copies > 1:
        cache.batch_repeat_interleave(num_copies)
        logits = logits.repeat_interleave(num_copies, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_copies, dim=0)
        position_ids = position_ids.repeat_interleave(num_copies, dim=0)
    num_rows, vocab = logits.shape
    banned = list(banned_token_ids)
    stop = torch.tensor(list(stop_token_ids), device=device)
    temperatures = temperatures.to(device).float().unsqueeze(1)  # (R, 1)
    filtered = generators is not None and filters_active(top_k, top_p)
    next_position = position_ids[:, -1:] + 1
    tokens = torch.full((num_rows, max_new_tokens), -1, dtype=torch.long)
    logprobs = torch.zeros(num_rows, dtype=torch.float64)
    # Rows that emitted a stop token leave the batch (their cache rows too): `active` holds the original
    # index of each row still decoded, and every per-row tensor below has one row per active row.
    active = torch.arange(num_rows)
    for step in range(max_new_tokens):
        logits[:, banned] = float("-inf")
        row_temperatures = temperatures[active.to(device)]
        greedy_rows = row_temperatures <= 0  # (A, 1)
        scores = logits / row_temperatures.clamp(min=1e-6)
        if filtered:  # after the temperature, as transformers' warpers
            scores = torch.where(greedy_rows, scores, filter_logits(scores, top_k, top_p))
        if generators is not None:
            # Gumbel-max: argmax(logits / T + G) is a sample from softmax(logits / T), with noise drawn from
            # each example's own generator so that batching does not change the draw. Every example draws
            # its whole (num_copies, V) block each step, finished rows included, so that a row's noise does
            # not depend on when the others finished.
            uniform = torch.cat([torch.rand((num_copies, vocab), generator=g) for g in generators]).to(device)
            gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
            scores = torch.where(greedy_rows, scores, scores + gumbel[active.to(device)])
        chosen = scores.argmax(-1)  # (A,)
        step_logprobs = torch.log_softmax(logits, -1).gather(1, chosen.unsqueeze(1)).squeeze(1)
        tokens[active, step] = chosen.cpu()
        logprobs[active] += step_logprobs.double().cpu()
        running = ~torch.isin(chosen, stop)
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        if not bool(running.all()):
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            chosen, attention_mask, next_position = chosen[keep], attention_mask[keep], next_position[keep]
            active = active[keep.cpu()]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
        out = model(input_ids=chosen.unsqueeze(1), attention_mask=attention_mask, position_ids=next_position,
                    cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
        next_position = next_position + 1
    sequences = []
    for row in tokens.tolist():
        new = [t for t in row if t >= 0]
        if new and new[-1] in stop_token_ids:
            new = new[:-1]
        sequences.append(new)
    return sequences, logprobs.tolist()
