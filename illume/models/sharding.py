"""Weights sharded by DeepSpeed ZeRO-3, seen whole outside training.

Assumptions, up front:
- `train.deepspeed` naming a ZeRO stage-3 config partitions every parameter of the model over the ranks when
  the first Trainer starts (`deepspeed.initialize`), frozen weights included; small ones (below
  `stage3_param_persistence_threshold`) stay whole on every rank. The partitions stay in place between rounds:
  the next round's Trainer reuses them.
- Training itself needs nothing from here: DeepSpeed's hooks gather each layer for its forward and backward.
- Everything else reads whole tensors: sampling (answers, candidates, val decoding), the reference log-probs of
  DPO and KTO, saving and loading adapters. Those steps run inside `whole(model)`, which gathers the
  partitioned parameters on every rank for the block, as TRL does under ZeRO-3 for generation
  (`unwrap_model_for_generation`). The full model must fit one device for that block, as it must in TRL.
- `whole` is collective: every rank enters it, the same number of times. Inside it there are no collectives,
  so ranks may decode shares of different lengths. It is re-entrant: an inner `whole` over parameters an
  outer one gathered does nothing, so the outermost block decides whether writes are kept.
- After `train()`, `release_training_hooks` removes the engine's hooks (`DeepSpeedEngine.destroy`): ZeRO-3's
  would otherwise fetch partitions, a collective, in every forward pass made outside training.
- A model that is done training and is then used on one rank alone (the reward model: the critic scores on
  rank 0 while the others wait) cannot gather there, since gathering is collective. `unshard` turns it back
  into plain whole tensors on every rank once, after its training.
- Without ZeRO-3 (one process, DDP, ZeRO-1/2) every function here is a no-op, and DeepSpeed is not imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_held: dict[int, bool] = {}
"""id of each parameter an open `whole` block gathered -> whether that block keeps writes."""


@contextlib.contextmanager
def whole(model: nn.Module, parameters: Iterable[torch.Tensor] | None = None,
          keep_writes: bool = False) -> Iterator[None]:
    """Inside the block, every rank holds the full tensors of `parameters` (default: all of `model`'s).

    Args:
        keep_writes: What the block writes into the tensors is kept: rank 0's values become the partitions on
            exit (every rank writes the same values here: loaded adapters). Otherwise writes are dropped.
            Small parameters ZeRO-3 keeps whole on every rank are gathered too then: their partition, which
            the next engine's optimizer starts from, is written on exit, not only the whole copy.
    """
    # DeepSpeed marks its parameters with `ds_id`; a whole one (gathered, or kept whole) is AVAILABLE.
    ours = [p for p in (model.parameters() if parameters is None else parameters) if hasattr(p, "ds_id")]
    if keep_writes and any(_held.get(id(p)) is False for p in ours):
        raise RuntimeError("writes kept inside a `whole` block that drops them: make the outer block keep_writes")
    pending = [p for p in ours if id(p) not in _held
               and (keep_writes or p.ds_status.name == "NOT_AVAILABLE")]
    if not pending:  # not sharded, or an outer block gathered them already
        yield
        return
    import deepspeed  # only reached when DeepSpeed partitioned the model

    _held.update({id(p): keep_writes for p in pending})
    try:
        with deepspeed.zero.GatheredParameters(pending, modifier_rank=0 if keep_writes else None):
            yield
    finally:
        for p in pending:
            _held.pop(id(p), None)


def unshard(model: nn.Module) -> None:
    """Replace every ZeRO-3 partitioned parameter of `model` by a plain whole one, on every rank (collective:
    every rank calls it). For a model whose training is over (`release_training_hooks` first): afterwards any
    rank may use it alone, and nothing of DeepSpeed is left on it. Gathered one parameter at a time, so the
    peak is the whole model plus one parameter. A no-op without ZeRO-3."""
    sharded = [p for p in model.parameters() if hasattr(p, "ds_id")]  # each shared parameter once
    if not sharded:
        return
    import deepspeed

    plain: dict[int, nn.Parameter] = {}
    for p in sharded:
        with deepspeed.zero.GatheredParameters([p]):
            plain[id(p)] = nn.Parameter(p.data.detach().clone(), requires_grad=p.requires_grad)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):  # every holder of a tied weight too
            if id(p) in plain:
                setattr(module, name, plain[id(p)])


def release_training_hooks(wrapped_model: nn.Module) -> None:
    """Remove a DeepSpeed engine's hooks once its training is over (`DeepSpeedEngine.destroy`): ZeRO-3's forward
    hooks (see the module's notes) and ZeRO-1/2's gradient hooks, which would otherwise still reduce gradients
    into this engine's buffers when the next round's engine trains the same parameters. The partitions stay;
    the next Trainer's engine reuses them and adds its own hooks. A no-op for any other model."""
    if type(wrapped_model).__name__ == "DeepSpeedEngine":
        wrapped_model.destroy()
