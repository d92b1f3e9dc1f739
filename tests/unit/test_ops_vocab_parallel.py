"""Vocab-parallel ops at TP=1 (tp_group=None) against a float64 full-vocabulary reference.

Tolerances (see megatron_papo.ops.reference.compare_to_reference): values rtol 1e-5 (on
1 + |ref|) for fp32/bf16/fp16 inputs, the reference being computed from the SAME input values
upcast to float64; gradients rtol 1e-5 (fp32), 2^-8 (bf16), 2^-10 (fp16) plus 1e-5 * max|grad|.
"""

import pytest
import torch

from megatron_papo.ops import (
    PapoTokenStats,
    default_chunk_size,
    papo_token_stats,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
)
from megatron_papo.ops.reference import (
    STAT_NAMES,
    compare_to_reference,
    reference_results,
    run_ops_on_shard,
    synthetic_papo_case,
)

VOCAB, PADDED = 100, 104  # padded columns hold NaN / +inf / -inf / 1e30 garbage
CASES = [(torch.float64, k) for k in ("normal", "neginf")] + \
        [(torch.float32, k) for k in ("normal", "large", "offset", "neginf")] + \
        [(torch.bfloat16, k) for k in ("normal", "large", "neginf")] + \
        [(torch.float16, k) for k in ("normal", "neginf")]


@pytest.mark.parametrize(("dtype", "kind"), CASES, ids=[f"{d}-{k}".replace("torch.", "") for d, k in CASES])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_all_ops_match_reference(dtype, kind, chunk_size):
    case = synthetic_papo_case(1, (3, 4), VOCAB, PADDED, kind, dtype)
    got = run_ops_on_shard(case, 0, 1, None, VOCAB, chunk_size=chunk_size)
    assert got.pop("unchanged"), "the op wrote into the caller's logits"
    assert compare_to_reference(got, reference_results(case, VOCAB), dtype) == []


