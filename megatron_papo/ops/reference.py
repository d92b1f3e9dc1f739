"""Plain-autograd references for the vocab-parallel ops: the naive path, and synthetic inputs.

``naive_papo_token_stats`` is what the fused op replaces: gather the vocabulary shards into
[T, V], upcast the whole tensor, log_softmax, and let autograd do the backward. It is the float64
oracle of the tests (tp_group=None on the full logits) and the baseline of the benchmark. Its
memory grows with several full [T, V] fp32/fp64 tensors; use it for checking, not training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.ops.fused import PapoTokenStats, papo_token_stats
from megatron_papo.ops.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
)


class _GatherVocab(torch.autograd.Function):
    """[T, V_local] shards -> [T, V_local * tp] (rank order); backward keeps this rank's columns.

    The loss built on the gathered tensor is identical on every TP rank, so each rank's shard
    receives its own slice of that loss's gradient (no reduction).
    """

    @staticmethod
    def forward(ctx, shard: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        lo = ctx.rank * ctx.width
        return grad[..., lo:lo + ctx.width], None


def _safe(x: Tensor, keep: Tensor) -> Tensor:
    """x where keep else 0, with no NaN reaching the gradient of the unused branch."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def naive_papo_token_stats(logits: Tensor, masked_logits: Tensor, target: Tensor,
                           tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None,
                           dtype: torch.dtype = torch.float32) -> PapoTokenStats:
    """The five PAPO token statistics by gather + upcast + log_softmax + autograd.

    logits, masked_logits: [..., V_local] shards (or the full vocabulary with tp_group=None);
    target: [...] global ids. Returns fields of shape logits.shape[:-1] in ``dtype``.
    """
    full = []
    for x in (logits, masked_logits):
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            x = _GatherVocab.apply(x, tp_group)
        full.append(x)
    vocab = full[0].shape[-1] if vocab_size is None else vocab_size
    lp = torch.log_softmax(full[0][..., :vocab].to(dtype), dim=-1)
    lq = torch.log_softmax(full[1][..., :vocab].to(dtype), dim=-1)
    p, q = lp.exp(), lq.exp()
    has_p, has_q = p > 0, q > 0
    lp_s, lq_s = _safe(lp, has_p), _safe(lq, has_q)
    idx = target.long().unsqueeze(-1)
    return PapoTokenStats(
        log_probs=lp.gather(-1, idx).squeeze(-1),
        masked_log_probs=lq.gather(-1, idx).squeeze(-1),
        kl=(p * (lp_s - _safe(lq, has_p))).sum(-1),
        entropy=-(p * lp_s).sum(-1),
        masked_entropy=-(q * lq_s).sum(-1),
    )


