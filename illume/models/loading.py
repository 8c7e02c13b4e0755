"""`load_vlm`: the configured model, pre-training and caching the demo base model when needed."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from illume.config import ConfigError, RunConfig
from illume.models.vlm import MagmaVLM
from illume.models.weights import readable_safetensors

logger = logging.getLogger(__name__)


def load_vlm(cfg: RunConfig, device: str = "cpu"):
    """The configured VLM: an HF VLM with LoRA (`model.kind=hf`), a saved MAGMA (`model.path`), or the cached
    demo base model (pre-training it first if it is not cached yet)."""
    if cfg.model.kind == "hf":
        return _load_hf(cfg, device)
    if cfg.model.path is not None:
        return _load_magma(Path(cfg.model.path), device,
                           "write it again (save_pretrained or `illume convert-magma`)")
    from illume.pretrain import demo_model_dir, pretrain_demo_model

    directory = demo_model_dir(cfg)
    if not (directory / "config.json").is_file():
        logger.warning("no cached demo base model at %s: pre-training it now (once per machine, a few minutes)",
                       directory)
        pretrain_demo_model(cfg, directory)
    return _load_magma(directory, device, f"delete {directory} and the demo base model is pre-trained again")


def _load_magma(directory: Path, device: str, remedy: str) -> MagmaVLM:
    """`MagmaVLM.load`, a damaged one-file checkpoint named with `remedy` (the shards of a large model, which
    transformers reads one by one, keep transformers' own errors)."""
    weights = directory / "model.safetensors"
    with readable_safetensors(weights, remedy) if weights.is_file() else nullcontext():
        return MagmaVLM.load(directory, device)


def _load_hf(cfg: RunConfig, device: str):
    from pathlib import Path

    from illume.models.hf import ADAPTER_DIR, DEFAULT_LORA, HFVLM, load_hf_vlm

    if cfg.model.path is None:
        raise ConfigError("model.kind=hf needs model.path: a hub name (e.g. llava-hf/llava-1.5-7b-hf) or a local "
                         "directory")
    if (Path(cfg.model.path) / ADAPTER_DIR / "adapter_config.json").is_file():  # saved by HFVLM.save
        return HFVLM.load(cfg.model.path, device, cfg.model.dtype)
    lora = cfg.model.lora
    settings = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                "target_modules": lora.target_modules or DEFAULT_LORA["target_modules"]}
    return load_hf_vlm(cfg.model.path, settings, cfg.model.dtype, device)
