"""`load_vlm`: the configured model, pre-training and caching the demo base model when needed.

It sits above illume/models/ (which loads what a path names, `illume.models.loading`) because the demo base
model's first use pre-trains it (`illume.demo.pretrain`), with the trainers and the shapes world.
"""

from __future__ import annotations

from pathlib import Path

from illume.config import RunConfig
from illume.demo.pretrain import DEMO_MODEL_KIND, SHIPPED_DEMO_MODEL, demo_model_dir, ensure_demo_model
from illume.models.loading import load_magma, load_model_path


def load_vlm(cfg: RunConfig, device: str = "cpu"):
    """The configured VLM: an HF VLM with LoRA (`model.kind=hf`), a saved MAGMA (`model.path`), or the demo
    base model (cached, shipped for configs/demo.yaml's settings, or pre-trained first: `ensure_demo_model`)."""
    if cfg.model.path is not None or cfg.model.kind != DEMO_MODEL_KIND:
        return load_model_path(cfg, device)
    directory = ensure_demo_model(cfg)
    remedy = ("reinstall illume (the shipped demo base model is damaged)" if directory == SHIPPED_DEMO_MODEL
              else f"delete {directory} and the demo base model is pre-trained again")
    return load_magma(directory, device, remedy)


def model_identity(cfg: RunConfig) -> str:
    """Which base model `cfg` loads, from the config alone (nothing is loaded): the demo base model's cache
    name (a hash of every setting that changes it), or `kind:path` (a local folder resolved, a hub name as
    given). A model fitted on one identity (a reward model) is refused by a run of another."""
    if cfg.model.path is None and cfg.model.kind == DEMO_MODEL_KIND:
        return f"demo base model {demo_model_dir(cfg).name}"
    path = Path(cfg.model.path) if cfg.model.path is not None else None
    where = str(path.resolve()) if path is not None and path.exists() else str(cfg.model.path)
    return f"{cfg.model.kind}:{where}"
