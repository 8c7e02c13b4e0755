"""Saving and loading only the trainable weights (adapters, optionally the prefix) as safetensors, and the
checks every weights file of ours passes when it is read.

A round's checkpoint is a few MB of adapters instead of the whole model; loading checks every key, so a
checkpoint from another architecture fails loudly instead of half-loading. Every safetensors file of ours is
read through `readable_safetensors`, so a damaged one (a copy cut short, a full disk) fails with one line that
names it and says what to do, not with safetensors' bare `header too large`.

Verified, not only readable: every weights file illume writes gets its sha256 beside it (`NAME.sha256`, in
`sha256sum`'s format, so `sha256sum -c` checks it too), written after the file itself was written whole (under
a temporary name, then renamed). Reading one compares the digest first: bytes damaged behind an intact header
fail as the same one-line `WeightsFileError` as a damaged header. A file without a digest (written by an older
illume, or by someone else) is read unverified. Whatever was read, tensors holding NaN or infinity are refused
(`check_finite`), wherever weights are loaded (`illume.models.*.load` check the whole model).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from illume.models.sharding import whole

WRITE_AGAIN = "delete it and run the command that wrote it again"
DIGEST_SUFFIX = ".sha256"
"""`model.safetensors` -> `model.safetensors.sha256`: the file's sha256, as `sha256sum` writes it."""


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
    """Every tensor of a safetensors file (on the CPU), its recorded digest checked and every value finite.

    Raises:
        FileNotFoundError: there is no such file.
        WeightsFileError: it is damaged, not a safetensors file, not the file its digest was recorded for, or
            holds NaN or infinity; the message names it and says `remedy`.
    """
    verify_digest(path, remedy)
    with readable_safetensors(path, remedy):
        state = load_file(str(path))
    check_finite(state.items(), path, remedy)
    return state


def check_safetensors(path: str | Path, remedy: str = WRITE_AGAIN) -> None:
    """Check the digest and read the header, so that a damaged file fails before a model loads rather than
    after (the values are checked when the file is read).

    Raises:
        FileNotFoundError, WeightsFileError: as `read_safetensors`.
    """
    verify_digest(path, remedy)
    with readable_safetensors(path, remedy), safe_open(str(path), "pt"):
        pass


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors to a safetensors file whole (a temporary file renamed over it), then its digest beside it.

    A kill at any moment leaves the old file or the new one, never half of one; in between the two renames the
    new file's digest is still the old one's, and reading it fails with the remedy rather than silently.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt"})
    _replace_durably(tmp, path)
    record_digest(path)


def record_digest(path: str | Path) -> Path:
    """Write `path`'s sha256 to `path.sha256` (sha256sum's format: digest, two spaces, file name).

    Returns:
        The digest file.
    """
    path = Path(path)
    digest_path = path.with_name(path.name + DIGEST_SUFFIX)
    tmp = digest_path.with_name(f".{digest_path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{sha256_of(path)}  {path.name}\n")
    _replace_durably(tmp, digest_path)
    return digest_path


def record_digests(directory: str | Path) -> None:
    """Record the digest of every safetensors file in `directory` and its subfolders (after a `save_pretrained`,
    which writes them itself)."""
    for path in sorted(Path(directory).rglob("*.safetensors")):
        record_digest(path)


def verify_digest(path: str | Path, remedy: str = WRITE_AGAIN) -> None:
    """Compare `path` with the digest recorded beside it; a file without one passes (see the module doc).

    Raises:
        FileNotFoundError: there is no such file.
        WeightsFileError: the digests differ; the message names the file and says `remedy`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    digest_path = path.with_name(path.name + DIGEST_SUFFIX)
    if not digest_path.is_file():
        return
    recorded = digest_path.read_text().split()[:1]
    if recorded != [sha256_of(path)]:
        raise WeightsFileError(f"{path} is not the file that was written there (its sha256 differs from the one "
                               f"recorded in {digest_path.name}: damaged or changed since): {remedy}")


def verify_digests(directory: str | Path, remedy: str = WRITE_AGAIN) -> None:
    """`verify_digest` for every safetensors file in `directory` and its subfolders (before a
    `from_pretrained` of a folder illume saved)."""
    for path in sorted(Path(directory).rglob("*.safetensors")):
        verify_digest(path, remedy)


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str | Path,
                 remedy: str = WRITE_AGAIN) -> None:
    """Refuse weights holding NaN or infinity: they load without an error and then make every output NaN.

    Raises:
        WeightsFileError: naming the first such tensor, how many values are bad, `where` and `remedy`.
    """
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsFileError(f"{where}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}: "
                                   f"{remedy}")


def sha256_of(path: str | Path) -> str:
    """The file's sha256, hex, read in 8 MiB blocks (GBs of weights never sit in memory at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())  # on disk before the name points at it: a power cut leaves old or new
    os.replace(tmp, path)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable_weights(model: nn.Module, path: str | Path) -> None:
    """Write the trainable parameters to a safetensors file, with its digest (`save_safetensors`)."""
    state = trainable_state_dict(model)
    if not state:
        raise ValueError("the model has no trainable parameters to save")
    save_safetensors(state, path)


def load_trainable_weights(model: nn.Module, path: str | Path, remedy: str = WRITE_AGAIN) -> list[str]:
    """Copy the parameters stored in `path` into `model`; every stored key must exist with the same shape.
    A model sharded by ZeRO-3 is written whole on every rank: then every rank must call this.

    Args:
        remedy: What a damaged file's error tells the reader to do (see `read_safetensors`).

    Returns:
        The names of the parameters loaded.

    Raises:
        WeightsFileError: as `read_safetensors` (damaged, changed since written, NaN or infinity).
    """
    state = read_safetensors(path, remedy)
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    if unknown:
        raise KeyError(f"{path}: {len(unknown)} keys not in the model, e.g. {unknown[:5]}")
    # Under ZeRO-3 every rank gathers the targets, writes them, and keeps the writes (illume.models.sharding).
    with whole(model, [parameters[k] for k in state], keep_writes=True), torch.no_grad():
        mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(parameters[k].shape)}" for k, v in state.items()
                      if v.shape != parameters[k].shape]
        if mismatched:
            raise ValueError(f"{path}: shape mismatch for {mismatched[:5]}")
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    return sorted(state)
