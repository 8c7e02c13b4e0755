"""`illume plan`: what a config's model weighs and roughly how much GPU memory sampling and training take.

The model is built on the meta device (shapes, no weights), so planning GPT-J-6B costs a second on a laptop.
The config comes from `model.path`/config.json when that exists, else from the `model.*` sizes. The attention
implementation is read from that built model (`config._attn_implementation` of its LM, which GPT-J's attention
dispatches on at every call): transformers resolves it when the model is built, `sdpa` unless one was asked
for (`attn_implementation=` on the config or `from_pretrained`, or `model.set_attn_implementation(...)`), and
our runs ask for none, so a run gets `sdpa`. The plan prints the implementation it assumed.

Memory formula, per GPU, in bytes. p = 2 with `train.bf16`/`train.fp16`, else 4; b = micro-batch rows;
T = image tokens + `prompt_tokens` + the longer of `sample.max_new_tokens`/`answer_max_new_tokens`;
h, a, L, V = width, heads, layers, vocabulary; r = rotary dims; f = an adapter's downsample factor; N = GPUs.

- Weights: every frozen parameter at p bytes (a converted official checkpoint is fp16; mixed precision
  assumes the frozen weights are held in 16 bits). ZeRO-3 divides them by N.
- Trainable parameters: 16 bytes each, split as DeepSpeed does in mixed precision (2 weight + 2 gradient +
  12 optimizer: fp32 master, Adam m and v) or as AMP/fp32 do (4 + 4 + 8). ZeRO >= 1 divides the optimizer
  states by N, ZeRO >= 2 the gradients too, ZeRO-3 the weights; `offload_optimizer` moves the states to CPU.
- Activations saved for backward, counted tensor by tensor with autograd's saved-tensor hooks on GPT-J as
  transformers 5.24 runs it (tests/test_plan.py checks the count, within 1 %, against a tiny model on CPU for
  each attention implementation and precision, and that the model really ran that implementation). Three
  precisions (`PRECISIONS`): fp32; `autocast`, the HF Trainer's bf16/fp16 (a 16-bit frozen model, fp32
  adapters, CUDA autocast); `half`, DeepSpeed's bf16/fp16 (the engine casts the whole model to 16 bits, no
  autocast). Under CUDA autocast layer_norm, pow and softmax run in fp32 (torch's autocast fp32 list); u is
  the bytes of their outputs: 4 under CUDA autocast, else p. Per layer and token:
  - ln_1: its input at u bytes (autocast's fp32 copy) + mean and rstd, 8.
  - attention, `sdpa`: q, k, v and the output, 4·h·p, + the logsumexp, a·4, + the padding mask SDPA turns
    into an additive one of q's dtype, (b, 1, T, T) per layer: T·p (a padded batch; an unpadded one passes no
    mask and runs causal). No a·T² tensor.
  - attention, `eager`: q and k as the q·kᵀ matmul keeps them, 2·h·s (eager upcasts them to fp32, s = 4, and
    autocast casts the matmul's operands back down, s = p), v, h·p, and the a·T probabilities: softmax's
    result (fp32 when s = 4 or under CUDA autocast, else p) plus their p-byte copy for the value matmul when
    the softmax ran in fp32 (one tensor when p = 4): a·T·(4 + p), a·T·4 in fp32, a·T·p under CPU autocast.
  - MLP, gelu_new (GPT-J): pow's input, tanh's output, 1 + tanh at u bytes and 0.5·x at p: 4h·(3u + p);
    exact gelu: its input, 4h·p. fc_in/fc_out, like every frozen linear layer, keep no input (it only
    serves their weight gradient).
  - each adapter: its down-projection's input and the ReLU's output, (h + h/f)·p.
  - rotary: the sin and cos GPT-J repeats for q and for k in every layer, 4·r·p per position (b-independent).
  The first block keeps only its adapters' inputs unless the prefix trains (nothing before it needs a
  gradient). Plus ln_f's input, h·u + 8. All times b·T. With gradient checkpointing only every block's input
  (h·p per token and layer) is kept, plus one block's activations while it is recomputed.
  Where a CPU measurement stands for the GPU: the same ops save the same tensors on both, except for the
  dtypes autocast picks (CUDA upcasts layer_norm, pow and softmax, CPU does not: that is u; the test measures
  CPU's rule, `autocast-cpu`, and CUDA's applied on CPU, `autocast`) and for the SDPA kernel. The CPU's fused
  kernel keeps q, k, v, the output, the logsumexp (b·a·T fp32) and the mask, as CUDA's memory-efficient
  kernel does (fp32, or a padding mask; it pads the logsumexp to a multiple of 32 positions and the mask to
  16) and CUDA's flash kernel does without the mask (bf16/fp16, no mask, head dim <= 256). SDPA's math
  fallback (CPU with attention dropout, CUDA when no fused kernel fits or they are switched off) materialises
  the a·T² probabilities like eager and exceeds the `sdpa` count; the test fails on such a fallback on CPU,
  but which kernel a GPU run picks is not checked (no GPU measured this).
- Autocast's 16-bit copies of the trainable fp32 weights, cached for the whole forward (and saved by the
  adapters' matmuls): 2 bytes per trainable parameter; none in fp32 or `half`.
- Logits: b·T·V·(p + 4 + 4 + 4): the p-byte logits, their fp32 copy for the loss (none when p = 4), its
  log-softmax (saved for backward) and the fp32 gradient.
- Sampling: weights + the KV cache of B·K rows (B = `sample.batch_size`, K candidates per example) of T
  tokens, 2·L·B·K·T·h·p, + the prefill's largest per-layer intermediates (MLP 2·4h·p per token; attention:
  eager's fp32 probabilities B·a·T²·(4 + p), SDPA's boolean padding mask and its additive copy B·T²·(1 + p))
  + two fp32 rows of V logits per candidate.
- A fixed 1 GiB for the CUDA context, kernels' workspaces and allocator slack.

Not counted: the frozen image encoder (it runs without autograd; its transient maps are small beside the
rest); the bf16 copy of every frozen weight a linear layer saves (to pass gradients to its input) when bf16
autocast runs over fp16 weights (a converted checkpoint is fp16: convert with `--dtype bfloat16` for bf16
training), 24·h² bytes per block; flash-attention-2/flex attention (no formula: the plan refuses them);
fragmentation beyond the fixed slack.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from illume.config import ConfigError, RunConfig, load_config
from illume.models.adapters import is_adapter_parameter
from illume.models.magma import MagmaConfig, MagmaForCausalLM, build_magma_config, register_magma

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the tensors a decoder block saves, by where they come from (module docstring)."""

    p: int
    """The activations: residual stream, linear layers' outputs, SDPA's q/k/v/output, the adapters' inputs."""
    u: int
    """Outputs of layer_norm, pow and softmax, which CUDA autocast runs in fp32."""
    eager_qk: int
    """q and k as eager attention's q·kᵀ keeps them: it upcasts them to fp32, autocast casts them back."""
    weight_copy: int
    """Autocast's cached 16-bit copy of each trainable (fp32) parameter; 0 without autocast."""


