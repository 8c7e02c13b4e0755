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

from illume.collate import collate_rows
from illume.models.image_processing import to_pixel_values
from illume.models.magma import MagmaForCausalLM, register_magma


class VLM(Protocol):
    """What the rest of illume needs from a vision-language model backend."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    backend: str
    """"magma" or "hf": which sampler decodes for it."""

    @property
    def eos_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor: ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def prompt_ids(self, text: str) -> list[int]: ...

    def text_ids(self, text: str) -> list[int]: ...

    def completion_ids(self, text: str, prompt: str = "") -> list[int]: ...

    def encode_row(self, image: Image.Image, prompt: str, completion: str | None = None) -> dict: ...

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor | None]: ...

    def set_trainable(self, adapters: bool = True, prefix: bool = False) -> None: ...

    def save(self, directory: Path) -> None: ...


@dataclass
class MagmaVLM:
    """Our MAGMA model with its tokenizer; image rows start with `num_image_tokens` `<|image|>` tokens."""

    model: MagmaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    backend = "magma"

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

    def completion_ids(self, text: str, prompt: str = "") -> list[int]:
        """The target ids of a completion (rationale or answer) after its prompt: ` text<eos>` (the word-level
        and GPT-2 tokenizers encode it the same whatever the prompt)."""
        return self.text_ids(" " + text.strip()) + [self.eos_token_id]

    def set_trainable(self, adapters: bool = True, prefix: bool = False) -> None:
        """MAGMA's adapters train (optionally the prefix projection); everything else is frozen."""
        self.model.set_trainable(adapters=adapters, prefix=prefix)

    def encode_row(self, image: Image.Image, prompt: str, completion: str | None = None) -> dict:
        """One training/scoring row: `input_ids`, `labels` (-100 over the image slots and the prompt) and the
        image's `pixel_values` (3, S, S). Without a completion it is the exact prefix generation continues."""
        prompt_ids = self.prompt_ids(prompt)
        target = self.completion_ids(completion) if completion is not None else []
        return {"input_ids": prompt_ids + target, "labels": [-100] * len(prompt_ids) + target,
                "pixel_values": self.pixel_values([image])[0]}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor | None]:
        """Right-padded batch of `encode_row` rows (images stacked in row order)."""
        return collate_rows(rows, self.pad_token_id)

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
