"""Which process this is in a distributed run: one rule for the build and the datasets."""

from __future__ import annotations

import os


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The arguments, else torch.distributed when initialised, else $RANK/$WORLD_SIZE, else (0, 1)."""
    if rank is None and world_size is None:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            rank, world_size = td.get_rank(), td.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}; pass both or neither")
    return int(rank), int(world_size)
