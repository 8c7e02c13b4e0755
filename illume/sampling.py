"""Sampling a near-greedy answer and K candidate rationales per example.

For a batch of examples: each image is encoded once; the answer is decoded greedily; the rationale prompt
`Q: {question} A: {answer}, seeing that` is pre-filled once per example, and its KV cache is then repeated
K times (one row per candidate) and decoded with each row's temperature until every row has emitted EOS.

Randomness is per example: row k of example e draws its Gumbel noise from a generator seeded with e's seed,
so a candidate depends only on (model, example, seed, k), not on the batch it was drawn in; the recorded
seeds reproduce it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from illume.config import SampleConfig
from illume.data.records import Candidate, CandidateSet, Example, load_image
from illume.models.vlm import VLM

RATIONALE_PROMPT = "Q: {question} A: {answer}, seeing that"
ANSWER_PROMPT = "Q: {question} A:"


def example_seed(base_seed: int, round_idx: int, example_id: str) -> int:
    """A stable 63-bit seed for one example in one round."""
    digest = hashlib.sha256(f"{base_seed}/{round_idx}/{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rationale_prompt(question: str, answer: str) -> str:
    return RATIONALE_PROMPT.format(question=question, answer=answer)


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):] = torch.as_tensor(s)
        mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def _banned_tokens(vlm: VLM) -> list[int]:
    """Tokens a rationale must never contain: padding and the image slot."""
    banned = [vlm.pad_token_id]
    image_token_id = getattr(vlm, "image_token_id", None)
    if image_token_id is not None:
        banned.append(image_token_id)
    return [t for t in banned if t is not None and t != vlm.eos_token_id]


@torch.no_grad()
def _decode(vlm: VLM, prompts: list[list[int]], image_embeds: torch.Tensor, num_copies: int,
            temperatures: torch.Tensor, generators: list[torch.Generator] | None, max_new_tokens: int,
            stop_token_ids: Sequence[int]) -> tuple[list[list[int]], list[float]]:
    """Pre-fill each prompt once, repeat its cache `num_copies` times, decode every row until a stop token.

    Args:
        prompts: One token-id list per example, image slots included.
        image_embeds: (B, P, D) image features, one per prompt.
        temperatures: (B * num_copies,) per-row temperatures; 0 means greedy.
        generators: One per example (row block), for its Gumbel noise; None for greedy decoding.

    Returns:
        The new tokens of every row (stop token excluded) and their summed log-probabilities at T = 1
        (stop token included).
    """
    model = vlm.model
    device = image_embeds.device
    input_ids, attention_mask = _left_pad(prompts, vlm.pad_token_id, device)
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
    banned = _banned_tokens(vlm)
    stop = torch.tensor(list(stop_token_ids), device=device)
    temperatures = temperatures.to(device).float().unsqueeze(1)  # (R, 1)
    greedy_rows = temperatures.squeeze(1) <= 0
    next_position = position_ids[:, -1:] + 1
    tokens = torch.full((num_rows, max_new_tokens), -1, dtype=torch.long)
    logprobs = torch.zeros(num_rows, dtype=torch.float64)
    finished = torch.zeros(num_rows, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits[:, banned] = float("-inf")
        scores = logits / temperatures.clamp(min=1e-6)
        if generators is not None:
            # Gumbel-max: argmax(logits / T + G) is a sample from softmax(logits / T), with noise drawn from
            # each example's own generator so that batching does not change the draw.
            uniform = torch.cat([torch.rand((num_copies, vocab), generator=g) for g in generators]).to(device)
            gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
            scores = torch.where(greedy_rows.unsqueeze(1), scores, scores + gumbel)
        chosen = scores.argmax(-1)  # (R,)
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


def _clean(text: str) -> str:
    return " ".join(text.split())


def sample(vlm: VLM, examples: Sequence[Example], cfg: SampleConfig, round_idx: int = 0,
           use_reference_answer: bool = False, seeds: dict[str, int] | None = None,
           progress: bool = True) -> list[CandidateSet]:
    """Draw a near-greedy answer and K rationales for every example.

    Args:
        use_reference_answer: Put the ground-truth answer into the rationale prompt (train); otherwise the
            model's own answer (val/test).
        seeds: Example id -> seed, to reproduce recorded candidates; default derived from
            (cfg.seed, round_idx, example id).

    Returns:
        One CandidateSet per example, in order, with at most K distinct non-empty rationales.
    """
    if getattr(vlm, "backend", "magma") == "hf":  # HF VLMs decode through `generate` (illume.models.hf)
        from illume.models.hf import sample_hf

        return sample_hf(vlm, examples, cfg, round_idx, use_reference_answer, seeds)
    temperatures = [t for t in cfg.temperatures for _ in range(cfg.samples_per_temperature)]
    k = len(temperatures)
    model_was_training = vlm.model.training
    vlm.model.eval()
    results: list[CandidateSet] = []
    bar = tqdm(total=len(examples), desc="sampling", unit="ex", disable=not progress)
    comma = vlm.text_ids(",")
    answer_stops = [vlm.eos_token_id] + (comma if len(comma) == 1 else [])
    for start in range(0, len(examples), cfg.batch_size):
        batch = list(examples[start:start + cfg.batch_size])
        with torch.no_grad():
            image_embeds = vlm.encode_images(vlm.pixel_values([load_image(e) for e in batch]))
        # 1. The model's own answer, greedy.
        answer_prompts = [vlm.prompt_ids(ANSWER_PROMPT.format(question=e.question)) for e in batch]
        answer_ids, _ = _decode(vlm, answer_prompts, image_embeds, 1, torch.zeros(len(batch)), None,
                                cfg.answer_max_new_tokens, answer_stops)
        predicted = [_clean(vlm.tokenizer.decode(ids, skip_special_tokens=True)) for ids in answer_ids]
        answers = [e.answer if use_reference_answer else p for e, p in zip(batch, predicted)]
        # 2. K rationales per example from one pre-fill each.
        prompts = [rationale_prompt(e.question, a) for e, a in zip(batch, answers)]
        batch_seeds = [(seeds or {}).get(e.id, example_seed(cfg.seed, round_idx, e.id)) for e in batch]
        generators = [torch.Generator().manual_seed(s) for s in batch_seeds]
        row_temperatures = torch.tensor(temperatures * len(batch))
        sequences, logprobs = _decode(vlm, [vlm.prompt_ids(p) for p in prompts], image_embeds, k,
                                      row_temperatures, generators, cfg.max_new_tokens, [vlm.eos_token_id])
        texts = vlm.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        for i, example in enumerate(batch):
            seen, candidates = set(), []
            for j in range(k):
                row = i * k + j
                text = _clean(texts[row])
                if not text or text in seen:
                    continue
                seen.add(text)
                candidates.append(Candidate(text, temperatures[j], batch_seeds[i], j, logprobs[row]))
            results.append(CandidateSet(example.id, answers[i], predicted[i], prompts[i], batch_seeds[i],
                                        candidates))
        bar.update(len(batch))
    bar.close()
    vlm.model.train(model_was_training)
    return results
