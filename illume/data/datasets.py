"""Loading a split of the configured dataset (the shapes world, an annotation file or a `datasets` dataset)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from PIL import Image

from illume.config import DataConfig
from illume.data.errors import DatasetError
from illume.data.records import SPLITS, Example, verify_image


def load_split(cfg: DataConfig, split: str, *, images_must_exist: bool = False) -> list[Example]:
    """The examples of `split` ("train", "val" or "test"), truncated to the configured maximum.

    Args:
        images_must_exist: Also check every image file, for commands that go on to load a model: a missing one
            (a stat) and, unless `data.check_images` is false, an unreadable one (header, size, `Image.verify`;
            no decoding) then fail before the model loads (or pre-trains), not minutes later.

    Raises:
        DatasetError: a malformed file or row, a split with no examples, or (images_must_exist) a missing or
            unreadable image, named with its row.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    where = f"{split} split ({cfg.kind})"
    if cfg.kind == "shapes":
        from illume.data.shapes import ShapesWorld

        examples = ShapesWorld(**asdict(cfg.shapes)).examples(split)
    elif cfg.kind == "hf":
        from illume.data.hf_datasets import load_hf_split  # imports `datasets`: only for this kind

        try:
            # Only the rows the run uses are read; images held as bytes are checked while read (those given as
            # files below, as every kind's are).
            examples = load_hf_split(cfg.hf, split, cfg.image_dir, limit=_max_examples(cfg, split)[1],
                                     verify_images=images_must_exist and cfg.check_images)
        except (OSError, ValueError, KeyError) as error:
            raise DatasetError(f"{where}: {error}") from error
    else:
        from illume.data.loaders import load_examples_from_file

        path = getattr(cfg, f"{split}_path")
        if path is None:
            raise DatasetError(f"data.{split}_path is not set (data.kind={cfg.kind} reads its splits from files)")
        try:
            examples = load_examples_from_file(path, cfg.kind, cfg.image_dir, split_name=split)
        except (OSError, ValueError, KeyError) as error:
            raise DatasetError(f"{where}: {error}") from error
    examples = _truncate(examples, cfg, split, where)
    if images_must_exist:
        _check_image_files(examples, where, open_files=cfg.check_images)
    return examples


def _truncate(examples: list[Example], cfg: DataConfig, split: str, where: str) -> list[Example]:
    """The first `data.max_<split>_examples` examples; a split left with none is an error, since a round, a
    baseline or a score over 0 examples would run and report nothing."""
    if not examples:
        raise DatasetError(f"{where}: {_source(cfg, split)} has no examples")
    key, limit = _max_examples(cfg, split)
    if limit is None:
        return examples
    if limit < 1:
        raise DatasetError(f"{where}: data.{key}={limit} leaves no examples (must be at least 1; "
                           f"{_source(cfg, split)} has {len(examples)})")
    return examples[:limit]


def _max_examples(cfg: DataConfig, split: str) -> tuple[str | None, int | None]:
    """The setting that caps the split's examples and its value (None, None for the test split, which has none)."""
    key = {"train": "max_train_examples", "val": "max_val_examples"}.get(split)
    return key, getattr(cfg, key) if key is not None else None


def _source(cfg: DataConfig, split: str) -> str:
    """Where the split's examples come from, as the setting or file a user would change."""
    if cfg.kind == "shapes":
        return (f"the shapes world (data.shapes.num_{split}_scenes={getattr(cfg.shapes, f'num_{split}_scenes')}, "
                f"data.shapes.questions_per_scene={cfg.shapes.questions_per_scene})")
    if cfg.kind == "hf":
        return f"{cfg.hf.path} (data.hf.splits.{split}={getattr(cfg.hf.splits, split)!r})"
    return str(getattr(cfg, f"{split}_path"))


def _check_image_files(examples: list[Example], where: str, *, open_files: bool) -> None:
    """A stat per image file and, with `open_files`, `records.verify_image` (header, size, integrity, no
    decoding). In-memory images (the shapes world) are skipped. Every file is checked, so the error can say how
    many more are bad: fixing one and rerunning to find the next would take a run start each."""
    files = [e for e in examples if not isinstance(e.image, Image.Image)]
    missing = [e for e in files if not Path(e.image).is_file()]
    if missing:
        more = f"; {len(missing) - 1} more images are missing" if len(missing) > 1 else ""
        raise DatasetError(f"{where}: image not found: {missing[0].image} (row {missing[0].source}){more}")
    if not open_files:
        return
    from tqdm import tqdm  # imported here: only this path needs it

    errors = []
    # A bar only where the check takes a while (scripts/bench_images.py: 2,000 PNGs about a second, JPEGs a
    # fifth of that); below, it is noise.
    for example in tqdm(files, desc=f"checking {where} images", unit="img", leave=False,
                        disable=len(files) < 2000):
        try:
            verify_image(example)
        except DatasetError as error:
            errors.append(error)
    if errors:
        more = f"; {len(errors) - 1} more images cannot be read" if len(errors) > 1 else ""
        raise DatasetError(f"{where}: {errors[0]}{more}")
