"""Sampling a near-greedy answer and K candidate rationales per example: the one sampler, for every backend.

For a batch of examples: the images are prepared once (`VLM.prepare_images`); the answer is decoded from
`Q: {question} A:` (greedily, or at `sample.answer_temperature`) and ends at EOS or at one of the backend's
`answer_stops`; then the rationale prompt `Q: {question} A: {answer}, seeing that` is decoded K times per
example (`num_copies`), each row with its temperature, optionally restricted to its top-k / top-p tokens
(`sample.top_k`, `sample.top_p`, applied after the temperature), until EOS or `max_new_tokens`. How a backend
decodes (MAGMA: one pre-fill per prompt and a repeated KV cache; HF: `generate`) is behind `VLM.decode`; this
module never asks which backend it has.

Randomness is per example: row k of example e draws its Gumbel noise from a generator seeded with e's seed
(`illume.prompts.example_seed`), so a candidate depends only on (model, example, seed, k), not on the batch
it was drawn in; the recorded seeds reproduce it. A sampled answer draws from its own generator, seeded with
`illume.prompts.answer_seed` of the example's seed; a greedy answer (the default) draws nothing.

Who draws is `sample.engine` (`ENGINES`, the one place that chooses): `generate`, the model in this process, as
above; `vllm`, a vLLM server (illume.vllm_engine) with the same stored fields. Callers (the loop, the pool,
evaluation) call `sample` and, around a run, `engine_session`; none asks which engine it has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from illume import vllm_engine
from illume.config import SampleConfig
from illume.data.records import CandidateSet, Example, clean_text, distinct_candidates, load_image
from illume.models.sharding import whole
from illume.models.vlm import VLM
from illume.prompts import ANSWER_PROMPT, answer_seed, example_seed, rationale_prompt


def answer_stop_ids(vlm: VLM) -> list[int]:
    """EOS and the backend's answer stops that are one token (longer ones are cut from the text)."""
    stops = [vlm.eos_token_id]
    for text in vlm.answer_stops:
        ids = vlm.text_ids(text)
        stops += ids if len(ids) == 1 else []
    return stops


def answer_text(vlm: VLM, ids: list[int]) -> str:
    """The decoded answer up to the first of each answer stop, whitespace normalised."""
    text = vlm.tokenizer.decode(ids, skip_special_tokens=True)
    for stop in vlm.answer_stops:
        text = text.split(stop)[0]
    return clean_text(text)


def sample(vlm: VLM, examples: Sequence[Example], cfg: SampleConfig, round_idx: int = 0,
           use_reference_answer: bool = False, seeds: dict[str, int] | None = None,
           progress: bool = True) -> list[CandidateSet]:
    """Draw a near-greedy answer and K rationales for every example, by the engine `cfg.engine` names
    (`ENGINES`); arguments and result as `decode_candidates`, whichever engine draws.

    Several processes: each passes its share of the examples and gets its share's sets back (the vLLM
    engine draws them all on rank 0 and hands each rank its share)."""
    return ENGINES[cfg.engine].draw(vlm, examples, cfg, round_idx, use_reference_answer, seeds, progress)


def decode_candidates(vlm: VLM, examples: Sequence[Example], cfg: SampleConfig, round_idx: int = 0,
                      use_reference_answer: bool = False, seeds: dict[str, int] | None = None,
                      progress: bool = True) -> list[CandidateSet]:
    """Draw a near-greedy answer and K rationales for every example with the model in this process
    (`VLM.decode`; the `generate` engine).

    Rationales are drawn at each of `cfg.temperatures`, `cfg.samples_per_temperature` times, from the
    `cfg.top_k` / `cfg.top_p` tokens (when set), up to `cfg.max_new_tokens`, stopped at EOS; the answer at
    `cfg.answer_temperature` (0: greedy) up to `cfg.answer_max_new_tokens`.

    Args:
        use_reference_answer: Put the ground-truth answer into the rationale prompt (train); otherwise the
            model's own answer (val/test).
        seeds: Example id -> seed, to reproduce recorded candidates; default derived from
            (cfg.seed, round_idx, example id).

    Returns:
        One CandidateSet per example, in order, with at most K distinct non-empty rationales in drawing order.

    Several processes under ZeRO-3: every rank calls this (with its share, possibly empty).
    """
    with whole(vlm.model):  # ZeRO-3: the weights gathered on every rank for the whole draw (collective)
        return _decode_all(vlm, examples, cfg, round_idx, use_reference_answer, seeds, progress)


