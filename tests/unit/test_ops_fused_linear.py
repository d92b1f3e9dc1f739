"""The fused linear PAPO op (ops/fused_linear.py) against float64 autograd of the unfused
composition ``papo_token_stats(hidden @ weight.T, masked_hidden @ weight.T, target)``.

Tolerances, from the arithmetic (u = unit roundoff of the input dtype: fp32 2^-24, bf16 2^-8;
u32 = 2^-24; n = vocabulary rows, H = hidden size):
- float64: the op and the reference compute the same sums in another order: 1e-10.
- Values, per token: the op's logits differ from the exact ones by at most
  dz_tv = u |z_tv| + H u32 (|h_t| . |W_v|) (the input-dtype rounding of the matmul output plus
  its fp32 accumulation). To first order a statistic moves by sum_v |d stat_t / d z_tv| dz_tv
  (the float64 reference's own gradient gives that sum); twice that, plus the fp32 summation
  over n terms, 8 n u32 (1 + |ref|), bounds the difference.
- Gradients, relative to the largest reference entry: the logit gradient is rounded to the input
  dtype before each tile's matmul and each tile's product to the input dtype again, and the
  products of k tiles are summed (k = token chunks for the weight, vocabulary blocks for the
  hidden states): (k + 2) u; plus the first-order move of the logit gradient under the logit
  error above, which the softmax derivatives bound by 4 max dz.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_papo.ops import (
    linear_papo_token_stats,
    linear_vocab_parallel_log_probs,
    linear_vocab_parallel_log_probs_entropy,
    papo_token_stats,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
)

FIELDS = ("log_probs", "masked_log_probs", "kl", "entropy", "masked_entropy")
LEAD, H, VOCAB, PADDED = (3, 13), 24, 100, 104  # T = 39 tokens, 4 padded output rows
CHUNK, BLOCK = 8, 32  # neither divides T nor the 100 valid rows: ragged last tiles
U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24


def _case(dtype, seed=0, scale=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*LEAD, H, generator=g).to(dtype)
    hq = (h.float() + 0.5 * torch.randn(*LEAD, H, generator=g)).to(dtype)
    w = (scale * torch.randn(PADDED, H, generator=g)).to(dtype)
    y = torch.randint(0, VOCAB, LEAD, generator=g)
    up = {f: torch.randn(LEAD, generator=g, dtype=torch.float64) for f in FIELDS}
    return h, hq, w, y, up


def _loss(stats, up, fields=FIELDS):
    return sum((getattr(stats, f).double() * up[f]).sum() for f in fields)


def _reference(h, hq, w, y, up, masked="grad", vocab=VOCAB):
    """float64 values, gradients (hidden, masked_hidden, weight) and per-token value bounds' inputs.

    masked: "grad" (both branches differentiated), "hidden" (masked_hidden detached, its logits
    still reach W), "logits" (the masked logits detached: no gradient from that branch)."""
    h64, hq64, w64 = (x.detach().double().requires_grad_(True) for x in (h, hq, w))
    z, zq = h64 @ w64.T, (hq64 if masked == "grad" else hq64.detach()) @ w64.T
    stats = papo_token_stats(z, zq.detach() if masked == "logits" else zq, y, vocab_size=vocab)
    _loss(stats, up).backward()
    masked_grad = masked == "grad"
    # |d stat_t / d z_tv| per statistic: each token's outputs depend on its own logits only
    sens = {}
    for f in FIELDS:
        zz, zzq = (x.detach().clone().requires_grad_(True) for x in (z, zq))
        getattr(papo_token_stats(zz, zzq, y, vocab_size=vocab), f).sum().backward()
        sens[f] = tuple(torch.zeros_like(x) if x.grad is None else x.grad.abs() for x in (zz, zzq))
    return {"stats": stats, "grads": (h64.grad, hq64.grad if masked_grad else None, w64.grad),
            "z": (z.detach(), zq.detach()), "sens": sens, "abs": (h64.abs(), hq64.abs(), w64.abs()),
            "vocab": vocab}


def _value_bound(ref, dtype, f):
    u = U[dtype]
    habs, hqabs, wabs = ref["abs"]
    hidden, rows = wabs.shape[1], wabs.shape[0]
    dz = [u * z.abs() + hidden * U32 * (a @ wabs.T).detach() for z, a in zip(ref["z"], (habs, hqabs))]
    first = sum((s * d).sum(-1) for s, d in zip(ref["sens"][f], dz))
    want = getattr(ref["stats"], f).detach()
    return 2 * first + 8 * rows * U32 * (1 + want.abs()), float(max(d.max() for d in dz))


def _check(got_stats, got_grads, ref, dtype, chunk=CHUNK, block=BLOCK):
    """Failures of the op's values / gradients against ``_reference`` (the module's tolerances);
    ``got_stats`` has the PapoTokenStats fields, ``got_grads`` is (hidden, masked_hidden, weight)."""
    failures = []
    dz_max = 0.0
    for f in FIELDS:
        want = getattr(ref["stats"], f).detach()
        have = getattr(got_stats, f).double()
        bound, dz_max = _value_bound(ref, dtype, f)
        if dtype == torch.float64:
            bound = torch.full_like(want, 1e-10)
        if not bool(((have - want).abs() <= bound).all()):
            failures.append(f"{f}: max err {(have - want).abs().max().item():.3g} "
                            f"(bound {bound.min().item():.3g}..{bound.max().item():.3g})")
    n_tokens = got_stats.kl.numel()
    vocab = ref["vocab"]
    k_for = {0: -(-vocab // block), 1: -(-vocab // block), 2: -(-n_tokens // chunk)}
    for i, (have, want) in enumerate(zip(got_grads, ref["grads"])):
        if want is None:
            if have is not None:
                failures.append(f"grad {i}: expected none, got a gradient")
            continue
        if have is None or have.dtype != dtype:
            failures.append(f"grad {i}: {None if have is None else have.dtype}, expected {dtype}")
            continue
        scale = want.abs().max().item()
        rel = 1e-10 if dtype == torch.float64 else (k_for[i] + 2) * U[dtype] + 4 * dz_max
        err = (have.double() - want).abs().max().item()
        if err > rel * scale:
            failures.append(f"grad {i}: max err {err:.3g} > {rel:.3g} * {scale:.3g}")
    return failures


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", ["grad", "hidden", "logits"])
def test_linear_papo_token_stats_equals_the_unfused_composition(dtype, masked):
    h, hq, w, y, up = _case(dtype)
    ref = _reference(h, hq, w, y, up, masked)
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hq = hq.clone().requires_grad_(masked == "grad")
    stats = linear_papo_token_stats(h, hq, w, y, vocab_size=VOCAB, chunk_size=CHUNK, vocab_block=BLOCK,
                                    masked_weight_grad=masked != "logits")
    _loss(stats, up).backward()
    failures = _check(stats, (h.grad, hq.grad, w.grad), ref, dtype)
    assert not failures, failures
    assert bool((w.grad[VOCAB:] == 0).all()), "padded output rows must get gradient 0"


def test_the_weight_gradient_sums_both_branches():
    """Dropping the masked branch's weight contribution (a plausible bug) is visible."""
    h, hq, w, y, up = _case(torch.float64)
    w1 = w.clone().requires_grad_(True)
    _loss(linear_papo_token_stats(h, hq.clone().requires_grad_(True), w1, y, vocab_size=VOCAB), up).backward()
    w2 = w.clone().requires_grad_(True)
    _loss(linear_papo_token_stats(h, hq, w2, y, vocab_size=VOCAB), up, ("log_probs", "entropy")).backward()
    w3 = w.clone().requires_grad_(True)
    z = h @ w3.T
    _loss(papo_token_stats(z, hq @ w3.T, y, vocab_size=VOCAB), up, ("log_probs", "entropy")).backward()
    assert torch.allclose(w2.grad, w3.grad, rtol=0, atol=1e-10)
    assert (w1.grad - w2.grad).abs().max() > 1e-3  # the KL and the q terms reach W through hq @ W.T


