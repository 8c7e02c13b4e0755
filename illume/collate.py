"""Batching of training rows for any trainer (pre-training, selection-SFT, later DPO/RM).

A row is a dict with `input_ids` and `labels` (lists; -100 where no loss) and `pixel_values` (a (3, S, S)
tensor, or None for text-only rows). Rows are right-padded; images are stacked in row order, which is the
order `MagmaForCausalLM.embed` fills the `<|image|>` slots in.
"""

from __future__ import annotations

import torch


def collate_rows(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor | None]:
    """Pad `input_ids`/`labels` on the right and stack the images of the rows that have one."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        attention_mask[i, :n] = 1
    images = [row["pixel_values"] for row in rows if row.get("pixel_values") is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.stack(images) if images else None,
    }
