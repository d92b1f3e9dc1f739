"""Context parallelism helpers: zigzag sequence sharding, gathering, and global token means.

Zigzag layout. With causal attention, the later positions of a sequence cost more; to balance
the ranks, the sequence (padded to a multiple of 2*cp) is cut into 2*cp equal chunks and rank r
keeps chunks r and 2*cp-1-r, concatenated in that order:

    cp=2, chunks c0 c1 c2 c3:   rank 0 -> [c0, c3]   rank 1 -> [c1, c2]

Per-token results (log-probs, entropies, KL) are computed locally on each rank's tokens; only
[B, L]-sized results ever cross the CP group, and token means are taken over the GLOBAL count
of valid tokens of the dp x cp group (``masked_token_mean``).

Data-parallel gradient convention (``masked_token_mean``). The value returned on rank r is
``sum_r(values * mask) / N`` with N the token count over the whole group, so the sum of the
returned values over the group's ranks is the global token mean, and the sum of their gradients
is the gradient of the global mean. Frameworks average instead of summing:
  * megatron-core DDP (``calculate_per_token_loss=False``, the default) scales gradients by
    1 / (dp * cp) when reducing over the dp x cp group, and a forward-step loss function that
    returns ``(loss, metrics)`` has its loss multiplied by cp and divided by the number of
    micro-batches M by the pipeline schedule. Net factor on sum_r grad(loss_r): 1 / (dp * M).
    So to get exactly the gradient of the global token mean, the caller returns
    ``masked_token_mean(...) * dp_size`` (dp without cp), and, if N counts the tokens of all
    M micro-batches of the step, also multiplies by M (if N is the micro-batch's count, the
    result is the mean over micro-batches of per-micro-batch token means).
  * plain torch DDP (average over its group of size G): multiply by G.
  * ``calculate_per_token_loss=True`` / any sum-reducing setup: use the value as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.ops.groups import rank_and_size


def pad_to_multiple(x: Tensor, multiple: int, dim: int = 1, value: float = 0) -> Tensor:
    """Pad ``x`` at the end of ``dim`` with ``value`` so its size is a multiple of ``multiple``.

    For zigzag sharding use ``multiple = 2 * cp_size``. Returns x itself if already aligned.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    length = x.shape[dim]
    extra = (-length) % multiple
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat([x, x.new_full(pad_shape, value)], dim=dim)


def zigzag_split(x: Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> Tensor:
    """This rank's zigzag shard: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size along ``dim``.

    x: [..., L, ...] with L a multiple of 2*cp_size (see ``pad_to_multiple``).
    Returns [..., L / cp_size, ...].
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size={cp_size}), got {cp_rank}")
    if cp_size == 1:
        return x
    length = x.shape[dim]
    if length % (2 * cp_size) != 0:
        raise ValueError(f"zigzag_split: size {length} of dim {dim} is not a multiple of 2 * cp_size = "
                         f"{2 * cp_size}; pad it first with pad_to_multiple(x, {2 * cp_size}, dim={dim})")
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def zigzag_merge(chunks_per_rank: Sequence[Tensor], cp_size: int, dim: int = 1) -> Tensor:
    """Inverse of ``zigzag_split``: the per-rank shards (in rank order) -> the full sequence."""
    if len(chunks_per_rank) != cp_size:
        raise ValueError(f"zigzag_merge: expected {cp_size} shards (one per CP rank), "
                         f"got {len(chunks_per_rank)}")
    if cp_size == 1:
        return chunks_per_rank[0]
    pieces: list[Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(chunks_per_rank):
        if shard.shape[dim] % 2 != 0:
            raise ValueError(f"zigzag_merge: shard of rank {rank} has odd size {shard.shape[dim]} "
                             f"along dim {dim}")
        first, second = shard.chunk(2, dim=dim)
        pieces[rank], pieces[2 * cp_size - 1 - rank] = first, second
    return torch.cat(pieces, dim=dim)


class _GatherZigzag(torch.autograd.Function):
    """All-gather zigzag shards into the full sequence; backward slices (optionally summed) grads."""

    @staticmethod
    def forward(ctx, x: Tensor, cp_group: dist.ProcessGroup, dim: int, sum_grads: bool) -> Tensor:
        rank, size = rank_and_size(cp_group)
        ctx.rank, ctx.size, ctx.dim, ctx.group, ctx.sum_grads = rank, size, dim, cp_group, sum_grads
        x = x.contiguous()
        shards = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(shards, x, group=cp_group)
        return zigzag_merge(shards, size, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.sum_grads:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return zigzag_split(grad, ctx.rank, ctx.size, ctx.dim), None, None, None


def gather_from_context_parallel(x: Tensor, cp_group: dist.ProcessGroup | None, dim: int = 1, *,
                                 sum_grads: bool = False) -> Tensor:
    """All-gather this rank's zigzag shard into the full sequence, in original token order.

    x: [..., L / cp, ...] this rank's zigzag shard (equal size on all ranks). Returns [..., L, ...].

    Gradient convention:
      * ``sum_grads=False`` (default): the gathered tensor is used identically on every CP rank
        (each rank computes the same loss from it). The gradient of that one loss wrt this rank's
        shard is this rank's zigzag slice of the full gradient: no collective in backward. When
        the parameter gradients are then summed over CP ranks (as DDP does over dp x cp), the
        contributions of all shards add up to the gradient of the loss, counted once.
      * ``sum_grads=True``: ranks compute DIFFERENT losses from the gathered tensor and the total
        is their sum; backward all-reduces (sums) the full gradient over ``cp_group`` first.
    The usual path avoids the gather for the loss altogether: compute per-token terms locally
    and reduce with ``masked_token_mean``; gather [B, L]-sized results for metrics/logging.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return x
    return _GatherZigzag.apply(x, cp_group, dim, sum_grads)


def global_token_count(mask: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Number of nonzero entries of ``mask`` over all ranks of ``group`` (int64 scalar tensor).

    One all-reduce SUM of a scalar (no host sync). ``group`` is the dp x cp group in training.
    """
    count = (mask != 0).sum(dtype=torch.int64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def masked_token_mean(values: Tensor, mask: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's share of the global token mean: sum_local(values[mask]) / global_count(mask).

    values: [...] float; mask: [...] same shape, bool or 0/1. Positions outside the mask are
    ignored even if non-finite. Summing the result over the ranks of ``group`` (dp x cp) gives the
    mean over every valid token of the group; see the module docstring for how to scale the loss
    under data-parallel gradient averaging. With group=None it is the plain masked mean.
    A global count of zero gives 0 (the count is clamped to 1).
    """
    if values.shape != mask.shape:
        raise ValueError(f"mask must have the shape of values: expected {tuple(values.shape)}, "
                         f"got {tuple(mask.shape)}")
    keep = mask != 0
    local_sum = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    count = global_token_count(keep, group).clamp(min=1)
    return local_sum / count.to(local_sum.dtype)
