"""Reference log-probabilities: the model as it was before the round, scored once before training.

DPO and KTO compare the policy with a reference model. Iterative DPO's reference is the model the round
started from; since only the adapters train, keeping a second copy of the model would double the memory for
nothing. Instead every row's reference log-prob is computed once, in eval mode, before the first update (what
TRL's `precompute_ref_log_probs=True` does), and stored with the row; the trainers never run a reference
forward pass. The reference cannot drift: it is a number per row, frozen before training starts.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from policies.losses import sequence_logps


def batch_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs, number of target tokens) per row of a collated batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels" and v is not None}
    logits = model(**inputs, use_cache=False).logits
    return sequence_logps(logits, batch["labels"])


@torch.no_grad()
def reference_logps(model, rows: list[dict], collate, batch_size: int, device: torch.device,
                    autocast_dtype: torch.dtype | None = None, desc: str = "reference log-probs") -> torch.Tensor:
    """Sequence log-probs of `rows` under `model` in eval mode (restoring its train/eval mode afterwards).

    Args:
        rows: Encoded rows (`VLM.encode_row` / `RowEncoder` output); collate: the VLM's `collate`.
        autocast_dtype: Mixed precision the training runs in (None: full precision), so that the reference
            is scored the way the policy will be.
    """
    was_training = model.training
    model.eval()
    model.to(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    out = []
    with autocast:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                     for k, v in collate(rows[start:start + batch_size]).items()}
            out.append(batch_logps(model, batch)[0].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
