"""Official MAGMA checkpoints in our MAGMA: the full-size config, the key map, strict loading, conversion.

The official checkpoint (Aleph-Alpha/magma, and ILLUME's, which uses the same code) is the DeepSpeed file
`mp_rank_00_model_states.pt` whose `module` entry is the state dict of `magma.magma.Magma` (ILLUME:
`magma.model.MultimodalLM`). Facts from that code (magma/magma.py, adapters.py, image_prefix.py,
image_encoders.py, language_model.py, utils.py, configs/MAGMA_v1.yml, configs/MAGMA_v2.yml) and from the
transformers fork it pins (finetuneanon/transformers, branch gpt-neo-localattention3-rp-b,
src/transformers/models/gpt_neo/modeling_gpt_neo.py):

- The LM is GPT-J-6B built as the fork's `GPTNeoForCausalLM` with `jax=True, rotary=True`: blocks are
  `ln_1`, `attn.attention.{q,k,v,out}_proj` (no biases), `mlp.c_fc`/`mlp.c_proj`, attention and MLP in
  parallel (no `ln_2`), an untied `lm_head` with a bias, no position embedding. Stock GPT-J is the same
  network under other names (`attn.q_proj`, `mlp.fc_in`, `mlp.fc_out`).
- Each attention keeps persistent buffers stock GPT-J does not store: `bias` (causal mask), `masked_bias`,
  `scale_attn` (sqrt(head_dim)), `sin`/`cos` (rotary tables). They are ignored by rule, after a shape check.
- MAGMA adds `<|image|>` to GPT-2's 50,257 tokens and calls `resize_token_embeddings(50258)`; with `jax=True`
  the fork reports no output embedding, so only `wte` shrinks to 50,258 rows while `lm_head` keeps GPT-J's
  50,400. Our model has one vocabulary size, so `wte` is padded with zero rows to 50,400 (never looked up:
  the tokenizer has 50,258 ids). `<|image|>` is id 50,257.
- Adapters: the MLP one is `nn.Sequential(mlp, Adapter)`, so `mlp.0.c_fc...` and `mlp.1.adapter.{0,2}...`;
  the attention one is `AdapterWrapper`, itself the adapter, wrapping the block as `attn_block`, so
  `attn.adapter.{0,2}...` and `attn.attn_block.attention.q_proj...`. v1: MLP only, downsample 4;
  v2 (and ILLUME's tuning script, which trains `attn.adapter` and `mlp[1]`): attention and MLP, downsample 8.
- The image prefix is `image_prefix.enc` (CLIP RN50x16's visual tower, its attention pool replaced by a
  parameter-free reshape), `image_prefix.proj` (3072 -> 4096) and `image_prefix.ln`: the same names as ours.
- `Magma` also registers `lm.transformer.wte` as `word_embedding` and `lm.transformer.h` as `transformer`, and
  `state_dict()` lists shared modules under every name: such aliases are checked to equal the original, then
  ignored.

The official loaders call `load_state_dict(..., strict=False)`, which loads a mismatched checkpoint silently.
Here every key is accounted for: used, or ignored by a named rule; anything else raises `MagmaCheckpointError`
listing the keys, unless the caller allows those keys explicitly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers.models.gptj.modeling_gptj import GPTJRotaryEmbedding, create_sinusoidal_positions

from illume.config import AdapterConfig, LMConfig, ModelConfig, VisionConfig
from illume.models.magma import MagmaConfig, MagmaForCausalLM, build_magma_config
from illume.models.weights import record_digests
from illume.run_folder import check_output_folder

logger = logging.getLogger(__name__)

Version = Literal["v1", "v2"]
GPTJ_VOCAB_SIZE = 50400
"""Rows of GPT-J-6B's LM head (and of our embedding)."""
OFFICIAL_EMBEDDING_ROWS = 50258
"""Rows of `wte` in the official checkpoint: GPT-2's 50,257 tokens + `<|image|>`."""
IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_ID = 50257
EOS_TOKEN_ID = 50256

