"""Image preprocessing without torchvision, step for step CLIP's (`clip.load(...)[1]`, which MAGMA uses).

CLIP composes torchvision's `Resize(n, BICUBIC)`, `CenterCrop(n)`, `convert("RGB")`, `ToTensor` and
`Normalize`. On PIL images that means: scale the shorter side to n and the longer one to `int(n * long /
short)` (truncated, not rounded; an image whose shorter side is already n is left alone) with PIL's bicubic
resize, crop at offsets `int(round((size - n) / 2))`, then RGB, [0, 1] and CLIP's mean/std. A one-pixel
difference in either step shifts every prefix token, so they are reproduced exactly.

The order is MAGMA's (`clip_preprocess` in Aleph-Alpha/magma's transforms, which hands the PIL image over in the
mode it was opened in): resize and crop in the image's own mode, then RGB. It matters only for images that are
not RGB or L, because PIL's resize depends on the mode: a palette ("P") or "1" image is resized with NEAREST
whatever resample is asked for (PIL switches silently; torchvision's Resize on a PIL image calls `Image.resize`
and so does the same); RGBA and LA are resized premultiplied by alpha (the colour under transparent pixels does
not bleed in) and their alpha is then dropped by the conversion; CMYK is resized per ink channel before PIL's
CMYK -> RGB formula. Converting first would give other pixels for P, RGBA and CMYK images (RGB and L agree).
`illume.data.records.load_image` therefore keeps the file's mode; the HF backend converts for its processor.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from illume.models.clip_resnet import CLIP_MEAN, CLIP_STD


def resize_and_crop(image: Image.Image, image_size: int) -> Image.Image:
    """CLIP's resize (shorter side to `image_size`, bicubic) and centre crop, in the image's own mode."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != image_size:
        new_long = int(image_size * long / short)
        new_size = (image_size, new_long) if width <= height else (new_long, image_size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = int(round((image.width - image_size) / 2.0))
    top = int(round((image.height - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def to_pixel_values(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """PIL images as a normalised batch (N, 3, image_size, image_size), as CLIP's preprocessing makes it."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    arrays = []
    for image in images:
        # CLIP converts to RGB after resizing and cropping; the order matters for palette and RGBA images.
        image = resize_and_crop(image, image_size).convert("RGB")
        arrays.append((np.asarray(image, dtype=np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
