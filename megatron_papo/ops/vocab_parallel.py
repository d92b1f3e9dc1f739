"""Token statistics over a vocabulary sharded across tensor-parallel ranks.

Layout. Rank r of the tensor-parallel group holds logits ``z`` of shape ``[..., V_local]``: the
global vocabulary columns ``[r * V_local, (r + 1) * V_local)``. Models pad the vocabulary to a
multiple of the TP size; global columns ``>= vocab_size`` are padding and count as probability 0
with gradient 0. Because padding sits at the end of the vocabulary, the valid columns of every
shard are a prefix ``z[..., :n_valid]``; the maths reads that prefix as a view and never touches
the padded columns, so no masked copy is needed.

Maths, per token (m = global max over valid columns, e_v = exp(z_v - m), S = sum_v e_v):

    log p(y)   = (z_y - m) - log S
    H(p)       = log S - (1 / S) * sum_v e_v (z_v - m)
    KL(p || q) = log S_q - log S_p + (1 / S_p) * sum_v e^p_v ((z^p_v - m_p) - (z^q_v - m_q))

These are the DESIGN.md formulas (logZ = m + log S, H = logZ - sum p z, ...) rewritten with the
max subtracted, so m cancels exactly and logits of magnitude 1e4 lose no precision in fp32.
Every sum over v splits into per-shard partial sums, so the forward needs:

    1. one all-reduce MAX of the stacked per-token local maxima ([k, T], k = 1 or 2 tensors);
    2. one all-reduce SUM of the stacked per-token partial sums ([3, T] or [7, T]).

(plus, once per (group, V_local, vocab_size), a 4-integer all-reduce checking that every rank
agrees on the shard width). The partial sums are produced chunk by chunk over tokens: a chunk's
fp32 scratch is bounded (``default_chunk_size``), no fp32 copy of the whole ``[T, V_local]``
tensor is made, and the caller's logits are only read.

Gradients (written by hand, recomputing softmax per chunk from the saved inputs and [T] stats):

    d log p(y) / dz   = onehot(y) - p
    d H(p) / dz       = -p (log p + H)
    d KL / dz_p       = p (log p - log q - KL)
    d KL / dz_q       = q - p
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.ops.groups import rank_and_size

# fp32 scratch budget of one token chunk, and how many [chunk, V_local] fp32 buffers the forward
# or backward of the fused op keeps alive at once (shifted logits, exp, products, coefficients...).
_CHUNK_SCRATCH_BYTES = 128 * 2**20
_FP32_BUFFERS_PER_CHUNK = 8

# Rows of the stacked partial sums that cross the TP group in the SUM all-reduce.
_S_P, _A_P, _Y_P, _S_Q, _A_Q, _Y_Q, _B = range(7)

# (id(group), V_local, vocab_size) already checked for agreement across the group's ranks.
_VERIFIED_LAYOUTS: set[tuple[int, int, int]] = set()


# --------------------------------------------------------------------------------------------
# Layout and validation (host-side, no device sync unless stated)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's vocabulary slice sits in the global vocabulary."""

    tp_rank: int
    tp_size: int
    v_local: int
    vocab_size: int
    """True (unpadded) vocabulary size."""

    @property
    def offset(self) -> int:
        """Global id of local column 0."""
        return self.tp_rank * self.v_local

    @property
    def n_valid(self) -> int:
        """Local columns holding real tokens (a prefix of the shard; the rest is padding)."""
        return max(0, min(self.v_local, self.vocab_size - self.offset))


def shard_layout(v_local: int, tp_group: dist.ProcessGroup | None, vocab_size: int | None) -> ShardLayout:
    """Validate ``vocab_size`` against ``V_local * tp`` and return this rank's layout.

    Requires ``V_local * (tp - 1) < vocab_size <= V_local * tp`` so that every shard holds at
    least one real token (padding never fills a whole shard).
    """
    rank, size = rank_and_size(tp_group)
    padded = v_local * size
    if vocab_size is None:
        vocab_size = padded
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if vocab_size > padded:
        raise ValueError(f"vocab_size={vocab_size} exceeds V_local * tp = {v_local} * {size} = {padded}: "
                         "the shards do not cover the vocabulary")
    if vocab_size <= v_local * (size - 1):
        raise ValueError(f"vocab_size={vocab_size} is inconsistent with V_local={v_local} and tp={size}: "
                         f"expected {v_local * (size - 1)} < vocab_size <= {padded} "
                         "(the last shard would hold only padding)")
    return ShardLayout(rank, size, v_local, vocab_size)


