"""Loading a VLM from where a config points: a saved MAGMA or an HF VLM (hub name or saved folder).

The configured model as a whole, including the demo base model that is pre-trained on first use when a
config names no model, is `illume.loading.load_vlm`: pre-training needs the trainers and the shapes world,
which the backends never import.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from illume.config import DEMO_MODEL_PATH, ConfigError, RunConfig
from illume.models.sharding import unshard
from illume.models.vlm import MagmaVLM
from illume.models.weights import readable_safetensors
from illume.prompts import ChatStyle


def load_model_path(cfg: RunConfig, device: str = "cpu", remedy: str | None = None):
    """The VLM `model.path` names, loaded by the backend of `model.kind` (BACKENDS); damaged weights are
    reported with `remedy` (None: the backend's own advice). Whole tensors, see `_whole`."""
    return _whole(BACKENDS[cfg.model.kind](cfg, device, remedy))


def _whole(vlm):
    """`vlm` with plain whole tensors. transformers builds a model partitioned (inside `deepspeed.zero.Init`)
    while a ZeRO-3 Trainer's arguments are alive, so a model loaded after the first round's training (the
    reward model's base) would come partitioned; every model illume loads starts whole instead, and a Trainer
    partitions what it trains. Collective in that case: every rank loads the model."""
    unshard(vlm.model)
    return vlm


def _load_saved_magma(cfg: RunConfig, device: str, remedy: str | None) -> MagmaVLM:
    if cfg.model.path is None:
        raise ConfigError("model.path is not set: name a saved MAGMA folder (or leave it unset for the demo "
                          "base model, through illume.loading.load_vlm)")
    return load_magma(Path(cfg.model.path), device,
                      remedy or "write it again (save_pretrained or `illume convert-magma`)")


def load_magma(directory: Path, device: str, remedy: str) -> MagmaVLM:
    """`MagmaVLM.load`, a damaged one-file checkpoint named with `remedy` (the shards of a large model, which
    transformers reads one by one, keep transformers' own errors)."""
    weights = directory / "model.safetensors"
    with readable_safetensors(weights, remedy) if weights.is_file() else nullcontext():
        return MagmaVLM.load(directory, device, remedy)


def load_saved_vlm(directory: str | Path, device: str = "cpu"):
    """A VLM that `VLM.save` wrote, by the backend its folder shows (an HF model's LoRA folder, else MAGMA):
    what a saved reward model names as its base model."""
    from illume.models.hf import ADAPTER_DIR, HFVLM

    directory = Path(directory)
    if (directory / ADAPTER_DIR / "adapter_config.json").is_file():
        return _whole(HFVLM.load(directory, device))
    return _whole(load_magma(directory, device, "write it again (save_pretrained or `illume convert-magma`)"))


def _load_hf(cfg: RunConfig, device: str, remedy: str | None):
    from illume.models.hf import ADAPTER_DIR, DEFAULT_LORA, HFVLM, load_hf_vlm

    if cfg.model.path is None:
        raise ConfigError("model.kind=hf needs model.path: a hub name (e.g. llava-hf/llava-1.5-7b-hf), a local "
                          f"directory, or {DEMO_MODEL_PATH} (the demo base model, a tiny Qwen2-VL)")
    prompt = cfg.prompt
    chat = ChatStyle(prompt.ask, prompt.explain, prompt.connective)
    if (Path(cfg.model.path) / ADAPTER_DIR / "adapter_config.json").is_file():  # saved by HFVLM.save
        return HFVLM.load(cfg.model.path, device, cfg.model.dtype, prompt.format, chat)
    lora = cfg.model.lora
    settings = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                "target_modules": lora.target_modules or DEFAULT_LORA["target_modules"]}
    return load_hf_vlm(cfg.model.path, settings, cfg.model.dtype, device, prompt.format, chat,
                       remedy or "get an intact copy of the model", seed=cfg.seed)


def chat_format(cfg: RunConfig) -> ChatStyle | None:
    """How the run's prompts read (`prompt.*`): its chat style, or None for the plain format. Decided as the
    model loads them (`illume.models.hf.chat_style`): MAGMA is plain; an HF VLM's processor is read when
    `prompt.format` leaves it to whether the model has a chat template."""
    chat = ChatStyle(cfg.prompt.ask, cfg.prompt.explain, cfg.prompt.connective)
    if cfg.model.kind != "hf" or cfg.prompt.format == "plain":
        return None
    if cfg.prompt.format == "chat" or cfg.model.names_demo_model():  # the HF demo model has a chat template
        return chat
    from illume.models.hf import chat_style, load_processor

    return chat_style(load_processor(cfg.model.path), cfg.prompt.format, chat)


BACKENDS = {"magma": _load_saved_magma, "hf": _load_hf}
"""model.kind -> (cfg, device, remedy) -> the VLM at model.path: the one place a backend is chosen."""