_EMBEDDING_KEY = "lm.transformer.wte.weight"
_FORK_BUFFERS = ("bias", "masked_bias", "scale_attn", "sin", "cos")
_IGNORE_RULES = {
    "fork attention buffers": re.compile(
        r"lm\.transformer\.h\.\d+\.attn\.(?:attn_block\.)?attention\.(?:" + "|".join(_FORK_BUFFERS) + ")"),
    "alias of lm.transformer.wte / lm.transformer.h":
        re.compile(r"word_embedding\.weight|transformer\.\d+\..+"),
}


class MagmaCheckpointError(ValueError):
    """An official checkpoint that does not fit the model.

    The message lists the offending keys (the first 20 of each kind); `missing`, `unexpected` and `wrong`
    hold all of them (official names; `wrong`: one line per mis-shaped or inconsistent key).
    """

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 wrong: Sequence[str] = ()):
        super().__init__(message)
        self.missing, self.unexpected, self.wrong = list(missing), list(unexpected), list(wrong)


def official_model_config(version: Version) -> ModelConfig:
    """Our `ModelConfig` values of the official MAGMA: CLIP RN50x16 at 384 px and GPT-J-6B with adapters."""
    adapters = {"v1": AdapterConfig(attention_downsample=0, mlp_downsample=4),
                "v2": AdapterConfig(attention_downsample=8, mlp_downsample=8)}
    if version not in adapters:
        raise ValueError(f"unknown MAGMA version {version!r}; expected 'v1' or 'v2'")
    return ModelConfig(
        vision=VisionConfig(layers=[6, 8, 18, 8], width=96, image_size=384),
        lm=LMConfig(hidden_size=4096, num_layers=28, num_heads=16, rotary_dim=64, max_positions=2048,
                    vocab_size=GPTJ_VOCAB_SIZE, activation="gelu_new"),
        adapters=adapters[version],
        prefix_dropout=0.1,  # MAGMA's image_embed_dropout_prob
    )


def magma_config(version: Version) -> MagmaConfig:
    """The full-size `MagmaConfig` of official MAGMA v1 or v2 (ILLUME's base model is v2-shaped)."""
    return build_magma_config(official_model_config(version), vocab_size=OFFICIAL_EMBEDDING_ROWS,
                              image_token_id=IMAGE_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                              pad_token_id=EOS_TOKEN_ID)


def official_key(key: str, config: MagmaConfig) -> str:
    """The official checkpoint's name of our state-dict key `key` (most keys are the same)."""
    match = re.fullmatch(r"lm\.transformer\.h\.(\d+)\.(.+)", key)
    if match is None:
        return key
    layer, rest = match.groups()
    if config.adapter_attention_downsample:
        if rest.startswith("attn.adapter.adapter."):  # AdapterWrapper is itself the adapter
            rest = "attn.adapter." + rest.removeprefix("attn.adapter.adapter.")
        elif rest.startswith("attn.attention."):
            rest = "attn.attn_block.attention." + rest.removeprefix("attn.attention.")
    elif rest.startswith("attn."):
        rest = "attn.attention." + rest.removeprefix("attn.")
    if rest.startswith("mlp."):
        rest = rest.replace(".fc_in.", ".c_fc.").replace(".fc_out.", ".c_proj.")
    return f"lm.transformer.h.{layer}.{rest}"