def _check_layout_agrees(v_local: int, vocab_size: int | None, tp_group: dist.ProcessGroup | None,
                         device: torch.device) -> None:
    """Raise on every rank if the ranks of ``tp_group`` disagree on V_local or vocab_size.

    Runs before any rank-local validation, so a disagreement raises everywhere instead of
    leaving some ranks waiting in a collective. One all-reduce MAX of 4 integers and one host
    read, cached per (group, V_local, vocab_size): after the first successful call with a layout,
    later calls with it issue no collective. Caveat: the cache is per process, so a later call in
    which only some ranks change V_local is not caught here (those ranks would enter this
    collective alone); the first call of a job, where configuration mistakes show, is checked.
    """
    rank, size = rank_and_size(tp_group)
    if size == 1:
        return
    vocab = v_local * size if vocab_size is None else vocab_size
    key = (id(tp_group), v_local, vocab)
    if key in _VERIFIED_LAYOUTS:
        return
    info = torch.tensor([v_local, -v_local, vocab, -vocab], dtype=torch.int64, device=device)
    dist.all_reduce(info, op=dist.ReduceOp.MAX, group=tp_group)
    v_max, neg_v_min, n_max, neg_n_min = info.tolist()
    v_min, n_min = -neg_v_min, -neg_n_min
    if v_max != v_min:
        raise ValueError(f"logits: V_local differs across tensor-parallel ranks (min {v_min}, "
                         f"max {v_max}); this rank (tp rank {rank}) has {v_local}. "
                         "Every rank must hold an equal contiguous vocabulary slice")
    if n_max != n_min:
        raise ValueError(f"vocab_size differs across tensor-parallel ranks (min {n_min}, max {n_max}); "
                         f"this rank (tp rank {rank}) has {vocab}")
    _VERIFIED_LAYOUTS.add(key)


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 1:
        raise ValueError(f"{name} must have shape [..., V_local] (ndim >= 1), got a 0-dim tensor")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32/bf16/fp16), got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has V_local = 0 (shape {tuple(logits.shape)}); expected V_local >= 1")


def _check_pair(logits_p: Tensor, logits_q: Tensor, names: tuple[str, str]) -> None:
    _check_logits(names[1], logits_q)
    if logits_q.shape != logits_p.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]}: expected {tuple(logits_p.shape)}, "
                         f"got {tuple(logits_q.shape)}")
    if logits_q.device != logits_p.device:
        raise ValueError(f"{names[1]} is on {logits_q.device}, {names[0]} on {logits_p.device}")


def _check_target(target: Tensor, logits: Tensor, name: str = "logits") -> None:
    """``target`` [...] integer ids matching ``logits`` [..., V] (or any [..., X] input called ``name``)."""
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {name}.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, {name} on {logits.device}")


