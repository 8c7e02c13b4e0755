"""Tests for illume/data/loaders.py: each layout on small fixtures, the real VQA-X val split, and errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from illume.data.datasets import DatasetError
from illume.data.loaders import (
    UNSET_IMAGE_DIR,
    load_examples_from_file,
    load_jsonl,
    load_vqax_columns,
    load_vqax_nle,
)
from illume.data.records import load_image

ASSETS = Path(__file__).parent / "assets" / "loaders"
COCO = ASSETS / "coco"
COLUMNS = ASSETS / "vqax_columns.json"
NLE = ASSETS / "vqax_nle.json"
EVIL = ASSETS / "vqax_evil.json"
JSONL = ASSETS / "examples.jsonl"
# ILLUME's val split, kept outside the repository (see ../shared/data/vqax/README.md).
SHARED_VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqax" / "val.json"


def message(*parts: str) -> str:
    """A `match` pattern requiring `parts` in this order, each taken literally."""
    return ".*".join(re.escape(part) for part in parts)


def columns_copy(tmp_path: Path, edit: Any = None, name: str = "cols.json") -> Path:
    """Write the column fixture, changed by `edit(table)`, to tmp_path and return its path."""
    table = json.loads(COLUMNS.read_text())
    if edit is not None:
        edit(table)
    path = tmp_path / name
    path.write_text(json.dumps(table))
    return path


def nle_copy(tmp_path: Path, edit: Any = None, name: str = "nle.json") -> Path:
    """Write the NLX-GPT fixture, changed by `edit(data)`, to tmp_path and return its path."""
    data = json.loads(NLE.read_text())
    if edit is not None:
        edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def evil_copy(tmp_path: Path, edit: Any = None, name: str = "evil.json") -> Path:
    """Write the e-ViL fixture, changed by `edit(records)`, to tmp_path and return its path."""
    records = json.loads(EVIL.read_text())
    if edit is not None:
        edit(records)
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def write_jsonl(tmp_path: Path, *lines: Any, name: str = "bad.jsonl") -> Path:
    """Write one JSONL line per item (strings verbatim, anything else as JSON) and return the path."""
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- VQA-X, ILLUME's column layout -------------------------------------------------------------------------


def test_vqax_columns_fixture():
    examples = load_vqax_columns(COLUMNS, image_dir=COCO)

    assert [e.id for e in examples] == ["42000", "7001", "99002"]
    assert [e.source for e in examples] == [
        "vqax_columns.json:10",
        "vqax_columns.json:11",
        "vqax_columns.json:12",
    ]
    first = examples[0]
    assert first.question == "What color is the square?"
    assert first.answers == ["red"] and first.answer == "red"
    assert first.explanations == [
        "The square in the middle is red.",
        "The shape is filled with red.",
        "It is painted red.",
    ]
    assert first.question_type == "what color is the"
    # Empty and null extra explanations are dropped.
    assert [len(e.explanations) for e in examples] == [3, 1, 1]
    # COCO 2014 name, plain 2017 name, and (missing) the first 2014 candidate.
    assert examples[0].image == COCO / "COCO_val2014_000000000042.jpg"
    assert examples[1].image == COCO / "000000000007.jpg"
    assert examples[2].image == COCO / "COCO_val2014_000000000099.jpg"
    assert load_image(examples[0]).size == (16, 16)


def test_vqax_columns_without_image_dir_fails_only_when_loaded():
    examples = load_vqax_columns(COLUMNS)

    assert examples[0].image == UNSET_IMAGE_DIR / "COCO_val2014_000000000042.jpg"
    with pytest.raises(FileNotFoundError, match=message("image_dir not set", "(row vqax_columns.json:10)")):
        load_image(examples[0])


def test_vqax_columns_split_name_picks_the_coco_folder_first():
    examples = load_vqax_columns(COLUMNS, split_name="train")
    assert examples[0].image == UNSET_IMAGE_DIR / "COCO_train2014_000000000042.jpg"
    # The split hint only orders the candidates: an existing val2014 file is still found.
    found = load_vqax_columns(COLUMNS, image_dir=COCO, split_name="train")
    assert found[0].image == COCO / "COCO_val2014_000000000042.jpg"


def test_vqax_columns_finds_images_in_coco_subfolders(tmp_path):
    (tmp_path / "train2014").mkdir()
    shutil.copy(
        COCO / "COCO_val2014_000000000042.jpg", tmp_path / "train2014" / "COCO_train2014_000000000007.jpg"
    )

    examples = load_vqax_columns(COLUMNS, image_dir=tmp_path)

    assert examples[1].image == tmp_path / "train2014" / "COCO_train2014_000000000007.jpg"


def test_vqax_columns_on_illume_val_split():
    if not SHARED_VAL.is_file():
        pytest.skip(f"ILLUME's VQA-X val split not present at {SHARED_VAL}")

    examples = load_vqax_columns(SHARED_VAL)

    assert len(examples) == 729
    assert len({e.id for e in examples}) == 729
    assert all(len(e.explanations) == 3 for e in examples)
    assert all(e.question and e.answer for e in examples)
    assert examples[0].id == "6771003" and examples[0].source == "val.json:0"
    assert examples[0].image == UNSET_IMAGE_DIR / "COCO_val2014_000000006771.jpg"


def test_vqax_columns_missing_column(tmp_path):
    path = columns_copy(tmp_path, lambda table: table.pop("multiple_choice_answer"))
    with pytest.raises(ValueError, match=message("cols.json", "missing column 'multiple_choice_answer'")):
        load_vqax_columns(path)


@pytest.mark.parametrize(
    ("column", "row", "value", "expected"),
    [
        ("question", "11", "  ", "field 'question' is empty"),
        ("question", "10", 3, "field 'question' must be a string"),
        ("question_id", "12", "abc", "field 'question_id' must be a non-negative integer"),
        ("image_id", "10", None, "missing field 'image_id'"),
        ("multiple_choice_answer", "11", "", "field 'multiple_choice_answer' is empty"),
        ("explanation_2", "10", ["a list"], "field 'explanation_2' must be a string"),
    ],
)
def test_vqax_columns_malformed_row(tmp_path, column, row, value, expected):
    path = columns_copy(tmp_path, lambda table: table[column].__setitem__(row, value))
    with pytest.raises(ValueError, match=message("cols.json", f"row {row}", expected)):
        load_vqax_columns(path)


def test_vqax_columns_row_missing_from_a_column(tmp_path):
    path = columns_copy(tmp_path, lambda table: table["question"].pop("12"))
    with pytest.raises(ValueError, match=message("cols.json", "row 12", "missing field 'question'")):
        load_vqax_columns(path)


def test_vqax_columns_duplicate_question_ids(tmp_path):
    path = columns_copy(tmp_path, lambda table: table["question_id"].__setitem__("12", 42000))
    with pytest.raises(ValueError, match=message("cols.json", "duplicate id '42000'", "row 10", "row 12")):
        load_vqax_columns(path)


def test_vqax_columns_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"image_id": {"0": 1},\n "question": {"0": "Why?"\n')
    with pytest.raises(ValueError, match=message("broken.json", "invalid JSON at line 3")):
        load_vqax_columns(path)


def test_vqax_columns_rejects_records_orient(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"image_id": 1, "question": "Why?"}]))
    with pytest.raises(ValueError, match=message("records.json", "column layout", "got a JSON list")):
        load_vqax_columns(path)


# --- VQA-X, NLX-GPT's layout --------------------------------------------------------------------------------


def test_vqax_nle_fixture():
    examples = load_vqax_nle(NLE, COCO)

    assert [e.id for e in examples] == ["262148000", "7001"]
    assert [e.source for e in examples] == ["vqax_nle.json:262148000", "vqax_nle.json:7001"]
    majority, tie = examples
    # red x5, dark red x3, maroon x2.
    assert majority.answers == ["red", "dark red", "maroon"]
    assert majority.explanations == ["the square in the middle is red", "the shape is filled with red"]
    assert majority.image == COCO / "COCO_val2014_000000000042.jpg"
    # no x2 and yes x2: the first seen wins; the empty explanation is dropped.
    assert tie.answers == ["no", "yes"]
    assert tie.explanations == ["a square is drawn in the middle"]
    # COCO_train2014_... is absent; the plain 2017 name exists.
    assert tie.image == COCO / "000000000007.jpg"
    assert load_image(tie).size == (16, 16)


def test_vqax_nle_nlxgpt_folders_and_no_image_dir(tmp_path):
    (tmp_path / "val2014").mkdir()
    shutil.copy(COCO / "COCO_val2014_000000000042.jpg", tmp_path / "val2014")

    assert load_vqax_nle(NLE, tmp_path)[0].image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert load_vqax_nle(NLE)[0].image == UNSET_IMAGE_DIR / "COCO_val2014_000000000042.jpg"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("question", "", "field 'question' is empty"),
        ("answers", None, "missing field 'answers'"),
        ("answers", "red", "field 'answers' must be a list"),
        ("answers", [{"answer": "red"}, {"answer_id": 2}], "field 'answers'[1] must be an object"),
        ("answers", [{"answer": " "}], "field 'answers' holds no non-empty answer"),
        ("image_name", None, "missing field 'image_name'"),
        ("image_id", "forty-two", "field 'image_id' must be a non-negative integer"),
        ("explanation", [1, 2], "field 'explanation' must be a list of strings"),
    ],
)
def test_vqax_nle_malformed_entry(tmp_path, field, value, expected):
    def edit(data: dict[str, Any]) -> None:
        if value is None:
            del data["7001"][field]
        else:
            data["7001"][field] = value

    with pytest.raises(ValueError, match=message("nle.json", "row 7001", expected)):
        load_vqax_nle(nle_copy(tmp_path, edit))


def test_vqax_nle_duplicate_question_id(tmp_path):
    text = NLE.read_text().replace('"7001"', '"262148000"')
    path = tmp_path / "dup.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message("dup.json", "key '262148000' appears twice")):
        load_vqax_nle(path)


def test_vqax_nle_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"1": {"question": "Why?",}}')
    with pytest.raises(ValueError, match=message("broken.json", "invalid JSON at line 1")):
        load_vqax_nle(path)


# --- VQA-X, e-ViL's layout (read by load_vqax_nle) --------------------------------------------------------


def test_vqax_evil_fixture():
    examples = load_vqax_nle(EVIL, COCO)

    assert [e.id for e in examples] == ["262148000", "7001", "99002"]
    assert [e.source for e in examples] == ["vqax_evil.json:0", "vqax_evil.json:1", "vqax_evil.json:2"]
    first, tie, last = examples
    assert first.question == "What color is the square?"
    # Highest score first, whatever the order in the file.
    assert first.answers == ["red", "dark red", "maroon"] and first.answer == "red"
    assert first.explanations == ["The square in the middle is red.", "The shape is filled with red."]
    assert first.question_type == "what color is the"
    assert first.image == COCO / "COCO_val2014_000000000042.jpg"
    # yes and sure tie at 1: the first in the file wins; the blank explanation is dropped.
    assert tie.answers == ["yes", "sure", "no"]
    assert tie.explanations == ["A square is drawn in the middle."]
    assert tie.question_type == ""
    # COCO_train2014_... is absent; the plain 2017 name exists.
    assert tie.image == COCO / "000000000007.jpg"
    assert load_image(tie).size == (16, 16)
    assert last.answers == ["1"]
    assert last.image == COCO / "COCO_val2014_000000000099.jpg"  # missing: the first candidate


def test_vqax_evil_coco_folders_and_no_image_dir(tmp_path):
    image = tmp_path / "train2014" / "COCO_train2014_000000000007.jpg"
    image.parent.mkdir()
    shutil.copy(COCO / "COCO_val2014_000000000042.jpg", image)

    assert load_vqax_nle(EVIL, tmp_path)[1].image == image
    assert load_vqax_nle(EVIL)[0].image == UNSET_IMAGE_DIR / "COCO_val2014_000000000042.jpg"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("sent", None, "missing field 'sent'"),
        ("sent", " ", "field 'sent' is empty"),
        ("img_id", None, "missing field 'img_id'"),
        ("question_id", "q7001", "field 'question_id' must be a non-negative integer"),
        ("label", None, "missing field 'label'"),
        ("label", ["yes"], "field 'label' must be an object"),
        ("label", {"yes": "high"}, "field 'label'['yes'] must be a number"),
        ("label", {}, "field 'label' holds no non-empty answer"),
        ("explanation", None, "missing field 'explanation'"),
        ("explanation", [], "field 'explanation' is empty"),
        ("explanation", "A square.", "field 'explanation' must be a list of strings"),
    ],
)
def test_vqax_evil_malformed_record(tmp_path, field, value, expected):
    def edit(records: list[dict[str, Any]]) -> None:
        if value is None:
            del records[1][field]
        else:
            records[1][field] = value

    with pytest.raises(ValueError, match=message("evil.json", "row 1", expected)):
        load_vqax_nle(evil_copy(tmp_path, edit))


def test_vqax_evil_record_not_an_object(tmp_path):
    path = evil_copy(tmp_path, lambda records: records.append(["not", "a", "record"]))
    with pytest.raises(ValueError, match=message("evil.json", "row 3", "expected an object, got list")):
        load_vqax_nle(path)


def test_vqax_evil_duplicate_question_ids_name_both_rows(tmp_path):
    path = evil_copy(tmp_path, lambda records: records[2].__setitem__("question_id", 262148000))
    with pytest.raises(ValueError, match=message("evil.json", "duplicate id '262148000'", "row 0", "row 2")):
        load_vqax_nle(path)


def test_vqax_nle_rejects_other_top_level(tmp_path):
    path = tmp_path / "scalar.json"
    path.write_text('"VQA-X"')
    with pytest.raises(ValueError, match=message("scalar.json", "NLX-GPT", "e-ViL", "got str")):
        load_vqax_nle(path)


# --- generic JSONL ------------------------------------------------------------------------------------------


def test_jsonl_fixture():
    examples = load_jsonl(JSONL)

    assert [e.id for e in examples] == ["sq-1", "3", "4"]  # line 2 is blank; line 3 takes its line number
    assert [e.source for e in examples] == ["examples.jsonl:1", "examples.jsonl:3", "examples.jsonl:4"]
    first, second, third = examples
    assert first.image == ASSETS / "coco" / "COCO_val2014_000000000042.jpg"
    assert first.answers == ["red"]
    assert first.explanations == ["The square is filled with red."]
    assert first.question_type == "color"
    assert second.answers == ["1", "one"]
    assert second.explanations == ["There is a single square.", "Only one shape is drawn."]
    assert second.question_type == ""
    assert load_image(second).size == (16, 16)
    assert third.answers == ["no", "nope"]  # "answer" first, then the others from "answers"
    assert third.explanations == []


def test_jsonl_image_dir_and_absolute_paths(tmp_path):
    path = write_jsonl(
        tmp_path,
        {"image": "square.png", "question": "Q?", "answer": "a"},
        {"image": str(ASSETS / "images" / "square.png"), "question": "Q?", "answer": "a"},
        name="ok.jsonl",
    )
    relative, absolute = load_jsonl(path, image_dir=ASSETS / "images")
    assert relative.image == ASSETS / "images" / "square.png"
    assert absolute.image == ASSETS / "images" / "square.png"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"image": "a.png", "answer": "a"}, "missing field 'question'"),
        ({"image": "a.png", "question": "", "answer": "a"}, "field 'question' is empty"),
        ({"question": "Q?", "answer": "a"}, "missing field 'image'"),
        ({"image": "a.png", "question": "Q?"}, "missing field 'answer'"),
        ({"image": "a.png", "question": "Q?", "answers": "a"}, "field 'answers' must be a list of strings"),
        ({"image": "a.png", "question": "Q?", "answers": []}, "missing field 'answer'"),
        ({"image": "a.png", "question": "Q?", "answer": 3}, "field 'answer' must be a string"),
        ({"image": "a.png", "question": "Q?", "answer": "a", "id": ""}, "field 'id' must be"),
        ({"image": "a.png", "question": "Q?", "answer": "a", "explanations": [1]}, "field 'explanations'"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_jsonl_malformed_line(tmp_path, record, expected):
    good = {"image": "a.png", "question": "Q?", "answer": "a"}
    path = write_jsonl(tmp_path, good, record)
    with pytest.raises(ValueError, match=message("bad.jsonl", "line 2", expected)):
        load_jsonl(path)


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path, {"image": "a.png", "question": "Q?", "answer": "a"}, '{"image": "b.png",')
    with pytest.raises(ValueError, match=message("bad.jsonl", "line 2", "invalid JSON")):
        load_jsonl(path)


def test_jsonl_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(
        tmp_path,
        {"id": "3", "image": "a.png", "question": "Q?", "answer": "a"},
        {"id": "x", "image": "a.png", "question": "Q?", "answer": "a"},
        {"image": "a.png", "question": "Q?", "answer": "a"},  # defaults to id "3"
    )
    with pytest.raises(ValueError, match=message("bad.jsonl", "duplicate id '3'", "line 1", "line 3")):
        load_jsonl(path)


# --- dispatcher ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "format", "image_dir", "ids"),
    [
        (COLUMNS, "vqax", COCO, ["42000", "7001", "99002"]),
        (NLE, "vqax_nle", COCO, ["262148000", "7001"]),
        (EVIL, "vqax_nle", COCO, ["262148000", "7001", "99002"]),
        (JSONL, "jsonl", None, ["sq-1", "3", "4"]),
    ],
)
def test_load_examples_from_file(path, format, image_dir, ids):
    assert [e.id for e in load_examples_from_file(path, format, image_dir)] == ids


def test_load_examples_from_file_unknown_format():
    with pytest.raises(ValueError, match=message("unknown format 'csv'", "examples.jsonl")):
        load_examples_from_file(JSONL, "csv")  # type: ignore[arg-type]


# --- images -------------------------------------------------------------------------------------------------


def test_check_images_passes_when_all_images_load(tmp_path):
    path = columns_copy(tmp_path, lambda table: [table[c].pop("12") for c in table])
    assert len(load_vqax_columns(path, COCO, check_images=True)) == 2
    assert len(load_vqax_nle(NLE, COCO, check_images=True)) == 2


def test_check_images_missing_image_names_file_and_row():
    missing = re.escape(str(COCO / "COCO_val2014_000000000099.jpg"))
    with pytest.raises(FileNotFoundError, match=f"image not found: {missing}.*row vqax_columns.json:12"):
        load_vqax_columns(COLUMNS, COCO, check_images=True)
    with pytest.raises(FileNotFoundError, match=message("missing.png", "(row examples.jsonl:4)")):
        load_examples_from_file(JSONL, "jsonl", check_images=True)


def test_corrupt_image_names_file_and_row(tmp_path):
    path = write_jsonl(
        tmp_path,
        {"image": "square.png", "question": "Q?", "answer": "a"},
        {"image": "corrupt.jpg", "question": "Q?", "answer": "a"},
        name="corrupt.jsonl",
    )
    examples = load_jsonl(path, image_dir=ASSETS / "images")  # loading annotations does not open images
    assert isinstance(load_image(examples[0]), Image.Image)
    expected = message("cannot read image", "corrupt.jpg", "(row corrupt.jsonl:2)")
    with pytest.raises(ValueError, match=expected):
        load_image(examples[1])
    with pytest.raises(ValueError, match=expected):
        load_jsonl(path, image_dir=ASSETS / "images", check_images=True)


def test_missing_and_corrupt_images_are_data_errors(tmp_path):
    """The CLI prints a DatasetError as one `data error:` line instead of a traceback."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = write_jsonl(tmp_path, {"image": "bad.png", "question": "Q?", "answer": "a"},
                       {"image": "gone.png", "question": "Q?", "answer": "a"}, name="b2.jsonl")
    corrupt, missing = load_jsonl(path)
    with pytest.raises(DatasetError, match=message("cannot read image", "bad.png", "(row b2.jsonl:1)")):
        load_image(corrupt)
    with pytest.raises(DatasetError, match=message("image not found", "gone.png", "(row b2.jsonl:2)")) as error:
        load_image(missing)
    assert isinstance(error.value, FileNotFoundError)  # what it also is, for callers that catch that
