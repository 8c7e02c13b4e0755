"""Benchmark: our sampler (`illume.sampling.sample`) vs the batched `generate()` a user would write, per backend.

    python scripts/bench_sampling.py                     # MAGMA and HF: the demo base models (shipped)
    python scripts/bench_sampling.py --random-model      # MAGMA: a random demo-size model (no pre-training)
    python scripts/bench_sampling.py --backends hf --naive --num-examples 16

Every method draws, for the same examples (the config's val split) and settings (`sample.*`), a greedy answer
and K = len(temperatures) x samples_per_temperature rationales per example:

- ours: `sample()`: per batch, one greedy answer decode and one decode of all K rows (per-row temperatures),
  each prompt pre-filled once and its KV cache repeated K times, finished rows leaving the batch (MAGMA's
  loop; HF: `illume.models.hf._decode_loop`).
- generate: what a user writes with transformers: per batch, `model.generate(do_sample=False)` for the
  answers, then per temperature `model.generate(do_sample=True, temperature=t, top_k=0,
  num_return_sequences=samples_per_temperature)`, which repeats every prompt and image per sequence.
- naive (`--naive`, slow): one `generate()` per example's answer and per candidate.

Backends, each with its demo config (--config, --hf-config), examples and settings: `magma`, the demo base model
of configs/demo.yaml, and `hf`, the HF demo base model of configs/demo_hf.yaml (a tiny Qwen2-VL pre-trained on
the shapes world in the chat format, shipped as illume/demo/assets/demo-hf), loaded through `model.kind: hf`
as a user's checkpoint is (nothing can be downloaded here); both are trained, so their rationales stop. Each
method runs once on the first batch before it is timed (first-call overheads). Prints one table per backend
(ratio = ours' candidates/s over the method's) and writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from illume.config import RunConfig, SampleConfig, load_config
from illume.data.datasets import load_split
from illume.data.records import Example, load_image
from illume.models.vlm import MagmaVLM
from illume.prompts import ANSWER_PROMPT, rationale_prompt
from illume.sampling import answer_stop_ids, answer_text, sample


def prompt_batch(vlm, images: list, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded `generate` inputs (ids, mask, image inputs) for prompts with one image each."""
    if isinstance(vlm, MagmaVLM):
        ids = [vlm.prompt_ids(p) for p in prompts]
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), vlm.pad_token_id)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, i in enumerate(ids):
            input_ids[row, length - len(i):] = torch.tensor(i)
            mask[row, length - len(i):] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": vlm.pixel_values(images)}
    rows = [vlm.encode_row(image, prompt) for image, prompt in zip(images, prompts)]
    batch = vlm.collate(rows, padding_side="left")
    batch.pop("labels", None)
    return batch


def _generate(vlm, batch: dict, **kwargs) -> list[list[int]]:
    batch = {k: v.to(vlm.device) if torch.is_tensor(v) else v for k, v in batch.items()}  # a GPU model too
    out = vlm.model.generate(**batch, pad_token_id=vlm.pad_token_id, **kwargs)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def batched_generate(vlm, examples: list[Example], cfg: SampleConfig) -> int:
    """Per batch: the greedy answers with one generate(), then one generate() per temperature with
    num_return_sequences=samples_per_temperature; returns the candidates drawn."""
    answer_stops = answer_stop_ids(vlm)
    drawn = 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = examples[start:start + cfg.batch_size]
        images = [load_image(e) for e in batch]
        ids = _generate(vlm, prompt_batch(vlm, images, [ANSWER_PROMPT.format(question=e.question) for e in batch]),
                        do_sample=False, max_new_tokens=cfg.answer_max_new_tokens, eos_token_id=answer_stops)
        answers = [answer_text(vlm, row) for row in ids]
        inputs = prompt_batch(vlm, images, [rationale_prompt(e.question, a) for e, a in zip(batch, answers)])
        for temperature in cfg.temperatures:
            rows = _generate(vlm, inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             num_return_sequences=cfg.samples_per_temperature,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=vlm.eos_token_id)
            drawn += len(rows)
    return drawn


