"""Which rank this process is, and how many there are: explicit, else ``torch.distributed``.

Imports nothing heavy: ``torch.distributed`` is asked only when it is already imported, since
a process group cannot be initialised without importing it first. So ``BatchReader`` gets its
rank from torch when the training script uses torch, and needs no torch otherwise.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """``(rank, world_size)``: each as given, else from an initialised ``torch.distributed``
    process group, else ``(0, 1)``."""
    dist = sys.modules.get("torch.distributed")
    initialised = dist is not None and dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    rank, world_size = int(rank), int(world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} for world_size {world_size}")
    return rank, world_size


def balanced_bounds(n: int, world_size: int) -> list:
    """Start of each rank's span of ``n`` items, then ``n``: the first ``n % world_size``
    ranks get one item more than the others."""
    per, extra = divmod(n, world_size)
    return [r * per + min(r, extra) for r in range(world_size + 1)]


def check_world_change(saved_world: int, world_size: int, epoch: int, position: int, what: str) -> None:
    """Refuse to resume mid-epoch with another world size (the epoch's split among ranks
    depends on it); at an epoch boundary the next epoch is simply planned for the new one."""
    if saved_world != world_size and position:
        raise ValueError(
            f"{what} state was saved by {saved_world} ranks in epoch {epoch} (position {position}); this run has "
            f"{world_size}: resume that epoch with {saved_world} ranks, or call set_epoch({epoch + 1}) instead of "
            "load_state_dict to start the next epoch with the new world size"
        )