def default_chunk_size(v_local: int) -> int:
    """Tokens per chunk so that the chunk's fp32 scratch stays under ~128 MiB."""
    return max(1, _CHUNK_SCRATCH_BYTES // (_FP32_BUFFERS_PER_CHUNK * 4 * max(1, v_local)))


# --------------------------------------------------------------------------------------------
# Forward pieces
# --------------------------------------------------------------------------------------------


def _global_max(shards: list[Tensor], n_valid: int, tp_group: dist.ProcessGroup | None) -> Tensor:
    """Per-token max over the global valid vocabulary: [k, T] fp32 for k = len(shards) inputs [T, V_local].

    ``amax`` runs on the input dtype (exact, no upcast copy) and propagates NaN; NaN is mapped to
    +inf before the reduce because a MAX all-reduce need not propagate NaN across ranks.
    """
    dtype = shards[0].dtype if len(shards) == 1 else torch.promote_types(shards[0].dtype, shards[1].dtype)
    acc = compute_dtype(dtype)
    return reduce_max(torch.stack([z[:, :n_valid].amax(dim=-1).to(acc) for z in shards]), tp_group)


def reduce_max(local: Tensor, tp_group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce MAX of per-token local maxima [k, T], NaN mapped to +inf first (in place)."""
    local = torch.nan_to_num_(local, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=tp_group)
    return local


def _raise_on_bad_values(gmax: Tensor, names: tuple[str, ...], target: Tensor | None,
                         vocab_size: int) -> None:
    """The one host sync of the forward: non-finite global maxima or out-of-range target ids.

    gmax is identical on all TP ranks (post all-reduce) and target is replicated across TP, so
    every rank raises together and none is left waiting in a later collective.
    """
    bad_rows = ~torch.isfinite(gmax)
    flags = [bad_rows.any()]
    if target is not None and target.numel() > 0:
        flags.append(((target < 0) | (target >= vocab_size)).any())
    flags_host = torch.stack(flags).tolist()
    if flags_host[0]:
        k, t = (int(i) for i in bad_rows.nonzero()[0].tolist())
        if gmax[k, t] > 0:
            raise ValueError(f"{names[k]} contains NaN or +inf (first at flattened token {t}); "
                             "logits must be finite or -inf")
        raise ValueError(f"{names[k]}: every logit of flattened token {t} is -inf over the whole vocabulary "
                         "(all tensor-parallel shards); the distribution is undefined")
    if len(flags_host) > 1 and flags_host[1]:
        lo, hi = (int(v) for v in torch.stack([target.min(), target.max()]).tolist())
        raise ValueError(f"target holds token ids outside [0, vocab_size={vocab_size}): min {lo}, max {hi}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for fp32/bf16/fp16 logits, float64 for float64 logits."""
    return torch.promote_types(dtype, torch.float32)


def _shift_exp(z: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """For a chunk z [c, n] (any float dtype) and max m [c]: fp32 (z - m) and exp(z - m), both new tensors."""
    zs = z.to(m.dtype, copy=True).sub_(m[:, None])
    return zs, torch.exp(zs)


def _masked_dot(e: Tensor, x: Tensor) -> Tensor:
    """sum_v e_v x_v over the last dim, with terms where e_v == 0 set to 0 (avoids 0 * inf = nan). [c]"""
    prod = e * x
    prod.masked_fill_(e == 0, 0.0)
    return prod.sum(dim=-1)


def _pick(zs: Tensor, local_idx: Tensor, in_shard: Tensor) -> Tensor:
    """zs[t, local_idx[t]] where this shard owns the target, else 0. [c]"""
    picked = zs.gather(-1, local_idx[:, None]).squeeze(-1)
    return torch.where(in_shard, picked, torch.zeros_like(picked))


def _local_target(target: Tensor, layout: ShardLayout) -> tuple[Tensor, Tensor]:
    """Target ids -> (local column clamped into the shard [T] int64, owned-by-this-shard mask [T] bool)."""
    local = target.reshape(-1).long() - layout.offset
    in_shard = (local >= 0) & (local < layout.n_valid)
    return local.clamp(0, layout.n_valid - 1), in_shard


def _chunk_partial_sums(zp: Tensor, zq: Tensor | None, m: Tensor, idx: Tensor | None,
                        in_shard: Tensor | None, out: Tensor) -> None:
    """Write this shard's partial sums for one chunk into ``out`` [3 or 7, c] (rows _S_P.._B).

    zp, zq: [c, n_valid] logits chunks (input dtype); m: [1 or 2, c] global maxima; idx, in_shard: [c].
    """
    zs_p, e_p = _shift_exp(zp, m[0])
    out[_S_P] = e_p.sum(dim=-1)
    out[_A_P] = _masked_dot(e_p, zs_p)
    if idx is not None:
        out[_Y_P] = _pick(zs_p, idx, in_shard)
    if zq is None:
        return
    zs_q, e_q = _shift_exp(zq, m[1])
    out[_S_Q] = e_q.sum(dim=-1)
    out[_A_Q] = _masked_dot(e_q, zs_q)
    if idx is not None:
        out[_Y_Q] = _pick(zs_q, idx, in_shard)
    zs_q.neg_().add_(zs_p)  # (z_p - m_p) - (z_q - m_q), reusing zs_q's storage
    out[_B] = _masked_dot(e_p, zs_q)


def stats_from_sums(sums: Tensor, m: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """Turn the TP-reduced partial sums into the outputs and the [7, T] stats the backward needs.

    sums: [3, T] (rows S_p, A_p, Y_p) or [7, T] (plus S_q, A_q, Y_q, B), every sum taken relative to
    the global maxima m: [1 or 2, T]. Returns ((logp, H_p) or (logp, logq, KL, H_p, H_q), stats) with
    stats rows (m_p, logS_p, H_p, m_q, logS_q, H_q, KL) (q rows zero for a [3, T] input).
    """
    log_s_p = sums[_S_P].log()
    logp = sums[_Y_P] - log_s_p
    h_p = log_s_p - sums[_A_P] / sums[_S_P]
    stats = torch.zeros((7, sums.shape[1]), dtype=sums.dtype, device=sums.device)
    stats[0], stats[1], stats[2] = m[0], log_s_p, h_p
    if sums.shape[0] == 3:
        return (logp, h_p), stats
    log_s_q = sums[_S_Q].log()
    logq = sums[_Y_Q] - log_s_q
    h_q = log_s_q - sums[_A_Q] / sums[_S_Q]
    kl = log_s_q - log_s_p + sums[_B] / sums[_S_P]
    stats[3], stats[4], stats[5], stats[6] = m[1], log_s_q, h_q, kl
    return (logp, logq, kl, h_p, h_q), stats


# --------------------------------------------------------------------------------------------
# Backward pieces
# --------------------------------------------------------------------------------------------


def _log_softmax_chunk(z: Tensor, m: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
    """Recompute fp32 log p = (z - m) - log S and p for a chunk [c, n]; m, log_s: [c]."""
    lp = z.to(m.dtype, copy=True).sub_(m[:, None]).sub_(log_s[:, None])
    return lp, torch.exp(lp)


def _times_prob(prob: Tensor, coef: Tensor) -> Tensor:
    """-prob * coef with 0 wherever prob == 0 (coef may be inf there through log 0). In place on coef."""
    coef.mul_(prob).neg_()
    return coef.masked_fill_(prob == 0, 0.0)


def _add_onehot(grad: Tensor, idx: Tensor, in_shard: Tensor, g_logp: Tensor) -> None:
    """grad[t, idx[t]] += g_logp[t] on tokens whose target this shard owns."""
    vals = torch.where(in_shard, g_logp, torch.zeros((), dtype=grad.dtype, device=grad.device))
    grad.scatter_add_(-1, idx[:, None], vals[:, None])


def _col(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)[:, None]


def _chunk_grads(zp: Tensor, zq: Tensor | None, stats: Tensor, grads: list[Tensor | None],
                 idx: Tensor | None, in_shard: Tensor | None, need_p: bool,
                 need_q: bool) -> tuple[Tensor | None, Tensor | None]:
    """fp32 gradients of one chunk wrt zp and zq, combining the incoming grads of every output.

    stats: [7, c] rows (m_p, logS_p, H_p, m_q, logS_q, H_q, KL) (q rows unused without zq);
    grads: [c] or None for (logp, H_p, logq, H_q, KL). Returns ([c, n] | None, [c, n] | None) for
    (zp, zq) as requested by need_p / need_q.

        grad_p = -p * (g_lp + g_Hp (lp + H_p) - g_kl (lp - lq - KL)) + g_lp onehot
        grad_q = -q * (g_lq + g_Hq (lq + H_q) - g_kl) - g_kl p + g_lq onehot
    """
    g_lp, g_hp, g_lq, g_hq, g_kl = (_col(g, stats.dtype) for g in grads)
    lp, p = _log_softmax_chunk(zp, stats[0], stats[1])
    lq = q = None
    if zq is not None and (g_kl is not None or need_q):
        lq, q = _log_softmax_chunk(zq, stats[3], stats[4])

    grad_p = None
    if need_p:  # each term built in place: at most one extra [c, n] temporary at a time
        coef = torch.zeros_like(lp) if g_hp is None else torch.add(lp, stats[2][:, None]).mul_(g_hp)
        if g_lp is not None:
            coef.add_(g_lp)
        if g_kl is not None:
            coef.sub_(torch.sub(lp, lq).sub_(stats[6][:, None]).mul_(g_kl))
        grad_p = _times_prob(p, coef)
        if g_lp is not None and idx is not None:
            _add_onehot(grad_p, idx, in_shard, g_lp[:, 0])

    grad_q = None
    if need_q:
        coef = torch.zeros_like(lq) if g_hq is None else torch.add(lq, stats[5][:, None]).mul_(g_hq)
        if g_lq is not None:
            coef.add_(g_lq)
        if g_kl is not None:
            coef.sub_(g_kl)
        grad_q = _times_prob(q, coef)
        if g_kl is not None:
            grad_q.sub_(p.mul_(g_kl))  # p is not needed after this
        if g_lq is not None and idx is not None:
            _add_onehot(grad_q, idx, in_shard, g_lq[:, 0])
    return grad_p, grad_q


def _empty_grad(z2d: Tensor, n_valid: int) -> Tensor:
    """Gradient buffer [T, V_local] in the logits' dtype with the padded columns zeroed."""
    grad = torch.empty(z2d.shape, dtype=z2d.dtype, device=z2d.device)
    if n_valid < z2d.shape[-1]:
        grad[:, n_valid:] = 0
    return grad


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


class VocabParallelStats(torch.autograd.Function):
    """Log-probs, entropies and KL over a TP-sharded vocabulary, chunked over tokens.

    forward(logits_p, logits_q | None, target | None, tp_group, vocab_size, chunk_size,
            check_finite, names) with logits [T, V_local] (callers flatten the leading dims) returns
      (logp, H_p)                          when logits_q is None
      (logp, logq, KL(p||q), H_p, H_q)     otherwise
    each [T] float32 (float64 for float64 logits). Without target, the log-prob outputs are
    zeros and must not be used.
    """

    @staticmethod
    def forward(ctx, logits_p: Tensor, logits_q: Tensor | None, target: Tensor | None,
                tp_group: dist.ProcessGroup | None, vocab_size: int | None, chunk_size: int | None,
                check_finite: bool, names: tuple[str, str]) -> tuple[Tensor, ...]:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)):
            raise ValueError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        _check_layout_agrees(logits_p.shape[-1], vocab_size, tp_group, logits_p.device)
        layout = shard_layout(logits_p.shape[-1], tp_group, vocab_size)
        n = layout.n_valid
        num_tokens = logits_p.shape[0]
        chunk = chunk_size or default_chunk_size(n)
        shards = [logits_p] if logits_q is None else [logits_p, logits_q]

        gmax = _global_max(shards, n, tp_group)  # collective 1: [k, T]
        if check_finite:
            _raise_on_bad_values(gmax, names[:len(shards)], target, layout.vocab_size)
        m = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))  # only matters if unchecked

        idx = in_shard = None
        if target is not None:
            idx, in_shard = _local_target(target, layout)
        sums = torch.zeros((3 if logits_q is None else 7, num_tokens), dtype=gmax.dtype,
                           device=logits_p.device)
        for s in range(0, num_tokens, chunk):
            e = min(s + chunk, num_tokens)
            _chunk_partial_sums(logits_p[s:e, :n], None if logits_q is None else logits_q[s:e, :n],
                                m[:, s:e], None if idx is None else idx[s:e],
                                None if in_shard is None else in_shard[s:e], sums[:, s:e])
        if layout.tp_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)  # collective 2: [3|7, T]

        outputs, stats = stats_from_sums(sums, m)
        ctx.save_for_backward(logits_p, logits_q, target, stats)
        ctx.layout, ctx.chunk = layout, chunk
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None):
        # No collective is needed here: every gradient entry d out_t / d z_{t,v} depends only on
        # z_{t,v} itself and on per-token scalars (m, log S, H, KL) that the forward already reduced
        # over the TP group and saved. Upstream [T] grads are identical on all TP ranks because the
        # loss downstream of these replicated outputs is computed identically on each of them.
        logits_p, logits_q, target, stats = ctx.saved_tensors
        if logits_q is None:
            g_lp, g_hp = grad_outputs
            g_lq = g_hq = g_kl = None
        else:
            g_lp, g_lq, g_kl, g_hp, g_hq = grad_outputs
        if target is None:  # log-prob outputs are placeholders without a target
            g_lp = g_lq = None
        grads = [g_lp, g_hp, g_lq, g_hq, g_kl]
        need_p = ctx.needs_input_grad[0]
        need_q = logits_q is not None and ctx.needs_input_grad[1]
        if not need_p and not need_q:
            return (None,) * 8
        need_q = need_q and any(g is not None for g in (g_lq, g_hq, g_kl))

        layout, chunk = ctx.layout, ctx.chunk
        n = layout.n_valid
        idx = in_shard = None
        if target is not None:
            idx, in_shard = _local_target(target, layout)
        grad_p = _empty_grad(logits_p, n) if need_p else None
        grad_q = _empty_grad(logits_q, n) if need_q else None
        num_tokens = logits_p.shape[0]
        for s in range(0, num_tokens, chunk):
            e = min(s + chunk, num_tokens)
            gp, gq = _chunk_grads(
                logits_p[s:e, :n], None if logits_q is None else logits_q[s:e, :n], stats[:, s:e],
                [None if g is None else g[s:e] for g in grads],
                None if idx is None else idx[s:e], None if in_shard is None else in_shard[s:e],
                need_p, need_q)
            if grad_p is not None:
                grad_p[s:e, :n] = gp
            if grad_q is not None:
                grad_q[s:e, :n] = gq
        return grad_p, grad_q, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _flat(logits: Tensor) -> Tensor:
    """[..., V_local] -> [T, V_local] (a view when the layout allows)."""
    return logits.reshape(-1, logits.shape[-1])