@pytest.mark.parametrize("tile", [(1, 1), (39, 100), (64, 4096), (5, 99)])
def test_any_tiling_gives_the_same_float64_result(tile):
    h, hq, w, y, up = _case(torch.float64, seed=3)
    ref = _reference(h, hq, w, y, up)
    h, hq, w = (x.clone().requires_grad_(True) for x in (h, hq, w))
    stats = linear_papo_token_stats(h, hq, w, y, vocab_size=VOCAB, chunk_size=tile[0], vocab_block=tile[1])
    _loss(stats, up).backward()
    failures = _check(stats, (h.grad, hq.grad, w.grad), ref, torch.float64, *tile)
    assert not failures, failures


def test_large_logits_lose_no_precision():
    """Logits of magnitude ~1e3 in float64: the max-shifted sums keep the 1e-10 agreement."""
    h, hq, w, y, up = _case(torch.float64, seed=5, scale=200.0)
    ref = _reference(h, hq, w, y, up)
    assert ref["z"][0].abs().max() > 500
    h, hq, w = (x.clone().requires_grad_(True) for x in (h, hq, w))
    stats = linear_papo_token_stats(h, hq, w, y, vocab_size=VOCAB, chunk_size=CHUNK, vocab_block=BLOCK)
    for f in FIELDS:
        want = getattr(ref["stats"], f).detach()
        assert torch.allclose(getattr(stats, f), want, rtol=1e-10, atol=1e-8), f


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_probs_and_entropy_equal_the_logits_ops(dtype):
    h, _, w, y, _ = _case(dtype, seed=7)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = linear_vocab_parallel_log_probs_entropy(h1, w1, y, vocab_size=VOCAB, chunk_size=CHUNK,
                                                      vocab_block=BLOCK)
    lp_only = linear_vocab_parallel_log_probs(h1, w1, y, vocab_size=VOCAB, chunk_size=CHUNK,
                                              vocab_block=BLOCK)
    (lp.sum() + 0.5 * ent.sum()).backward()
    h2, w2 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    z = h2 @ w2.T
    lp_ref = vocab_parallel_log_probs(z, y, vocab_size=VOCAB)
    ent_ref = vocab_parallel_entropy(z, vocab_size=VOCAB)
    (lp_ref.sum() + 0.5 * ent_ref.sum()).backward()
    # fp32: the logits' rounding, H u32 |h||W| <= 24 * 6e-8 * 15 ~ 2e-5, moves log p by at most twice that
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.equal(lp, lp_only)
    assert torch.allclose(lp.double(), lp_ref, rtol=0, atol=tol)
    assert torch.allclose(ent.double(), ent_ref, rtol=0, atol=tol)
    for have, want in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert torch.allclose(have.double(), want, rtol=0, atol=tol * want.abs().max().item() * 10)


