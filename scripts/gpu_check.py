"""One-shot GPU check: full-size models with random weights (nothing downloaded), the figures the docs estimate.

    python scripts/gpu_check.py                  # on one GPU (about 8 minutes on an H100, by design)
    python scripts/gpu_check.py --dry-run        # the same code at tiny sizes on the CPU (a test runs it)

Sections, each timed and written to `gpu_check.json` (a section that fails records its error and the others
still run):

- `magma`: MAGMA at the size of configs/vqax_magma.yaml (GPT-J-6B inside, CLIP RN50x16 at 384 px), random
  weights in bf16 on the GPU: sampling throughput, our sampler (`illume.sampling.sample`) against the batched
  `generate()` a user would write (scripts/bench_sampling.py's methods), and the peak memory of a
  selection-SFT epoch (`illume.training.selection_trainer`, bf16) against `illume plan`'s estimate.
- `hf`: a 7 B-class Qwen2.5-VL language model (Qwen2.5-VL-7B's text sizes) with the tiny vision tower of
  `illume.demo.tiny_families`, through `model.kind: hf` code (LoRA), the same two figures (no plan for hf).
- `zero`: one selection-SFT epoch of the MAGMA model under DeepSpeed ZeRO-2 and ZeRO-3
  (configs/deepspeed/zero{2,3}.json) on one process, with each one's peak memory.
- `vllm`: with `--vllm-python` (the Python of an environment with vLLM, scripts/vllm_env.sh), the `hf`
  section's model saved, served by vLLM and sampled through `sample.engine: vllm` (warm-up batch, then timed),
  next to our sampler's figure; without it the section records that it did not run.

The models are random, so their rationales never stop early: every candidate runs to `sample.max_new_tokens`,
the slowest case. `--dry-run` uses configs/demo.yaml's tiny MAGMA and a tiny Qwen2.5-VL on the CPU, float32,
with the memory figures left out (no CUDA allocator to read).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # bench_sampling's methods

SECTIONS = ("magma", "hf", "zero", "vllm")
QWEN25_VL_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]}}
"""Qwen2.5-VL-7B-Instruct's language model sizes (its config.json), with a vocabulary of the demo's words."""


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly on `device` in `dtype` (a 6 B model initialised on the GPU in seconds)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on the GPU (inputs arrive in fp32, the frozen weights are bf16); nothing on the CPU."""
    return torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()


def peak_memory(device: torch.device, run: Callable[[], object]) -> int | None:
    """The CUDA allocator's peak while `run` runs (None on the CPU)."""
    if device.type != "cuda":
        run()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def examples_for(vlm, count: int):
    """`count` val questions of the shapes world (images drawn here, no files)."""
    from illume.data.shapes import ShapesWorld

    return ShapesWorld(num_val_scenes=count).examples("val")[:count]


def sampling_figures(vlm, examples, sample_cfg, device, dtype) -> dict:
    from bench_sampling import batched_generate, bench, ours

    with autocast(device, dtype):
        return bench(vlm, examples, sample_cfg, {"ours": ours, "generate": batched_generate})


def training_epoch(vlm, examples, train_cfg, out_dir: Path) -> Callable[[], object]:
    """One selection-SFT epoch on the examples' reference explanations (every row a rationale row)."""
    from illume.training import build_training_set, selection_trainer, trained

    rows = build_training_set([(e.id, e.explanations[0]) for e in examples if e.explanations], examples)

    def run():
        trainer = selection_trainer(vlm, rows, examples, train_cfg, out_dir)
        trainer.train()
        trained(trainer)  # as the loop: the engine's hooks go, so the next check trains the same model afresh
        return trainer

    return run


def check_magma(args, device, dtype, out_dir: Path, shared: dict) -> dict:
    from illume.config import load_config
    from illume.demo.tiny_models import build_demo_vlm
    from illume.plan import plan

    config = REPO / "configs" / ("demo.yaml" if args.dry_run else "vqax_magma.yaml")
    cfg = load_config(config, [f"train.bf16={device.type == 'cuda'}", "train.num_epochs=1",
                               f"sample.max_new_tokens={8 if args.dry_run else 32}"])
    start = time.perf_counter()
    with building_on(device, dtype):
        vlm = build_demo_vlm(cfg.model)
    built = time.perf_counter() - start
    shared["magma"] = (vlm, cfg)
    examples = examples_for(vlm, args.num_examples)
    sampling = sampling_figures(vlm, examples, cfg.sample, device, dtype)
    peak = peak_memory(device, training_epoch(vlm, examples, cfg.train, out_dir / "magma"))
    estimate = plan(cfg)["training"]["total_bytes"]
    return {"config": str(config.relative_to(REPO)), "build_seconds": round(built, 1),
            "parameters": sum(p.numel() for p in vlm.model.parameters()), "sampling": sampling,
            "training_peak_bytes": peak, "plan_training_bytes": estimate,
            "peak_over_plan": None if peak is None else round(peak / estimate, 3)}


