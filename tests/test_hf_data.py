"""data.kind=hf: a Hugging Face `datasets` dataset on disk (illume.data.hf_datasets), read by `load_split` from
a save_to_disk folder, parquet / JSON(L) / CSV files or an image folder, with the rows checked and every error
naming the file or folder, the split, the row and the column."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from illume.cli import main
from illume.config import DataConfig, HFColumnsConfig, HFDataConfig, HFSplitsConfig, load_config
from illume.data.datasets import DatasetError, load_split
from illume.data.records import load_image
from tests.conftest import REPO, tiny_overrides

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`load_dataset` writes its Arrow cache under tmp_path, not the user's ~/.cache/huggingface."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _png(colour: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _rows(colours: list[str], **extra) -> dict[str, list]:
    """Columns of one row per colour: a question about the image, the colour as answer, two explanations."""
    return {"question": [f"what colour is it? ({c})" for c in colours], "answer": colours,
            "explanations": [[f"the square is {c}", f"it looks {c}"] for c in colours], **extra}


def _image_rows(colours: list[str]) -> datasets.Dataset:
    """Rows whose `image` is an `Image` feature holding PNG bytes (as a saved dataset holds them)."""
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
                                  "explanations": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict(_rows(colours, image=[{"bytes": _png(c), "path": None} for c in colours]),
                                      features=features)


def _files(folder: Path, colours: list[str]) -> list[str]:
    """One PNG per colour in folder/images, as paths relative to `folder`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for colour in colours:
        (folder / "images" / f"{colour}.png").write_bytes(_png(colour))
    return [f"images/{colour}.png" for colour in colours]


def _hf(path: Path, **settings) -> DataConfig:
    return DataConfig(kind="hf", hf=HFDataConfig(path=str(path), **settings))


def _colour(example) -> str:
    """The colour name of an example's (one-colour) image."""
    rgb = tuple(np.asarray(load_image(example).convert("RGB"))[0, 0])
    names = {tuple(np.asarray(Image.new("RGB", (1, 1), c))[0, 0]): c for c in COLOURS}
    return names[rgb]


def _check(examples, colours: list[str], source_name: str, split: str = "train") -> None:
    """Each example is its row: id, question, answer, explanations, source, and the image's pixels."""
    assert [e.id for e in examples] == [f"{split}-{i}" for i in range(len(colours))]
    assert [e.answers for e in examples] == [[c] for c in colours]
    assert [e.explanations for e in examples] == [[f"the square is {c}", f"it looks {c}"] for c in colours]
    assert [e.source for e in examples] == [f"{source_name}:{split}:{i}" for i in range(len(colours))]
    assert [_colour(e) for e in examples] == colours


# --- one test per source ------------------------------------------------------------------------------------


def test_save_to_disk_dataset_dict_gives_every_split_with_images_in_memory(tmp_path):
    datasets.DatasetDict(train=_image_rows(["red", "green", "blue"]), validation=_image_rows(["yellow"]),
                         test=_image_rows(["white", "black"])).save_to_disk(tmp_path / "saved")
    cfg = _hf(tmp_path / "saved")
    train, val, test = (load_split(cfg, split, images_must_exist=True) for split in ("train", "val", "test"))
    _check(train, ["red", "green", "blue"], "saved")
    _check(val, ["yellow"], "saved", split="validation")
    _check(test, ["white", "black"], "saved", split="test")
    assert all(isinstance(e.image, Image.Image) for e in train)  # bytes, opened in memory; no file to find


def test_save_to_disk_single_dataset_is_the_train_split(tmp_path):
    _image_rows(["red", "green", "blue", "yellow"]).save_to_disk(tmp_path / "one")
    cfg = _hf(tmp_path / "one", splits=HFSplitsConfig(train="train[:3]", val="train[3:]"))
    _check(load_split(cfg, "train"), ["red", "green", "blue"], "one")
    assert [(e.id, _colour(e)) for e in load_split(cfg, "val")] == [("train-3", "yellow")]


def test_parquet_with_image_bytes(tmp_path):
    _image_rows(["red", "green"]).to_parquet(tmp_path / "data.parquet")
    examples = load_split(_hf(tmp_path / "data.parquet"), "train", images_must_exist=True)
    _check(examples, ["red", "green"], "data.parquet")
    assert all(isinstance(e.image, Image.Image) for e in examples)