def synthetic_logits(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> Tensor:
    """fp32 test logits [..., V] of a given ``kind``.

    normal: 3 * N(0, 1); large: uniform in [-1e4, 1e4]; offset: 1e4 + 3 * N(0, 1);
    neginf: normal with ~30% of entries -inf (never a whole row; column 0 stays finite) and the
    first row -inf from column 10 on, so with small shards some shards see a row that is all -inf.
    """
    if kind == "normal":
        return 3 * torch.randn(shape, generator=generator)
    if kind == "large":
        return (torch.rand(shape, generator=generator) * 2 - 1) * 1e4
    if kind == "offset":
        return 1e4 + 3 * torch.randn(shape, generator=generator)
    if kind == "neginf":
        z = 3 * torch.randn(shape, generator=generator)
        drop = torch.rand(shape, generator=generator) < 0.3
        drop[..., 0] = False
        drop.view(-1, shape[-1])[0, 10:] = True
        return z.masked_fill(drop, -torch.inf)
    raise ValueError(f"unknown kind {kind!r}; expected normal, large, offset or neginf")


def synthetic_papo_case(seed: int, lead: tuple[int, ...], vocab_size: int, padded_vocab: int, kind: str,
                        dtype: torch.dtype) -> dict[str, Tensor]:
    """Full-vocabulary inputs for one PAPO op check, identical on every process for a given seed.

    Returns logits, masked_logits: [*lead, padded_vocab] in ``dtype`` with NaN / +inf garbage in the
    padded columns (>= vocab_size); target: [*lead] int64 ids in [0, vocab_size) on finite logits;
    upstream: [5, *lead] fp32 random gradients for (log_probs, masked_log_probs, kl, entropy,
    masked_entropy). For kind "neginf" the masked logits are -inf exactly where the logits are.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, vocab_size)
    z = synthetic_logits(shape, kind, gen)
    if kind == "neginf":
        zq = z + torch.randn(shape, generator=gen)
    else:
        zq = synthetic_logits(shape, kind, gen)
    pad = padded_vocab - vocab_size
    garbage = torch.tensor([torch.nan, torch.inf, -torch.inf, 1e30])
    out = {}
    for name, x in (("logits", z), ("masked_logits", zq)):
        fill = garbage[torch.randint(0, 4, (*lead, pad), generator=gen)]
        out[name] = torch.cat([x, fill], dim=-1).to(dtype)
    target = torch.randint(0, vocab_size, lead, generator=gen)
    finite = torch.isfinite(z.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    out["target"] = torch.where(finite, target, torch.zeros_like(target))
    out["upstream"] = torch.randn((5, *lead), generator=gen)
    return out


# --------------------------------------------------------------------------------------------
# Test oracle: run every op on one shard, and the float64 reference on the full vocabulary
# --------------------------------------------------------------------------------------------

STAT_NAMES = ("log_probs", "masked_log_probs", "kl", "entropy", "masked_entropy")


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN garbage compares equal to itself)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def _grads(outputs: list[Tensor], upstream: list[Tensor], inputs: list[Tensor]) -> list[Tensor | None]:
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, upstream))
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True))


def run_ops_on_shard(case: dict[str, Tensor], tp_rank: int, tp_size: int, tp_group: dist.ProcessGroup | None,
                     vocab_size: int, chunk_size: int | None = None) -> dict[str, Tensor | bool]:
    """Run papo_token_stats and the three single ops on this rank's vocabulary slice of ``case``.

    Returns values [*lead] and gradients [*lead, V_local] (logits dtype), keyed
    ``fused.<stat>``, ``fused.grad_p/grad_q`` (all five upstream grads), ``subset.grad_p`` (masked
    branch detached, only kl and entropy used), ``logp``/``entropy``/``kl`` (+ ``.grad...``), and
    ``unchanged`` (inputs bitwise intact).
    """
    width = case["logits"].shape[-1] // tp_size
    cols = slice(tp_rank * width, (tp_rank + 1) * width)
    zp0, zq0 = case["logits"][..., cols].clone(), case["masked_logits"][..., cols].clone()
    zp, zq = zp0.clone().requires_grad_(), zq0.clone().requires_grad_()
    target, up = case["target"], list(case["upstream"])
    kw = dict(tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size)
    out: dict[str, Tensor | bool] = {}

    stats = papo_token_stats(zp, zq, target, **kw)
    values = [getattr(stats, n) for n in STAT_NAMES]
    out.update({f"fused.{n}": v.detach() for n, v in zip(STAT_NAMES, values)})
    out["fused.grad_p"], out["fused.grad_q"] = _grads(values, up, [zp, zq])

    stats = papo_token_stats(zp, zq.detach(), target, **kw)
    out["subset.grad_p"], = _grads([stats.kl, stats.entropy], [up[2], up[3]], [zp])

    logp = vocab_parallel_log_probs(zp, target, **kw)
    out["logp"], (out["logp.grad"],) = logp.detach(), _grads([logp], [up[0]], [zp])
    ent = vocab_parallel_entropy(zp, **kw)
    out["entropy"], (out["entropy.grad"],) = ent.detach(), _grads([ent], [up[3]], [zp])
    kl = vocab_parallel_kl(zp, zq, **kw)
    out["kl"] = kl.detach()
    out["kl.grad_p"], out["kl.grad_q"] = _grads([kl], [up[2]], [zp, zq])
    out["unchanged"] = _same_bits(zp, zp0) and _same_bits(zq, zq0)
    return out


def reference_results(case: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """The float64 expectations for every key of ``run_ops_on_shard`` (full-vocabulary gradients)."""
    zp = case["logits"].double().requires_grad_()
    zq = case["masked_logits"].double().requires_grad_()
    up = list(case["upstream"].double())
    stats = naive_papo_token_stats(zp, zq, case["target"], vocab_size=vocab_size, dtype=torch.float64)
    values = [getattr(stats, n) for n in STAT_NAMES]
    ref = {f"fused.{n}": v.detach() for n, v in zip(STAT_NAMES, values)}
    ref["fused.grad_p"], ref["fused.grad_q"] = _grads(values, up, [zp, zq])
    ref["subset.grad_p"], = _grads([stats.kl, stats.entropy], [up[2], up[3]], [zp])
    ref["logp"], ref["entropy"], ref["kl"] = ref["fused.log_probs"], ref["fused.entropy"], ref["fused.kl"]
    ref["logp.grad"], = _grads([stats.log_probs], [up[0]], [zp])
    ref["entropy.grad"], = _grads([stats.entropy], [up[3]], [zp])
    ref["kl.grad_p"], ref["kl.grad_q"] = _grads([stats.kl], [up[2]], [zp, zq])
    return ref


# Tolerances of the op against the float64 reference (values are always computed in fp32 or
# better from the exact input values; gradients are additionally rounded to the logits dtype).
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}


def compare_to_reference(got: dict[str, Tensor], ref: dict[str, Tensor], dtype: torch.dtype,
                         grad_rtol: float | None = None) -> list[str]:
    """Failures of ``got`` (full-vocabulary gradients) against ``reference_results``; [] if all pass.

    values:    |got - ref| <= rtol * (1 + |ref|)                   rtol = VALUE_RTOL[dtype]
    gradients: |got - ref| <= rtol * |ref| + 1e-5 * max|ref| + 16 * eps * K
               rtol = GRAD_RTOL[dtype] (bf16: 2^-8, twice bf16's half-ulp rounding of the output);
               eps = machine epsilon of the accumulation dtype (fp32: 2^-23);
               K = max |log p(y)|, |log q(y)|, |KL| of the case. The KL gradient
               p (log p - log q - KL) subtracts numbers of magnitude up to K: with logits of
               magnitude 1e4, log q and KL are ~2e4 and fp32 holds them to ~2e-3, so that
               gradient carries an absolute error of order eps * K * |upstream grad| that no fp32
               algorithm avoids. For ordinary logits (K ~ 20) this term is ~4e-5.
    The gradient dtype must equal the logits dtype. Equal infinities pass.
    grad_rtol overrides GRAD_RTOL[dtype] (e.g. for a backend that truncates instead of rounding).
    """
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    mags = torch.cat([ref[k].reshape(-1) for k in ("fused.log_probs", "fused.masked_log_probs", "fused.kl")])
    cancel = 16 * eps * mags[torch.isfinite(mags)].abs().max()
    failures = []
    for key, want in ref.items():
        have = got[key]
        if have is None or have.shape != want.shape:
            shape = None if have is None else tuple(have.shape)
            failures.append(f"{key}: shape {shape} != {tuple(want.shape)}")
            continue
        is_grad = "grad" in key
        if is_grad and have.dtype != dtype:
            failures.append(f"{key}: gradient dtype {have.dtype} != logits dtype {dtype}")
        h = have.double()
        if is_grad:
            rtol = GRAD_RTOL[dtype] if grad_rtol is None else grad_rtol
            bound = rtol * want.abs() + 1e-5 * want.abs().max() + cancel
        else:
            bound = VALUE_RTOL[dtype] * (1 + want.abs())
        ok = (h == want) | ((h - want).abs() <= bound)
        if not bool(ok.all()):
            bad = tuple((~ok).nonzero()[0].tolist())
            failures.append(f"{key}: {int((~ok).sum())} mismatches, first at {list(bad)}: "
                            f"got {h[bad].item()}, want {want[bad].item()}")
    return failures