class _ShapeLog(TorchDispatchMode):
    """Records the element count of every tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_logits_size_exists_in_forward_or_backward():
    """T = 256 tokens, V = 512 rows, H = 8, tiles of 32 x 64: the largest tensor any op creates is a
    tile (2048 elements) or an input-sized gradient ([V, H] = 4096), never [T, V] (131072). The
    same recorder sees the logits path's [T, V] tensors, so it can fail."""
    g = torch.Generator().manual_seed(0)
    h, hq = (torch.randn(256, 8, generator=g).requires_grad_(True) for _ in range(2))
    w = torch.randn(512, 8, generator=g).requires_grad_(True)
    y = torch.randint(0, 512, (256,), generator=g)
    with _ShapeLog() as log:
        stats = linear_papo_token_stats(h, hq, w, y, chunk_size=32, vocab_block=64)
        (stats.log_probs.sum() + stats.kl.sum() + stats.entropy.sum() + stats.masked_entropy.sum()).backward()
    assert log.largest <= 512 * 8, log.largest
    with _ShapeLog() as unfused:
        s2 = papo_token_stats(h @ w.T, hq @ w.T, y)
        (s2.log_probs.sum() + s2.kl.sum()).backward()
    assert unfused.largest >= 256 * 512


def test_bad_inputs_give_clear_errors():
    h, hq, w, y, _ = _case(torch.float32)
    with pytest.raises(ValueError, match="H = 24 but weight"):
        linear_papo_token_stats(h, hq, w[:, :20], y)
    with pytest.raises(ValueError, match=r"bfloat16, weight torch\.float32"):
        linear_papo_token_stats(h.bfloat16(), hq, w, y)
    with pytest.raises(ValueError, match="masked_hidden must have the shape"):
        linear_papo_token_stats(h, hq[:2], w, y)
    with pytest.raises(ValueError, match="target must have shape"):
        linear_papo_token_stats(h, hq, w, y[:2])
    with pytest.raises(ValueError, match="no Triton kernel"):
        linear_papo_token_stats(h, hq, w, y, impl="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_papo_token_stats(h, hq, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_papo_token_stats(h, hq, w, y, vocab_size=PADDED + 1)
    bad = h.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"contains NaN or \+inf"):
        linear_papo_token_stats(bad, hq, w, y)
    with pytest.raises(ValueError, match="target"):
        linear_papo_token_stats(h, hq, w, torch.full_like(y, PADDED))
