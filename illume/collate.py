"""Batching of training rows for any trainer (pre-training, selection-SFT, later DPO/RM).

A row is a dict with `input_ids` and `labels` (lists; -100 where no loss) and `pixel_values` (a (3, S, S)
tensor, or None for text-only rows). Rows are right-padded; images are stacked in row order, which is the
order `MagmaForCausalLM.embed` fills the `<|image|>` slots in.
"""

from __future__ import annotations

import torch


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
