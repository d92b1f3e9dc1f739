"""Process-group bookkeeping the ops share (pure torch.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_int", "all_reduce_int", "collective_device", "rank_and_size"]


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


def _parallel(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_int(value: int, group: dist.ProcessGroup | None,
                   op: dist.ReduceOp = dist.ReduceOp.SUM) -> int:
    """``op`` (SUM by default) of one Python int over ``group``; ``value`` itself without one."""
    t = torch.tensor(value, dtype=torch.int64, device=collective_device(group))
    if _parallel(group):
        dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def all_gather_int(value: int, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's ``value``, in ``group``-rank order; ``[value]`` without a group."""
    if not _parallel(group):
        return [value]
    device = collective_device(group)
    out = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor(value, dtype=torch.int64, device=device), group=group)
    return [int(t.item()) for t in out]
