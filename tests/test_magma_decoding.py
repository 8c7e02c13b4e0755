"""MAGMA's decoding loop drops finished rows from the batch: it draws the tokens the loop that decoded every row
to the end drew (kept below as the reference), with the same noise per row."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from illume.data.shapes import ShapesWorld
from illume.models import magma_decoding
from illume.models.logits_filters import filter_logits, filters_active
from illume.prompts import rationale_prompt

K = 4
MAX_NEW_TOKENS = 12


@torch.no_grad()
def reference_decode(model, prompts: list[list[int]], image_embeds: torch.Tensor, num_copies: int,
                     temperatures: torch.Tensor, generators: list[torch.Generator] | None, max_new_tokens: int,
                     stop_token_ids: Sequence[int], pad_token_id: int, banned_token_ids: Sequence[int],
                     top_k: int | None = None, top_p: float = 1.0) -> tuple[list[list[int]], list[float]]:
    """`magma_decoding.decode` before finished rows left the batch: every row is decoded until all stopped."""
    device = image_embeds.device
    input_ids, attention_mask = magma_decoding._left_pad(prompts, pad_token_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                image_embeds=image_embeds, use_cache=True, logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1].float()
    if num_copies > 1:
        cache.batch_repeat_interleave(num_copies)
        logits = logits.repeat_interleave(num_copies, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_copies, dim=0)
        position_ids = position_ids.repeat_interleave(num_copies, dim=0)
    num_rows, vocab = logits.shape
    banned = list(banned_token_ids)
    stop = torch.tensor(list(stop_token_ids), device=device)
    temperatures = temperatures.to(device).float().unsqueeze(1)
    greedy_rows = temperatures.squeeze(1) <= 0
    filtered = generators is not None and filters_active(top_k, top_p)
    next_position = position_ids[:, -1:] + 1
    tokens = torch.full((num_rows, max_new_tokens), -1, dtype=torch.long)
    logprobs = torch.zeros(num_rows, dtype=torch.float64)
    finished = torch.zeros(num_rows, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits[:, banned] = float("-inf")
        scores = logits / temperatures.clamp(min=1e-6)
        if filtered:
            scores = torch.where(greedy_rows.unsqueeze(1), scores, filter_logits(scores, top_k, top_p))
        if generators is not None:
            uniform = torch.cat([torch.rand((num_copies, vocab), generator=g) for g in generators]).to(device)
            gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
            scores = torch.where(greedy_rows.unsqueeze(1), scores, scores + gumbel)
        chosen = scores.argmax(-1)
        step_logprobs = torch.log_softmax(logits, -1).gather(1, chosen.unsqueeze(1)).squeeze(1)
        active = ~finished
        tokens[active, step] = chosen[active].cpu()
        logprobs[active] += step_logprobs[active].double().cpu()
        finished |= torch.isin(chosen, stop).cpu()
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((num_rows, 1))], dim=1)
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


@pytest.fixture
def eos_biased_vlm(tiny_vlm):
    """The tiny MAGMA with EOS made likely, so that rows stop at different steps (a random model's rarely do)."""
    head = tiny_vlm.model.lm.lm_head
    with torch.no_grad():
        head.bias[tiny_vlm.eos_token_id] += 1.5
    return tiny_vlm


@pytest.mark.slow
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.7}])
def test_dropping_finished_rows_draws_what_decoding_every_row_drew(eos_biased_vlm, filters):
    vlm = eos_biased_vlm
    examples = ShapesWorld(num_val_scenes=5).examples("val")
    images = vlm.prepare_images([e.image for e in examples])
    prompts = [vlm.prompt_ids(rationale_prompt(e.question, e.answer)) for e in examples]
    temperatures = torch.tensor([0.0, 0.5, 1.0, 1.0] * len(examples))  # a greedy row and two temperatures
    draws = {}
    for name, decode in [("new", magma_decoding.decode), ("reference", reference_decode)]:
        generators = [torch.Generator().manual_seed(7 + i) for i in range(len(examples))]
        draws[name] = decode(vlm.model, prompts, images, K, temperatures, generators, MAX_NEW_TOKENS,
                             [vlm.eos_token_id], vlm.pad_token_id, vlm.banned_token_ids, **filters)
    (tokens, logprobs), (reference_tokens, reference_logprobs) = draws["new"], draws["reference"]
    assert tokens == reference_tokens
    # Float32 results of a row may differ in the last bits with the number of rows in the batch.
    assert logprobs == pytest.approx(reference_logprobs, abs=1e-5)
    lengths = {len(t) for t in tokens}
    assert len(lengths) > 2 and min(lengths) < MAX_NEW_TOKENS - 1, lengths  # rows left the batch at different steps
