"""Encoding and batching of training rows for any trainer (pre-training, selection-SFT, DPO/KTO, the RM).

A row is a dict with `input_ids` and `labels` (lists; -100 where no loss) and `pixel_values` (a (3, S, S)
tensor, or None for text-only rows). Rows are right-padded; images are stacked in row order, which is the
order `MagmaForCausalLM.embed` fills the `<|image|>` slots in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from illume.data.records import Example, load_image


def pad_right(sequences: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists into (B, T) ids and the matching attention mask."""
    length = max(len(seq) for seq in sequences)
    padded = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        padded[i, :len(seq)] = torch.as_tensor(seq)
        attention_mask[i, :len(seq)] = 1
    return padded, attention_mask


def collate_rows(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor | None]:
    """Pad `input_ids`/`labels` on the right and stack the images of the rows that have one."""
    input_ids, attention_mask = pad_right([row["input_ids"] for row in rows], pad_token_id)
    labels, _ = pad_right([row["labels"] for row in rows], -100)
    images = [row["pixel_values"] for row in rows if row.get("pixel_values") is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.stack(images) if images else None,
    }


class RowEncoder:
    """Encodes (example, prompt, completion) rows through a VLM's `encode_row`, each (example, prompt) once.

    Rows of the same prompt share its image tensors (one copy per image, however many completions: a DPO set
    has dozens of rows per image) and its prompt ids; a completion is appended with `vlm.completion_ids`,
    which relies on `encode_row(image, prompt)` being the exact prefix of `encode_row(image, prompt, c)`.
    """

    def __init__(self, vlm, examples_by_id: Mapping[str, Example]):
        self.vlm, self.examples_by_id = vlm, examples_by_id
        self._prompts: dict[tuple[str, str], dict] = {}

    def __call__(self, example_id: str, prompt: str, completion: str) -> dict:
        key = (example_id, prompt)
        if key not in self._prompts:
            if example_id not in self.examples_by_id:
                raise KeyError(f"example {example_id!r} is not in the dataset given")
            self._prompts[key] = self.vlm.encode_row(load_image(self.examples_by_id[example_id]), prompt)
        base = self._prompts[key]
        target = self.vlm.completion_ids(completion, prompt)
        row = {**base, "input_ids": base["input_ids"] + target, "labels": base["labels"] + target}
        for name, value in base.items():  # other per-token lists (Qwen2-VL's token types): the completion is text
            if isinstance(value, list) and name not in ("input_ids", "labels"):
                row[name] = value + [0] * len(target)
        return row
