"""The VLM protocol everything above the backend uses, and its MAGMA implementation.

The sampler, the trainers, the reward model and the critics see only this protocol; what really differs
between backends lives behind it:

- rows: `encode_row` (image + prompt [+ completion], labels) and `collate`, for training and scoring;
- decoding: `prepare_images` (once per batch) and `decode` (greedy or per-row-temperature Gumbel-max
  sampling, optionally top-k / top-p filtered, per-example generators), which the one sampler,
  `illume.sampling.sample`, calls;
- hidden states: `encode_scored` / `collate_scored` (rows a reward head reads, images shared where the backend
  can share them) and `last_hidden_states`, which `reward.model.RewardModel` pools.

`MagmaVLM` (below) decodes with our KV-cache loop (illume.models.magma_decoding) and encodes each image once
for all the rows that show it; `illume.models.hf.HFVLM` implements the same methods with `generate` and the
model's own forward. Nothing outside illume/models/ asks which one it has.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from illume.collate import collate_rows, pad_right
from illume.models import magma_decoding
from illume.models.image_processing import to_pixel_values
from illume.models.magma import MagmaForCausalLM, register_magma
from illume.models.weights import WRITE_AGAIN, check_finite, record_digests, verify_digests

ScoredItem = tuple[Image.Image, str, Sequence[str]]
"""(image, prompt, completions): one image shown with several completions of one prompt."""


class VLM(Protocol):
    """What the rest of illume needs from a vision-language model backend."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    answer_stops: tuple[str, ...]
    """Texts that end the model's own (greedy) answer, besides EOS: single-token ones stop decoding, and the
    answer's text is cut at the first of each (the rationale prompt supplies ", seeing that")."""

    @property
    def eos_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def text_ids(self, text: str) -> list[int]: ...

    def completion_ids(self, text: str, prompt: str = "") -> list[int]: ...

    # --- rows, for training and scoring

    def encode_row(self, image: Image.Image | None, prompt: str, completion: str | None = None) -> dict:
        """One training/scoring row: the image (None: a text-only row), the prompt, the completion and its end
        token; `labels` -100 where no loss."""

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor | None]: ...

    # --- decoding, for the sampler

    def prepare_images(self, images: list[Image.Image]) -> object:
        """A batch's images in the form `decode` takes, prepared once for all the prompts about them."""

    def decode(self, images: object, prompts: list[str], num_copies: int, max_new_tokens: int,
               stop_ids: Sequence[int], temperatures: torch.Tensor | None = None,
               generators: list[torch.Generator] | None = None, top_k: int | None = None,
               top_p: float = 1.0) -> tuple[list[list[int]], list[float]]:
        """Decode `num_copies` continuations of each prompt (about image i of `images`) until a stop token.

        Args:
            images: `prepare_images` output, one image per prompt.
            temperatures: (len(prompts) * num_copies,) per-row temperatures, rows grouped by prompt; 0 greedy.
            generators: One per prompt, for its rows' Gumbel noise; None: every row greedy.
            top_k, top_p: Sampled rows draw only from the top-k tokens / the top-p nucleus of their
                temperature-scaled logits (`illume.models.logits_filters`); 0 or None / 1.0: off.

        Returns:
            The new tokens of every row (stop token excluded), prompt-major, and their summed
            log-probabilities at T = 1 (stop token included).
        """

    # --- hidden states, for a reward head

    def encode_scored(self, items: Sequence[ScoredItem]) -> list[list[dict]]:
        """Rows `image + prompt + " " + completion + EOS` of each item, for inference (images are encoded
        here when the backend can reuse them), each with `rationale_start` (its completion's first token)."""

    def collate_scored(self, rows: list[dict], image_keys: Sequence[Hashable]) -> dict[str, torch.Tensor]:
        """A batch of scored rows (`encode_scored` rows, or `encode_row` rows given a `rationale_start` and
        no labels); `image_keys[i]` names the image row i shows (rows naming the same image share it where the
        backend can). Returns `last_hidden_states`' inputs plus `rationale_start`."""

    def last_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           **image_inputs) -> torch.Tensor:
        """(B, T, D) final hidden states (after the LM's last norm) of a `collate_scored` batch."""

    # --- training and saving

    def set_trainable(self, adapters: bool = True, prefix: bool = False, everything: bool = False) -> None:
        """Choose what trains: the adapters (ILLUME's default), optionally the image prefix/projector, or every
        weight of the model (`everything`: pre-training the demo base model)."""

    def save(self, directory: Path) -> None: ...


