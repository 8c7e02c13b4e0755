"""The data check before any model loads (illume.data.datasets.load_split): every image opened and verified
without decoding, the decompression-bomb limit as an error, and a split with no examples refused."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from illume.cli import main
from illume.config import DataConfig
from illume.data.datasets import DatasetError, load_split
from illume.data.records import Example, load_image
from tests.test_cli import _command, _jsonl_data, _square, no_model  # noqa: F401  (no_model: a fixture)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but holds a few bytes of data: small on disk, and PIL's size
    check (at open) is all that stands between it and a width x height x 3 byte allocation."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b"")


def _valid_png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, "PNG")
    return buffer.getvalue()


def _bad_crc_png() -> bytes:
    """A valid PNG with one byte of its IDAT data flipped: the header reads, the chunk's CRC no longer fits."""
    data = bytearray(_valid_png())
    idat = data.index(b"IDAT")
    data[idat + 4 + 2] ^= 0xFF  # inside the compressed data, past the zlib header
    return bytes(data)


def _truncated_png() -> bytes:
    data = _valid_png(64)
    return data[: data.index(b"IDAT") + 20]  # the header and a few bytes of pixel data


BAD_IMAGES = {"bad_crc": _bad_crc_png, "truncated": _truncated_png, "bomb": lambda: _png_header_only(20000, 20000)}


def _jsonl_config(tmp_path: Path, images: list[str], **settings) -> DataConfig:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"image": "{name}", "question": "q?", "answer": "a"}}\n' for name in images))
    return DataConfig(kind="jsonl", train_path=str(path), val_path=str(path), **settings)


# --- the CLI: data error before the model -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "baseline", "reward train", "dpo", "kto"])
@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_unreadable_image_fails_before_the_model_loads(tmp_path, capsys, no_model, command, bad):  # noqa: F811
    (tmp_path / "bad.png").write_bytes(BAD_IMAGES[bad]())
    data = _jsonl_data(tmp_path, [{"image": _square(tmp_path / "a.png"), "question": "q?", "answer": "yes"},
                                  {"image": "bad.png", "question": "q?", "answer": "no"}])
    assert main(_command(tmp_path, command, data)) == 2
    err = capsys.readouterr().err
    assert re.match(r"data error: (train|val) split \(jsonl\): cannot read image", err)  # dpo/kto: val first
    assert str(tmp_path / "bad.png") in err and "(row train.jsonl:2)" in err
    assert not (tmp_path / "cache").exists()  # nothing was pre-trained (no_model: nothing loaded)


# --- load_split's image check -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_load_split_names_the_first_unreadable_image_and_counts_the_rest(tmp_path, bad):
    for name in ("b1.png", "b2.png", "b3.png"):
        (tmp_path / name).write_bytes(BAD_IMAGES[bad]())
    cfg = _jsonl_config(tmp_path, [_square(tmp_path / "a.png"), "b1.png", "b2.png", "b3.png"])
    assert len(load_split(cfg, "val")) == 4  # without images_must_exist no file is opened
    with pytest.raises(DatasetError) as error:
        load_split(cfg, "val", images_must_exist=True)
    message = str(error.value)
    assert message.startswith(f"val split (jsonl): cannot read image {tmp_path / 'b1.png'} (row train.jsonl:2)")
    assert message.endswith("; 2 more images cannot be read")


def test_check_images_false_skips_the_open_but_not_the_stat(tmp_path):
    (tmp_path / "bad.png").write_bytes(_bad_crc_png())
    with pytest.raises(DatasetError, match="cannot read image .*bad.png"):
        load_split(_jsonl_config(tmp_path, ["bad.png"]), "train", images_must_exist=True)
    cfg = _jsonl_config(tmp_path, ["bad.png"], check_images=False)
    assert len(load_split(cfg, "train", images_must_exist=True)) == 1
    cfg = _jsonl_config(tmp_path, ["bad.png", "gone.png"], check_images=False)
    with pytest.raises(DatasetError, match="image not found: .*gone.png"):
        load_split(cfg, "train", images_must_exist=True)


def test_over_the_pixel_limit_is_an_error_where_pil_only_warns(tmp_path, monkeypatch):
    """PIL warns between 1x and 2x MAX_IMAGE_PIXELS and raises above; both load_split and load_image refuse
    anything over 1x, with a DatasetError naming the file and row and no warning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (12, 12), "red").save(tmp_path / "big.png")  # 144 pixels: in PIL's warning zone
    cfg = _jsonl_config(tmp_path, ["big.png"])
    expected = "cannot read image .*big.png \\(row train.jsonl:1\\): 12x12 pixels, more than the decompression-bomb"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DatasetError, match=expected):
            load_split(cfg, "train", images_must_exist=True)
        with pytest.raises(DatasetError, match=expected):
            load_image(load_split(cfg, "train")[0])


def test_load_image_refuses_a_decompression_bomb(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    example = Example(id="1", image=tmp_path / "bomb.png", question="q?", answers=["a"], source="x.jsonl:7")
    with pytest.raises(DatasetError, match="bomb.png \\(row x.jsonl:7\\): more pixels than the decompression-bomb limit"):
        load_image(example)


def test_in_memory_images_need_no_check():
    cfg = DataConfig(kind="shapes")
    cfg.shapes.num_val_scenes = 3
    assert len(load_split(cfg, "val", images_must_exist=True)) == 3


# --- an empty split is an error -----------------------------------------------------------------------------


def test_empty_file_is_an_error_naming_it(tmp_path):
    cfg = _jsonl_config(tmp_path, [])
    with pytest.raises(DatasetError, match=f"train split \\(jsonl\\): {tmp_path / 'train.jsonl'} has no examples"):
        load_split(cfg, "train")


@pytest.mark.parametrize(("split", "key"), [("train", "max_train_examples"), ("val", "max_val_examples")])
def test_a_maximum_of_zero_is_an_error_naming_the_key(tmp_path, split, key):
    """Config validation refuses 0 at load time too; load_split's own message is for a config built in code."""
    cfg = _jsonl_config(tmp_path, [_square(tmp_path / "a.png")])
    setattr(cfg, key, 0)
    with pytest.raises(DatasetError, match=f"data.{key}=0 leaves no examples .*train.jsonl has 1"):
        load_split(cfg, split)


def test_shapes_world_with_no_scenes_is_an_error_naming_the_setting():
    cfg = DataConfig(kind="shapes")
    cfg.shapes.num_test_scenes = 0
    with pytest.raises(DatasetError, match="test split \\(shapes\\): .*data.shapes.num_test_scenes=0"):
        load_split(cfg, "test")