def test_jsonl_with_image_paths_relative_to_the_file(tmp_path):
    folder = tmp_path / "somewhere"
    colours = ["red", "green", "blue"]
    rows = _rows(colours, image=_files(folder, colours))
    with (folder / "vqa.jsonl").open("w") as file:
        for i in range(len(colours)):
            file.write(json.dumps({key: values[i] for key, values in rows.items()}) + "\n")
    examples = load_split(_hf(folder / "vqa.jsonl"), "train", images_must_exist=True)
    _check(examples, colours, "vqa.jsonl")
    assert [e.image for e in examples] == [folder / "images" / f"{c}.png" for c in colours]  # files, as jsonl's


def test_csv_folder_with_splits_by_file_name_and_one_explanation_a_row(tmp_path):
    folder = tmp_path / "tables"
    for split, colours in (("train", ["red", "green"]), ("validation", ["blue"])):
        rows = _rows(colours, image=_files(folder, colours))
        rows["explanations"] = [f"the square is {c}" for c in colours]  # a string: one explanation
        datasets.Dataset.from_dict(rows).to_csv(folder / f"{split}.csv", index=False)
    cfg = _hf(folder)  # a folder of .csv files: format csv, splits from the file names
    train, val = load_split(cfg, "train", images_must_exist=True), load_split(cfg, "val", images_must_exist=True)
    assert [(e.answers, e.explanations, e.image) for e in train + val] == [
        ([c], [f"the square is {c}"], folder / "images" / f"{c}.png") for c in ["red", "green", "blue"]]
    assert [e.id for e in val] == ["validation-0"]


def test_imagefolder_with_metadata(tmp_path):
    folder = tmp_path / "pictures"
    for split, colours in (("train", ["red", "green"]), ("validation", ["blue"])):
        (folder / split).mkdir(parents=True)
        with (folder / split / "metadata.jsonl").open("w") as metadata:
            for colour in colours:
                (folder / split / f"{colour}.png").write_bytes(_png(colour))
                metadata.write(json.dumps({"file_name": f"{colour}.png", "question": "what colour?",
                                           "answer": colour, "explanations": [f"it is {colour}"],
                                           "id": f"q-{colour}"}) + "\n")
    cfg = _hf(folder)
    train, val = load_split(cfg, "train", images_must_exist=True), load_split(cfg, "val", images_must_exist=True)
    assert [(e.id, e.answers, e.explanations, _colour(e)) for e in train + val] == [
        (f"q-{c}", [c], [f"it is {c}"], c) for c in ["red", "green", "blue"]]
    # An image folder's Image feature holds paths: the files themselves, checked as every kind's files are.
    assert {e.image for e in train} == {folder / "train" / "red.png", folder / "train" / "green.png"}


# --- settings -----------------------------------------------------------------------------------------------


def test_column_mapping(tmp_path):
    datasets.Dataset.from_dict({
        "picture": [_png("red"), _png("blue")],  # a binary column: image bytes
        "prompt": ["which colour?", "and this one?"],
        "answers": [["red", "crimson"], ["blue"]],  # a list of answers: the first is the canonical one
        "rationale": ["it is red", ""],  # one string a row; an empty one is no explanation
        "question_id": [101, 102],  # integers are ids too
        "kind": ["colour", "colour"],
        "question": ["not this column", "not this column"],
    }).save_to_disk(tmp_path / "mapped")
    columns = HFColumnsConfig(image="picture", question="prompt", answer="answers", explanations="rationale",
                              id="question_id", question_type="kind")
    examples = load_split(_hf(tmp_path / "mapped", columns=columns), "train", images_must_exist=True)
    assert [(e.id, e.question, e.answers, e.explanations, e.question_type, _colour(e)) for e in examples] == [
        ("101", "which colour?", ["red", "crimson"], ["it is red"], "colour", "red"),
        ("102", "and this one?", ["blue"], [], "colour", "blue")]


