"""Read visual-question data sets from disk into `Example` records.

Four layouts are read by three loaders, plus a dispatcher (`load_examples_from_file`):

* `load_vqax_columns`: VQA-X as ILLUME ships it (pandas `DataFrame.to_json()` column orient).
* `load_vqax_nle`: VQA-X as NLX-GPT ships it (one object per question id) or as e-ViL ships it (a list of
  records); the JSON's top level tells which.
* `load_jsonl`: a generic JSON-lines file, for data sets of our own.

Every example gets `source = "<file name>:<row key>"` (the row key is the column-JSON row, NLX-GPT's question
id, e-ViL's 0-based list index, or the JSONL line number), and every error names the file, the row and the
field, so a bad row can be found and fixed by hand. Images are not opened while loading unless
`check_images=True`: `Example.image` is a path and `records.load_image` reads it later, naming the file and
row if it is missing or corrupt.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from illume.data.records import Example, load_image

Format = Literal["vqax", "vqax_nle", "jsonl"]

UNSET_IMAGE_DIR = Path("<image_dir not set>")
"""Stand-in folder for image paths when a loader is given no image folder.

Annotation-only work (tests, statistics, exports) needs no images, so loading succeeds; `load_image` on such an
example fails with `image not found: <image_dir not set>/COCO_val2014_....jpg (row val.json:17)`, which says
what is missing. The name cannot exist by accident in the working directory.
"""

_VQAX_REQUIRED = ("image_id", "question", "question_id", "multiple_choice_answer", "explanation")
# Optional because they add nothing a loader needs: a split with one explanation per question (e.g. a train
# split) may lack explanation_2/3, and answer_type has no field in `Example`.
_VQAX_OPTIONAL = ("question_type", "answer_type", "explanation_2", "explanation_3")
_VQAX_EXPLANATIONS = ("explanation", "explanation_2", "explanation_3")


def load_vqax_columns(
    path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None = None,
    split_name: str | None = None,
    *,
    check_images: bool = False,
) -> list[Example]:
    """Load VQA-X in ILLUME's column JSON (`utils/vqax_splits/{val,test}.json`).

    The file is pandas' default `DataFrame.to_json()` layout, `{column: {"<row>": value}}`, with columns
    image_id, question, question_id, multiple_choice_answer, question_type, answer_type, explanation,
    explanation_2, explanation_3; question_type, answer_type, explanation_2 and explanation_3 may be absent.

    Images are looked up in `image_dir` by COCO image id, under the 2014 names ILLUME uses
    (`COCO_val2014_000000123456.jpg`, `COCO_train2014_...`), directly or in a `val2014/`/`train2014/`
    subfolder, or under the plain 2017 name (`000000123456.jpg`). The 2014 folder named by the split is tried
    first (ILLUME's train split is on COCO train2014, its val and test splits on val2014), then the other one;
    COCO ids are unique across both, so the first file found is the right one. If none exists, the first
    candidate is kept and fails when loaded.

    Args:
        path: The column JSON file.
        image_dir: Folder with the COCO images. None keeps paths under `UNSET_IMAGE_DIR`, which load
            fine for annotation-only use and fail with a clear error only when an image is read.
        split_name: "train", "val" or "test", to guess the COCO folder first; defaults to the file's stem.
        check_images: Open every image now, so a missing or corrupt one fails at load time.

    Returns:
        One example per row, in file order: id is the question id, answers is [multiple_choice_answer],
        explanations are the non-empty explanation columns.

    Raises:
        ValueError: Invalid JSON, a missing column, a malformed row, or a duplicate question id.
    """
    path = Path(path)
    table = _read_json(path)
    if not isinstance(table, dict):
        raise ValueError(
            f"{path}: expected pandas' column layout {{column: {{row: value}}}}, got a JSON "
            f"{type(table).__name__} (was it written with another orient, e.g. 'records'?)"
        )
    for column in _VQAX_REQUIRED:
        if column not in table:
            raise ValueError(f"{path}: missing column {column!r} (columns: {sorted(table)})")
    columns = {name: table[name] for name in _VQAX_REQUIRED + _VQAX_OPTIONAL if name in table}
    for name, values in columns.items():
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}: column {name!r} must map row keys to values, got {type(values).__name__}"
            )

    hint = (split_name or path.stem).lower()
    coco_splits = ("train2014", "val2014") if "train" in hint else ("val2014", "train2014")
    folder = Path(image_dir) if image_dir is not None else None

    # Rows are the union of the required columns' keys, so a row missing from one column is reported as a
    # missing field rather than dropped.
    row_keys = dict.fromkeys(key for name in _VQAX_REQUIRED for key in columns[name])
    rows = []
    for key in row_keys:
        where = f"{path}, row {key}"
        row = {name: values[key] for name, values in columns.items() if key in values}
        question_id = _integer(row, "question_id", where)
        image_id = _integer(row, "image_id", where)
        names = [f"COCO_{split}_{image_id:012d}.jpg" for split in coco_splits]
        candidates = names + [f"{split}/{name}" for split, name in zip(coco_splits, names)]
        example = Example(
            id=str(question_id),
            image=_find_image(folder, candidates + [f"{image_id:012d}.jpg"]),
            question=_text(row, "question", where),
            answers=[_text(row, "multiple_choice_answer", where)],
            explanations=[e for name in _VQAX_EXPLANATIONS if (e := _text(row, name, where, required=False))],
            question_type=_text(row, "question_type", where, required=False),
            source=f"{path.name}:{key}",
        )
        rows.append((f"row {key}", example))
    return _finish(path, rows, check_images)


def load_vqax_nle(
    path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None = None,
    *,
    check_images: bool = False,
) -> list[Example]:
    """Load VQA-X in NLX-GPT's layout or in e-ViL's, whichever the file holds.

    * NLX-GPT (`nle_data/VQA-X/vqaX_{train,val,test}.json`): one object keyed by question id (a string), each
      value holding "question", "answers" (the ten VQA v2 annotator answers, `{"answer", "answer_confidence",
      "answer_id"}`), "image_id" (a string), "image_name" (`COCO_val2014_000000262148.jpg`) and "explanation"
      (a list of strings). Rows are named by question id.
    * e-ViL (Kayser et al., 2021, read by its `eViL_data.py`): a LXMERT-style list of records with
      "question_id", "img_id" (`COCO_val2014_000000262148`, no extension), "sent" (the question), "label"
      (`{answer: score}`), "explanation" (a non-empty list of strings) and optionally "question_type" and
      "answer_type" (which has no field in `Example`). Rows are named by their 0-based index in the list.

    Differences between the variants of VQA-X that are about:

    * NLX-GPT's explanations were lower-cased and had every "." removed by its preprocessing, unlike the
      original VQA-X and ILLUME's column files; compare metrics only between references of the same variant.
    * NLX-GPT picks its canonical answer by majority vote after the VQA evaluation normalisation (punctuation,
      number words to digits, articles dropped). Here the vote is over the answers as written (stripped), so
      in rare cases ("two" vs "2") the canonical answer differs from NLX-GPT's.
    * e-ViL's canonical answer is the label with the highest score. VQA soft scores saturate at 1, so two
      answers can tie at the top where a majority vote would not; the first in the file then wins.
    * NLX-GPT's val split (1,459 questions) is the standard VQA-X val split, which ILLUME divides into its val
      (729) and test (730) files; NLX-GPT's test split (1,968) is the standard VQA-X test split.

    Images are `image_dir/<name>`, or `image_dir/{train2014,val2014}/<name>` as NLX-GPT arranges them (chosen
    from the name), or the plain 2017 name `image_dir/000000262148.jpg`; the first that exists is used. The
    name is "image_name" (NLX-GPT) or "img_id" + ".jpg" (e-ViL).

    Args:
        path: The JSON file.
        image_dir: Folder with the COCO images; None keeps paths under `UNSET_IMAGE_DIR` (see there).
        check_images: Open every image now, so a missing or corrupt one fails at load time.

    Returns:
        One example per question, in file order; id is the question id. NLX-GPT: answers holds the most
        frequent answer first (ties: the first seen), then the other distinct answers by decreasing frequency.
        e-ViL: answers are the labels by decreasing score (ties: file order).

    Raises:
        ValueError: Invalid JSON, another layout, a malformed entry, or a question id given twice.
    """
    path = Path(path)
    data = _read_json(path)
    folder = Path(image_dir) if image_dir is not None else None
    if isinstance(data, dict):
        rows = [_nlx_gpt_row(path, str(key), entry, folder) for key, entry in data.items()]
    elif isinstance(data, list):
        rows = [_evil_row(path, index, record, folder) for index, record in enumerate(data)]
    else:
        raise ValueError(
            f"{path}: expected NLX-GPT's object keyed by question id or e-ViL's list of records, "
            f"got {type(data).__name__}"
        )
    return _finish(path, rows, check_images)


def load_jsonl(
    path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None = None,
    *,
    check_images: bool = False,
) -> list[Example]:
    """Load a JSON-lines file, one example per line (blank lines are skipped).

    Fields of a line:

    * "image" (required): image path; a relative one is taken from `image_dir`, or from the JSONL file's
      folder when `image_dir` is None.
    * "question" (required): non-empty string.
    * "answer" (string) and/or "answers" (list of strings), at least one: with both, "answer" is the
      canonical answer and "answers" adds the others.
    * "id" (optional): string or integer; defaults to the line number (1-based), which is stable only as
      long as lines are not inserted or removed above.
    * "explanation" (string) and/or "explanations" (list of strings), optional; empty ones are dropped.
    * "question_type" (optional): string.

    Args:
        path: The JSONL file.
        image_dir: Folder relative image paths start from; defaults to the JSONL file's folder.
        check_images: Open every image now, so a missing or corrupt one fails at load time.

    Returns:
        One example per non-blank line, in file order; `source` is `"<file name>:<line number>"`.

    Raises:
        ValueError: Invalid JSON on a line, a malformed line, or a duplicate id.
    """
    path = Path(path)
    folder = Path(image_dir) if image_dir is not None else path.parent
    rows = []
    # utf-8-sig: a byte-order mark left by some editors would otherwise make line 1 invalid JSON.
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON at column {error.colno}: {error.msg}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            example = Example(
                id=_identifier(record, where, default=str(number)),
                image=folder / _text(record, "image", where),  # an absolute image path replaces the folder
                question=_text(record, "question", where),
                answers=_merge(record, "answer", "answers", where, required=True),
                explanations=_merge(record, "explanation", "explanations", where, required=False),
                question_type=_text(record, "question_type", where, required=False),
                source=f"{path.name}:{number}",
            )
            rows.append((f"line {number}", example))
    return _finish(path, rows, check_images)


def load_examples_from_file(
    path: str | os.PathLike[str],
    format: Format,
    image_dir: str | os.PathLike[str] | None = None,
    *,
    split_name: str | None = None,
    check_images: bool = False,
) -> list[Example]:
    """Load examples with the loader for `format`.

    Args:
        path: The annotation file.
        format: "vqax" (`load_vqax_columns`), "vqax_nle" (`load_vqax_nle`) or "jsonl" (`load_jsonl`).
        image_dir: Image folder, as the chosen loader reads it.
        split_name: COCO split hint, used by "vqax" only.
        check_images: Open every image now, so a missing or corrupt one fails at load time.

    Returns:
        The examples, in file order.

    Raises:
        ValueError: An unknown format, or whatever the chosen loader raises.
    """
    if format == "vqax":
        return load_vqax_columns(path, image_dir, split_name, check_images=check_images)
    if format == "vqax_nle":
        return load_vqax_nle(path, image_dir, check_images=check_images)
    if format == "jsonl":
        return load_jsonl(path, image_dir, check_images=check_images)
    raise ValueError(f"unknown format {format!r} for {path}; expected one of 'vqax', 'vqax_nle', 'jsonl'")


def check_example_images(examples: Sequence[Example]) -> None:
    """Open every example's image, so that a missing or corrupt file fails now rather than mid-run.

    Raises:
        ImageNotFoundError: An image file does not exist (a FileNotFoundError; the message names the file and
            the row).
        DatasetError: An image file cannot be decoded (a ValueError; the message names the file and the row).
    """
    from tqdm import tqdm  # imported here: only this slow path needs it

    # Decoding thousands of COCO images takes a while; a bar is noise for a handful.
    for example in tqdm(
        examples, desc="checking images", unit="img", leave=False, disable=len(examples) < 500
    ):
        load_image(example)


# ---------------------------------------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    """A JSON object with a key given twice (the json module would silently keep the last value)."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` that refuses duplicate keys: in the keyed layouts they would drop rows silently."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _read_json(path: Path) -> Any:
    """Parse a JSON file, with errors naming the file (and the line for syntax errors)."""
    with path.open(encoding="utf-8-sig") as file:  # tolerate a byte-order mark, as in load_jsonl
        text = file.read()
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except _DuplicateKeyError as error:
        raise ValueError(f"{path}: key {error.args[0]!r} appears twice in one JSON object") from None


def _finish(path: Path, rows: Iterable[tuple[str, Example]], check_images: bool) -> list[Example]:
    """Check that ids are unique (naming both rows of a clash), then optionally open every image."""
    first_row: dict[str, str] = {}
    examples = []
    for row, example in rows:
        if example.id in first_row:
            raise ValueError(f"{path}: duplicate id {example.id!r} in {first_row[example.id]} and {row}")
        first_row[example.id] = row
        examples.append(example)
    if check_images:
        check_example_images(examples)
    return examples


def _nlx_gpt_row(path: Path, key: str, entry: Any, folder: Path | None) -> tuple[str, Example]:
    """One entry of NLX-GPT's VQA-X object, as ("row <question id>", example)."""
    where = f"{path}, row {key}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    image_name = _text(entry, "image_name", where)
    image_id = _integer(entry, "image_id", where) if entry.get("image_id") is not None else None
    example = Example(
        id=key,
        image=_find_image(folder, _coco_candidates(image_name, image_id)),
        question=_text(entry, "question", where),
        answers=_vote(entry, where),
        explanations=_texts(entry, "explanation", where),
        source=f"{path.name}:{key}",
    )
    return f"row {key}", example


def _evil_row(path: Path, index: int, record: Any, folder: Path | None) -> tuple[str, Example]:
    """One record of e-ViL's VQA-X list, as ("row <index>", example)."""
    where = f"{path}, row {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    img_id = _text(record, "img_id", where)
    digits = img_id.rpartition("_")[2]  # COCO_val2014_000000262148 -> 000000262148
    image_id = int(digits) if digits.isascii() and digits.isdigit() else None
    example = Example(
        id=str(_integer(record, "question_id", where)),
        image=_find_image(folder, _coco_candidates(f"{img_id}.jpg", image_id)),
        question=_text(record, "sent", where),
        answers=_ranked(record, "label", where),
        explanations=_texts(record, "explanation", where, required=True),
        question_type=_text(record, "question_type", where, required=False),
        source=f"{path.name}:{index}",
    )
    return f"row {index}", example


def _coco_candidates(image_name: str, image_id: int | None) -> list[str]:
    """A COCO 2014 file name as is, then in the 2014 folder it names, then the plain 2017 name (if known)."""
    split = "train2014" if "train" in image_name else "val2014"
    candidates = [image_name, f"{split}/{image_name}"]
    return candidates + [f"{image_id:012d}.jpg"] if image_id is not None else candidates


def _find_image(folder: Path | None, candidates: Sequence[str]) -> Path:
    """The first candidate file that exists under `folder`, else the first candidate (to fail when loaded)."""
    if folder is None:
        return UNSET_IMAGE_DIR / candidates[0]
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    return folder / candidates[0]


def _text(record: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str:
    """A stripped string field; required ones must be present and non-empty, optional ones default to ""."""
    value = record.get(field)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing field {field!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}")
    value = value.strip()
    if required and not value:
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _texts(record: Mapping[str, Any], field: str, where: str, *, required: bool = False) -> list[str]:
    """A list-of-strings field, stripped, empty entries dropped; a required one must keep at least one."""
    value = record.get(field)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing field {field!r}")
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: field {field!r} must be a list of strings, got {value!r}")
    texts = [item.strip() for item in value if item.strip()]
    if required and not texts:
        raise ValueError(f"{where}: field {field!r} is empty")
    return texts


def _merge(record: Mapping[str, Any], one: str, many: str, where: str, *, required: bool) -> list[str]:
    """The singular field first, then the list field's distinct other entries (JSONL answers/explanations)."""
    merged = list(dict.fromkeys([_text(record, one, where, required=False)] + _texts(record, many, where)))
    merged = [item for item in merged if item]
    if required and not merged:
        raise ValueError(
            f"{where}: missing field {one!r} (a string) or {many!r} (a non-empty list of strings)"
        )
    return merged


def _integer(record: Mapping[str, Any], field: str, where: str) -> int:
    """A non-negative integer id, given as an int or a string of digits."""
    value = record.get(field)
    if value is None:
        raise ValueError(f"{where}: missing field {field!r}")
    # pandas writes an int column holding a NaN as floats; 6771003.0 is still a usable id.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: field {field!r} must be a non-negative integer, got {value!r}")
    return value


def _identifier(record: Mapping[str, Any], where: str, default: str) -> str:
    """The optional "id" field as a non-empty string (int ids are accepted), or `default`."""
    value = record.get("id")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ValueError(f"{where}: field 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()


def _vote(entry: Mapping[str, Any], where: str) -> list[str]:
    """Distinct annotator answers, most frequent first; ties keep the order first seen."""
    answers = entry.get("answers")
    if answers is None:
        raise ValueError(f"{where}: missing field 'answers'")
    if not isinstance(answers, list):
        raise ValueError(f"{where}: field 'answers' must be a list, got {type(answers).__name__}")
    texts = []
    for index, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
            raise ValueError(f"{where}: field 'answers'[{index}] must be an object with a string 'answer'")
        if answer["answer"].strip():
            texts.append(answer["answer"].strip())
    if not texts:
        raise ValueError(f"{where}: field 'answers' holds no non-empty answer")
    counts = Counter(texts)
    # sorted() is stable and dict.fromkeys keeps first-seen order, so equal counts stay in that order.
    return sorted(dict.fromkeys(texts), key=lambda text: -counts[text])


def _ranked(record: Mapping[str, Any], field: str, where: str) -> list[str]:
    """The answers of an `{answer: score}` field, highest score first; ties keep file order."""
    label = record.get(field)
    if label is None:
        raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(label, dict):
        raise ValueError(f"{where}: field {field!r} must be an object {{answer: score}}, got {label!r}")
    for answer, score in label.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{where}: field {field!r}[{answer!r}] must be a number, got {score!r}")
    scored = [(answer.strip(), score) for answer, score in label.items() if answer.strip()]
    if not scored:
        raise ValueError(f"{where}: field {field!r} holds no non-empty answer")
    # sorted() is stable, so equal scores stay in file order; dict.fromkeys drops repeats after stripping.
    return list(dict.fromkeys(answer for answer, _ in sorted(scored, key=lambda item: -item[1])))