@dataclass
class LoadReport:
    """What loading an official checkpoint did with every key."""

    loaded: list[str] = field(default_factory=list)
    """Our keys filled from the checkpoint."""
    ignored: dict[str, list[str]] = field(default_factory=dict)
    """Checkpoint keys left out, by the rule that allows it."""
    padded: dict[str, list[int]] = field(default_factory=dict)
    """Our key -> [rows in the checkpoint, rows in the model]; the extra rows are zeros."""
    allowed_missing: list[str] = field(default_factory=list)
    """Our keys absent from the checkpoint and left as initialised, because the caller allowed them."""
    allowed_unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys that match nothing, skipped because the caller allowed them."""

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        lines += [f"padded {key} from {rows} to {total} rows with zeros"
                  for key, (rows, total) in self.padded.items()]
        lines += [f"ignored {len(keys)} keys by rule '{rule}' (e.g. {keys[0]})"
                  for rule, keys in self.ignored.items()]
        if self.allowed_missing:
            lines.append(f"left {len(self.allowed_missing)} missing keys as initialised (allowed): "
                         f"{_listing(self.allowed_missing)}")
        if self.allowed_unexpected:
            lines.append(f"skipped {len(self.allowed_unexpected)} unexpected keys (allowed): "
                         f"{_listing(self.allowed_unexpected)}")
        return "\n".join(lines)


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _matches_any(key: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in patterns)


def read_official_state_dict(path: str | Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The `module` state dict of a DeepSpeed `mp_rank_00_model_states.pt` (or a plain state dict file).

    Uses `weights_only=True`: a checkpoint that needs arbitrary code to unpickle is refused, not executed.
    `mmap` maps the file instead of reading 12 GB into memory (zip-format files only; others are read).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        try:
            checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
        except RuntimeError as error:
            if not mmap or "mmap" not in str(error):
                raise
            checkpoint = torch.load(path, weights_only=True, map_location="cpu")  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise MagmaCheckpointError(
            f"{path}: refusing to unpickle non-tensor objects (weights_only=True): "
            f"{str(error).splitlines()[0]}. Extract its 'module' state dict in a trusted environment and "
            "save that instead.") from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("module"), dict):
        checkpoint = checkpoint["module"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        top = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise MagmaCheckpointError(f"{path}: expected a DeepSpeed checkpoint with a 'module' state dict, "
                                   f"got {top}")
    return checkpoint


def _alias_target(key: str) -> str | None:
    if key == "word_embedding.weight":
        return _EMBEDDING_KEY
    match = re.fullmatch(r"transformer\.(\d+)\.(.+)", key)
    return f"lm.transformer.h.{match[1]}.{match[2]}" if match else None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.data_ptr() == b.data_ptr() or torch.equal(a, b)  # torch.load keeps shared storage shared


def _check_ignored(key: str, tensor: torch.Tensor, state: dict[str, torch.Tensor],
                   config: MagmaConfig) -> str | None:
    """Why an ignored key is nevertheless wrong (a different rotary size, an alias that differs), or None."""
    target = _alias_target(key)
    if target is not None:
        if target in state and not _same_tensor(tensor, state[target]):
            return f"{key}: differs from {target}, of which it should be an alias"
        return None
    text = config.text_config
    name = key.rsplit(".", 1)[1]
    if name in ("sin", "cos") and tuple(tensor.shape) != (text.n_positions, text.rotary_dim // 2):
        return (f"{key}: rotary table {tuple(tensor.shape)}, expected (n_positions, rotary_dim / 2) = "
                f"{(text.n_positions, text.rotary_dim // 2)}")
    if name == "scale_attn":
        expected = math.sqrt(text.n_embd // text.n_head)
        if tensor.numel() != 1 or not math.isclose(float(tensor), expected, rel_tol=1e-3):
            return f"{key}: attention scale {tensor.tolist()}, expected sqrt(head_dim) = {expected}"
    return None


def load_official_state_dict(model: MagmaForCausalLM, state: dict[str, torch.Tensor], *,
                             allow_missing: Sequence[str] = (),
                             allow_unexpected: Sequence[str] = ()) -> LoadReport:
    """Fill `model` from an official MAGMA state dict, accounting for every key.

    A model built on the meta device receives the checkpoint's tensors as they are (no copy, their dtype);
    a materialised one has them copied in, in its own dtype.

    Args:
        allow_missing: Regular expressions (full match, on our key or the official one) of keys that may be
            absent; those parameters keep their initial values (not possible on the meta device).
        allow_unexpected: Regular expressions of checkpoint keys that may match nothing; they are skipped.

    Raises:
        MagmaCheckpointError: Listing every missing, unexpected or mis-shaped key that was not allowed.
    """
    config = model.config
    ours = model.state_dict()
    expected = {official_key(key, config): key for key in ours}  # official name -> our name
    report = LoadReport()
    unexpected, wrong = [], []
    for key, tensor in state.items():
        if key in expected:
            continue
        rule = next((name for name, pattern in _IGNORE_RULES.items() if pattern.fullmatch(key)), None)
        if rule is not None:
            report.ignored.setdefault(rule, []).append(key)
            if (problem := _check_ignored(key, tensor, state, config)) is not None:
                wrong.append(problem)
        elif _matches_any(key, allow_unexpected):
            report.allowed_unexpected.append(key)
        else:
            unexpected.append(key)
    missing = []
    for official, key in expected.items():
        if official in state:
            theirs, mine = tuple(state[official].shape), tuple(ours[key].shape)
            rows_short = key == _EMBEDDING_KEY and theirs[1:] == mine[1:] and theirs[0] <= mine[0]
            if theirs != mine and not rows_short:
                wrong.append(f"{official}: {theirs} in the checkpoint, {mine} in the model")
        elif _matches_any(key, allow_missing) or _matches_any(official, allow_missing):
            report.allowed_missing.append(key)
        else:
            missing.append(official)
    if missing or unexpected or wrong:
        message = _describe_problems(missing, unexpected, wrong, state)
        raise MagmaCheckpointError(message, missing, unexpected, wrong)
    _fill(model, ours, expected, state, report)
    return report


def _describe_problems(missing: list[str], unexpected: list[str], wrong: list[str], state: dict) -> str:
    parts = ["the checkpoint does not fit the model"]
    if missing:
        parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} wrong shapes or values: {_listing(wrong)}")
    has_attention_adapters = any(re.search(r"\.attn\.adapter\.", key) for key in state)
    parts.append(f"(the checkpoint {'has' if has_attention_adapters else 'has no'} attention adapters, so it "
                 f"looks like MAGMA {'v2' if has_attention_adapters else 'v1'}; pass --allow-missing / "
                 "--allow-unexpected REGEX only for keys you mean to leave out)")
    return "; ".join(parts)


def _fill(model: MagmaForCausalLM, ours: dict[str, torch.Tensor], expected: dict[str, str],
          state: dict[str, torch.Tensor], report: LoadReport) -> None:
    on_meta = any(t.is_meta for t in ours.values())
    if on_meta and report.allowed_missing:
        raise MagmaCheckpointError(f"cannot leave keys uninitialised on a meta-device model: "
                                   f"{_listing(report.allowed_missing)}; build the model on a real device")
    values = {}
    for official, key in expected.items():
        if official not in state:
            continue
        tensor = state[official]
        if key == _EMBEDDING_KEY and tensor.shape != ours[key].shape:  # zero rows for ids no tokenizer makes
            extra = tensor.new_zeros((ours[key].shape[0] - tensor.shape[0], *tensor.shape[1:]))
            report.padded[key] = [tensor.shape[0], ours[key].shape[0]]
            tensor = torch.cat([tensor, extra])
        values[key] = tensor
        report.loaded.append(key)
    if on_meta:
        model.load_state_dict(values, strict=True, assign=True)
        _materialise_rotary_tables(model)
    else:
        with torch.no_grad():
            for key, tensor in values.items():
                ours[key].copy_(tensor)


def _materialise_rotary_tables(model: MagmaForCausalLM) -> None:
    """Stock GPT-J's rotary table is a non-persistent buffer, so loading by assignment leaves it on meta.

    Since transformers 5.24 one `GPTJRotaryEmbedding` per model owns the table (before, every attention layer
    held a copy); it is filled as GPT-J's own `_init_weights` fills it, from the module's public sizes."""
    for module in model.modules():
        if isinstance(module, GPTJRotaryEmbedding) and module.embed_positions.is_meta:
            table = create_sinusoidal_positions(module.max_positions, module.pos_embd_dim)
            module.register_buffer("embed_positions", table, persistent=False)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MagmaCheckpointError(f"tensors still on the meta device after loading: {_listing(left)}")


def load_official_checkpoint(model: MagmaForCausalLM, path: str | Path, *, allow_missing: Sequence[str] = (),
                             allow_unexpected: Sequence[str] = ()) -> LoadReport:
    """`read_official_state_dict` + `load_official_state_dict`; logs what was padded and ignored."""
    report = load_official_state_dict(model, read_official_state_dict(path), allow_missing=allow_missing,
                                      allow_unexpected=allow_unexpected)
    logger.info("%s: %s", path, report.summary().replace("\n", "; "))
    return report


def official_state_dict(model: MagmaForCausalLM, embedding_rows: int = OFFICIAL_EMBEDDING_ROWS,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our weights laid out as the official checkpoint's `module`: official names, `wte` cut to
    `embedding_rows`, the fork's attention buffers, and the `word_embedding`/`transformer` aliases (the same
    tensors, as `torch.save` of the official model stores them). For tests and round trips."""
    config, text = model.config, model.config.text_config
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if key == _EMBEDDING_KEY:
            if embedding_rows > tensor.shape[0]:
                raise ValueError(f"embedding_rows={embedding_rows} exceeds the model's "
                                 f"{tensor.shape[0]} rows")
            tensor = tensor[:embedding_rows].clone()
        state[official_key(key, config)] = tensor
    # The fork's buffers, computed as its GPTNeoSelfAttention does.
    positions, head_dim = text.n_positions, text.n_embd // text.n_head
    causal = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, text.rotary_dim, 2) / text.rotary_dim))
    angles = torch.outer(torch.arange(positions).float(), inv_freq)
    scale = torch.tensor(math.sqrt(head_dim))
    buffers = {"bias": causal, "masked_bias": torch.tensor(-1e9), "scale_attn": scale,
               "sin": torch.sin(angles), "cos": torch.cos(angles)}
    attention = "attn.attn_block.attention" if config.adapter_attention_downsample else "attn.attention"
    for layer in range(text.n_layer):
        for name, tensor in buffers.items():
            state[f"lm.transformer.h.{layer}.{attention}.{name}"] = tensor
    state["word_embedding.weight"] = state[_EMBEDDING_KEY]
    for key in [k for k in state if k.startswith("lm.transformer.h.")]:
        state["transformer." + key.removeprefix("lm.transformer.h.")] = state[key]
    return state


