"""Image preprocessing without torchvision: resize (bicubic), centre crop, CLIP normalisation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from illume.models.clip_resnet import CLIP_MEAN, CLIP_STD


def to_pixel_values(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """Turn PIL images into a normalised batch (N, 3, image_size, image_size), as CLIP's preprocessing does."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    arrays = []
    for image in images:
        image = image.convert("RGB")
        width, height = image.size
        scale = image_size / min(width, height)
        if scale != 1:
            new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        left = (image.width - image_size) // 2
        top = (image.height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        arrays.append((np.asarray(image, dtype=np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
