"""Reductions of per-token terms [B, L] to a scalar loss, with explicit normalisers.

Token-mean over the *global* batch: when the batch is split over data-parallel and
context-parallel ranks, pass `num_tokens` = the global count of valid tokens (an all-reduced
scalar) so each rank returns its share sum_local / N_global; the shares add up to the global mean.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LOSS_AGGS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """sum(values * mask) as a 0-dim tensor; `mask` is bool or {0, 1} float, same shape."""
    return (values * mask.to(values.dtype)).sum()


def token_mean(values: Tensor, mask: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """sum(values * mask) / N, N = `num_tokens` if given else mask.sum() (clamped to >= 1)."""
    n = mask.to(values.dtype).sum() if num_tokens is None else num_tokens
    if isinstance(n, Tensor):
        n = n.to(values.dtype).clamp(min=1.0)
    else:
        n = max(float(n), 1.0)
    return masked_sum(values, mask) / n


def aggregate(values: Tensor, mask: Tensor, mode: LossAgg = "token-mean", *,
              num_tokens: Tensor | float | None = None, num_seqs: Tensor | float | None = None,
              row_tokens: Tensor | None = None) -> Tensor:
    """Reduce per-token `values` [B, L] under `mask` [B, L] to a scalar.

    token-mean:          sum_{b,t} m v / N_tokens                       (DAPO; PAPO reference)
    seq-mean-token-mean: (1/N_seqs) sum_b [ sum_t m v / max(1, sum_t m) ]  (original GRPO)
    seq-mean-token-sum:  (1/N_seqs) sum_b sum_t m v                        (Dr. GRPO style)
    N_tokens / N_seqs default to this batch's counts (rows with no valid token still count as
    sequences only if `num_seqs` says so); pass global counts under data/context parallelism.
    Under context parallelism each rank holds part of every sequence: pass `row_tokens` [B],
    the valid-token count of each WHOLE row, as the per-sequence divisor of seq-mean-token-mean;
    the ranks' results then add up to the unsharded value (as do the token-mean shares).
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"aggregate: values {tuple(values.shape)} and mask {tuple(mask.shape)} must both "
                         "be [B, L]")
    if mode == "token-mean":
        return token_mean(values, mask, num_tokens)
    m = mask.to(values.dtype)
    per_seq = (values * m).sum(dim=1)
    if mode == "seq-mean-token-mean":
        counts = m.sum(dim=1) if row_tokens is None else row_tokens.to(values.dtype)
        per_seq = per_seq / counts.clamp(min=1.0)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"aggregate: mode must be one of {LOSS_AGGS}, got {mode!r}")
    if num_seqs is None:
        num_seqs = (m.sum(dim=1) > 0).to(values.dtype).sum().clamp(min=1.0)
    return per_seq.sum() / num_seqs
