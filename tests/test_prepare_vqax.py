"""Tests for illume/data/prepare.py and scripts/prepare_vqax.py: image checks against annotation files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from illume.data.prepare import check_annotations
from tests.conftest import REPO, SHARED_VQAX_VAL

_spec = importlib.util.spec_from_file_location("prepare_vqax", REPO / "scripts" / "prepare_vqax.py")
prepare_vqax = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_vqax)

# Rows 0-5 of the column fixture use COCO images 1, 2, 3, 4, 4, 5: image 1 under its 2014 name, 2 in a val2014/
# sub-folder, 3 under the plain 2017 name, 4 (two rows) nowhere, 5 a corrupt file.
IMAGE_IDS = [1, 2, 3, 4, 4, 5]


def write_coco(folder: Path) -> Path:
    """A COCO-like folder with images 1-3 (tiny JPEGs) and a corrupt image 5."""
    (folder / "val2014").mkdir(parents=True)
    for name in ("COCO_val2014_000000000001.jpg", "val2014/COCO_val2014_000000000002.jpg", "000000000003.jpg"):
        Image.new("RGB", (4, 4), "red").save(folder / name, format="JPEG")
    (folder / "COCO_val2014_000000000005.jpg").write_bytes(b"not a JPEG at all")
    return folder


def write_columns(path: Path, image_ids: list[int] = IMAGE_IDS) -> Path:
    """ILLUME's column JSON with one row per image id (row keys "0", "1", ...)."""
    rows = [str(row) for row in range(len(image_ids))]
    table = {
        "image_id": dict(zip(rows, image_ids)),
        "question": {row: "What color is it?" for row in rows},
        "question_id": {row: 10 + int(row) for row in rows},
        "multiple_choice_answer": {row: "red" for row in rows},
        "explanation": {row: "It is painted red." for row in rows},
    }
    path.write_text(json.dumps(table))
    return path


def run_main(*argv: str | Path) -> int:
    return prepare_vqax.main([str(arg) for arg in argv])


def test_report_is_exact(tmp_path, capsys):
    coco = write_coco(tmp_path / "coco")
    annotations = write_columns(tmp_path / "val.json")
    report_path = tmp_path / "out" / "report.json"

    code = run_main(annotations, "--image-dir", coco, "--verify", "--report", report_path)

    assert code == 1
    report = json.loads(report_path.read_text())
    error = report["files"][0]["unreadable"][0].pop("error")
    assert error.startswith("cannot identify image file")  # PIL's words for a file that is no image
    assert report == {
        "image_dir": str(coco),
        "verified": True,
        "exit_code": 1,
        "files": [{
            "annotations": str(annotations), "format": "vqax", "rows": 6, "images": 5, "found": 4,
            "missing": [{"file": "COCO_val2014_000000000004.jpg", "rows": ["val.json:3", "val.json:4"]}],
            "unreadable": [{"file": "COCO_val2014_000000000005.jpg", "rows": ["val.json:5"]}],
        }],
    }
    out = capsys.readouterr().out
    assert "COCO_val2014_000000000004.jpg  (rows val.json:3, val.json:4)" in out
    assert "unreadable for" in out and "COCO_val2014_000000000005.jpg" in out


def test_without_verify_a_corrupt_file_counts_as_found(tmp_path):
    check = check_annotations(write_columns(tmp_path / "val.json"), write_coco(tmp_path / "coco"))
    assert (check.rows, check.images, check.found) == (6, 5, 4)
    assert [issue.file for issue in check.missing] == ["COCO_val2014_000000000004.jpg"]
    assert check.unreadable == []


def test_split_hint_names_the_train2014_file(tmp_path):
    check = check_annotations(write_columns(tmp_path / "cols.json"), write_coco(tmp_path / "coco"),
                              split_name="train")
    # Found images stay found (every candidate is tried); the missing one is named as train2014 would have it.
    assert check.found == 4
    assert [issue.file for issue in check.missing] == ["COCO_train2014_000000000004.jpg"]


def test_nlx_gpt_and_evil_layouts_are_detected_and_resolved_like_the_loader(tmp_path):
    coco = write_coco(tmp_path / "coco")
    names = [f"COCO_val2014_{image_id:012d}" for image_id in IMAGE_IDS]
    nlx = {
        str(10 + row): {"question": "Q?", "answers": [{"answer": "red"}], "image_id": str(IMAGE_IDS[row]),
                        "image_name": f"{name}.jpg", "explanation": ["it is red"]}
        for row, name in enumerate(names)
    }
    evil = [{"question_id": 10 + row, "img_id": name, "sent": "Q?", "label": {"red": 1}, "explanation": ["red"]}
            for row, name in enumerate(names)]
    (tmp_path / "nlx.json").write_text(json.dumps(nlx))
    (tmp_path / "evil.json").write_text(json.dumps(evil))

    nlx_check = check_annotations(tmp_path / "nlx.json", coco, verify=True)
    evil_check = check_annotations(tmp_path / "evil.json", coco, verify=True)

    for check, rows in ((nlx_check, ["nlx.json:13", "nlx.json:14"]), (evil_check, ["evil.json:3", "evil.json:4"])):
        assert (check.format, check.rows, check.images, check.found) == ("vqax_nle", 6, 5, 4)
        assert [(i.file, i.rows) for i in check.missing] == [("COCO_val2014_000000000004.jpg", rows)]
        assert [i.file for i in check.unreadable] == ["COCO_val2014_000000000005.jpg"]