PRECISIONS = {
    "fp32": Precision(p=4, u=4, eager_qk=4, weight_copy=0),
    "autocast": Precision(p=2, u=4, eager_qk=2, weight_copy=2),  # HF Trainer bf16/fp16: CUDA autocast
    "half": Precision(p=2, u=2, eager_qk=4, weight_copy=0),  # DeepSpeed bf16/fp16: 16-bit model, no autocast
    "autocast-cpu": Precision(p=2, u=2, eager_qk=2, weight_copy=2),  # CPU autocast, what the test can measure
}


def _sdpa_saves(h: int, a: int, seq_len: int, prec: Precision) -> int:
    # q, k, v, the output; the logsumexp (fp32); the padding mask made additive, (b, 1, T, T) in q's dtype.
    return 4 * h * prec.p + 4 * a + seq_len * prec.p


def _eager_saves(h: int, a: int, seq_len: int, prec: Precision) -> int:
    softmax = 4 if prec.eager_qk == 4 else prec.u  # in the scores' dtype, or in fp32 under CUDA autocast
    copy = prec.p if softmax != prec.p else 0  # `.to(value.dtype)` for the value matmul
    return 2 * h * prec.eager_qk + h * prec.p + a * seq_len * (softmax + copy)


@dataclass(frozen=True)
class AttentionCosts:
    """What one attention implementation costs (module docstring); keyed by `config._attn_implementation`."""

    saved: Callable[[int, int, int, Precision], int]
    """(h, a, T, precision) -> bytes a layer saves for backward per token."""
    prefill: Callable[[int, int, int, int], int]
    """(rows, a, T, p) -> the largest transient of one layer's prefill when sampling."""


