"""Check an image folder against annotation files before a long run (the library side of
`scripts/prepare_vqax.py`).

Images are resolved by the loaders themselves (`load_examples_from_file` with the same folder), so an image
reported found is exactly the file a run would read, and this module holds no second copy of the COCO naming
rules. A missing image is reported under the first name the loader tries (for VQA-X e.g.
`COCO_val2014_000000006771.jpg`); the loader also accepts it in a `val2014/`/`train2014/` sub-folder or under
the plain COCO 2017 name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illume.data.loaders import Format, load_examples_from_file
from illume.data.records import Example, load_image

FORMATS = ("vqax", "vqax_nle", "jsonl")


@dataclass
class ImageIssue:
    """One image file that a run would fail on, with the rows that need it."""

    file: str
    """The file, relative to the image folder when it lies inside it."""
    rows: list[str]
    """The `source` of every row using it, e.g. `val.json:17`."""
    error: str = ""
    """Why it cannot be read (unreadable images only)."""


@dataclass
class FileCheck:
    """What one annotation file needs from the image folder."""

    annotations: str
    format: str
    rows: int = 0
    images: int = 0
    """Distinct image files the rows need."""
    found: int = 0
    missing: list[ImageIssue] = field(default_factory=list)
    unreadable: list[ImageIssue] = field(default_factory=list)
    """Found but not decodable; only looked for with `verify=True`."""
    error: str = ""
    """Set when the annotation file is malformed or unreadable; the counts are then meaningless."""


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The loader format of an annotation file: `.jsonl` by its suffix, otherwise by the JSON's shape.

    ILLUME's column JSON is an object with an "image_id" column; NLX-GPT's object (keyed by question id) and
    e-ViL's list are both read by "vqax_nle". Unparseable JSON gets "vqax", whose loader then reports where
    the syntax error is.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        return "vqax"
    return "vqax" if isinstance(data, dict) and isinstance(data.get("image_id"), dict) else "vqax_nle"


def check_annotations(
    path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    format: Format | None = None,
    *,
    split_name: str | None = None,
    verify: bool = False,
) -> FileCheck:
    """Count the rows of an annotation file and the images they need, found and missing, in `image_dir`.

    Args:
        path: The annotation file.
        image_dir: The image folder, as a run's `data.image_dir`.
        format: "vqax", "vqax_nle" or "jsonl"; None detects it (`detect_format`).
        split_name: COCO split hint for "vqax" (see `load_vqax_columns`); defaults to the file's stem.
        verify: Also decode every found image, as a run would, to catch corrupt files (slow: a progress bar).

    Returns:
        The check; issues are listed in the order the file first uses each image. A malformed file gives a
        check with `error` set (naming the file, the row and the field) instead of raising.
    """
    folder = Path(image_dir)
    try:
        format = format or detect_format(path)
        examples = load_examples_from_file(path, format, folder, split_name=split_name)
    except (OSError, ValueError) as error:
        return FileCheck(str(path), format or "?", error=str(error))

    # Rows sharing an image are one file to fetch; dicts keep the order the file first uses each image.
    by_image: dict[Path, list[Example]] = {}
    for example in examples:
        by_image.setdefault(Path(example.image), []).append(example)
    check = FileCheck(str(path), format, rows=len(examples), images=len(by_image))
    found = []
    for image, users in by_image.items():
        issue = ImageIssue(_relative(image, folder), [e.source for e in users])
        if image.is_file():
            found.append((issue, users[0]))
        else:
            check.missing.append(issue)
    check.found = len(found)
    if verify:
        from tqdm import tqdm  # imported here: only this slow path needs it

        bar = tqdm(found, desc=f"verifying {Path(path).name}", unit="img", leave=False, disable=not found)
        for issue, example in bar:
            try:
                load_image(example)  # the decode a run does, so "readable" means a run can read it
            except (OSError, ValueError) as error:
                issue.error = str(error.__cause__ or error)  # PIL's own words; the file and rows are in issue
                check.unreadable.append(issue)
    return check


def exit_code(checks: list[FileCheck]) -> int:
    """2 if an annotation file is malformed, else 1 if an image is missing or unreadable, else 0."""
    if any(check.error for check in checks):
        return 2
    return 1 if any(check.missing or check.unreadable for check in checks) else 0


def report(checks: list[FileCheck], image_dir: str | os.PathLike[str], verified: bool) -> dict[str, Any]:
    """The JSON report: per file its counts and every missing or unreadable image with the rows needing it."""
    files = []
    for check in checks:
        entry: dict[str, Any] = {"annotations": check.annotations, "format": check.format}
        if check.error:
            entry["error"] = check.error
        else:
            entry.update(
                rows=check.rows, images=check.images, found=check.found,
                missing=[{"file": i.file, "rows": i.rows} for i in check.missing],
                unreadable=[{"file": i.file, "rows": i.rows, "error": i.error} for i in check.unreadable],
            )
        files.append(entry)
    return {"image_dir": str(image_dir), "verified": verified, "exit_code": exit_code(checks), "files": files}


def _relative(image: Path, folder: Path) -> str:
    """`image` relative to `folder` when inside it (JSONL may name absolute paths elsewhere)."""
    try:
        return image.relative_to(folder).as_posix()
    except ValueError:
        return str(image)