def _decode_all(vlm: VLM, examples: Sequence[Example], cfg: SampleConfig, round_idx: int, use_reference_answer: bool,
            seeds: dict[str, int] | None, progress: bool) -> list[CandidateSet]:
    temperatures = [t for t in cfg.temperatures for _ in range(cfg.samples_per_temperature)]
    k = len(temperatures)
    model_was_training = vlm.model.training
    vlm.model.eval()
    results: list[CandidateSet] = []
    bar = tqdm(total=len(examples), desc="sampling", unit="ex", disable=not progress)
    answer_stops = answer_stop_ids(vlm)
    for start in range(0, len(examples), cfg.batch_size):
        batch = list(examples[start:start + cfg.batch_size])
        with torch.no_grad():
            images = vlm.prepare_images([load_image(e) for e in batch])
        batch_seeds = [(seeds or {}).get(e.id, example_seed(cfg.seed, round_idx, e.id)) for e in batch]
        # 1. The model's own answer: greedy (no noise drawn), or a draw at cfg.answer_temperature.
        answer_prompts = [ANSWER_PROMPT.format(question=e.question) for e in batch]
        if cfg.answer_temperature > 0:
            answer_generators = [torch.Generator().manual_seed(answer_seed(s)) for s in batch_seeds]
            answer_ids, _ = vlm.decode(images, answer_prompts, 1, cfg.answer_max_new_tokens, answer_stops,
                                       torch.full((len(batch),), cfg.answer_temperature), answer_generators,
                                       cfg.top_k, cfg.top_p)
        else:
            answer_ids, _ = vlm.decode(images, answer_prompts, 1, cfg.answer_max_new_tokens, answer_stops)
        predicted = [answer_text(vlm, ids) for ids in answer_ids]
        answers = [e.answer if use_reference_answer else p for e, p in zip(batch, predicted)]
        # 2. K rationales per example.
        prompts = [rationale_prompt(e.question, a) for e, a in zip(batch, answers)]
        generators = [torch.Generator().manual_seed(s) for s in batch_seeds]
        sequences, logprobs = vlm.decode(images, prompts, k, cfg.max_new_tokens, [vlm.eos_token_id],
                                         torch.tensor(temperatures * len(batch)), generators,
                                         cfg.top_k, cfg.top_p)
        texts = vlm.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        for i, example in enumerate(batch):
            rows = slice(i * k, (i + 1) * k)
            candidates = distinct_candidates(texts[rows], temperatures, batch_seeds[i], logprobs[rows])
            results.append(CandidateSet(example.id, answers[i], predicted[i], prompts[i], batch_seeds[i],
                                        candidates))
        bar.update(len(batch))
    bar.close()
    vlm.model.train(model_was_training)
    return results


@contextlib.contextmanager
def _no_session(cfg: SampleConfig, vlm: VLM, run_dir: Path) -> Iterator[None]:
    yield


@dataclass(frozen=True)
class Engine:
    """A way to draw candidates: `draw` as `sample` (same arguments, same result), and `session`, a context
    manager around a run (`engine_session`) holding what the engine needs for all its draws."""

    draw: Callable[..., list[CandidateSet]]
    session: Callable[[SampleConfig, VLM, Path], contextlib.AbstractContextManager]


ENGINES = {
    "generate": Engine(decode_candidates, _no_session),
    "vllm": Engine(vllm_engine.draw_candidates, vllm_engine.serving),
}
"""`sample.engine` -> the engine that draws the candidates."""


def engine_session(cfg: SampleConfig, vlm: VLM, run_dir: Path) -> contextlib.AbstractContextManager:
    """What `cfg.engine` keeps for a run's draws, opened once and closed at its end: nothing for `generate`;
    for `vllm` the server (started here unless `sample.vllm.url`), its log and the LoRA folders in
    RUN_DIR/vllm/."""
    return ENGINES[cfg.engine].session(cfg, vlm, run_dir)
