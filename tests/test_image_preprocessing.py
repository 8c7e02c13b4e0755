"""Images as MAGMA sees them: resize and centre crop in the image's own mode, then RGB, then CLIP normalisation.

MAGMA's CLIP transform (Aleph-Alpha/magma, `clip_preprocess`) converts to RGB after resizing and cropping; for
palette, RGBA and CMYK images that gives other pixels than converting first, so the tests pin the order: the
backend must equal a reference written here step by step in MAGMA's order, and must differ from the
convert-first order where the two disagree. The file tests go through the data loader (`load_image`), which must
therefore keep the file's mode.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from illume.data.errors import DatasetError
from illume.data.loaders import load_jsonl
from illume.data.records import Example, load_image
from illume.models.image_processing import to_pixel_values
from illume.models.vlm import MagmaVLM

# CLIP's normalisation, as MAGMA's transform writes it (kept here, not imported, so the test is independent).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

SIZE = 16
WIDTH, HEIGHT = 37, 23
# torchvision's Resize(16) on 37 x 23: shorter side 16, longer int(16 * 37 / 23) = int(25.74) = 25; CenterCrop(16):
# left = int(round((25 - 16) / 2)) = round(4.5) = 4 (Python rounds halves to even), top = 0.
RESIZED = (25, 16)
CROP = (4, 0, 20, 16)

MODES = ["RGB", "L", "RGBA", "P", "CMYK"]
ORDER_MATTERS = {"RGBA", "P", "CMYK"}


def synthetic(mode: str, seed: int = 0) -> Image.Image:
    """A small random image in `mode`: RGBA with varying alpha (30% fully transparent), P with an 8-colour
    palette and a transparent index."""
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8), "L")
    if mode == "RGBA":
        pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
        pixels[..., 3] = np.where(rng.random((HEIGHT, WIDTH)) < 0.3, 0, pixels[..., 3])
        return Image.fromarray(pixels, "RGBA")
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 8, (HEIGHT, WIDTH), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 8 * 3).astype(np.uint8).tobytes())
        image.info["transparency"] = 3
        return image
    if mode == "CMYK":
        return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8), "CMYK")
    raise ValueError(mode)


def magma_reference(image: Image.Image) -> torch.Tensor:
    """MAGMA's order, step by step: Resize(BICUBIC) -> CenterCrop -> convert("RGB") -> ToTensor -> Normalize."""
    assert image.size == (WIDTH, HEIGHT)
    image = image.resize(RESIZED, Image.Resampling.BICUBIC).crop(CROP).convert("RGB")
    array = (np.asarray(image, dtype=np.float32) / np.float32(255.0) - MEAN) / STD
    return torch.from_numpy(array).permute(2, 0, 1)


def convert_first(image: Image.Image) -> torch.Tensor:
    """The old order (RGB before resizing), for the modes where it must give other pixels."""
    image = image.convert("RGB").resize(RESIZED, Image.Resampling.BICUBIC).crop(CROP)
    array = (np.asarray(image, dtype=np.float32) / np.float32(255.0) - MEAN) / STD
    return torch.from_numpy(array).permute(2, 0, 1)


def magma_pixels(images: list[Image.Image], size: int = SIZE) -> torch.Tensor:
    """The MAGMA backend's own entry point (`MagmaVLM.pixel_values`), on a stand-in with just the image size."""
    stand_in = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(image_size=size)))
    return MagmaVLM.pixel_values(stand_in, images)


@pytest.mark.parametrize("mode", MODES)
def test_magma_preprocessing_resizes_and_crops_before_converting(mode):
    image = synthetic(mode)
    before = image.tobytes()
    pixels = magma_pixels([image])
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], magma_reference(image), rtol=0, atol=1e-6)
    assert image.mode == mode and image.tobytes() == before  # the caller's image is left alone
    old = convert_first(image)
    if mode in ORDER_MATTERS:  # reverting to convert-first fails here
        assert (pixels[0] - old).abs().max().item() > 0.1
    else:
        assert torch.equal(pixels[0], old)


def test_pil_resizes_palette_images_nearest_and_rgba_premultiplied():
    """The PIL behaviour that makes the order matter (and that torchvision's Resize inherits on PIL images)."""
    palette = synthetic("P")
    bicubic = palette.resize(RESIZED, Image.Resampling.BICUBIC)
    assert bicubic.mode == "P"
    assert bicubic.tobytes() == palette.resize(RESIZED, Image.Resampling.NEAREST).tobytes()
    rgba = synthetic("RGBA")
    premultiplied = rgba.convert("RGBa").resize(RESIZED, Image.Resampling.BICUBIC).convert("RGBA")
    assert rgba.resize(RESIZED, Image.Resampling.BICUBIC).tobytes() == premultiplied.tobytes()


