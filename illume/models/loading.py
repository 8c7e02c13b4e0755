"""`load_vlm`: the configured model, pre-training and caching the demo base model when needed."""

from __future__ import annotations

import logging

from illume.config import RunConfig
from illume.models.vlm import MagmaVLM

logger = logging.getLogger(__name__)


def load_vlm(cfg: RunConfig, device: str = "cpu") -> MagmaVLM:
    """Load `model.path`, or the cached demo base model (pre-training it first if it is not cached yet)."""
    if cfg.model.path is not None:
        return MagmaVLM.load(cfg.model.path, device)
    from illume.pretrain import demo_model_dir, pretrain_demo_model

    directory = demo_model_dir(cfg)
    if not (directory / "config.json").is_file():
        logger.warning("no cached demo base model at %s: pre-training it now (once per machine, a few minutes)",
                       directory)
        pretrain_demo_model(cfg, directory)
    return MagmaVLM.load(directory, device)
