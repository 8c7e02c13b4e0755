"""`load_vlm`: the configured model, pre-training and caching the demo base model when needed.

It sits above illume/models/ (which loads what a path names, `illume.models.loading`) because the demo base
model's first use pre-trains it (`illume.demo.pretrain`), with the trainers and the shapes world.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from illume.config import RunConfig
from illume.demo.pretrain import SHIPPED_DEMO_MODELS, demo_model_dir, ensure_demo_model
from illume.models.loading import load_model_path


def load_vlm(cfg: RunConfig, device: str = "cpu"):
    """The configured VLM: an HF VLM with LoRA (`model.kind=hf`), a saved MAGMA (`model.path`), or the demo
    base model of `model.kind` (no path for MAGMA, or `model.path: illume:demo`: cached, shipped for
    configs/demo.yaml's / configs/demo_hf.yaml's settings, or pre-trained first: `ensure_demo_model`), loaded
    from its folder as any saved model of its kind."""
    if not cfg.model.names_demo_model():
        return load_model_path(cfg, device)
    directory = ensure_demo_model(cfg)
    remedy = ("reinstall illume (the shipped demo base model is damaged)" if directory in SHIPPED_DEMO_MODELS.values()
              else f"delete {directory} and the demo base model is pre-trained again")
    return load_model_path(replace(cfg, model=replace(cfg.model, path=str(directory))), device, remedy)


def model_identity(cfg: RunConfig) -> str:
    """Which base model `cfg` loads, from the config alone (nothing is loaded): the demo base model's cache
    name (a hash of every setting that changes it), or `kind:path` (a local folder resolved, a hub name as
    given). A model fitted on one identity (a reward model) is refused by a run of another."""
    if cfg.model.names_demo_model():
        return f"demo base model {demo_model_dir(cfg).name}"
    path = Path(cfg.model.path) if cfg.model.path is not None else None
    where = str(path.resolve()) if path is not None and path.exists() else str(cfg.model.path)
    return f"{cfg.model.kind}:{where}"