def test_split_mapping_and_max_examples(tmp_path):
    datasets.DatasetDict(dev=_image_rows(["red", "green", "blue"]), holdout=_image_rows(["yellow"]),
                         train=_image_rows(["black"])).save_to_disk(tmp_path / "saved")
    splits = HFSplitsConfig(train="dev[1:]", val="holdout", test="dev[:1]+holdout")
    cfg = _hf(tmp_path / "saved", splits=splits)
    assert [e.id for e in load_split(cfg, "train")] == ["dev-1", "dev-2"]
    assert [e.id for e in load_split(cfg, "val")] == ["holdout-0"]
    assert [e.id for e in load_split(cfg, "test")] == ["dev-0", "holdout-0"]
    cfg.max_train_examples = 1
    assert [(e.id, _colour(e)) for e in load_split(cfg, "train")] == [("dev-1", "green")]
    # A split the dataset does not have names the setting and the dataset's splits.
    cfg.hf.splits.val = "validation"
    with pytest.raises(DatasetError, match=r"data\.hf\.splits\.val='validation'.*\['dev', 'holdout', 'train'\]"):
        load_split(cfg, "val")


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_column_names_the_file_the_setting_and_the_columns_there(tmp_path):
    rows = _rows(["red"], image=_files(tmp_path, ["red"]))
    rows["query"] = rows.pop("question")
    datasets.Dataset.from_dict(rows).to_json(tmp_path / "vqa.jsonl")
    with pytest.raises(DatasetError) as error:
        load_split(_hf(tmp_path / "vqa.jsonl"), "train")
    message = str(error.value)
    assert f"{tmp_path / 'vqa.jsonl'}, split 'train': missing column 'question' (data.hf.columns.question)" in message
    assert re.search(r"its columns: \['answer', 'explanations', 'image', 'query'\]", message)
    # An optional column may be missing under its default name, but not under a name set for it.
    assert [e.question for e in load_split(_hf(tmp_path / "vqa.jsonl", columns=HFColumnsConfig(
        question="query")), "train")] == ["what colour is it? (red)"]
    with pytest.raises(DatasetError, match=r"missing column 'qid' \(data\.hf\.columns\.id\)"):
        load_split(_hf(tmp_path / "vqa.jsonl", columns=HFColumnsConfig(question="query", id="qid")), "train")


@pytest.mark.parametrize("column, value, named", [
    ("question", "   ", "field 'question' is empty"),
    ("question", None, "missing field 'question'"),
    ("answer", "", "field 'answer' is empty"),
    ("explanations", ["fine", ""], None),  # empty explanations are dropped, as in JSONL files
])
def test_bad_row_names_file_split_row_and_column(tmp_path, column, value, named):
    rows = _rows(["red", "green", "blue"], image=_files(tmp_path, ["red", "green", "blue"]))
    with (tmp_path / "vqa.jsonl").open("w") as file:
        for i in range(3):
            row = {key: values[i] for key, values in rows.items()}
            if i == 2:
                row[column] = value
            file.write(json.dumps(row) + "\n")
    if named is None:
        assert load_split(_hf(tmp_path / "vqa.jsonl"), "train")[2].explanations == ["fine"]
        return
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'vqa.jsonl'}, split 'train', row 2: {named}")):
        load_split(_hf(tmp_path / "vqa.jsonl"), "train")


@pytest.mark.parametrize("column, values, named", [
    ("question", [1, 2], "field 'question' must be a string, got int 1"),
    ("explanations", [[1], [2]], "field 'explanations' must be a list of strings, got [1]"),
    ("answer", [True, False], "field 'answer' must be a string, got bool True"),
    ("image", [7, 8], "field 'image' must be an image (an Image feature, image bytes or a path), got int"),
    ("id", [1.5, 2.5], "field 'id' must be a non-empty string or an integer, got 1.5"),
])
def test_column_of_a_wrong_type_names_the_row_and_column(tmp_path, column, values, named):
    rows = _rows(["red", "green"], image=_files(tmp_path, ["red", "green"]))
    rows[column] = values
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'saved'}, split 'train', row 0: {named}")):
        load_split(_hf(tmp_path / "saved"), "train")


def test_repeated_id_names_both_rows(tmp_path):
    rows = _rows(["red", "green", "blue"], image=_files(tmp_path, ["red", "green", "blue"]), id=["a", "b", "a"])
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "vqa.parquet")
    with pytest.raises(DatasetError, match=r"duplicate id 'a' in split 'train', row 0 and split 'train', row 2"):
        load_split(_hf(tmp_path / "vqa.parquet"), "train")


def test_unreadable_image_bytes_name_the_row_and_column_before_any_model_loads(tmp_path):
    images = [{"bytes": _png("red"), "path": None}, {"bytes": b"not an image", "path": "green.png"},
              {"bytes": _png("blue")[:-30], "path": None}]  # the last truncated: the header reads, the rest not
    datasets.Dataset.from_dict(_rows(["red", "green", "blue"], image=images),
                               features=_image_rows([]).features).save_to_disk(tmp_path / "saved")
    cfg = _hf(tmp_path / "saved")
    with pytest.raises(DatasetError) as error:
        load_split(cfg, "train", images_must_exist=True)
    assert "train split (hf): cannot read image green.png (column 'image', row saved:train:1)" in str(error.value)
    assert "1 more images cannot be read" in str(error.value)  # the truncated one, found by Image.verify
    # The header is read whenever the dataset is (the image is opened); Image.verify runs only before a model
    # loads and with data.check_images, as for files; a decode that fails later names the row too.
    cfg.max_train_examples, cfg.check_images = 1, False
    load_split(cfg, "train", images_must_exist=True)
    cfg.max_train_examples = None
    with pytest.raises(DatasetError, match=re.escape("cannot read image green.png (column 'image', row saved:tr")):
        load_split(cfg, "train", images_must_exist=True)