def test_results_independent_of_chunk_size():
    case = synthetic_papo_case(2, (13,), VOCAB, PADDED, "normal", torch.float32)
    runs = [run_ops_on_shard(case, 0, 1, None, VOCAB, chunk_size=c) for c in (1, 7, 13)]
    for key, value in runs[-1].items():
        if isinstance(value, torch.Tensor):
            for other in runs[:-1]:
                torch.testing.assert_close(other[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_output_shapes_and_dtypes():
    z = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16)
    y = torch.randint(0, 8, (2, 3, 5))
    stats = papo_token_stats(z, z.clone(), y)
    assert isinstance(stats, PapoTokenStats)
    for name in STAT_NAMES:
        assert getattr(stats, name).shape == (2, 3, 5) and getattr(stats, name).dtype == torch.float32
    assert vocab_parallel_log_probs(z[0, 0, 0], y[0, 0, 0]).shape == ()  # a bare [V] vector -> scalar
    assert vocab_parallel_entropy(z).shape == (2, 3, 5)
    assert vocab_parallel_kl(z, z).shape == (2, 3, 5)
    torch.testing.assert_close(vocab_parallel_kl(z, z), torch.zeros(2, 3, 5), atol=1e-6, rtol=0)
    empty = papo_token_stats(torch.zeros(0, 8), torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert empty.kl.shape == (0,)


def test_float64_gradcheck():
    gen = torch.Generator().manual_seed(3)
    zp = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_()
    zq = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_()
    y = torch.randint(0, 5, (4,), generator=gen)

    def fn(a, b):
        s = papo_token_stats(a, b, y, vocab_size=5, chunk_size=3)
        return s.log_probs, s.masked_log_probs, s.kl, s.entropy, s.masked_entropy

    assert torch.autograd.gradcheck(fn, (zp, zq))


def test_unused_outputs_and_detached_branch():
    zp = torch.randn(5, 9, requires_grad=True)
    zq = torch.randn(5, 9, requires_grad=True)
    y = torch.randint(0, 9, (5,))
    papo_token_stats(zp, zq, y).entropy.sum().backward()
    assert zq.grad is None or torch.count_nonzero(zq.grad) == 0
    zq.grad = None
    papo_token_stats(zp, zq.detach(), y).kl.sum().backward()
    assert zq.grad is None and zp.grad is not None


def test_default_chunk_bounds_scratch():
    v = 152064
    c = default_chunk_size(v)
    assert c >= 1 and c * v * 4 * 8 <= 128 * 2**20
    assert default_chunk_size(10**9) == 1


# ------------------------------------------------------------------------------- bad inputs


def _zy(t=4, v=10):
    return torch.randn(t, v), torch.randint(0, v, (t,))


def test_shape_errors():
    z, y = _zy()
    with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., V_local\]"):
        vocab_parallel_entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"target must have shape logits.shape\[:-1\] = \(4,\), got \(5,\)"):
        vocab_parallel_log_probs(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="target must hold integer token ids"):
        vocab_parallel_log_probs(z, y.float())
    with pytest.raises(ValueError, match=r"logits_q must have the shape of logits_p: expected \(4, 10\), "
                                         r"got \(4, 11\)"):
        vocab_parallel_kl(z, torch.randn(4, 11))
    with pytest.raises(ValueError, match="masked_logits must have the shape of logits"):
        papo_token_stats(z, torch.randn(3, 10), y)
    with pytest.raises(ValueError, match="logits must be floating point"):
        vocab_parallel_entropy(torch.ones(4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="V_local = 0"):
        vocab_parallel_entropy(torch.ones(4, 0))


def test_vocab_size_errors():
    z, _ = _zy()
    with pytest.raises(ValueError, match=r"vocab_size=11 exceeds V_local \* tp = 10 \* 1 = 10"):
        vocab_parallel_entropy(z, vocab_size=11)
    with pytest.raises(ValueError, match=r"vocab_size=0 is inconsistent with V_local=10 and tp=1"):
        vocab_parallel_entropy(z, vocab_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        vocab_parallel_entropy(z, chunk_size=0)


def test_target_range_errors():
    z, y = _zy()
    with pytest.raises(ValueError, match=r"target holds token ids outside \[0, vocab_size=8\): min 0, max 9"):
        y[0], y[1] = 9, 0
        vocab_parallel_log_probs(z, y, vocab_size=8)
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=10\): min -1"):
        y[0] = -1
        papo_token_stats(z, z, y)


def test_non_finite_errors():
    z, y = _zy()
    bad = z.clone()
    bad[2, 3] = torch.nan
    with pytest.raises(ValueError, match=r"logits contains NaN or \+inf \(first at flattened token 2\)"):
        vocab_parallel_log_probs(bad, y)
    with pytest.raises(ValueError, match=r"masked_logits contains NaN or \+inf"):
        papo_token_stats(z, bad, y)
    bad[2, 3] = torch.inf
    with pytest.raises(ValueError, match=r"logits_q contains NaN or \+inf"):
        vocab_parallel_kl(z, bad)
    bad = z.clone()
    bad[1] = -torch.inf
    with pytest.raises(ValueError, match="every logit of flattened token 1 is -inf"):
        vocab_parallel_entropy(bad)
    # padded columns may hold anything, including NaN
    padded = torch.cat([z, torch.full((4, 2), torch.nan)], dim=-1)
    torch.testing.assert_close(vocab_parallel_entropy(padded, vocab_size=10), vocab_parallel_entropy(z))
    # check_finite=False skips the host sync and the checks
    bad[1] = torch.nan
    assert vocab_parallel_entropy(bad, check_finite=False).shape == (4,)


def test_bf16_forward_makes_no_full_fp32_copy():
    """Peak extra memory of the fused forward stays far below one fp32 copy of the logits."""
    t, v = 512, 4096
    z = torch.randn(t, v).bfloat16()
    y = torch.randint(0, v, (t,))
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as prof:
        papo_token_stats(z, z, y, chunk_size=16)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < t * v * 4 // 8, f"largest single allocation {largest} bytes"