def test_rgb_pixels_are_unchanged_by_the_order():
    """RGB images (the shapes world's) give exactly the pixels of the step-by-step reference, batched too."""
    images = [synthetic("RGB", seed) for seed in range(3)]
    pixels = magma_pixels(images)
    for row, image in zip(pixels, images):
        assert torch.equal(row, magma_reference(image))
        assert torch.equal(row, convert_first(image))


def write_dataset(tmp_path: Path, modes: list[str]) -> list[Example]:
    """Each mode's synthetic image as a file (PNG; CMYK as TIFF, PNG has no CMYK) and a JSONL that names them."""
    lines = []
    for mode in modes:
        name = f"{mode.lower()}.{'tif' if mode == 'CMYK' else 'png'}"
        synthetic(mode).save(tmp_path / name)
        lines.append(json.dumps({"id": mode, "image": name, "question": "What is it?", "answer": "noise"}))
    path = tmp_path / "images.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_jsonl(path, check_images=True)


@pytest.mark.parametrize("mode", MODES)
def test_files_keep_their_mode_through_the_loader_and_reach_magmas_pixels(tmp_path, mode):
    (example,) = write_dataset(tmp_path, [mode])
    image = load_image(example)
    with Image.open(example.image) as on_disk:  # what MAGMA's ImageInput hands its transform
        assert on_disk.mode == mode
        expected = magma_reference(on_disk)
        assert image.tobytes() == on_disk.tobytes()
        if mode == "P":
            assert image.getpalette() == on_disk.getpalette()
            assert image.info.get("transparency") == on_disk.info.get("transparency") == 3
    assert image.mode == mode and image.size == (WIDTH, HEIGHT)
    assert getattr(image, "fp", None) is None  # decoded and detached from the file
    torch.testing.assert_close(magma_pixels([image])[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(magma_pixels([image])[0], magma_pixels([synthetic(mode)])[0])  # lossless round trip


def test_collated_rows_of_the_tiny_magma_carry_magmas_pixels(tmp_path, tiny_vlm):
    """The path training takes (load_image -> encode_row) at the model's own resolution."""
    size = tiny_vlm.model.config.image_size
    examples = write_dataset(tmp_path, MODES)
    for example in examples:
        row = tiny_vlm.encode_row(load_image(example), "What is it?", "noise")
        with Image.open(example.image) as on_disk:
            expected = to_pixel_values([on_disk], size)[0]
            old = to_pixel_values([on_disk.convert("RGB")], size)[0]
        assert torch.equal(row["pixel_values"], expected)
        assert torch.equal(row["pixel_values"], old) == (example.id not in ORDER_MATTERS)


def test_in_memory_images_are_returned_as_copies():
    original = synthetic("RGB")
    example = Example("x", original, "What is it?", ["noise"])
    image = load_image(example)
    assert image is not original and image.tobytes() == original.tobytes()
    image.putpixel((0, 0), (1, 2, 3))  # a caller drawing on its image leaves the dataset's alone
    assert original.tobytes() == synthetic("RGB").tobytes()
    assert synthetic("RGB").getpixel((0, 0)) != (1, 2, 3)


def test_truncated_file_is_a_data_error(tmp_path):
    """Decoding happens in load_image (so `--verify` and check_images catch it), not later in a backend."""
    path = tmp_path / "cut.png"
    synthetic("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="cut.png"):
        load_image(Example("cut", path, "What is it?", ["noise"], source="images.jsonl:1"))


class RecordingProcessor:
    """An HF processor that records the images it is given and hands the call on."""

    def __init__(self, processor):
        self.processor = processor
        self.images: list[Image.Image] = []

    def __call__(self, images=None, **kwargs):
        self.images.extend(images or [])
        return self.processor(images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


@pytest.fixture(scope="module")
def tiny_llava():
    from illume.demo.tiny_models import build_tiny_hf_vlm

    return build_tiny_hf_vlm("llava")


@pytest.mark.parametrize("mode", MODES)
def test_hf_backend_still_gives_its_processor_pil_rgb(mode, tiny_llava):
    """The HF backend's behaviour is unchanged: its processor gets the image as PIL's convert("RGB") makes it
    (before images kept their mode, load_image did that), not an RGBA/P/CMYK image it would convert its own way."""
    vlm = replace(tiny_llava, processor=RecordingProcessor(tiny_llava.processor))
    image = synthetic(mode)
    row = vlm.encode_row(image, "What is it?")
    assert set(row["labels"]) == {-100} and len(row["labels"]) == len(row["input_ids"])
    (given,) = vlm.processor.images
    assert given.mode == "RGB" and given.tobytes() == image.convert("RGB").tobytes()
    assert image.mode == mode