def test_truncated_image_bytes_fail_when_decoded_naming_the_row(tmp_path):
    dataset = datasets.Dataset.from_dict(_rows(["red"], image=[_png("red", size=64)[:-30]]))
    dataset.save_to_disk(tmp_path / "saved")
    (example,) = load_split(_hf(tmp_path / "saved"), "train")  # no verify: the header alone reads fine
    with pytest.raises(DatasetError, match=re.escape("cannot read the in-memory image (row saved:train:0)")):
        load_image(example)


def test_image_bytes_over_the_decompression_bomb_limit_are_refused(tmp_path, monkeypatch):
    datasets.Dataset.from_dict(_rows(["red"], image=[_png("red", size=64)])).save_to_disk(tmp_path / "saved")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(DatasetError, match=re.escape(
            "cannot read image bytes (column 'image', row saved:train:0): 64x64 pixels, more than the "
            "decompression-bomb limit")):
        load_split(_hf(tmp_path / "saved"), "train")


def test_unreadable_image_file_names_the_row(tmp_path):
    rows = _rows(["red", "green"], image=_files(tmp_path, ["red", "green"]))
    (tmp_path / "images" / "green.png").write_bytes(b"not a png")
    datasets.Dataset.from_dict(rows).to_csv(tmp_path / "vqa.csv", index=False)
    load_split(_hf(tmp_path / "vqa.csv"), "train")  # annotations alone: images are checked before a model loads
    with pytest.raises(DatasetError, match=re.escape(
            f"train split (hf): cannot read image {tmp_path / 'images' / 'green.png'} (row vqa.csv:train:1)")):
        load_split(_hf(tmp_path / "vqa.csv"), "train", images_must_exist=True)


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.hf\.path is not set"):
        load_split(DataConfig(kind="hf"), "train")
    with pytest.raises(DatasetError, match=r"data\.hf\.path .*nowhere does not exist"):
        load_split(_hf(tmp_path / "nowhere"), "train")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DatasetError, match=r"cannot tell its format from the suffix '\.txt'; set data\.hf\.format"):
        load_split(_hf(tmp_path / "notes.txt"), "train")
    (tmp_path / "broken.json").write_text('{"question": "q", "answer": \n')
    with pytest.raises(DatasetError, match=r"broken\.json: cannot be read as json by `datasets`"):
        load_split(_hf(tmp_path / "broken.json"), "train")


# --- a run --------------------------------------------------------------------------------------------------


def test_a_run_config_with_kind_hf_loads_every_split(tmp_path):
    datasets.DatasetDict(train=_image_rows(["red", "green", "blue"]), dev=_image_rows(["yellow", "white"]),
                         test=_image_rows(["black"])).save_to_disk(tmp_path / "saved")
    (tmp_path / "run.yaml").write_text(f"""\
base: {REPO / "configs" / "demo.yaml"}
data:
  kind: hf
  hf:
    path: {tmp_path / "saved"}
    splits: {{val: dev}}
    columns: {{explanations: explanations}}
  max_val_examples: 1
""")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.hf.splits == HFSplitsConfig(train="train", val="dev", test="test")
    sizes = {split: len(load_split(cfg.data, split, images_must_exist=True)) for split in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 1, "test": 1}


@pytest.mark.slow
def test_illume_run_with_kind_hf_runs_a_round(tmp_path):
    """The in-memory images of a saved dataset go the whole way: sampled, written for the annotation page,
    judged, trained on and scored."""
    colours = COLOURS * 2
    datasets.DatasetDict(train=_image_rows(colours), validation=_image_rows(colours[:4])).save_to_disk(
        tmp_path / "saved")
    overrides = ["data.kind=hf", f"data.hf.path={tmp_path / 'saved'}", "name=hf", "loop.num_rounds=1",
                 "critic.threshold=0.1", "train.num_epochs=1", "train.batch_size=8",
                 "sample.samples_per_temperature=2", "sample.max_new_tokens=6"]
    assert main(["run", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tmp_path), *overrides]) == 0
    run_dir = tmp_path / "runs" / "hf"
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == sorted(f"train-{i}.png" for i in range(12))
