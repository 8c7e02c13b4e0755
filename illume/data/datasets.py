"""Loading a split of the configured dataset (the shapes world or an annotation file)."""

from __future__ import annotations

from dataclasses import asdict

from illume.config import DataConfig
from illume.data.records import Example

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file, the row and the field."""


def load_split(cfg: DataConfig, split: str) -> list[Example]:
    """The examples of `split` ("train", "val" or "test"), truncated to the configured maximum."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if cfg.kind == "shapes":
        from illume.data.shapes import ShapesWorld

        examples = ShapesWorld(**asdict(cfg.shapes)).examples(split)
    else:
        from illume.data.loaders import load_examples_from_file

        path = getattr(cfg, f"{split}_path")
        if path is None:
            raise DatasetError(f"data.{split}_path is not set (data.kind={cfg.kind} reads its splits from files)")
        try:
            examples = load_examples_from_file(path, cfg.kind, cfg.image_dir, split_name=split)
        except (OSError, ValueError, KeyError) as error:
            raise DatasetError(f"{split} split ({cfg.kind}): {error}") from error
    limit = {"train": cfg.max_train_examples, "val": cfg.max_val_examples}.get(split)
    return examples[:limit] if limit is not None else examples
