"""Reading a Hugging Face `datasets` dataset on disk into `Example` records (data.kind=hf).

Three sources, each read by `datasets`' own reader (imported in this module only, which `load_split` imports
only for this kind, so that nothing else pays for importing `datasets`):

* a `save_to_disk` folder (`load_from_disk`): a DatasetDict, or one Dataset, read as the split `train`;
* parquet, JSON(L) or CSV files: one file (its split is `train`) or a folder of them, whose splits
  `load_dataset` names from the file names (train.csv, validation.csv, test.csv, ...);
* an image folder with a metadata.jsonl or metadata.csv (`load_dataset("imagefolder", data_dir=...)`).

`data.hf.columns` names the column of each field and `data.hf.splits` the dataset's split for each of the
run's. Rows are checked by the JSONL loader's rules (illume.data.loaders: text fields, unique ids), and every
error names the dataset's file or folder, its split, the row index and the column.

Images: a path (a string column, or an `Image` feature that holds only a path, as an image folder's does)
becomes a file `Example.image`, checked and read as every kind's files are. Image bytes (the `Image` feature
of a saved dataset or of a parquet file written by `datasets`, or a binary column) are opened in memory by
`records.image_from_bytes`, with the checks files get (header, the decompression-bomb limit, `Image.verify`
when `data.check_images`), and decoded when first used. They stay in memory for the run, decoded once used
(as the shapes world's images are), so a large dataset is better kept with its images as files.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from illume.config import HFColumnsConfig, HFDataConfig
from illume.data.errors import DatasetError
from illume.data.loaders import _finish, _text, _texts  # the JSONL loader's row rules, so both agree
from illume.data.records import Example, image_from_bytes

FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
"""The file suffixes `data.hf.format` is told from, and the `load_dataset` reader each names."""
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
"""The files that make a folder an image folder (`datasets`' ImageFolder builder)."""
REQUIRED_COLUMNS = ("image", "question", "answer")
"""Fields of `data.hf.columns` whose column every row must have; the others are optional."""
_BATCH_ROWS = 1000  # rows converted from Arrow to Python at a time


def load_hf_split(
    hf: HFDataConfig,
    split: str,
    image_dir: str | None = None,
    *,
    limit: int | None = None,
    verify_images: bool = False,
) -> list[Example]:
    """The examples of the run's `split` from the dataset `data.hf` names.

    Args:
        hf: The `data.hf` settings.
        split: The run's split ("train", "val" or "test"); `hf.splits` gives the dataset's.
        image_dir: Where relative image paths start; None: the folder `hf.path` is or is in.
        limit: Read only the first `limit` rows (`data.max_<split>_examples`); None: all.
        verify_images: Also `Image.verify` each image held as bytes (`data.check_images`, for the commands
            that go on to load a model; image files are checked by `load_split`, as every kind's are).

    Returns:
        One example per row, in the dataset's order; `source` is `"<file or folder name>:<split>:<row>"`.

    Raises:
        DatasetError: The path cannot be read, a split or a column is missing, a row is malformed, an id
            repeats, or an image held as bytes cannot be read; named with the file or folder, split, row and
            column (for a missing column, the dataset's columns).
    """
    if hf.path is None:
        raise DatasetError("data.hf.path is not set (data.kind=hf reads its splits from a dataset there)")
    path = Path(hf.path).expanduser()
    splits = _read(path, hf.format or detect_format(path))
    image_base = Path(image_dir) if image_dir is not None else (path if path.is_dir() else path.parent)
    examples, image_errors, rows_left = [], [], limit
    for name, start, stop in _row_ranges(splits, getattr(hf.splits, split), path, split):
        if rows_left is not None:
            stop = min(stop, start + max(rows_left, 0))
            rows_left -= stop - start
        columns = _columns(splits[name], hf.columns, f"{path}, split {name!r}")
        table = splits[name].select_columns(list(dict.fromkeys(columns.values()))).with_format("arrow")
        for batch_start in range(start, stop, _BATCH_ROWS):
            rows = table[batch_start:min(batch_start + _BATCH_ROWS, stop)].to_pylist()
            for index, row in enumerate(rows, start=batch_start):
                where = f"{path}, split {name!r}, row {index}"
                source = f"{path.name}:{name}:{index}"
                try:
                    image = _image(row, columns["image"], image_base, where, source, verify_images)
                except DatasetError as error:  # every image is checked, so the error can say how many are bad
                    image_errors.append(error)
                    continue
                example = Example(
                    id=_identifier(row, columns.get("id"), where, default=f"{name}-{index}"),
                    image=image,
                    question=_text(row, columns["question"], where),
                    answers=_strings(row, columns["answer"], where, required=True),
                    explanations=_strings(row, columns.get("explanations"), where, required=False),
                    question_type=_text(row, columns["question_type"], where, required=False)
                    if "question_type" in columns else "",
                    source=source,
                )
                examples.append((f"split {name!r}, row {index}", example))
    if image_errors:
        more = f"; {len(image_errors) - 1} more images cannot be read" if len(image_errors) > 1 else ""
        raise DatasetError(f"{image_errors[0]}{more}")
    return _finish(path, examples, check_images=False)


def detect_format(path: Path) -> str:
    """The reader for `path` when `data.hf.format` is not set: `disk` for a `save_to_disk` folder,
    `imagefolder` for a folder with a metadata file, else the one format of the file or the folder's files.

    Raises:
        DatasetError: `path` does not exist, or its format cannot be told.
    """
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise DatasetError(f"data.hf.path {path}: cannot tell its format from the suffix "
                               f"{path.suffix!r}; set data.hf.format (known: {sorted(FILE_FORMATS)})")
        return FILE_FORMATS[path.suffix.lower()]
    if not path.is_dir():
        raise DatasetError(f"data.hf.path {path} does not exist")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    files = [p for p in path.rglob("*") if p.is_file()]
    if any(p.name in METADATA_FILES for p in files):
        return "imagefolder"
    formats = sorted({FILE_FORMATS[p.suffix.lower()] for p in files if p.suffix.lower() in FILE_FORMATS})
    if len(formats) == 1:
        return formats[0]
    found = f"files of several formats ({', '.join(formats)})" if formats else (
        f"no dataset_dict.json or state.json (save_to_disk), no {' or '.join(METADATA_FILES)} (imagefolder) "
        f"and no {'/'.join(FILE_FORMATS)} file")
    raise DatasetError(f"data.hf.path {path}: cannot tell its format, it holds {found}; set data.hf.format")


def _read(path: Path, format: str) -> dict[str, datasets.Dataset]:
    """The dataset's splits by name, read by `datasets`."""
    try:
        if format == "disk":
            loaded = datasets.load_from_disk(str(path))
        elif format == "imagefolder" or path.is_dir():
            loaded = datasets.load_dataset(format, data_dir=str(path))
        else:
            loaded = datasets.load_dataset(format, data_files=str(path))
    except Exception as error:  # `datasets` raises many types: its own, Arrow's, OSError, ValueError
        cause = error.__cause__ if isinstance(error, datasets.exceptions.DatasetGenerationError) else None
        reason = f"{error}: {type(cause).__name__}: {cause}" if cause is not None else str(error)
        raise DatasetError(f"{path}: cannot be read as {format} by `datasets` "
                           f"({type(error).__name__}: {reason})") from error
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _row_ranges(splits: dict[str, datasets.Dataset], spec: str, path: Path,
                split: str) -> list[tuple[str, int, int]]:
    """The rows `data.hf.splits.<split>` names, as (dataset split, first row, row after the last) ranges."""
    try:
        instructions = datasets.ReadInstruction.from_spec(spec).to_absolute(
            {name: len(dataset) for name, dataset in splits.items()})
    except (ValueError, KeyError, AssertionError) as error:
        raise DatasetError(f"{path}: data.hf.splits.{split}={spec!r} cannot be read ({error}); the dataset's "
                           f"splits: {sorted(splits)}") from error
    return [(instruction.splitname, instruction.from_, instruction.to) for instruction in instructions]


def _columns(dataset: datasets.Dataset, columns: HFColumnsConfig, where: str) -> dict[str, str]:
    """{field: the dataset's column} for every field whose column is there.

    Raises:
        DatasetError: A required field's column is missing, or an optional one's set to a name that is not
            there (a name left at its default may be missing); naming the setting and the dataset's columns.
    """
    present, defaults, found = dataset.column_names, HFColumnsConfig(), {}
    for f in fields(columns):
        name = getattr(columns, f.name)
        if name in present:
            found[f.name] = name
        elif f.name in REQUIRED_COLUMNS or name != getattr(defaults, f.name):
            raise DatasetError(f"{where}: missing column {name!r} (data.hf.columns.{f.name}); its columns: "
                               f"{present}")
    return found


def _image(row: dict[str, Any], column: str, base: Path, where: str, source: str,
           verify: bool) -> Path | Image.Image:
    """The row's image: a file path (relative ones from `base`), or image bytes opened in memory."""
    value = row.get(column)
    name = "bytes"  # what an error calls an image stored without a file name
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:  # how an `Image` feature is stored
        if value.get("bytes") is None:
            value = value.get("path")
        else:
            name, value = value.get("path") or name, value["bytes"]
    if isinstance(value, bytes):
        return image_from_bytes(value, name, f" (column {column!r}, row {source})", verify=verify)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {column!r} must be an image (an Image feature, image bytes or a "
                         f"path), got {type(value).__name__}")
    return base / _text({column: value}, column, where)  # an absolute path replaces the base


def _strings(row: dict[str, Any], column: str | None, where: str, *, required: bool) -> list[str]:
    """A column holding one string or a list of strings, stripped, empty ones dropped; a required one must
    keep at least one."""
    if column is None:
        return []
    if isinstance(row.get(column), list):
        return _texts(row, column, where, required=required)
    text = _text(row, column, where, required=required)
    return [text] if text else []


def _identifier(row: dict[str, Any], column: str | None, where: str, default: str) -> str:
    """The id column's value as a non-empty string (integers are accepted), or `default` without one."""
    value = row.get(column) if column is not None else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ValueError(f"{where}: field {column!r} must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()
