"""Loading a split of the configured dataset (the shapes world or an annotation file)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from PIL import Image

from illume.config import DataConfig
from illume.data.errors import DatasetError
from illume.data.records import Example

SPLITS = ("train", "val", "test")


def load_split(cfg: DataConfig, split: str, *, images_must_exist: bool = False) -> list[Example]:
    """The examples of `split` ("train", "val" or "test"), truncated to the configured maximum.

    Args:
        images_must_exist: Also check that every image file exists, for commands that go on to load a model:
            a missing image then fails before the model loads (or pre-trains), not minutes later.

    Raises:
        DatasetError: a malformed file or row, or (images_must_exist) a missing image, named with its row.
    """
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
    examples = examples[:limit] if limit is not None else examples
    if images_must_exist:
        _check_image_files(examples, f"{split} split ({cfg.kind})")
    return examples


def _check_image_files(examples: list[Example], where: str) -> None:
    """A stat per image file, no decoding: cheap even for thousands of COCO images. A corrupt file is still
    found only when it is read (`records.load_image`), as a `DatasetError` too."""
    missing = [e for e in examples if not isinstance(e.image, Image.Image) and not Path(e.image).is_file()]
    if missing:
        more = f"; {len(missing) - 1} more images are missing" if len(missing) > 1 else ""
        raise DatasetError(f"{where}: image not found: {missing[0].image} (row {missing[0].source}){more}")
