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


SMALL_MODEL_PARAMETERS = 100_000_000  # below this, one CPU thread per process beats several (see set_threads)


def set_threads(requested: int | None, device: Any, n_parameters: int) -> int:
    """Set torch's intra-op threads for this process and return the number used.

    ``requested`` wins when given. Otherwise: on a GPU, torch's default; on CPU, one thread per process for small
    models (< 100 M parameters), whose kernels are too short to gain from a second thread and lose badly when any
    other process wants a core (the embedded gap: 4.9 s at one thread vs 94 s at two beside another job), and torch's
    default for larger ones. One thread also fixes the order of CPU reductions, so reruns match bit for bit.
    """
    import torch

    if requested is None:
        on_cpu = getattr(device, "type", str(device)) == "cpu"
        if not on_cpu or n_parameters >= SMALL_MODEL_PARAMETERS:
            return torch.get_num_threads()
        requested = 1
    if requested < 1:
        raise ValueError(f"--threads must be at least 1, got {requested}")
    torch.set_num_threads(requested)
    return requested
