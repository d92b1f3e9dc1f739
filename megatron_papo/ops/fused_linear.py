"""PAPO token statistics straight from hidden states and the vocab-parallel output weight.

``papo_token_stats`` reads two ``[T, V_local]`` logit tensors and returns two ``[T, V_local]``
gradients; at T = 16k response tokens and V = 152k that is ~5 GB per tensor in bf16. The
functions here take what the output layer takes instead, the last hidden states of both branches
and this rank's output-weight shard, and never hold more logits than one tile (below):

    z_p = hidden @ W.T,  z_q = masked_hidden @ W.T        (recomputed per tile, never stored)

Layout. ``weight`` is ``[V_local, H]``: rank r of the TP group holds vocabulary rows
``[r V_local, (r + 1) V_local)`` (megatron-core's ColumnParallelLinear output layer); rows at
global ids ``>= vocab_size`` are padding (probability 0, gradient 0). ``hidden`` is replicated
over the TP group, as the output layer's input is.

Tiles. Both passes work on (c tokens x v vocabulary rows) tiles, ``z = h[s:e] @ W[lo:hi].T``
in the input dtype (what the output layer computes), c and v from ``default_tile`` (a tile's fp32
scratch ~64 MiB: v = 4096, c = 512 by default).

Forward (token chunks outside, vocabulary blocks inside). Each tile gives the partial sums of
ops.vocab_parallel (S, A and, with two branches, S^q, A^q, B) against the TILE's maxima, and the
raw target logit where the tile owns the target. A running state per token is merged with each
tile like an online softmax; after the last block one all-reduce MAX gives the global maxima m
([2, T]) and the state is moved onto them. Moving sums taken against m' onto m, d = m' - m <= 0,
s = exp(d), is an exact rewrite of the same sums:

    S = s S',   A = s (A' + d S'),   B = s_p (B' + S'_p (d_p - d_q))

then one all-reduce SUM of [7, T] (the raw target logit has one owner, so its sum is exact),
Y = z_y - m and the per-token outputs of ``vocab_parallel.stats_from_sums``. Two collectives per
call, as the logits op.

Backward (vocabulary blocks outside, token chunks inside): recompute the tile's logits from the
saved hidden states and weight, take the fp32 logit gradients g_p, g_q of
``vocab_parallel._chunk_grads`` (the formulas are in that module's docstring; they need only the
tile and the saved per-token m, log S, H, KL), cast them to the input dtype (what the unfused
output layer's backward receives), and

    d hidden[s:e]        += g_p @ W[lo:hi]               fp32 [T, H] accumulator per branch
    d masked_hidden[s:e] += g_q @ W[lo:hi]               (only when masked_hidden requires grad)
    d W[lo:hi]           += g_p.T @ h[s:e] + g_q.T @ hq[s:e]   fp32 [v, H] accumulator per block

No collective in backward. The hidden-state gradients are this shard's contribution, exactly
what autograd of ``hidden @ weight.T`` gives: the caller sums them over the TP group where its
layer does (megatron-core's ``copy_to_tensor_model_parallel_region`` before a column-parallel
layer, or the reduce-scatter of ``gather_from_sequence_parallel_region`` under sequence
parallelism), as megatron-core's output layer does for the logits path.

Memory: besides the inputs and the gradients autograd returns anyway, one tile's logits and its
fp32 scratch (~64 MiB), the fp32 accumulators ([T, H] per branch with a gradient, [v, H]) and
[7, T] fp32 statistics. No [T, V_local] tensor of any dtype exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.ops.fused import PapoTokenStats
from megatron_papo.ops.vocab_parallel import (
    _A_P,
    _A_Q,
    _B,
    _S_P,
    _S_Q,
    _Y_P,
    _Y_Q,
    _check_layout_agrees,
    _check_target,
    _chunk_grads,
    _chunk_partial_sums,
    _flat,
    _raise_on_bad_values,
    compute_dtype,
    reduce_max,
    shard_layout,
    stats_from_sums,
)

LINEAR_OP_IMPLS: tuple[str, ...] = ("auto", "torch")

__all__ = [
    "LINEAR_OP_IMPLS",
    "LinearVocabParallelStats",
    "linear_papo_token_stats",
    "linear_vocab_parallel_log_probs",
    "linear_vocab_parallel_log_probs_entropy",
]


# --------------------------------------------------------------------------------------------
# Validation (host-side, no device sync)
# --------------------------------------------------------------------------------------------


def _check_hidden(name: str, hidden: Tensor, weight: Tensor) -> None:
    if not isinstance(hidden, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.ndim < 1 or not hidden.is_floating_point():
        raise ValueError(f"{name} must be a floating-point [..., H] tensor, got {hidden.dtype} "
                         f"of shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"{name} has H = {hidden.shape[-1]} but weight is {tuple(weight.shape)}: "
                         "expected weight [V_local, H] with the same H")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name} is {hidden.dtype}, weight {weight.dtype}: the output layer "
                         "multiplies them in one dtype; cast one of them")
    if hidden.device != weight.device:
        raise ValueError(f"{name} is on {hidden.device}, weight on {weight.device}")


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be the floating-point [V_local, H] output-layer shard, got {shape}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V_local = 0 rows; expected V_local >= 1")


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

# fp32 scratch of one (token chunk x vocabulary block) tile: ~8 [c, v] fp32 buffers live at once
# (ops.vocab_parallel._FP32_BUFFERS_PER_CHUNK), held under 64 MiB.
_TILE_ELEMENTS = 64 * 2**20 // (4 * 8)
_DEFAULT_VOCAB_BLOCK = 4096


def default_tile(n_valid: int, chunk_size: int | None, vocab_block: int | None) -> tuple[int, int]:
    """(tokens per chunk, vocabulary rows per block) of one tile; defaults keep its scratch ~64 MiB."""
    for name, v in (("chunk_size", chunk_size), ("vocab_block", vocab_block)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    block = min(n_valid, vocab_block or _DEFAULT_VOCAB_BLOCK)
    return chunk_size or max(1, _TILE_ELEMENTS // block), block


# --------------------------------------------------------------------------------------------
# Forward pieces
# --------------------------------------------------------------------------------------------


def _rescale(sums: Tensor, m_from: Tensor, m_to: Tensor) -> None:
    """Move partial sums taken against maxima m_from onto maxima m_to >= m_from, in place.

    sums: [3 | 7, c] rows (S_p, A_p, Y_p[, S_q, A_q, Y_q, B]) (the Y rows hold raw picked logits
    and do not move); m_from, m_to: [1 | 2, c]. With d = m_from - m_to and s = exp(d):

        S = s S',   A = s (A' + d S'),   B = s_p (B' + S'_p (d_p - d_q))

    exact rewrites of the same sums. Where d is not finite (m_from = -inf: nothing was summed)
    the sums become 0 instead of 0 * inf.
    """
    d = m_from - m_to
    ok = torch.isfinite(d)
    d = torch.where(ok, d, torch.zeros_like(d))
    s = torch.where(ok, torch.exp(d), torch.zeros_like(d))
    if sums.shape[0] == 7:  # B first: it reads the unscaled S'_p
        sums[_B] = s[0] * (sums[_B] + sums[_S_P] * (d[0] - d[1]))
    for k, (row_s, row_a) in enumerate(((_S_P, _A_P), (_S_Q, _A_Q))[:m_to.shape[0]]):
        sums[row_a] = s[k] * (sums[row_a] + d[k] * sums[row_s])
        sums[row_s] = s[k] * sums[row_s]


def _block_target(target: Tensor | None, lo: int, hi: int) -> tuple[Tensor | None, Tensor | None]:
    """Local target ids (global id - lo, clamped into the block) and the owned-by-block mask [c]."""
    if target is None:
        return None, None
    local = target.long() - lo
    own = (local >= 0) & (local < hi - lo)
    return local.clamp(0, hi - lo - 1), own


def _tile_sums(zs: list[Tensor], idx: Tensor | None, own: Tensor | None,
               rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """One tile's partial sums against the tile's own maxima.

    zs: 1 or 2 logit tiles [c, v] (input dtype). Returns (sums [rows, c] with the Y rows holding
    the raw target logit where this block owns the target (else 0), the maxima the sums were
    taken against [k, c] (-inf where a row is all -inf), the raw maxima [k, c] (NaN -> +inf) for
    the finiteness check).
    """
    raw = torch.stack([z.amax(dim=-1) for z in zs]).to(compute_dtype(zs[0].dtype))
    raw = torch.nan_to_num_(raw, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    finite = torch.isfinite(raw)
    m_sum = torch.where(finite, raw, torch.zeros_like(raw))  # what _chunk_partial_sums subtracts
    sums = torch.zeros((rows, raw.shape[1]), dtype=raw.dtype, device=raw.device)
    _chunk_partial_sums(zs[0], zs[1] if len(zs) == 2 else None, m_sum, None, None, sums)
    if idx is not None:
        for z, row in zip(zs, (_Y_P, _Y_Q)):
            picked = z.gather(-1, idx[:, None]).squeeze(-1).to(raw.dtype)
            sums[row] = torch.where(own, picked, torch.zeros_like(picked))
    m_merge = torch.where(torch.isneginf(raw), raw, m_sum)
    return sums, m_merge, raw


def _tile_logits(hiddens: list[Tensor], w_block: Tensor, s: int, e: int) -> list[Tensor]:
    """[e - s, v] logits per branch in the input dtype (what the output layer computes)."""
    return [h[s:e] @ w_block.T for h in hiddens]


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


class LinearVocabParallelStats(torch.autograd.Function):
    """Log-probs, entropies and KL of softmax(hidden @ W.T) over a TP-sharded vocabulary, tiled
    over (token chunk x vocabulary block), the logits recomputed in backward.

    forward(hidden_p [T, H], hidden_q [T, H] | None, weight [V_local, H], target [T] | None,
            tp_group, vocab_size, chunk_size, vocab_block, masked_weight_grad, check_finite, names)
    returns
      (logp, H_p)                          when hidden_q is None
      (logp, logq, KL(p||q), H_p, H_q)     otherwise
    each [T] float32 (float64 for float64 inputs). Without target the log-prob outputs are zeros
    and must not be used.
    """

    @staticmethod
    def forward(ctx, hidden_p: Tensor, hidden_q: Tensor | None, weight: Tensor, target: Tensor | None,
                tp_group: dist.ProcessGroup | None, vocab_size: int | None, chunk_size: int | None,
                vocab_block: int | None, masked_weight_grad: bool, check_finite: bool,
                names: tuple[str, str]) -> tuple[Tensor, ...]:
        if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)):
            raise ValueError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        _check_layout_agrees(weight.shape[0], vocab_size, tp_group, weight.device)
        layout = shard_layout(weight.shape[0], tp_group, vocab_size)
        n = layout.n_valid
        chunk, block = default_tile(n, chunk_size, vocab_block)
        hiddens = [hidden_p] if hidden_q is None else [hidden_p, hidden_q]
        k, rows = len(hiddens), 3 if hidden_q is None else 7
        num_tokens, dev, acc = hidden_p.shape[0], hidden_p.device, compute_dtype(hidden_p.dtype)
        local_target = None if target is None else target.long() - layout.offset

        sums = torch.zeros((rows, num_tokens), dtype=acc, device=dev)
        m_run = torch.full((k, num_tokens), float("-inf"), dtype=acc, device=dev)
        raw_max = torch.full((k, num_tokens), float("-inf"), dtype=acc, device=dev)
        for s in range(0, num_tokens, chunk):
            e = min(s + chunk, num_tokens)
            tgt = None if local_target is None else local_target[s:e]
            for lo in range(0, n, block):
                hi = min(lo + block, n)
                idx, own = _block_target(tgt, lo, hi)
                t_sums, t_m, t_raw = _tile_sums(_tile_logits(hiddens, weight[lo:hi], s, e), idx, own, rows)
                m_new = torch.maximum(m_run[:, s:e], t_m)
                _rescale(sums[:, s:e], m_run[:, s:e], m_new)
                _rescale(t_sums, t_m, m_new)
                sums[:, s:e] += t_sums
                m_run[:, s:e] = m_new
                raw_max[:, s:e] = torch.maximum(raw_max[:, s:e], t_raw)
        gmax = reduce_max(raw_max, tp_group)  # collective 1: [k, T]
        if check_finite:
            _raise_on_bad_values(gmax, names[:k], target, layout.vocab_size)
        m = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))  # only matters if unchecked
        _rescale(sums, m_run, m)
        if layout.tp_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)  # collective 2: [3|7, T]
        for row, mk in zip((_Y_P, _Y_Q)[:k], m):  # raw target logit -> z_y - m (one owner per token)
            sums[row] -= mk

        outputs, stats = stats_from_sums(sums, m)
        ctx.save_for_backward(hidden_p, hidden_q, weight, target, stats)
        ctx.layout, ctx.tile, ctx.masked_weight_grad = layout, (chunk, block), masked_weight_grad
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None):
        # No collective: each logit gradient depends on its own logit and on per-token scalars the
        # forward reduced and saved (ops.vocab_parallel.VocabParallelStats.backward); the matmuls
        # back to hidden and weight are local to this vocabulary shard. Loop order: vocabulary
        # block outside, token chunk inside, so a block's weight gradient is summed in fp32 in a
        # [block, H] buffer and the hidden-state gradients in fp32 [T, H] buffers (no full-size
        # fp32 copy of the weight gradient).
        hidden_p, hidden_q, weight, target, stats = ctx.saved_tensors
        if hidden_q is None:
            g_lp, g_hp = grad_outputs
            g_lq = g_hq = g_kl = None
        else:
            g_lp, g_lq, g_kl, g_hp, g_hq = grad_outputs
        if target is None:
            g_lp = g_lq = None
        grads = [g_lp, g_hp, g_lq, g_hq, g_kl]
        need_hp, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_hq = hidden_q is not None and ctx.needs_input_grad[1]
        none = (None,) * 11
        if all(g is None for g in grads) or not (need_hp or need_hq or need_w):
            return none
        q_has_grad = any(g is not None for g in (g_lq, g_hq, g_kl))
        need_gp = need_hp or need_w
        q_to_w = need_w and ctx.masked_weight_grad  # False: the masked logits count as constants
        need_gq = hidden_q is not None and q_has_grad and (need_hq or q_to_w)

        layout = ctx.layout
        chunk, block = ctx.tile
        n, num_tokens = layout.n_valid, hidden_p.shape[0]
        acc = stats.dtype
        hiddens = [hidden_p] if hidden_q is None else [hidden_p, hidden_q]
        local_target = None if target is None else target.long() - layout.offset
        acc_hp = torch.zeros(hidden_p.shape, dtype=acc, device=hidden_p.device) if need_hp else None
        acc_hq = torch.zeros(hidden_q.shape, dtype=acc, device=hidden_q.device) if need_hq else None
        grad_w = torch.zeros_like(weight) if need_w else None  # padded rows keep gradient 0
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            w_block = weight[lo:hi]
            acc_w = torch.zeros(w_block.shape, dtype=acc, device=weight.device) if need_w else None
            for s in range(0, num_tokens, chunk):
                e = min(s + chunk, num_tokens)
                idx, own = _block_target(None if local_target is None else local_target[s:e], lo, hi)
                zs = _tile_logits(hiddens, w_block, s, e)
                gp, gq = _chunk_grads(zs[0], zs[1] if len(zs) == 2 else None, stats[:, s:e],
                                      [None if g is None else g[s:e] for g in grads], idx, own,
                                      need_gp, need_gq)
                del zs
                for g, h, acc_h, to_w in ((gp, hidden_p, acc_hp, True), (gq, hidden_q, acc_hq, q_to_w)):
                    if g is None:
                        continue
                    g = g.to(weight.dtype)  # the dtype the unfused output layer's backward receives
                    if acc_h is not None:
                        acc_h[s:e] += g @ w_block
                    if acc_w is not None and to_w:
                        acc_w += g.T @ h[s:e]
            if grad_w is not None:
                grad_w[lo:hi] = acc_w
        grad_hp = None if acc_hp is None else acc_hp.to(hidden_p.dtype)
        grad_hq = None if acc_hq is None else acc_hq.to(hidden_q.dtype)
        return (grad_hp, grad_hq, grad_w) + (None,) * 8


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _resolve_linear_impl(impl: str) -> None:
    if impl not in LINEAR_OP_IMPLS:
        raise ValueError(f"impl must be one of {list(LINEAR_OP_IMPLS)} for the fused linear op "
                         f"(no Triton kernel for it yet), got {impl!r}")


def linear_papo_token_stats(hidden: Tensor, masked_hidden: Tensor, weight: Tensor, target: Tensor,
                            tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None, *,
                            chunk_size: int | None = None, vocab_block: int | None = None,
                            masked_weight_grad: bool = True, check_finite: bool = True,
                            impl: str = "auto") -> PapoTokenStats:
    """``papo_token_stats(hidden @ weight.T, masked_hidden @ weight.T, target, ...)`` without the logits.

    Args:
        hidden: [..., H] the output layer's input on the original-image branch (replicated over TP).
        masked_hidden: [..., H] the same on the masked-image branch, same leading shape. Receives a
            gradient only if it requires grad (detach it for the no-grad masked branch).
        weight: [V_local, H] this rank's output-layer shard (rows [r V_local, (r + 1) V_local)),
            the dtype and device of ``hidden``. Its gradient sums both branches' contributions.
        target: [...] integer GLOBAL token ids in [0, vocab_size).
        tp_group: tensor-parallel group; None = vocabulary not sharded.
        vocab_size: true vocabulary size when the weight is padded (default V_local * tp).
        chunk_size: tokens per tile (default: a tile's fp32 scratch ~64 MiB, see ``default_tile``).
        vocab_block: vocabulary rows per tile (default 4096).
        masked_weight_grad: True (the composition's autograd): the masked branch's logits reach
            the weight's gradient too. False: they count as constants, as with the reference
            code's no-grad masked branch (``masked_logits.detach()``); pass a detached
            ``masked_hidden`` with it.
        check_finite: one host sync validating non-finite logits and the target range.
        impl: "auto" or "torch" (the token-chunked torch implementation; no Triton kernel yet).
    Returns:
        PapoTokenStats, each field [...] float32. Gradients reach ``hidden`` (this shard's part:
        the caller all-reduces it over TP as its output layer would, see the module docstring),
        ``masked_hidden`` when it requires grad, and ``weight``.

    Collectives (TP > 1): all-reduce MAX [2, T], all-reduce SUM [7, T]; none in backward.
    """
    _resolve_linear_impl(impl)
    _check_weight(weight)
    _check_hidden("hidden", hidden, weight)
    _check_hidden("masked_hidden", masked_hidden, weight)
    if masked_hidden.shape != hidden.shape:
        raise ValueError(f"masked_hidden must have the shape of hidden: expected {tuple(hidden.shape)}, "
                         f"got {tuple(masked_hidden.shape)}")
    _check_target(target, hidden, "hidden")
    lead = hidden.shape[:-1]
    outs = LinearVocabParallelStats.apply(_flat(hidden), _flat(masked_hidden), weight, target.reshape(-1),
                                          tp_group, vocab_size, chunk_size, vocab_block, masked_weight_grad,
                                          check_finite,
                                          ("logits (hidden @ weight.T)",
                                           "masked logits (masked_hidden @ weight.T)"))
    logp, logq, kl, h_p, h_q = (o.view(lead) for o in outs)
    return PapoTokenStats(log_probs=logp, masked_log_probs=logq, kl=kl, entropy=h_p, masked_entropy=h_q)


def linear_vocab_parallel_log_probs_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                                            tp_group: dist.ProcessGroup | None = None,
                                            vocab_size: int | None = None, *, chunk_size: int | None = None,
                                            vocab_block: int | None = None,
                                            check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """(log p(target), H(p)) of p = softmax(hidden @ weight.T) over the sharded vocabulary.

    Args as ``linear_papo_token_stats`` (one branch). Returns two [...] float32 tensors,
    differentiable wrt hidden (this shard's part) and weight. For GRPO/DAPO updates.
    """
    _check_weight(weight)
    _check_hidden("hidden", hidden, weight)
    _check_target(target, hidden, "hidden")
    lead = hidden.shape[:-1]
    logp, ent = LinearVocabParallelStats.apply(_flat(hidden), None, weight, target.reshape(-1), tp_group,
                                               vocab_size, chunk_size, vocab_block, True, check_finite,
                                               ("logits (hidden @ weight.T)", ""))
    return logp.view(lead), ent.view(lead)


def linear_vocab_parallel_log_probs(hidden: Tensor, weight: Tensor, target: Tensor,
                                    tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None,
                                    *, chunk_size: int | None = None, vocab_block: int | None = None,
                                    check_finite: bool = True) -> Tensor:
    """log p(target) of p = softmax(hidden @ weight.T) over the sharded vocabulary, [...] float32.

    For the no-grad passes (old, masked, reference policy); differentiable all the same.
    """
    return linear_vocab_parallel_log_probs_entropy(hidden, weight, target, tp_group, vocab_size,
                                                   chunk_size=chunk_size, vocab_block=vocab_block,
                                                   check_finite=check_finite)[0]