def save_official_checkpoint(model: MagmaForCausalLM, path: str | Path,
                             embedding_rows: int = OFFICIAL_EMBEDDING_ROWS,
                             dtype: torch.dtype | None = None) -> None:
    """Write `model` as an official-format DeepSpeed file `{"module": state_dict}` (`official_state_dict`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": official_state_dict(model, embedding_rows, dtype)}, path)


def _tokenizer_with_image_token(tokenizer_path: str | Path, image_token_id: int):
    """The LM's tokenizer with `<|image|>` added as MAGMA adds it (a special token after GPT-2's 50,257)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"cls_token": IMAGE_TOKEN})  # MAGMA's get_tokenizer does the same
    got = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:
        raise MagmaCheckpointError(f"{tokenizer_path}: {IMAGE_TOKEN} has id {got}, the model expects "
                                   f"{image_token_id} (MAGMA: GPT-2's tokenizer, 50,257 tokens, plus "
                                   f"{IMAGE_TOKEN})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # MAGMA pads with EOS
    return tokenizer


def convert_magma(checkpoint_path: str | Path, out_dir: str | Path, version: Version | MagmaConfig = "v1",
                  tokenizer_path: str | Path | None = None, *, allow_missing: Sequence[str] = (),
                  allow_unexpected: Sequence[str] = (), dtype: torch.dtype | None = None) -> LoadReport:
    """Convert an official MAGMA checkpoint into a folder `MagmaVLM.load` reads (safetensors + config).

    Args:
        checkpoint_path: The official `mp_rank_00_model_states.pt`.
        out_dir: Output folder; gets config.json, model safetensors, conversion_report.json and, with
            `tokenizer_path`, the tokenizer.
        version: "v1" (MLP adapters, downsample 4), "v2" (attention + MLP adapters, downsample 8; ILLUME's
            base model), or a `MagmaConfig` (tests use tiny ones).
        tokenizer_path: A folder with GPT-2's tokenizer (`<|image|>` is added if absent). Without it no
            tokenizer is written and one must be copied in before `MagmaVLM.load`.
        allow_missing, allow_unexpected: See `load_official_state_dict`.
        dtype: Store the weights in this dtype; None keeps the checkpoint's (fp16 for the official one).

    Returns:
        The load report (also written to out_dir/conversion_report.json).
    """
    config = magma_config(version) if isinstance(version, str) else version
    tokenizer = _tokenizer_with_image_token(tokenizer_path, config.image_token_id) if tokenizer_path else None
    state = read_official_state_dict(checkpoint_path)
    if allow_missing:  # keys left as initialised need real initial values
        model = MagmaForCausalLM(config)
        model.to(next(t.dtype for t in state.values() if t.is_floating_point()))
    else:
        with torch.device("meta"):  # no 24 GB of random fp32 weights just to overwrite them
            model = MagmaForCausalLM(config)
    report = load_official_state_dict(model, state, allow_missing=allow_missing,
                                      allow_unexpected=allow_unexpected)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    record_digests(out_dir)  # MagmaVLM.load verifies them
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    summary = {"checkpoint": str(checkpoint_path),
               "version": version if isinstance(version, str) else "config", "loaded": len(report.loaded),
               "padded": report.padded, "ignored": report.ignored,
               "allowed_missing": report.allowed_missing, "allowed_unexpected": report.allowed_unexpected}
    (out_dir / "conversion_report.json").write_text(json.dumps(summary, indent=2))
    return report


def cmd_convert_magma(args: argparse.Namespace) -> int:
    """`illume convert-magma CHECKPOINT OUT_DIR --version v1|v2 [--tokenizer DIR] [--allow-missing REGEX]`."""
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    # Before the (minutes-long) read: an earlier conversion is replaced only on request, anything else never.
    check_output_folder(Path(args.out_dir), "conversion_report.json", args.force, "illume convert-magma")
    try:
        report = convert_magma(args.checkpoint, args.out_dir, args.version, args.tokenizer,
                               allow_missing=args.allow_missing or (),
                               allow_unexpected=args.allow_unexpected or (), dtype=dtype)
    except MagmaCheckpointError as error:
        print(f"error: {error}")
        return 1
    print(report.summary())
    if args.tokenizer is None:
        print(f"no tokenizer written: copy GPT-2's, with {IMAGE_TOKEN} = {IMAGE_TOKEN_ID}, "
              f"into {args.out_dir}")
    print(f"wrote {args.out_dir}")
    return 0


def add_convert_magma_parser(commands) -> None:
    """Register `convert-magma` on an argparse subparsers object."""
    sub = commands.add_parser(
        "convert-magma",
        help="convert an official MAGMA checkpoint (mp_rank_00_model_states.pt) into a folder for model.path")
    sub.add_argument("checkpoint", help="the official DeepSpeed file mp_rank_00_model_states.pt")
    sub.add_argument("out_dir", help="folder to write (config.json, safetensors, tokenizer, "
                                     "conversion_report.json)")
    sub.add_argument("--version", required=True, choices=("v1", "v2"),
                     help="v1: MLP adapters /4 (the public MAGMA checkpoint); v2: attention + MLP adapters "
                          "/8 (ILLUME's base model)")
    sub.add_argument("--tokenizer", default=None, help="folder with GPT-2's tokenizer (<|image|> is added)")
    sub.add_argument("--allow-missing", action="append", metavar="REGEX",
                     help="keys that may be absent (kept as initialised); repeatable")
    sub.add_argument("--allow-unexpected", action="append", metavar="REGEX",
                     help="checkpoint keys that may match nothing (skipped); repeatable")
    sub.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                     help="store the weights in this dtype (default: the checkpoint's, fp16)")
    sub.add_argument("--force", action="store_true", help="replace an earlier conversion in OUT_DIR")
    sub.set_defaults(handler=cmd_convert_magma)
