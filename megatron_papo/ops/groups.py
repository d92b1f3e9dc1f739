"""Process-group bookkeeping the ops share (pure torch.distributed)."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["rank_and_size"]


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) for None (not parallel)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