def check_hf(args, device, dtype, out_dir: Path, shared: dict) -> dict:
    from illume.config import SampleConfig, TrainConfig
    from illume.demo.tiny_models import build_tiny_hf_vlm

    start = time.perf_counter()
    with building_on(device, dtype):
        vlm = build_tiny_hf_vlm("qwen2_5_vl", text_size={} if args.dry_run else QWEN25_VL_7B_TEXT)
    built = time.perf_counter() - start
    examples = examples_for(vlm, args.num_examples)
    sample_cfg = SampleConfig(batch_size=4 if args.dry_run else 16, max_new_tokens=8 if args.dry_run else 32)
    sampling = sampling_figures(vlm, examples, sample_cfg, device, dtype)
    shared["hf"] = (vlm, sample_cfg, sampling)
    train_cfg = TrainConfig(num_epochs=1, batch_size=4, bf16=device.type == "cuda")
    peak = peak_memory(device, training_epoch(vlm, examples, train_cfg, out_dir / "hf"))
    return {"family": "qwen2_5_vl", "text_sizes": "tiny" if args.dry_run else "Qwen2.5-VL-7B",
            "build_seconds": round(built, 1), "parameters": sum(p.numel() for p in vlm.model.parameters()),
            "sampling": sampling, "training_peak_bytes": peak,
            "plan_training_bytes": None}  # illume plan estimates MAGMA only


def check_zero(args, device, dtype, out_dir: Path, shared: dict) -> dict:
    if "magma" not in shared:
        raise RuntimeError("needs the magma section's model (run with it)")
    vlm, cfg = shared["magma"]
    examples = examples_for(vlm, args.num_examples)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                        ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    result = {}
    for stage in (2, 3):
        train_cfg = replace(cfg.train, deepspeed=str(REPO / "configs" / "deepspeed" / f"zero{stage}.json"))
        peak = peak_memory(device, training_epoch(vlm, examples, train_cfg, out_dir / f"zero{stage}"))
        result[f"zero{stage}"] = {"ran": True, "training_peak_bytes": peak}
    return result


def check_vllm(args, device, dtype, out_dir: Path, shared: dict) -> dict:
    python = args.vllm_python or os.environ.get("ILLUME_VLLM_PYTHON")
    if not python:
        return {"ran": False, "installed_here": importlib.util.find_spec("vllm") is not None,
                "why": "no vLLM environment given (--vllm-python; scripts/vllm_env.sh makes one)"}
    if "hf" not in shared:
        raise RuntimeError("needs the hf section's model (run with it)")
    from illume.config import VLLMConfig
    from illume.models.hf import HFVLM
    from illume.sampling import engine_session, sample

    vlm, sample_cfg, ours = shared.pop("hf")
    folder = out_dir / "hf_model"
    vlm.save(folder)  # the server serves a folder; our copy stays on the CPU, the GPU is vLLM's
    del vlm
    shared.pop("magma", None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    served = HFVLM.load(folder, device="cpu", dtype=dtype)
    cfg = replace(sample_cfg, engine="vllm",
                  vllm=VLLMConfig(python=python, server_args=["--gpu-memory-utilization", "0.85"]))
    examples = examples_for(served, args.num_examples)
    with engine_session(cfg, served, out_dir / "vllm_run"):
        sample(served, examples[:cfg.batch_size], cfg, progress=False)  # warm-up: the server's first batch
        start = time.perf_counter()
        sets = sample(served, examples, cfg, progress=False)
        seconds = time.perf_counter() - start
    drawn = sum(len(s.candidates) for s in sets)
    return {"ran": True, "candidates": drawn, "seconds": round(seconds, 2),
            "candidates_per_second": round(drawn / seconds, 1),
            "ours_candidates_per_second": ours["ours"]["candidates_per_second"],
            "server_log": str(out_dir / "vllm_run" / "vllm" / "server.log")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKS = {"magma": check_magma, "hf": check_hf, "zero": check_zero, "vllm": check_vllm}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (what the test runs)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--num-examples", type=int, default=None,
                        help="val questions sampled and trained on (default 64; 4 with --dry-run)")
    parser.add_argument("--out", default="gpu_check.json", help="where the figures go")
    parser.add_argument("--vllm-python", default=None,
                        help="the Python of an environment with vLLM (scripts/vllm_env.sh); default "
                             "$ILLUME_VLLM_PYTHON; without it the vllm section does not run")
    args = parser.parse_args(argv)
    args.num_examples = args.num_examples or (4 if args.dry_run else 64)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        parser.error("no GPU here: use --dry-run for the tiny CPU version")
    out = Path(args.out)
    work = out.parent / f"{out.stem}-work"
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dry_run": args.dry_run, "sections": {}}
    shared: dict = {}
    for name in args.only:
        start = time.perf_counter()
        try:
            figures = CHECKS[name](args, device, dtype, work, shared)
        except Exception as error:  # one failing section must not hide the others' figures
            figures = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}
        figures["seconds"] = round(time.perf_counter() - start, 1)
        report["sections"][name] = figures
        print(f"{name}: {json.dumps({k: v for k, v in figures.items() if k != 'traceback'})}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