def vocab_parallel_log_probs(logits: Tensor, target: Tensor, tp_group: dist.ProcessGroup | None = None,
                             vocab_size: int | None = None, *, chunk_size: int | None = None,
                             check_finite: bool = True) -> Tensor:
    """log p(target) under softmax(logits) over the full (sharded) vocabulary.

    Args:
        logits: [..., V_local], this rank's vocabulary slice (global columns [r*V_local, (r+1)*V_local)).
        target: [...] integer GLOBAL token ids in [0, vocab_size).
        tp_group: tensor-parallel group; None means the vocabulary is not sharded.
        vocab_size: true vocabulary size when padded (default V_local * tp).
        chunk_size: tokens per chunk (default: fp32 scratch under ~128 MiB).
        check_finite: validate logits (NaN/+inf, rows all -inf) and target range with one host sync;
            False skips it (no device-to-host sync; invalid inputs then give undefined results).
    Returns:
        [...] fp32 (= logits.shape[:-1]); differentiable wrt logits.
    """
    _check_logits("logits", logits)
    _check_target(target, logits)
    lead = logits.shape[:-1]
    logp, _ = VocabParallelStats.apply(_flat(logits), None, target.reshape(-1), tp_group, vocab_size,
                                       chunk_size, check_finite, ("logits", ""))
    return logp.view(lead)


