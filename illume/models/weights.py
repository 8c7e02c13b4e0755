"""Saving and loading only the trainable weights (adapters, optionally the prefix) as safetensors.

A round's checkpoint is a few MB of adapters instead of the whole model; loading checks every key, so a
checkpoint from another architecture fails loudly instead of half-loading. Every safetensors file of ours is
read through `readable_safetensors`, so a damaged one (a copy cut short, a full disk) fails with one line that
names it and says what to do, not with safetensors' bare `header too large`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

WRITE_AGAIN = "delete it and run the command that wrote it again"


class WeightsFileError(ValueError):
    """A safetensors file of ours that cannot be read; the message names it and says what to do."""


@contextmanager
def readable_safetensors(path: str | Path, remedy: str = WRITE_AGAIN) -> Iterator[None]:
    """Turn a safetensors error inside the block (it names no file) into a `WeightsFileError` naming `path`.

    Args:
        path: The file the block reads.
        remedy: What to do about it, e.g. which folder to delete so that it is made again.
    """
    try:
        yield
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise WeightsFileError(f"{path} is not a readable safetensors file ({reason}): {remedy}") from error


def read_safetensors(path: str | Path, remedy: str = WRITE_AGAIN) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU).

    Raises:
        FileNotFoundError: there is no such file.
        WeightsFileError: it is damaged or not a safetensors file; the message names it and says `remedy`.
    """
    with readable_safetensors(path, remedy):
        return load_file(str(path))


def check_safetensors(path: str | Path, remedy: str = WRITE_AGAIN) -> None:
    """Read only the header (cheap), so that a damaged file fails before a model loads rather than after.

    Raises:
        FileNotFoundError, WeightsFileError: as `read_safetensors`.
    """
    with readable_safetensors(path, remedy), safe_open(str(path), "pt"):
        pass


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


def load_trainable_weights(model: nn.Module, path: str | Path, remedy: str = WRITE_AGAIN) -> list[str]:
    """Copy the parameters stored in `path` into `model`; every stored key must exist with the same shape.

    Args:
        remedy: What a damaged file's error tells the reader to do (see `read_safetensors`).

    Returns:
        The names of the parameters loaded.
    """
    state = read_safetensors(path, remedy)
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
