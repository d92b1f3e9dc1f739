"""The Triton kernels of papo_token_stats (impl="triton") against the float64 reference.

Three groups:
- dispatch (runs everywhere, CI included): impl="auto" picks torch on CPU; impl="triton" without
  triton raises MissingDependencyError with an install hint;
- kernel (needs triton, and either CUDA or TRITON_INTERPRET=1 set before the run, which runs the
  kernels in Triton's interpreter on CPU tensors; skipped in CI, which has no triton):

      TRITON_INTERPRET=1 python -m pytest tests/unit/test_ops_triton.py   # venv with triton

  values and gradients vs float64 (tolerances of megatron_papo.ops.reference.compare_to_reference,
  the same as the torch path's), several block sizes so V_local is not a multiple of the block,
  padded vocabulary holding NaN/inf garbage, large magnitudes, -inf logits, fp32/bf16/fp16,
  TP=2 on gloo ranks (marked slow). Triton 3.9's interpreter TRUNCATES fp32 -> bf16 casts
  (compiled kernels round to nearest even), so under the interpreter the bf16 gradient tolerance
  is one bf16 ulp (2^-7 relative) instead of the half-ulp-based 2^-8;
- gpu (marker gpu, needs CUDA + triton): kernel vs torch path at realistic sizes.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from megatron_papo.compat import mcore_compat
from megatron_papo.losses import PapoLossConfig, papo_loss
from megatron_papo.ops import papo_token_stats
from megatron_papo.ops.fused import resolve_impl
from megatron_papo.ops.reference import (
    STAT_NAMES,
    _grads,
    compare_to_reference,
    reference_results,
    synthetic_papo_case,
)
from megatron_papo.testing import run_distributed

HAVE_TRITON = mcore_compat.have_triton()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(not (HAVE_TRITON and (INTERPRET or CUDA)),
                                  reason="needs triton and CUDA, or TRITON_INTERPRET=1")

VOCAB, PADDED = 100, 104  # padded columns hold NaN / +inf / -inf / 1e30 garbage
# bf16 gradient rtol: the interpreter truncates fp32 -> bf16 (up to 1 ulp = 2^-7 relative off)
GRAD_RTOL = {torch.bfloat16: 2**-7} if INTERPRET else {}
BLOCKS = [None, (32, 16), (64, 128)]  # None = the public API's default blocks (one block here)


# ------------------------------------------------------------------------------- dispatch (CI)


def _zy(t: int = 4, v: int = 10, dtype: torch.dtype = torch.float32):
    return torch.randn(t, v, dtype=dtype), torch.randn(t, v, dtype=dtype), torch.randint(0, v, (t,))


def test_auto_picks_torch_on_cpu():
    z, zq, _ = _zy(dtype=torch.bfloat16)
    assert resolve_impl("auto", z, zq) == "torch"
    assert resolve_impl("torch", z, zq) == "torch"
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'torch', 'triton'\], got 'cuda'"):
        papo_token_stats(z, zq, torch.zeros(4, dtype=torch.long), impl="cuda")


@pytest.fixture
def no_triton(monkeypatch):
    """Make the triton probe report it absent, whether or not this environment has it."""
    _, hint = mcore_compat._FEATURES["triton"]
    monkeypatch.setitem(mcore_compat._FEATURES, "triton", (lambda: False, hint))


def test_triton_requested_without_triton_raises(no_triton):
    z, zq, y = _zy()
    with pytest.raises(mcore_compat.MissingDependencyError, match=r"triton is not available\. Triton is"):
        papo_token_stats(z, zq, y, impl="triton")
    cfg = PapoLossConfig(kl_prcp_mode="full", op_impl="triton")
    b, length = 2, 3
    logits = torch.randn(b, length, 10)
    with pytest.raises(mcore_compat.MissingDependencyError, match="triton is not available"):
        papo_loss(logits, torch.zeros(b, length, dtype=torch.long), torch.zeros(b, length), torch.ones(b),
                  torch.ones(b, length), config=cfg, masked_logits=logits.clone())


@pytest.mark.skipif(HAVE_TRITON, reason="this environment has triton")
def test_triton_absent_here_raises_missing_dependency():
    z, zq, y = _zy()
    with pytest.raises(mcore_compat.MissingDependencyError, match="pip install megatron_papo\\[gpu\\]"):
        papo_token_stats(z, zq, y, impl="triton")


# ------------------------------------------------------------------------------- kernel


def run_kernel_on_shard(case: dict, tp_rank: int, tp_size: int, tp_group, vocab_size: int,
                        block_v: tuple[int, int] | None, device: str = DEVICE) -> dict:
    """The ``fused.*`` and ``subset.grad_p`` keys of reference.run_ops_on_shard, via the kernels.

    block_v None goes through the public ``papo_token_stats(..., impl="triton")``; otherwise the
    kernel entry ``papo_token_stats_triton`` with those (forward, backward) block widths.
    """
    from megatron_papo.ops.triton_papo import papo_token_stats_triton

    width = case["logits"].shape[-1] // tp_size
    cols = slice(tp_rank * width, (tp_rank + 1) * width)
    zp = case["logits"][..., cols].to(device).requires_grad_()
    zq = case["masked_logits"][..., cols].to(device).requires_grad_()
    target = case["target"].to(device)
    up = [u.to(device) for u in case["upstream"]]

    def stats(a, b):
        if block_v is None:
            s = papo_token_stats(a, b, target, tp_group, vocab_size, impl="triton")
            return [getattr(s, n) for n in STAT_NAMES]
        flat = [x.reshape(-1, x.shape[-1]) for x in (a, b)]
        outs = papo_token_stats_triton(flat[0], flat[1], target.reshape(-1), tp_group, vocab_size,
                                       block_v=block_v)
        return [o.view(target.shape) for o in outs]

    values = stats(zp, zq)
    out = {f"fused.{n}": v.detach().cpu() for n, v in zip(STAT_NAMES, values)}
    grads = _grads(values, up, [zp, zq])
    out["fused.grad_p"], out["fused.grad_q"] = (g.cpu() for g in grads)
    values = stats(zp, zq.detach())
    out["subset.grad_p"] = _grads([values[2], values[3]], [up[2], up[3]], [zp])[0].cpu()
    return out


def _reference(case: dict) -> dict:
    ref = reference_results(case, VOCAB)
    return {k: v for k, v in ref.items() if k.startswith(("fused.", "subset."))}


CASES = [(torch.float32, k) for k in ("normal", "large", "offset", "neginf")] + \
        [(torch.bfloat16, k) for k in ("normal", "large", "neginf")] + [(torch.float16, "normal")]


@needs_kernel
@pytest.mark.parametrize(("dtype", "kind"), CASES, ids=[f"{d}-{k}".replace("torch.", "") for d, k in CASES])
@pytest.mark.parametrize("block_v", BLOCKS, ids=["default", "32-16", "64-128"])
def test_kernel_matches_reference(dtype, kind, block_v):
    case = synthetic_papo_case(1, (3, 5), VOCAB, PADDED, kind, dtype)
    got = run_kernel_on_shard(case, 0, 1, None, VOCAB, block_v)
    assert compare_to_reference(got, _reference(case), dtype, GRAD_RTOL.get(dtype)) == []
    assert not got["fused.grad_p"][..., VOCAB:].any(), "padded columns must get gradient 0"


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (7,), (2, 17)])
def test_kernel_shapes_unpadded(shape):
    """T not a multiple of anything, V_local = 77 not a multiple of the block, no padding."""
    case = synthetic_papo_case(4, shape, 77, 77, "normal", torch.float32)
    got = run_kernel_on_shard(case, 0, 1, None, 77, (16, 32))
    ref = {k: v for k, v in reference_results(case, 77).items() if k.startswith(("fused.", "subset."))}
    assert compare_to_reference(got, ref, torch.float32) == []


@needs_kernel
def test_kernel_agrees_with_torch_path_and_keeps_inputs():
    gen = torch.Generator().manual_seed(7)
    zp0 = (3 * torch.randn(9, 300, generator=gen)).to(DEVICE)
    zq0 = zp0 + torch.randn(9, 300, generator=gen).to(DEVICE)
    y = torch.randint(0, 290, (9,), generator=gen).to(DEVICE)
    res = {}
    for impl in ("torch", "triton"):
        zp, zq = zp0.clone().requires_grad_(), zq0.clone().requires_grad_()
        s = papo_token_stats(zp, zq, y, vocab_size=290, impl=impl)
        (s.kl * 2 + s.entropy - s.masked_entropy + s.log_probs + 0.5 * s.masked_log_probs).sum().backward()
        res[impl] = [getattr(s, n).detach() for n in STAT_NAMES] + [zp.grad, zq.grad]
        assert torch.equal(zp.detach(), zp0) and torch.equal(zq.detach(), zq0)
    for a, b in zip(res["torch"], res["triton"]):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6)


@needs_kernel
def test_kernel_strided_inputs():
    """Rows with a stride larger than V_local (a column slice) and a non-unit column stride."""
    gen = torch.Generator().manual_seed(8)
    base = (3 * torch.randn(6, 130, generator=gen)).to(DEVICE)
    y = torch.randint(0, 60, (6,), generator=gen).to(DEVICE)
    for make_view in (lambda x: x[:, :60], lambda x: x[:, ::2][:, :60]):
        res = {}
        for impl in ("torch", "triton"):
            leaf = base.clone().requires_grad_()
            zp = make_view(leaf)
            s = papo_token_stats(zp, zp.detach().flip(-1), y, impl=impl)
            (s.kl + s.entropy + s.log_probs).sum().backward()
            res[impl] = (s.kl.detach(), leaf.grad)
        torch.testing.assert_close(res["triton"], res["torch"], rtol=2e-6, atol=2e-6)


@needs_kernel
def test_kernel_unused_outputs_and_detached_branch():
    zp = torch.randn(5, 9, device=DEVICE, requires_grad=True)
    zq = torch.randn(5, 9, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 9, (5,), device=DEVICE)
    papo_token_stats(zp, zq, y, impl="triton").entropy.sum().backward()
    assert zq.grad is None or torch.count_nonzero(zq.grad) == 0
    zq.grad = zp.grad = None
    papo_token_stats(zp, zq.detach(), y, impl="triton").kl.sum().backward()
    assert zq.grad is None and zp.grad is not None
    empty = papo_token_stats(torch.zeros(0, 8, device=DEVICE), torch.zeros(0, 8, device=DEVICE),
                             torch.zeros(0, dtype=torch.long, device=DEVICE), impl="triton")
    assert empty.kl.shape == (0,)


@needs_kernel
def test_kernel_input_errors():
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    bad = z.clone()
    bad[2, 3] = torch.nan
    with pytest.raises(ValueError, match=r"masked_logits contains NaN or \+inf \(first at flattened token 2"):
        papo_token_stats(z, bad, y, impl="triton")
    bad = z.clone()
    bad[1] = -torch.inf
    with pytest.raises(ValueError, match="every logit of flattened token 1 is -inf"):
        papo_token_stats(bad, z, y, impl="triton")
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=8\)"):
        papo_token_stats(z, z, y.clamp(min=9), vocab_size=8, impl="triton")
    with pytest.raises(ValueError, match="use impl='torch' for float64"):
        papo_token_stats(z.double(), z.double(), y, impl="triton")
    padded = torch.cat([z, torch.full((4, 2), torch.nan, device=DEVICE)], dim=-1)  # garbage padding is fine
    torch.testing.assert_close(papo_token_stats(padded, padded, y, vocab_size=10, impl="triton").entropy,
                               papo_token_stats(z, z, y, impl="torch").entropy, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_papo_loss_with_triton_op_matches_torch_op():
    gen = torch.Generator().manual_seed(9)
    b, length, v = 2, 6, 40
    logits = (3 * torch.randn(b, length, v, generator=gen)).to(DEVICE)
    masked = logits + torch.randn(b, length, v, generator=gen).to(DEVICE)
    target = torch.randint(0, 37, (b, length), generator=gen).to(DEVICE)
    old, adv = torch.randn(b, length, generator=gen).to(DEVICE) - 3, torch.randn(b, generator=gen).to(DEVICE)
    mask = torch.ones(b, length, device=DEVICE)
    res = {}
    for impl in ("torch", "triton"):
        cfg = PapoLossConfig(gamma=0.3, kl_prcp_mode="full", entropy_mode="full", masked_grad=True,
                             ref_kl_coef=0.0, op_impl=impl)
        a, am = logits.clone().requires_grad_(), masked.clone().requires_grad_()
        loss, _ = papo_loss(a, target, old, adv, mask, config=cfg, masked_logits=am, vocab_size=37)
        loss.backward()
        res[impl] = (loss.detach(), a.grad, am.grad)
    torch.testing.assert_close(res["triton"], res["torch"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- TP = 2


TP_CASES = [(torch.float32, "normal", (32, 16)), (torch.float32, "large", None),
            (torch.float32, "neginf", (16, 16)), (torch.bfloat16, "normal", (32, 64))]


def _tp_case(i: int) -> dict:
    dtype, kind, _ = TP_CASES[i]
    return synthetic_papo_case(20 + i, (2, 3), VOCAB, PADDED, kind, dtype)


def _tp_rank(rank: int, world: int) -> bytes:
    """This rank's results, serialised: tensors sent through the queue as shared-memory file
    descriptors can vanish with the exiting rank before the parent reads them."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    res = [run_kernel_on_shard(_tp_case(i), rank, world, group, VOCAB, block, "cpu")
           for i, (_, _, block) in enumerate(TP_CASES)]
    buf = io.BytesIO()
    torch.save(res, buf)
    return buf.getvalue()


