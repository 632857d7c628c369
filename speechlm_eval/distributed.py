"""Multi-process runs through accelerate's process state (works under ``torchrun`` and ``accelerate launch``)."""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def is_distributed_launch() -> bool:
    """True when a launcher (torchrun / accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.cache
def process_state() -> Any:
    """accelerate's ``PartialState``: rank, world size, device and barriers (gloo on CPU, NCCL on GPUs).

    Created once per process; a single-process run gets a trivial state without any process group.
    """
    from accelerate import PartialState

    if is_distributed_launch() and not _has_accelerator():
        # accelerate only sets up a CPU process group when told to; torchrun on CPU machines needs this.
        return PartialState(cpu=True, backend="gloo")
    return PartialState()


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The disjoint share of ``items`` for ``rank``: every ``world_size``-th item (balanced in length after sorting)."""
    return list(items[rank::world_size])
