"""The VLM protocol everything above the backend uses, and its MAGMA implementation.

The sampler, the trainers and the critics see only this: turn images into image features once, turn a
prompt into token ids with the image slots in place, run the model with features instead of pixels. An HF
VLM backend (LLaVA, Qwen2-VL through PEFT) implements the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from illume.models.image_processing import to_pixel_values
from illume.models.magma import MagmaForCausalLM, register_magma


class VLM(Protocol):
    """What the rest of illume needs from a vision-language model backend."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def eos_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor: ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def prompt_ids(self, text: str) -> list[int]: ...

    def text_ids(self, text: str) -> list[int]: ...

    def save(self, directory: Path) -> None: ...


@dataclass
class MagmaVLM:
    """Our MAGMA model with its tokenizer; image rows start with `num_image_tokens` `<|image|>` tokens."""

    model: MagmaForCausalLM
    tokenizer: PreTrainedTokenizerBase

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP-normalised pixels (N, 3, S, S) at the encoder's resolution."""
        return to_pixel_values(images, self.model.config.image_size)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image prefix features (N, num_image_tokens, hidden)."""
        return self.model.encode_images(pixel_values.to(self.device))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a piece of text, without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str) -> list[int]:
        """The image slots followed by the text's token ids."""
        return [self.image_token_id] * self.model.config.num_image_tokens + self.text_ids(text)

    def save(self, directory: Path) -> None:
        """Write the whole model (safetensors) and the tokenizer."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> MagmaVLM:
        """Load a model written by `save` (weights from safetensors only)."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"no saved model in {directory} (config.json missing)")
        register_magma()
        model = MagmaForCausalLM.from_pretrained(directory, use_safetensors=True).to(device).eval()
        model.set_trainable(adapters=True)  # ILLUME's default: adapters train, everything else is frozen
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(model, tokenizer)
