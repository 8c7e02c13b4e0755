"""Benchmark: what the image check before a run's model loads costs, per 10,000 images.

    python scripts/bench_images.py                      # 10,000 JPEG and 10,000 PNG images, twice each
    python scripts/bench_images.py --num-images 2000 --formats jpeg --repeats 1     # a quick look

`illume run`, `baseline`, `reward train` and `dpo`/`kto` call `load_split(..., images_must_exist=True)` before
loading the model. With `data.check_images=true` (the default) that opens every image file
(`records.verify_image`: the header, the size against `PIL.Image.MAX_IMAGE_PIXELS`, `Image.verify`); with
false it only stats each file. This script writes `--num-images` COCO-like images, 640x480 RGB (smooth colour
fields plus noise; about 120 KiB as JPEG, quality 90, and about 0.7 MiB as PNG, PIL's default compression),
lists them in a JSONL file, and times per format, in seconds per 10,000 images:

- `stat only`: `load_split` with `data.check_images=false` (also parses the JSONL file);
- `check`: `load_split` with `data.check_images=true`, what a run does by default;
- `open only`: `Image.open` and the size per file, no `verify` (what verify adds is `check` minus this);
- `decode`: `records.load_image` on the first `--decode-images` files, scaled up (what decoding every image
  up front would cost instead, for comparison).

Assumptions, up front:
- The files were just written, so they are in the page cache: the figures are the check's CPU cost. On a cold
  disk add the reads: a JPEG's header is a few KiB, but PNG's verify reads the whole file (every chunk's CRC).
- `--num-images` files are written from a pool of 50 distinct images (encoding is slower than the check).
- Figures taken while other work runs are contended: each is measured `--repeats` times; quote them all.
- No timing is asserted anywhere; the figures are printed.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from illume.config import DataConfig
from illume.data.datasets import load_split
from illume.data.records import load_image

FORMATS = {"jpeg": ("JPEG", ".jpg", {"quality": 90}), "png": ("PNG", ".png", {})}
POOL = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=["jpeg", "png"])
    parser.add_argument("--repeats", type=int, default=2, help="times each measurement is taken")
    parser.add_argument("--decode-images", type=int, default=500, help="files decoded for the `decode` row")
    parser.add_argument("--dir", default=None, help="where the images go (default: a temporary folder, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_images_") as folder:
        for name in args.formats:
            jsonl = write_images(Path(folder) / name, name, args.num_images)
            for repeat in range(1, args.repeats + 1):
                report(name, repeat, measure(jsonl, args.num_images, args.decode_images))


def write_images(folder: Path, name: str, count: int) -> Path:
    """`count` image files of format `name` in `folder` and a JSONL file listing them; returns its path."""
    fmt, suffix, options = FORMATS[name]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(POOL):
        buffer = io.BytesIO()
        coco_like(rng).save(buffer, fmt, **options)
        pool.append(buffer.getvalue())
    with (folder / "train.jsonl").open("w") as lines:
        for index in range(count):
            (folder / f"{index:06d}{suffix}").write_bytes(pool[index % POOL])
            lines.write(json.dumps({"image": f"{index:06d}{suffix}", "question": "q?", "answer": "a"}) + "\n")
    size = sum(len(b) for b in pool) / POOL / 1024
    print(f"{name}: {count} files of 640x480, {size:.0f} KiB on average, in {folder}")
    return folder / "train.jsonl"


def coco_like(rng: np.random.Generator) -> Image.Image:
    """A 640x480 photo stand-in: smooth colour fields (a 20x15 random image, upscaled) plus sensor-like noise,
    so that it compresses about as well as a COCO photo (random noise alone would not compress at all)."""
    small = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    pixels = np.asarray(small).astype(np.int16) + rng.normal(0, 12, (480, 640, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def measure(jsonl: Path, count: int, decode_count: int) -> dict[str, float]:
    """Seconds per 10,000 images of each way of checking the files `jsonl` lists."""
    per_10k = 10_000 / count
    cfg = DataConfig(kind="jsonl", train_path=str(jsonl))
    seconds = {}
    for name, check in (("stat only", False), ("check", True)):
        cfg.check_images = check
        start = time.perf_counter()
        examples = load_split(cfg, "train", images_must_exist=True)
        seconds[name] = (time.perf_counter() - start) * per_10k
    start = time.perf_counter()
    pixels = 0
    for example in examples:
        with Image.open(example.image) as image:
            pixels += image.width * image.height  # what the size check reads: the header is parsed by now
    seconds["open only"] = (time.perf_counter() - start) * per_10k
    subset = examples[:decode_count]
    start = time.perf_counter()
    for example in subset:
        load_image(example)
    seconds["decode"] = (time.perf_counter() - start) * 10_000 / len(subset)
    return seconds


def report(name: str, repeat: int, seconds: dict[str, float]) -> None:
    cells = ", ".join(f"{key} {value:.2f} s" for key, value in seconds.items())
    print(f"{name} (measurement {repeat}), per 10,000 images: {cells}", flush=True)


if __name__ == "__main__":
    main()
