"""Benchmark: our batched sampler vs a naive loop (one `generate` call per candidate, image re-encoded each time).

    python scripts/bench_sampling.py                       # the cached demo base model (pre-trains it if missing)
    python scripts/bench_sampling.py --num-examples 64 --random-model

Both produce a greedy answer and K rationales per example with the same model, prompts and settings; the
naive loop is what a first implementation on `transformers.generate` looks like. Prints candidates per second
for both and the ratio, and writes them to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from illume.config import load_config
from illume.data.datasets import load_split
from illume.data.records import load_image
from illume.prompts import ANSWER_PROMPT, rationale_prompt
from illume.sampling import sample


def naive_sample(vlm, examples, cfg) -> int:
    """One generate() per answer and per candidate, each re-encoding the image; returns candidates drawn."""
    drawn = 0
    for example in examples:
        pixel_values = vlm.pixel_values([load_image(example)])
        ids = torch.tensor([vlm.prompt_ids(ANSWER_PROMPT.format(question=example.question))])
        out = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                 do_sample=False, max_new_tokens=cfg.answer_max_new_tokens,
                                 eos_token_id=vlm.eos_token_id, pad_token_id=vlm.pad_token_id)
        answer = vlm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(",")[0].strip()
        prompt = torch.tensor([vlm.prompt_ids(rationale_prompt(example.question, answer))])
        for temperature in cfg.temperatures:
            for _ in range(cfg.samples_per_temperature):
                vlm.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   pixel_values=pixel_values, do_sample=True, temperature=temperature,
                                   top_k=0, max_new_tokens=cfg.max_new_tokens, eos_token_id=vlm.eos_token_id,
                                   pad_token_id=vlm.pad_token_id)
                drawn += 1
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--num-examples", type=int, default=32)
    parser.add_argument("--random-model", action="store_true", help="a random demo-size model (no pre-training)")
    parser.add_argument("--out", default="runs/bench_sampling.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    if args.random_model:
        from illume.demo.tiny_models import build_demo_vlm

        vlm = build_demo_vlm(cfg.model)
    else:
        from illume.loading import load_vlm

        vlm = load_vlm(cfg)
    examples = load_split(cfg.data, "val")[: args.num_examples]
    k = len(cfg.sample.temperatures) * cfg.sample.samples_per_temperature

    start = time.perf_counter()
    sets = sample(vlm, examples, cfg.sample, progress=False)
    ours_seconds = time.perf_counter() - start
    ours_drawn = len(examples) * k

    start = time.perf_counter()
    with torch.no_grad():
        naive_drawn = naive_sample(vlm, examples, cfg.sample)
    naive_seconds = time.perf_counter() - start

    result = {
        "examples": len(examples), "samples_per_example": k, "threads": torch.get_num_threads(),
        "ours": {"seconds": round(ours_seconds, 2), "candidates": ours_drawn,
                 "distinct": sum(len(s.candidates) for s in sets),
                 "candidates_per_second": round(ours_drawn / ours_seconds, 1)},
        "naive": {"seconds": round(naive_seconds, 2), "candidates": naive_drawn,
                  "candidates_per_second": round(naive_drawn / naive_seconds, 1)},
    }
    result["speedup"] = round(result["ours"]["candidates_per_second"] / result["naive"]["candidates_per_second"], 1)
    print(f"{'method':<8}{'candidates':>12}{'seconds':>10}{'cand/s':>10}")
    for name in ("ours", "naive"):
        r = result[name]
        print(f"{name:<8}{r['candidates']:>12}{r['seconds']:>10.2f}{r['candidates_per_second']:>10.1f}")
    print(f"speed-up: {result['speedup']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