def test_jsonl_with_png_images(tmp_path):
    Image.new("RGB", (3, 3), "blue").save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "Q?", "answer": "blue"},
             {"image": "b.png", "question": "Q?", "answer": "blue"}]
    annotations = tmp_path / "mine.jsonl"
    annotations.write_text("".join(json.dumps(line) + "\n" for line in lines))

    check = check_annotations(annotations, tmp_path, verify=True)

    assert (check.format, check.rows, check.found, check.unreadable) == ("jsonl", 2, 1, [])
    assert [(i.file, i.rows) for i in check.missing] == [("b.png", ["mine.jsonl:2"])]


def test_exit_0_when_every_image_is_there_and_readable(tmp_path, capsys):
    coco = write_coco(tmp_path / "coco")
    annotations = write_columns(tmp_path / "val.json", image_ids=[1, 2, 3, 1])
    report_path = tmp_path / "report.json"

    assert run_main(annotations, "--image-dir", coco, "--verify", "--report", report_path) == 0
    assert capsys.readouterr().out.rstrip().endswith("all images present and readable")
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 0
    assert report["files"][0]["missing"] == [] and report["files"][0]["unreadable"] == []


def test_show_limits_the_missing_list(tmp_path, capsys):
    annotations = write_columns(tmp_path / "val.json")
    (tmp_path / "empty").mkdir()
    assert run_main(annotations, "--image-dir", tmp_path / "empty", "--show", "2") == 1
    out = capsys.readouterr().out
    assert "(first 2 of 5)" in out
    assert "COCO_val2014_000000000002.jpg" in out and "COCO_val2014_000000000003.jpg" not in out


def _drop_question_of_row_2(path: Path) -> None:
    table = json.loads(path.read_text())
    del table["question"]["2"]
    path.write_text(json.dumps(table))


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (_drop_question_of_row_2, ["val.json", "row 2", "missing field 'question'"]),
        (lambda path: path.write_text('{"image_id": {"0": 1},'), ["val.json", "invalid JSON at line 1"]),
        (lambda path: path.unlink(), ["val.json"]),
    ],
    ids=["missing-field", "invalid-json", "no-such-file"],
)
def test_exit_2_on_a_malformed_annotation_file(tmp_path, capsys, spoil, expected):
    coco = write_coco(tmp_path / "coco")
    good = write_columns(tmp_path / "good.json", image_ids=[1])
    bad = write_columns(tmp_path / "val.json")
    spoil(bad)
    report_path = tmp_path / "report.json"

    assert run_main(good, bad, "--image-dir", coco, "--report", report_path) == 2

    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    good_entry, bad_entry = json.loads(report_path.read_text())["files"]
    assert good_entry["found"] == 1  # the other files are still checked
    assert all(part in bad_entry["error"] for part in expected)


def test_exit_2_when_the_image_dir_does_not_exist(tmp_path, capsys):
    annotations = write_columns(tmp_path / "val.json")
    assert run_main(annotations, "--image-dir", tmp_path / "no-such-dir") == 2
    assert "no-such-dir does not exist" in capsys.readouterr().err


def test_illume_val_split_with_empty_image_dir(tmp_path):
    if not SHARED_VQAX_VAL.is_file():
        pytest.skip(f"ILLUME's VQA-X val split not present at {SHARED_VQAX_VAL}")
    image_ids = set(json.loads(SHARED_VQAX_VAL.read_text())["image_id"].values())
    (tmp_path / "coco").mkdir()
    report_path = tmp_path / "report.json"

    assert run_main(SHARED_VQAX_VAL, "--image-dir", tmp_path / "coco", "--report", report_path) == 1

    entry = json.loads(report_path.read_text())["files"][0]
    assert (entry["format"], entry["rows"], entry["found"], entry["unreadable"]) == ("vqax", 729, 0, [])
    assert entry["images"] == len(entry["missing"]) == len(image_ids) == 723
    assert {item["file"] for item in entry["missing"]} == {f"COCO_val2014_{i:012d}.jpg" for i in image_ids}
    assert sum(len(item["rows"]) for item in entry["missing"]) == 729