def naive_generate(vlm, examples: list[Example], cfg: SampleConfig) -> int:
    """One generate() per answer and per candidate, each re-encoding the image; returns candidates drawn."""
    answer_stops = answer_stop_ids(vlm)
    drawn = 0
    for example in examples:
        image = [load_image(example)]
        ids = _generate(vlm, prompt_batch(vlm, image, [ANSWER_PROMPT.format(question=example.question)]),
                        do_sample=False, max_new_tokens=cfg.answer_max_new_tokens, eos_token_id=answer_stops)
        inputs = prompt_batch(vlm, image, [rationale_prompt(example.question, answer_text(vlm, ids[0]))])
        for temperature in cfg.temperatures:
            for _ in range(cfg.samples_per_temperature):
                _generate(vlm, inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=cfg.max_new_tokens, eos_token_id=vlm.eos_token_id)
                drawn += 1
    return drawn


def ours(vlm, examples: list[Example], cfg: SampleConfig) -> int:
    sample(vlm, examples, cfg, progress=False)
    return len(examples) * len(cfg.temperatures) * cfg.samples_per_temperature


def bench(vlm, examples: list[Example], cfg: SampleConfig, methods: dict[str, Callable]) -> dict:
    """Each method once on the first batch (warm-up), then timed on all examples."""
    results = {}
    with torch.no_grad():
        for name, method in methods.items():
            method(vlm, examples[:cfg.batch_size], cfg)
            start = time.perf_counter()
            drawn = method(vlm, examples, cfg)
            seconds = time.perf_counter() - start
            results[name] = {"candidates": drawn, "seconds": round(seconds, 2),
                             "candidates_per_second": round(drawn / seconds, 1)}
    for r in results.values():
        r["ours_ratio"] = round(results["ours"]["candidates_per_second"] / r["candidates_per_second"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="the magma backend's config")
    parser.add_argument("--hf-config", default="configs/demo_hf.yaml", help="the hf backend's config")
    parser.add_argument("--num-examples", type=int, default=64)
    parser.add_argument("--backends", nargs="+", default=["magma", "hf"], choices=["magma", "hf"])
    parser.add_argument("--random-model", action="store_true", help="MAGMA: a random demo-size model")
    parser.add_argument("--naive", action="store_true", help="also time one generate() per candidate (slow)")
    parser.add_argument("--out", default="runs/bench_sampling.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of both configs")
    args = parser.parse_args()

    methods = {"ours": ours, "generate": batched_generate}
    if args.naive:
        methods["naive"] = naive_generate
    report = {"threads": torch.get_num_threads(), "backends": {}}
    print(f"torch threads {torch.get_num_threads()}")
    for backend in args.backends:
        cfg = load_config(args.config if backend == "magma" else args.hf_config, args.overrides)
        examples = load_split(cfg.data, "val")[: args.num_examples]
        k = len(cfg.sample.temperatures) * cfg.sample.samples_per_temperature
        vlm = load_backend_magma(cfg, args.random_model) if backend == "magma" else load_backend_hf(cfg)
        results = bench(vlm, examples, cfg.sample, methods)
        report["backends"][backend] = {"examples": len(examples), "samples_per_example": k,
                                       "batch_size": cfg.sample.batch_size,
                                       "max_new_tokens": cfg.sample.max_new_tokens, "methods": results}
        print(f"\n{backend}: {len(examples)} examples x K = {k}, batch {cfg.sample.batch_size}\n"
              f"{'method':<10}{'candidates':>12}{'seconds':>10}{'cand/s':>10}{'ours / it':>11}")
        for name, r in results.items():
            print(f"{name:<10}{r['candidates']:>12}{r['seconds']:>10.2f}{r['candidates_per_second']:>10.1f}"
                  f"{r['ours_ratio']:>10.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


def load_backend_magma(cfg: RunConfig, random_model: bool):
    """The demo config's MAGMA: random (`--random-model`) or the cached demo base model."""
    if random_model:
        from illume.demo.tiny_models import build_demo_vlm

        return build_demo_vlm(cfg.model)
    from illume.loading import load_vlm

    return load_vlm(cfg)


def load_backend_hf(cfg: RunConfig):
    """The HF demo config's model (`model.kind: hf`, `model.path: illume:demo`: the shipped HF demo base model)."""
    from illume.loading import load_vlm

    return load_vlm(cfg)


if __name__ == "__main__":
    main()
