"""`illume plan`: what a config's model weighs and roughly how much GPU memory sampling and training take.

The model is built on the meta device (shapes, no weights), so planning GPT-J-6B costs a second on a laptop.
The config comes from `model.path`/config.json when that exists, else from the `model.*` sizes.

Memory formula, per GPU, in bytes. p = 2 with `train.bf16`/`train.fp16`, else 4; b = micro-batch rows;
T = image tokens + `prompt_tokens` + the longer of `sample.max_new_tokens`/`answer_max_new_tokens`;
h, a, L, V = width, heads, layers, vocabulary; f = an adapter's downsample factor; N = GPUs.

- Weights: every frozen parameter at p bytes (a converted official checkpoint is fp16; mixed precision
  assumes the frozen weights are held in 16 bits). ZeRO-3 divides them by N.
- Trainable parameters: 16 bytes each, split as DeepSpeed does in mixed precision (2 weight + 2 gradient +
  12 optimizer: fp32 master, Adam m and v) or as AMP/fp32 do (4 + 4 + 8). ZeRO >= 1 divides the optimizer
  states by N, ZeRO >= 2 the gradients too, ZeRO-3 the weights; `offload_optimizer` moves the states to CPU.
- Activations saved for backward, per layer and token (counted for stock GPT-J's eager attention and our
  adapters with autograd's saved-tensor hooks; tests/test_plan.py checks the count against a tiny model):
  18·h·p (LayerNorm, q/k/v, rotary, gelu_new's intermediates) + 2·h·4 (q and k, upcast to fp32 for the
  scores) + a·T·(4 + p) (fp32 attention probabilities and their p-byte copy; one tensor when p = 4)
  + (h + h/f)·p per adapter. Frozen linear layers keep no input (it only serves their weight gradient), and
  the first block keeps only its adapters' inputs unless the prefix trains (nothing before it needs a
  gradient). Plus ln_f's input, h·p. All times b·T. With gradient checkpointing only every block's input
  (h·p per token and layer) is kept, plus one block's activations while it is recomputed.
- Logits: b·T·V·(p + 4 + 4 + 4): the p-byte logits, their fp32 copy for the loss (none when p = 4), its
  log-softmax (saved for backward) and the fp32 gradient.
- Sampling: weights + the KV cache of B·K rows (B = `sample.batch_size`, K candidates per example) of T
  tokens, 2·L·B·K·T·h·p, + the prefill's largest per-layer intermediates (MLP 2·4h·p per token, fp32
  attention probabilities B·a·T²·(4 + p)) + two fp32 rows of V logits per candidate.
- A fixed 1 GiB for the CUDA context, kernels' workspaces and allocator slack.

Not counted: the frozen image encoder (it runs without autograd; its transient maps are small beside the
rest), flash-attention (which would shrink the a·T terms), fragmentation beyond the fixed slack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from illume.config import ConfigError, RunConfig, load_config
from illume.models.adapters import is_adapter_parameter
from illume.models.magma import MagmaConfig, MagmaForCausalLM, build_magma_config, register_magma

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB


def model_config(cfg: RunConfig) -> tuple[MagmaConfig, str]:
    """The MagmaConfig a run would use, and where it came from."""
    path = Path(cfg.model.path) / "config.json" if cfg.model.path else None
    if path is not None and path.is_file():
        register_magma()
        return MagmaConfig.from_pretrained(path.parent), str(path)
    vocab_size = cfg.model.lm.vocab_size
    if vocab_size is None:  # the demo model: its word tokenizer decides
        from illume.data.shapes import vocabulary
        from illume.models.word_tokenizer import build_word_tokenizer

        vocab_size = len(build_word_tokenizer(vocabulary()))
    # Token ids do not change any size; the last id stands in for <|image|>.
    config = build_magma_config(cfg.model, vocab_size=vocab_size, image_token_id=vocab_size - 1,
                                eos_token_id=0, pad_token_id=0)
    return config, "model.* settings" + ("" if path is None else f" ({path} does not exist yet)")


def count_parameters(config: MagmaConfig, train_prefix: bool = False) -> dict[str, int]:
    """Parameter counts by part, from the model built on the meta device."""
    with torch.device("meta"):
        model = MagmaForCausalLM(config)
    counts = {"total": 0, "lm": 0, "vision_encoder": 0, "prefix_projection": 0, "adapters": 0, "trainable": 0}
    for name, parameter in model.named_parameters():
        n = parameter.numel()
        counts["total"] += n
        if is_adapter_parameter(name):
            part = "adapters"
        elif name.startswith("image_prefix.enc."):
            part = "vision_encoder"
        elif name.startswith("image_prefix."):
            part = "prefix_projection"
        else:
            part = "lm"
        counts[part] += n
        if part == "adapters" or (train_prefix and part == "prefix_projection"):
            counts["trainable"] += n
    return counts


def _adapter_factors(config: MagmaConfig) -> list[int]:
    return [f for f in (config.adapter_attention_downsample, config.adapter_mlp_downsample) if f]


def activation_bytes_per_token_and_layer(config: MagmaConfig, seq_len: int, p: int) -> int:
    """Bytes one decoder block saves for backward per token (see the module docstring)."""
    text = config.text_config
    h, a = text.n_embd, text.n_head
    attention_probs = a * seq_len * (4 + (p if p < 4 else 0))
    adapters = sum((h + h // f) * p for f in _adapter_factors(config))
    return 18 * h * p + 2 * h * 4 + attention_probs + adapters


def training_activation_bytes(config: MagmaConfig, batch_size: int, seq_len: int, p: int,
                              gradient_checkpointing: bool, prefix_trains: bool = False) -> int:
    """Activations the decoder saves for backward (the logits aside) for one micro-batch."""
    text = config.text_config
    tokens = batch_size * seq_len
    block = activation_bytes_per_token_and_layer(config, seq_len, p) * tokens
    adapters_only = sum((text.n_embd + text.n_embd // f) * p for f in _adapter_factors(config)) * tokens
    final_norm = text.n_embd * p * tokens  # ln_f's input; the frozen LM head keeps nothing
    if gradient_checkpointing:
        return text.n_layer * text.n_embd * p * tokens + block + final_norm
    first_block = block if prefix_trains else adapters_only
    return (text.n_layer - 1) * block + first_block + final_norm


def _zero_settings(deepspeed_path: str | None) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded to CPU/NVMe) from a DeepSpeed JSON file; (0, False) without one."""
    if deepspeed_path is None:
        return 0, False
    path = Path(deepspeed_path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: no DeepSpeed config at {path}")
    zero = json.loads(path.read_text()).get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    return int(zero.get("stage", 0)), offload


def plan(cfg: RunConfig, num_gpus: int = 1, prompt_tokens: int = 32) -> dict:
    """Parameter counts and GPU memory estimates (bytes per GPU) for sampling and training.

    Args:
        num_gpus: Data-parallel GPUs; only ZeRO's sharding and the global batch depend on it.
        prompt_tokens: Text tokens of a prompt (`Q: ... A: ..., seeing that`), besides the image tokens.
    """
    if cfg.model.kind != "magma":
        # The estimate below is MAGMA's (GPT-J blocks, CLIP prefix, bottleneck adapters); an HF VLM's would need
        # its own architecture walk. Refuse rather than print the numbers of another model.
        raise ValueError(f"illume plan covers model.kind=magma; model.kind={cfg.model.kind} is not estimated yet")
    config, source = model_config(cfg)
    text, train, sample = config.text_config, cfg.train, cfg.sample
    params = count_parameters(config, train.train_prefix)
    p = 2 if (train.bf16 or train.fp16) else 4
    precision = "bf16" if train.bf16 else "fp16" if train.fp16 else "fp32"
    h, a, L, V = text.n_embd, text.n_head, text.n_layer, text.vocab_size
    new_tokens = max(sample.max_new_tokens, sample.answer_max_new_tokens)
    seq_len = config.num_image_tokens + prompt_tokens + new_tokens
    frozen, trainable = params["total"] - params["trainable"], params["trainable"]

    k = len(sample.temperatures) * sample.samples_per_temperature
    rows = sample.batch_size * k
    sampling = {
        "weights": params["total"] * p,
        "kv_cache": 2 * L * rows * seq_len * h * p,
        "prefill_and_decoding_buffers": (sample.batch_size * seq_len * 8 * h * p
                                         + sample.batch_size * a * seq_len**2 * (4 + (p if p < 4 else 0))
                                         + 2 * rows * V * 4),
        "overhead": OVERHEAD_BYTES,
    }

    stage, offload = _zero_settings(train.deepspeed)
    n = max(1, num_gpus)
    weight_b, grad_b, optim_b = (2, 2, 12) if (p == 2 and train.deepspeed) else (4, 4, 8)
    b = train.batch_size
    training = {
        "frozen_weights": frozen * p // (n if stage == 3 else 1),
        "trainable_weights": trainable * weight_b // (n if stage == 3 else 1),
        "gradients": trainable * grad_b // (n if stage >= 2 else 1),
        "optimizer_states": 0 if offload else trainable * optim_b // (n if stage >= 1 else 1),
        "activations": training_activation_bytes(config, b, seq_len, p, train.gradient_checkpointing,
                                                 prefix_trains=train.train_prefix),
        "logits": b * seq_len * V * (p + (4 if p < 4 else 0) + 8),
        "overhead": OVERHEAD_BYTES,
    }
    return {
        "model": {"source": source, "layers": L, "hidden_size": h, "heads": a, "vocab_size": V,
                  "image_tokens": config.num_image_tokens,
                  "adapter_downsample": {"attention": config.adapter_attention_downsample,
                                         "mlp": config.adapter_mlp_downsample}},
        "parameters": params,
        "sampling": {"examples_per_batch": sample.batch_size, "candidates_per_example": k, "rows": rows,
                     "sequence_length": seq_len, "precision": precision, "bytes": sampling,
                     "total_bytes": sum(sampling.values())},
        "training": {"micro_batch_size": b, "gradient_accumulation_steps": train.gradient_accumulation_steps,
                     "num_gpus": n, "global_batch_size": b * train.gradient_accumulation_steps * n,
                     "sequence_length": seq_len, "precision": precision,
                     "gradient_checkpointing": train.gradient_checkpointing, "zero_stage": stage,
                     "optimizer_offload": offload, "bytes": training, "total_bytes": sum(training.values())},
    }


def print_plan(result: dict, console=None) -> None:
    """Rich tables: the parameters, then the memory of sampling and of training (GiB per GPU)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    model, s, t = result["model"], result["sampling"], result["training"]
    console.print(f"model from {model['source']}: {model['layers']} layers x {model['hidden_size']} wide, "
                  f"{model['heads']} heads, vocabulary {model['vocab_size']}, {model['image_tokens']} image "
                  f"tokens, adapters /{model['adapter_downsample']['attention']} after attention and "
                  f"/{model['adapter_downsample']['mlp']} after the MLP (0: none)")
    table = Table(title="Parameters")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, count in result["parameters"].items():
        table.add_row(part.replace("_", " "), f"{count:,}")
    console.print(table)
    checkpointing = "on" if t["gradient_checkpointing"] else "off"
    offload = " + optimizer offload" if t["optimizer_offload"] else ""
    titles = {
        "sampling": f"Sampling, per GPU: {s['examples_per_batch']} examples x {s['candidates_per_example']} "
                    f"candidates, {s['sequence_length']} tokens, {s['precision']}",
        "training": f"Training, per GPU: micro-batch {t['micro_batch_size']} x {t['sequence_length']} "
                    f"tokens, {t['precision']}, gradient checkpointing {checkpointing}, "
                    f"ZeRO-{t['zero_stage']}{offload} on {t['num_gpus']} GPU(s), "
                    f"global batch {t['global_batch_size']}",
    }
    for what, title in titles.items():
        console.print(title)  # a line of its own: a table title would wrap to the narrow table's width
        table = Table()
        table.add_column("memory")
        table.add_column("GiB", justify="right")
        for name, value in result[what]["bytes"].items():
            table.add_row(name.replace("_", " "), f"{value / GIB:.2f}")
        table.add_row("total (estimate)", f"{result[what]['total_bytes'] / GIB:.2f}", style="bold")
        console.print(table)


def cmd_plan(args: argparse.Namespace) -> int:
    """`illume plan CONFIG [key=value ...] [--gpus N] [--prompt-tokens N] [--json]`."""
    cfg = load_config(args.config, args.overrides)
    try:
        result = plan(cfg, num_gpus=args.gpus, prompt_tokens=args.prompt_tokens)
    except ValueError as error:
        print(f"plan error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_plan(result)
    return 0


def add_plan_parser(commands) -> None:
    """Register `plan` on an argparse subparsers object."""
    sub = commands.add_parser("plan", help="parameter counts and GPU memory estimates (sampling, training)")
    sub.add_argument("config", help="YAML config file, e.g. configs/vqax_magma.yaml")
    sub.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sub.add_argument("--gpus", type=int, default=1,
                     help="data-parallel GPUs (ZeRO shards across them; default 1)")
    sub.add_argument("--prompt-tokens", type=int, default=32,
                     help="text tokens of a prompt besides the image tokens (default 32)")
    sub.add_argument("--json", action="store_true", help="print the numbers as JSON")
    sub.set_defaults(handler=cmd_plan)
