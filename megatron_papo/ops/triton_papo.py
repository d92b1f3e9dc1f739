"""Triton kernels for ``papo_token_stats``: each logit read once forward and once backward.

Imported lazily by ``megatron_papo.ops.fused`` (``impl="triton"``, or ``"auto"`` on CUDA); importing
this module needs triton. With ``TRITON_INTERPRET=1`` set before the import the kernels run in
Triton's interpreter on CPU tensors (slow; for tests only).

Forward (one program per token row, looping over the shard's valid columns in blocks). Each row
keeps an online-softmax state per branch, relative to its running maximum m:

    S = sum_v e^(z_v - m),   A = sum_v e^(z_v - m) (z_v - m),   D = sum_v e^(zp_v - m_p) (zp_v - zq_v)

When a block raises the maximum to m', alpha = e^(m - m') rescales the state:
S <- alpha S,  A <- alpha (A + (m - m') S),  D <- alpha D. The kernel writes, per row, the local
maxima, (S, A) of both branches, D and the raw target logits: a [9, T] fp32 tensor. In torch, a
MAX all-reduce of the two maxima gives the global m; the partials are rebased onto it with the
same alpha rule and become the [7, T] partial sums of the torch path (``vocab_parallel``), using

    B = sum_v e^p_v ((zp_v - m_p) - (zq_v - m_q)) = D - (m_p - m_q) S_p,

then one SUM all-reduce and the torch path's finishing step. Padded columns (global id >=
vocab_size) are never loaded; NaN in a valid column is read as +inf so the finiteness check of
the torch path catches it.

Backward (same grid) recomputes lp = (z - m_p) - log S_p and p = e^lp per block from the saved
[7, T] stats (no collective) and writes each gradient element once, in the logits' dtype,
padded columns as 0:

    grad_p = -p (g_lp + g_Hp (lp + H_p) - g_kl (lp - lq - KL)) + g_lp onehot(y)
    grad_q = -q (g_lq + g_Hq (lq + H_q) - g_kl) - g_kl p + g_lq onehot(y)

with terms where the probability is exactly 0 set to 0 (as in the torch path).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from megatron_papo.ops import vocab_parallel as vp

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import): CPU tensors allowed."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FWD_BLOCK_V = 2048
"""Columns per forward iteration (two [BLOCK] fp32 tiles live per program)."""
BWD_BLOCK_V = 2048
"""Columns per backward iteration."""
NUM_WARPS = 8

# Rows of the [9, T] forward partials written by the kernel.
_M_P, _S_P, _A_P, _ZY_P, _M_Q, _S_Q, _A_Q, _ZY_Q, _D = range(9)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fold_block(z, m, s, a):
    """Fold one block z [BLOCK] (fp32, -inf where absent) into the online state (m, s, a).

    Returns the new (m, s, a), the block's e^(z - m_new) [BLOCK] and alpha (the old state's scale).
    The reference point is 0 while every value seen is -inf, so no -inf - -inf arises.
    """
    m_new = tl.maximum(m, tl.max(z, axis=0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    seen = m > float("-inf")
    alpha = tl.where(seen, tl.exp(m - ref), 0.0)
    shift = tl.where(seen, m - ref, 0.0)
    e = tl.exp(z - ref)
    ez = tl.where(e > 0, e * (z - ref), 0.0)
    s_new = alpha * s + tl.sum(e, axis=0)
    a_new = alpha * (a + shift * s) + tl.sum(ez, axis=0)
    return m_new, s_new, a_new, e, alpha


@triton.jit
def _load_fp32(row_ptr, cols, valid):
    """Valid columns of one row as fp32; -inf elsewhere; NaN read as +inf."""
    z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
    return tl.where(z != z, float("inf"), z)


@triton.jit
def _papo_fwd_kernel(zp_ptr, zq_ptr, target_ptr, part_ptr, stride_p, stride_q, n_tokens, n_valid, offset,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zp_row = zp_ptr + row * stride_p
    zq_row = zq_ptr + row * stride_q
    m_p = float("-inf")
    s_p = 0.0
    a_p = 0.0
    m_q = float("-inf")
    s_q = 0.0
    a_q = 0.0
    d = 0.0
    for start in range(0, n_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_valid
        zp = _load_fp32(zp_row, cols, valid)
        zq = _load_fp32(zq_row, cols, valid)
        m_p, s_p, a_p, e_p, alpha_p = _fold_block(zp, m_p, s_p, a_p)
        m_q, s_q, a_q, _, _ = _fold_block(zq, m_q, s_q, a_q)
        d = alpha_p * d + tl.sum(tl.where(e_p > 0, e_p * (zp - zq), 0.0), axis=0)

    local = tl.load(target_ptr + row).to(tl.int64) - offset
    owned = (local >= 0) & (local < n_valid)
    local = tl.where(owned, local, 0)
    zy_p = tl.load(zp_row + local, mask=owned, other=0.0).to(tl.float32)
    zy_q = tl.load(zq_row + local, mask=owned, other=0.0).to(tl.float32)

    out = part_ptr + row
    tl.store(out + 0 * n_tokens, m_p)
    tl.store(out + 1 * n_tokens, s_p)
    tl.store(out + 2 * n_tokens, a_p)
    tl.store(out + 3 * n_tokens, zy_p)
    tl.store(out + 4 * n_tokens, m_q)
    tl.store(out + 5 * n_tokens, s_q)
    tl.store(out + 6 * n_tokens, a_q)
    tl.store(out + 7 * n_tokens, zy_q)
    tl.store(out + 8 * n_tokens, d)


@triton.jit
def _papo_bwd_kernel(zp_ptr, zq_ptr, gp_ptr, gq_ptr, target_ptr, stats_ptr, gout_ptr,
                     stride_p, stride_q, stride_gp, stride_gq, n_tokens, n_valid, v_local, offset,
                     HAS_LP: tl.constexpr, HAS_HP: tl.constexpr, HAS_LQ: tl.constexpr, HAS_HQ: tl.constexpr,
                     HAS_KL: tl.constexpr, NEED_P: tl.constexpr, NEED_Q: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zp_row = zp_ptr + row * stride_p
    zq_row = zq_ptr + row * stride_q
    st = stats_ptr + row
    m_p = tl.load(st + 0 * n_tokens)
    ls_p = tl.load(st + 1 * n_tokens)
    h_p = tl.load(st + 2 * n_tokens)
    m_q = tl.load(st + 3 * n_tokens)
    ls_q = tl.load(st + 4 * n_tokens)
    h_q = tl.load(st + 5 * n_tokens)
    kl = tl.load(st + 6 * n_tokens)
    g = gout_ptr + row  # upstream grads, rows (logp, H_p, logq, H_q, KL); a row is read only if present
    local = tl.load(target_ptr + row).to(tl.int64) - offset
    owned = (local >= 0) & (local < n_valid)
    target_col = tl.where(owned, local, -1)

    for start in range(0, v_local, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_valid
        in_row = cols < v_local
        zp = tl.load(zp_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        lp = (zp - m_p) - ls_p
        p = tl.exp(lp)
        if NEED_Q or HAS_KL:
            zq = tl.load(zq_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            lq = (zq - m_q) - ls_q
            q = tl.exp(lq)
        if NEED_P:
            coef = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_HP:
                coef += tl.load(g + 1 * n_tokens) * (lp + h_p)
            if HAS_LP:
                coef += tl.load(g + 0 * n_tokens)
            if HAS_KL:
                coef -= tl.load(g + 4 * n_tokens) * ((lp - lq) - kl)
            grad = tl.where(p > 0, -p * coef, 0.0)
            if HAS_LP:
                grad += tl.where(cols == target_col, tl.load(g + 0 * n_tokens), 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(gp_ptr + row * stride_gp + cols, grad.to(gp_ptr.dtype.element_ty), mask=in_row)
        if NEED_Q:
            coef_q = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_HQ:
                coef_q += tl.load(g + 3 * n_tokens) * (lq + h_q)
            if HAS_LQ:
                coef_q += tl.load(g + 2 * n_tokens)
            if HAS_KL:
                coef_q -= tl.load(g + 4 * n_tokens)
            grad_q = tl.where(q > 0, -q * coef_q, 0.0)
            if HAS_KL:
                grad_q -= tl.load(g + 4 * n_tokens) * p
            if HAS_LQ:
                grad_q += tl.where(cols == target_col, tl.load(g + 2 * n_tokens), 0.0)
            grad_q = tl.where(valid, grad_q, 0.0)
            tl.store(gq_ptr + row * stride_gq + cols, grad_q.to(gq_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------
# Host side: partials -> TP-reduced sums (pure torch, [T]-sized)
# --------------------------------------------------------------------------------------------


def _rebase(m_local: Tensor, s: Tensor, a: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Move one branch's online state from its local max onto the global max m (all [T]).

    Returns (scale = e^(m_local - m), S, A) relative to m; rows whose local values are all -inf
    (S = 0) get scale 0.
    """
    seen = m_local > -torch.inf
    shift = torch.where(seen, m_local - m, torch.zeros_like(m))
    scale = torch.where(seen, torch.exp(shift), torch.zeros_like(m))
    return scale, s * scale, scale * (a + shift * s)


