"""Saving and loading only the trainable weights (adapters, optionally the prefix) as safetensors.

A round's checkpoint is a few MB of adapters instead of the whole model; loading checks every key, so a
checkpoint from another architecture fails loudly instead of half-loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable_weights(model: nn.Module, path: str | Path) -> None:
    """Write the trainable parameters to a safetensors file."""
    state = trainable_state_dict(model)
    if not state:
        raise ValueError("the model has no trainable parameters to save")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def load_trainable_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the parameters stored in `path` into `model`; every stored key must exist with the same shape.

    Returns:
        The names of the parameters loaded.
    """
    state = load_file(str(path))
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    if unknown:
        raise KeyError(f"{path}: {len(unknown)} keys not in the model, e.g. {unknown[:5]}")
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(parameters[k].shape)}" for k, v in state.items()
                  if v.shape != parameters[k].shape]
    if mismatched:
        raise ValueError(f"{path}: shape mismatch for {mismatched[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    return sorted(state)