# The one place an attention implementation is chosen.
ATTENTION: dict[str, AttentionCosts] = {
    "sdpa": AttentionCosts(_sdpa_saves, lambda rows, a, t, p: rows * t**2 * (1 + p)),  # bool mask + additive
    "eager": AttentionCosts(_eager_saves, lambda rows, a, t, p: rows * a * t**2 * (4 + (p if p < 4 else 0))),
}

# Per layer and token, by GPT-J's `activation_function`, for an inner width n.
MLP_SAVES: dict[str, Callable[[int, Precision], int]] = {
    "gelu_new": lambda n, prec: n * (3 * prec.u + prec.p),  # pow's input, tanh, 1 + tanh (u); 0.5·x (p)
    "gelu": lambda n, prec: n * prec.p,  # its input
}


def training_precision(cfg: RunConfig) -> str:
    """The `PRECISIONS` key a run's training uses: bf16/fp16 or not, and whether DeepSpeed casts the model."""
    if not (cfg.train.bf16 or cfg.train.fp16):
        return "fp32"
    return "half" if cfg.train.deepspeed else "autocast"


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


def meta_model(config: MagmaConfig) -> MagmaForCausalLM:
    """The model built on the meta device: shapes and the resolved attention implementation, no weights."""
    with torch.device("meta"):
        return MagmaForCausalLM(config)


def attention_implementation(model: MagmaForCausalLM) -> str:
    """The attention implementation the LM's blocks dispatch to (transformers resolved it when building)."""
    return model.lm.config._attn_implementation


def count_parameters(model: MagmaForCausalLM, train_prefix: bool = False) -> dict[str, int]:
    """Parameter counts by part."""
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


def attention_costs(attn_implementation: str) -> AttentionCosts:
    """`ATTENTION[attn_implementation]`, or a ValueError naming the implementations there is a formula for."""
    if attn_implementation not in ATTENTION:
        raise ValueError(f"no activation formula for attn_implementation={attn_implementation!r}; "
                         f"illume plan knows {', '.join(sorted(ATTENTION))}")
    return ATTENTION[attn_implementation]


