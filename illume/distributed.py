"""Several processes (torchrun / accelerate launch): who is who, sharding work, and meeting points.

Assumptions, up front:
- A launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun and `accelerate launch`
  both do). Without them everything here is the single-process no-op: rank 0 of 1, `shard` returns all items.
- `init_if_launched` joins the default process group early (gloo on CPU, nccl on GPUs), because the loop
  samples before any Trainer exists; the HF Trainer (accelerate) and DeepSpeed then reuse that group.
- The helpers below talk over a second, gloo group with a long timeout: rank 0 may wait hours for people to
  judge while the others wait at a barrier, far longer than the default group's timeout (meant to catch hung
  training collectives), and gloo carries pickled Python objects on CPU whatever the training backend is.
  If a rank crashes, the launcher stops the others; nothing waits for the timeout.
- With WORLD_SIZE > 1 the collectives below need the group joined (`init_if_launched`); they fail loudly
  otherwise rather than quietly returning one rank's share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

COORDINATION_TIMEOUT = timedelta(days=7)
"""How long a rank waits at a barrier for the others (rank 0 may be waiting for people)."""

_coordination: tuple[object, object] | None = None  # (default group it was made for, the gloo group)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes: from the process group once joined, else from the launcher's WORLD_SIZE."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0, the one process that writes files and the feedback store."""
    return rank() == 0


def init_if_launched() -> bool:
    """Join the default process group when started by a launcher with WORLD_SIZE > 1 (idempotent).

    Returns:
        True when running with several processes.
    """
    if world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def ddp_backend() -> str | None:
    """TrainingArguments.ddp_backend: gloo for several CPU processes (accelerate would take MPI when torch has
    it); None otherwise (nccl on GPUs; one process must not name a backend, or accelerate expects a group)."""
    return "gloo" if world_size() > 1 and not torch.cuda.is_available() else None


def _group():
    """The gloo group the helpers use, made (collectively, by every rank) for the current default group."""
    global _coordination
    if _coordination is None or _coordination[0] is not dist.group.WORLD:
        _coordination = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT))
    return _coordination[1]


def shard(items: Sequence, block_size: int = 1) -> list:
    """This rank's contiguous share of `items`, in whole blocks of `block_size` items.

    Blocks of the sampler's batch size keep every batch the same as in a single-process run (same
    padding, same shapes), so results do not depend on the number of processes. `gather_objects` of the
    per-rank results, flattened in rank order, is in the order of `items`.
    """
    n = world_size()
    if n == 1:
        return list(items)
    num_blocks = -(-len(items) // block_size)
    first, last = rank() * num_blocks // n, (rank() + 1) * num_blocks // n
    return list(items[first * block_size:last * block_size])


def gather_objects(items: list) -> list:
    """Every rank's `items` (picklable) concatenated in rank order, on every rank."""
    if world_size() == 1:
        return list(items)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, items, group=_group())
    return [item for part in gathered for item in part]


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank (the others pass anything); also a meeting point."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def barrier() -> None:
    """Wait until every rank got here."""
    if world_size() > 1:
        dist.barrier(group=_group())


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creates the store's tables); the others run it once rank 0 is done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
