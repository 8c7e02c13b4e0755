"""`load_vlm`: the configured model, pre-training and caching the demo base model when needed.

It sits above illume/models/ (which loads what a path names, `illume.models.loading`) because the demo base
model's first use pre-trains it (`illume.demo.pretrain`), with the trainers and the shapes world.
"""

from __future__ import annotations

from illume.config import RunConfig
from illume.demo.pretrain import DEMO_MODEL_KIND, ensure_demo_model
from illume.models.loading import load_magma, load_model_path


def load_vlm(cfg: RunConfig, device: str = "cpu"):
    """The configured VLM: an HF VLM with LoRA (`model.kind=hf`), a saved MAGMA (`model.path`), or the cached
    demo base model (pre-training it first if it is not cached yet)."""
    if cfg.model.path is not None or cfg.model.kind != DEMO_MODEL_KIND:
        return load_model_path(cfg, device)
    directory = ensure_demo_model(cfg)
    return load_magma(directory, device, f"delete {directory} and the demo base model is pre-trained again")