def partials_to_sums(part: Tensor, m: Tensor, owned: Tensor) -> Tensor:
    """The kernel's [9, T] partials -> this shard's [7, T] partial sums of the torch path.

    part rows: (m_p, S_p, A_p, z_p[y], m_q, S_q, A_q, z_q[y], D) relative to the local maxima;
    m: [2, T] global maxima (finite); owned: [T] bool, this shard holds the target. Output rows
    (S_p, A_p, Y_p, S_q, A_q, Y_q, B) relative to m, ready for the SUM all-reduce.
    """
    scale_p, s_p, a_p = _rebase(part[_M_P], part[_S_P], part[_A_P], m[0])
    _, s_q, a_q = _rebase(part[_M_Q], part[_S_Q], part[_A_Q], m[1])
    zero = torch.zeros_like(s_p)
    y_p = torch.where(owned, part[_ZY_P] - m[0], zero)
    y_q = torch.where(owned, part[_ZY_Q] - m[1], zero)
    b = part[_D] * scale_p - (m[0] - m[1]) * s_p
    return torch.stack([s_p, a_p, y_p, s_q, a_q, y_q, b])


def _rows(x: Tensor) -> Tensor:
    """[T, V_local] with unit stride along the vocabulary (a copy only if it is not already)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _owned(target: Tensor, layout: vp.ShardLayout) -> Tensor:
    local = target.long() - layout.offset
    return (local >= 0) & (local < layout.n_valid)


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


class TritonPapoStats(torch.autograd.Function):
    """(logp, logq, KL(p||q), H_p, H_q), each [T] float32, from logits_p, logits_q [T, V_local].

    forward(logits_p, logits_q, target [T], tp_group, vocab_size, check_finite, names, block_v)
    Collectives (TP > 1): all-reduce MAX [2, T], all-reduce SUM [7, T]; none in backward.
    """

    @staticmethod
    def forward(ctx, logits_p: Tensor, logits_q: Tensor, target: Tensor, tp_group: dist.ProcessGroup | None,
                vocab_size: int | None, check_finite: bool, names: tuple[str, str],
                block_v: tuple[int, int]) -> tuple[Tensor, ...]:
        if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)):
            raise ValueError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        vp._check_layout_agrees(logits_p.shape[-1], vocab_size, tp_group, logits_p.device)
        layout = vp.shard_layout(logits_p.shape[-1], tp_group, vocab_size)
        zp, zq = _rows(logits_p), _rows(logits_q)
        target = target.contiguous()
        n_tokens = zp.shape[0]
        part = torch.empty((9, n_tokens), dtype=torch.float32, device=zp.device)
        if n_tokens > 0:
            _papo_fwd_kernel[(n_tokens,)](zp, zq, target, part, zp.stride(0), zq.stride(0), n_tokens,
                                          layout.n_valid, layout.offset, BLOCK_V=block_v[0],
                                          num_warps=NUM_WARPS)
        gmax = vp.reduce_max(part[[_M_P, _M_Q]], tp_group)  # collective 1: [2, T]
        if check_finite:
            vp._raise_on_bad_values(gmax, names, target, layout.vocab_size)
        m = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))  # only matters if unchecked
        sums = partials_to_sums(part, m, _owned(target, layout))
        if layout.tp_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)  # collective 2: [7, T]
        outputs, stats = vp.stats_from_sums(sums, m)
        ctx.save_for_backward(zp, zq, target, stats)
        ctx.layout, ctx.block = layout, block_v[1]
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor | None):
        # No collective: every gradient entry depends on its own logit and on per-token scalars
        # (m, log S, H, KL) that the forward reduced over the TP group and saved.
        zp, zq, target, stats = ctx.saved_tensors
        g_lp, g_lq, g_kl, g_hp, g_hq = grad_outputs
        need_p = ctx.needs_input_grad[0]
        need_q = ctx.needs_input_grad[1] and any(g is not None for g in (g_lq, g_hq, g_kl))
        present = [g is not None for g in (g_lp, g_hp, g_lq, g_hq, g_kl)]
        if not any(present) or not (need_p or need_q):
            return (None,) * 8
        n_tokens = zp.shape[0]
        gout = torch.zeros((5, n_tokens), dtype=torch.float32, device=zp.device)
        for i, g in enumerate((g_lp, g_hp, g_lq, g_hq, g_kl)):
            if g is not None:
                gout[i] = g
        grad_p = torch.empty(zp.shape, dtype=zp.dtype, device=zp.device) if need_p else None
        grad_q = torch.empty(zq.shape, dtype=zq.dtype, device=zq.device) if need_q else None
        layout = ctx.layout
        if n_tokens > 0:
            gp, gq = (grad_p if need_p else zp), (grad_q if need_q else zq)  # dummies are never written
            _papo_bwd_kernel[(n_tokens,)](
                zp, zq, gp, gq, target, stats, gout, zp.stride(0), zq.stride(0), gp.stride(0), gq.stride(0),
                n_tokens, layout.n_valid, layout.v_local, layout.offset,
                HAS_LP=present[0], HAS_HP=present[1], HAS_LQ=present[2], HAS_HQ=present[3],
                HAS_KL=present[4], NEED_P=need_p, NEED_Q=need_q, BLOCK_V=ctx.block, num_warps=NUM_WARPS)
        return grad_p, grad_q, None, None, None, None, None, None


def check_inputs(logits: Tensor, masked_logits: Tensor) -> None:
    """Raise ValueError if the kernels cannot run on these tensors (dtype, device)."""
    for name, x in (("logits", logits), ("masked_logits", masked_logits)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"impl='triton': {name} has dtype {x.dtype}; the Triton kernels take "
                             "float32, bfloat16 or float16 logits (use impl='torch' for float64)")
        if not x.is_cuda and not INTERPRETED:
            raise ValueError(f"impl='triton': {name} is on {x.device}; the Triton kernels need CUDA tensors "
                             "(or TRITON_INTERPRET=1 set before import to run them in Triton's CPU "
                             "interpreter, for tests)")


def papo_token_stats_triton(logits: Tensor, masked_logits: Tensor, target: Tensor,
                            tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None, *,
                            check_finite: bool = True, block_v: tuple[int, int] | None = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp, logq, KL(p||q), H_p, H_q), each [T] float32, for logits / masked_logits [T, V_local].

    The kernel entry behind ``papo_token_stats(..., impl="triton")``, which validates shapes and
    flattens the leading dims first. block_v: (forward, backward) columns per iteration, powers
    of 2 (default (FWD_BLOCK_V, BWD_BLOCK_V); tests pass small blocks to cover several of them).
    """
    check_inputs(logits, masked_logits)
    blocks = block_v or (FWD_BLOCK_V, BWD_BLOCK_V)
    for b in blocks:
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_v entries must be powers of 2 >= 16, got {blocks}")
    return TritonPapoStats.apply(logits, masked_logits, target, tp_group, vocab_size, check_finite,
                                 ("logits", "masked_logits"), tuple(blocks))