def vocab_parallel_entropy(logits: Tensor, tp_group: dist.ProcessGroup | None = None,
                           vocab_size: int | None = None, *, chunk_size: int | None = None,
                           check_finite: bool = True) -> Tensor:
    """Entropy H(p) = -sum_v p_v log p_v of softmax(logits) over the full (sharded) vocabulary.

    Args as ``vocab_parallel_log_probs``. Returns [...] fp32 (= logits.shape[:-1]).
    """
    _check_logits("logits", logits)
    lead = logits.shape[:-1]
    _, ent = VocabParallelStats.apply(_flat(logits), None, None, tp_group, vocab_size, chunk_size,
                                      check_finite, ("logits", ""))
    return ent.view(lead)


def vocab_parallel_kl(logits_p: Tensor, logits_q: Tensor, tp_group: dist.ProcessGroup | None = None,
                      vocab_size: int | None = None, *, chunk_size: int | None = None,
                      check_finite: bool = True) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), p = softmax(logits_p), q = softmax(logits_q).

    Both are [..., V_local] slices of the same vocabulary layout. Gradient flows to each input that
    requires grad. KL is +inf where q has zero mass on a token p can produce (gradient then not finite).
    Returns [...] fp32 (= logits_p.shape[:-1]).
    """
    _check_logits("logits_p", logits_p)
    _check_pair(logits_p, logits_q, ("logits_p", "logits_q"))
    lead = logits_p.shape[:-1]
    out = VocabParallelStats.apply(_flat(logits_p), _flat(logits_q), None, tp_group, vocab_size, chunk_size,
                                   check_finite, ("logits_p", "logits_q"))
    return out[2].view(lead)
