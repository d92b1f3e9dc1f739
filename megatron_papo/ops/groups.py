"""Process-group bookkeeping the ops share (pure torch.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device", "rank_and_size"]


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a tensor must live to cross ``group``: the current CUDA device for an NCCL group,
    the CPU otherwise (gloo, or no process group). NCCL rejects CPU tensors; gloo takes both."""
    if group is not None and dist.is_initialized() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) for None (not parallel)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