def activation_bytes_per_token_and_layer(config: MagmaConfig, seq_len: int, precision: str,
                                         attn_implementation: str) -> int:
    """Bytes one decoder block saves for backward per token (see the module docstring).

    Args:
        precision: A `PRECISIONS` key.
        attn_implementation: The LM's `config._attn_implementation`, a key of `ATTENTION`.
    """
    text, prec = config.text_config, PRECISIONS[precision]
    h, a = text.n_embd, text.n_head
    inner = text.n_inner if text.n_inner is not None else 4 * h
    if text.activation_function not in MLP_SAVES:
        raise ValueError(f"no activation formula for activation_function={text.activation_function!r}; "
                         f"illume plan knows {sorted(MLP_SAVES)}")
    layer_norm = h * prec.u + 8
    attention = attention_costs(attn_implementation).saved(h, a, seq_len, prec)
    adapters = sum((h + h // f) * prec.p for f in _adapter_factors(config))
    return layer_norm + attention + MLP_SAVES[text.activation_function](inner, prec) + adapters


def training_activation_bytes(config: MagmaConfig, batch_size: int, seq_len: int, precision: str,
                              attn_implementation: str, gradient_checkpointing: bool,
                              prefix_trains: bool = False) -> int:
    """Activations the decoder saves for backward (the logits aside) for one micro-batch."""
    text, prec = config.text_config, PRECISIONS[precision]
    h, tokens = text.n_embd, batch_size * seq_len
    rotary = 4 * (text.rotary_dim or h) * seq_len * prec.p  # per layer, shared by the rows
    block = (activation_bytes_per_token_and_layer(config, seq_len, precision, attn_implementation) * tokens
             + rotary)
    adapters_only = sum((h + h // f) * prec.p for f in _adapter_factors(config)) * tokens
    final_norm = (h * prec.u + 8) * tokens  # ln_f's input; the frozen LM head keeps nothing
    if gradient_checkpointing:
        return text.n_layer * h * prec.p * tokens + block + final_norm
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


ESTIMATED_KINDS = ("magma",)
"""The model.kinds whose architecture `plan` walks (MAGMA's GPT-J blocks, CLIP prefix, adapters)."""


def plan(cfg: RunConfig, num_gpus: int = 1, prompt_tokens: int = 32) -> dict:
    """Parameter counts and GPU memory estimates (bytes per GPU) for sampling and training.

    Args:
        num_gpus: Data-parallel GPUs; only ZeRO's sharding and the global batch depend on it.
        prompt_tokens: Text tokens of a prompt (`Q: ... A: ..., seeing that`), besides the image tokens.
    """
    if cfg.model.kind not in ESTIMATED_KINDS:
        # The estimate below is MAGMA's (GPT-J blocks, CLIP prefix, bottleneck adapters); an HF VLM's would need
        # its own architecture walk. Refuse rather than print the numbers of another model.
        raise ValueError(f"illume plan covers model.kind={', '.join(ESTIMATED_KINDS)}; "
                         f"model.kind={cfg.model.kind} is not estimated yet")
    config, source = model_config(cfg)
    text, train, sample = config.text_config, cfg.train, cfg.sample
    model = meta_model(config)
    params = count_parameters(model, train.train_prefix)
    attn = attention_implementation(model)
    attention = attention_costs(attn)
    mode = training_precision(cfg)
    p = PRECISIONS[mode].p
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
                                         + attention.prefill(sample.batch_size, a, seq_len, p)
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
        "activations": training_activation_bytes(config, b, seq_len, mode, attn, train.gradient_checkpointing,
                                                 prefix_trains=train.train_prefix),
        "autocast_weight_copies": trainable * PRECISIONS[mode].weight_copy,
        "logits": b * seq_len * V * (p + (4 if p < 4 else 0) + 8),
        "overhead": OVERHEAD_BYTES,
    }
    return {
        "model": {"source": source, "layers": L, "hidden_size": h, "heads": a, "vocab_size": V,
                  "image_tokens": config.num_image_tokens, "attn_implementation": attn,
                  "adapter_downsample": {"attention": config.adapter_attention_downsample,
                                         "mlp": config.adapter_mlp_downsample}},
        "parameters": params,
        "sampling": {"examples_per_batch": sample.batch_size, "candidates_per_example": k, "rows": rows,
                     "sequence_length": seq_len, "precision": precision, "attn_implementation": attn,
                     "bytes": sampling, "total_bytes": sum(sampling.values())},
        "training": {"micro_batch_size": b, "gradient_accumulation_steps": train.gradient_accumulation_steps,
                     "num_gpus": n, "global_batch_size": b * train.gradient_accumulation_steps * n,
                     "sequence_length": seq_len, "precision": precision, "activation_precision": mode,
                     "attn_implementation": attn, "gradient_checkpointing": train.gradient_checkpointing,
                     "zero_stage": stage, "optimizer_offload": offload, "bytes": training,
                     "total_bytes": sum(training.values())},
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
    console.print(f"attention: {model['attn_implementation']} (the implementation transformers resolved for "
                  "this model; the activation estimate follows it)")
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
                    f"candidates, {s['sequence_length']} tokens, {s['precision']}, "
                    f"{s['attn_implementation']} attention",
        "training": f"Training, per GPU: micro-batch {t['micro_batch_size']} x {t['sequence_length']} "
                    f"tokens, {t['precision']} ({t['activation_precision']}), "
                    f"{t['attn_implementation']} attention, "
                    f"gradient checkpointing {checkpointing}, "
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