@dataclass
class MagmaVLM:
    """Our MAGMA model with its tokenizer; image rows start with `num_image_tokens` `<|image|>` tokens."""

    model: MagmaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    answer_stops = (",",)

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

    def set_trainable(self, adapters: bool = True, prefix: bool = False, everything: bool = False) -> None:
        """MAGMA's adapters train (optionally the prefix projection); everything else is frozen, unless
        `everything`."""
        self.model.set_trainable(adapters=adapters, prefix=prefix, everything=everything)

    def encode_row(self, image: Image.Image | None, prompt: str, completion: str | None = None) -> dict:
        """One training/scoring row: `input_ids`, `labels` (-100 over the image slots and the prompt) and the
        image's `pixel_values` (3, S, S); without an image, no image slots and `pixel_values` None. Without a
        completion it is the exact prefix generation continues."""
        prompt_ids = self.prompt_ids(prompt) if image is not None else self.text_ids(prompt)
        target = self.completion_ids(completion) if completion is not None else []
        return {"input_ids": prompt_ids + target, "labels": [-100] * len(prompt_ids) + target,
                "pixel_values": self.pixel_values([image])[0] if image is not None else None}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor | None]:
        """Right-padded batch of `encode_row` rows (images stacked in row order)."""
        return collate_rows(rows, self.pad_token_id)

    # --- decoding: each image encoded once, each prompt pre-filled once (illume.models.magma_decoding)

    @property
    def banned_token_ids(self) -> list[int]:
        """Tokens decoding never draws: padding and the image slot."""
        ids = (self.pad_token_id, self.image_token_id)
        return [t for t in ids if t is not None and t != self.eos_token_id]

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The images' prefix features (N, P, D): encoded once for the answer and the rationale prompts."""
        return self.encode_images(self.pixel_values(images))

    def decode(self, images: torch.Tensor, prompts: list[str], num_copies: int, max_new_tokens: int,
               stop_ids: Sequence[int], temperatures: torch.Tensor | None = None,
               generators: list[torch.Generator] | None = None, top_k: int | None = None,
               top_p: float = 1.0) -> tuple[list[list[int]], list[float]]:
        """`VLM.decode` with our KV-cache loop: each prompt pre-filled once, its cache repeated per copy."""
        if temperatures is None:
            temperatures = torch.zeros(len(prompts) * num_copies)
        return magma_decoding.decode(self.model, [self.prompt_ids(p) for p in prompts], images, num_copies,
                                     temperatures, generators, max_new_tokens, stop_ids, self.pad_token_id,
                                     self.banned_token_ids, top_k, top_p)

    # --- hidden states: rows share their image's features (`image_index`)

    def encode_scored(self, items: Sequence[ScoredItem]) -> list[list[dict]]:
        """`VLM.encode_scored`: the items' images are encoded here, in one batch, and every row of an item
        carries its image's features (`image_embeds`), so that an item whose rows span batches is encoded
        once."""
        pixels = self.pixel_values([image for image, _, _ in items]).to(self.device)
        features = self.model.encode_images(pixels)
        groups = []
        for (_, prompt, completions), image_embeds in zip(items, features):
            prompt_ids = self.prompt_ids(prompt)
            groups.append([{"input_ids": prompt_ids + self.completion_ids(text),
                            "rationale_start": len(prompt_ids), "image_embeds": image_embeds}
                           for text in completions])
        return groups

    def collate_scored(self, rows: list[dict], image_keys: Sequence[Hashable]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, the distinct images of the batch once each, in order of first appearance
        (`image_embeds` when the rows carry features, else `pixel_values`), and `image_index`: which of them
        each row shows."""
        slots: dict[Hashable, int] = {}
        first_rows = []  # one row per distinct image
        for row, key in zip(rows, image_keys):
            if key not in slots:
                slots[key] = len(slots)
                first_rows.append(row)
        input_ids, attention_mask = pad_right([row["input_ids"] for row in rows], self.pad_token_id)
        image_key = "image_embeds" if "image_embeds" in first_rows[0] else "pixel_values"
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                image_key: torch.stack([row[image_key] for row in first_rows]),
                "image_index": torch.tensor([slots[key] for key in image_keys]),
                "rationale_start": torch.tensor([row["rationale_start"] for row in rows])}

    def last_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                           image_index: torch.Tensor | None = None) -> torch.Tensor:
        """The LM body's final hidden states (after its last LayerNorm; no vocabulary projection).

        Args:
            pixel_values: (N, 3, S, S) images, encoded here; or `image_embeds`: (N, P, D) encoded ones.
            image_index: (B,) which of the N images each row shows (None: N == B, row i shows image i).
        """
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.model.encode_images(pixel_values)
        if image_embeds is not None and image_index is not None:
            image_embeds = image_embeds[image_index]
        inputs_embeds = self.model.embed(input_ids, image_embeds=image_embeds)
        return self.model.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state  # (B, T, D)

    # --- saving and loading

    def save(self, directory: Path) -> None:
        """Write the whole model (safetensors, each with its digest) and the tokenizer."""
        self.model.save_pretrained(directory)
        record_digests(directory)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             remedy: str = WRITE_AGAIN) -> MagmaVLM:
        """Load a model written by `save` (weights from safetensors only, their recorded digests checked first,
        every value finite after).

        Raises:
            FileNotFoundError: no saved model in `directory`.
            WeightsFileError: a weights file changed since it was written, or NaN or infinite weights; the
                message says `remedy`.
        """
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"no saved model in {directory} (config.json missing)")
        register_magma()
        verify_digests(directory, remedy)
        model = MagmaForCausalLM.from_pretrained(directory, use_safetensors=True).to(device).eval()
        check_finite(model.named_parameters(), directory, remedy)
        model.set_trainable(adapters=True)  # ILLUME's default: adapters train, everything else is frozen
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(model, tokenizer)