@needs_kernel
@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="gloo ranks on CPU tensors: interpreter only")
def test_kernel_tp2_matches_reference():
    """V_local = 52; the second shard holds 48 real columns and 4 padded ones."""
    ranks = [torch.load(io.BytesIO(r)) for r in run_distributed(_tp_rank, 2, timeout=600)]
    for i, (dtype, _, _) in enumerate(TP_CASES):
        got = dict(ranks[0][i])
        for key in ("fused.grad_p", "fused.grad_q", "subset.grad_p"):
            got[key] = torch.cat([r[i][key] for r in ranks], dim=-1)
        for key in got:
            if not key.endswith(("grad_p", "grad_q")):  # values are replicated across TP ranks
                torch.testing.assert_close(ranks[1][i][key], got[key], rtol=0, atol=0)
        assert compare_to_reference(got, _reference(_tp_case(i)), dtype, GRAD_RTOL.get(dtype)) == [], i


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAVE_TRITON) or INTERPRET, reason="needs CUDA and triton (compiled)")
@pytest.mark.parametrize("t,v_local,vocab", [(512, 38016, 38016), (1024, 152064, 151643), (333, 4099, 4000)])
def test_gpu_kernel_matches_torch_path(t, v_local, vocab):
    gen = torch.Generator(device="cuda").manual_seed(0)
    zp0 = (3 * torch.randn(t, v_local, generator=gen, device="cuda")).bfloat16()
    zq0 = (zp0.float() + torch.randn(t, v_local, generator=gen, device="cuda")).bfloat16()
    y = torch.randint(0, vocab, (t,), generator=gen, device="cuda")
    w = torch.randn(5, t, generator=gen, device="cuda")
    res = {}
    for impl in ("torch", "triton"):
        zp, zq = zp0.clone().requires_grad_(), zq0.clone().requires_grad_()
        s = papo_token_stats(zp, zq, y, vocab_size=vocab, impl=impl)
        vals = [getattr(s, n) for n in STAT_NAMES]
        sum((x * w[i]).sum() for i, x in enumerate(vals)).backward()
        res[impl] = [v.detach() for v in vals] + [zp.grad.float(), zq.grad.float()]
    for i, (a, b) in enumerate(zip(res["torch"], res["triton"])):
        if i < 5:  # fp32 values from identical bf16 inputs: summation order only
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
        else:  # bf16 gradients: one bf16 rounding each, possibly on opposite sides
            torch.testing.assert_close(b, a, rtol=2**-7, atol=1e-6 * float(a.abs().max()))
