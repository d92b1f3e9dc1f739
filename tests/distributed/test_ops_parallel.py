"""Vocab-parallel ops at TP=2 and TP=4 and context-parallel helpers at CP=2, on real gloo ranks.

One spawned run per world size computes every case; the tests below only read its results
(each spawn costs seconds). Every rank returns its shard's values and gradients; the parent
concatenates the vocabulary slices and compares with the float64 single-process reference
(tolerances: megatron_papo.ops.reference.compare_to_reference).
"""

import pytest
import torch
import torch.distributed as dist

from megatron_papo.ops import (
    gather_from_context_parallel,
    global_token_count,
    masked_token_mean,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
    zigzag_split,
)
from megatron_papo.ops.reference import (
    compare_to_reference,
    reference_results,
    run_ops_on_shard,
    synthetic_papo_case,
)
from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow

VOCAB, PADDED = 100, 104  # V_local = 52 at TP=2, 26 at TP=4; the last shard has 4 padded columns
CASES = [(torch.float32, "normal", None), (torch.float32, "large", 5), (torch.float32, "neginf", 1),
         (torch.bfloat16, "normal", 7), (torch.bfloat16, "large", None), (torch.bfloat16, "neginf", None)]


def _case(i: int) -> dict:
    dtype, kind, _ = CASES[i]
    return synthetic_papo_case(10 + i, (3, 5), VOCAB, PADDED, kind, dtype)


def _vocab_cases(group, rank: int, size: int) -> list[dict]:
    return [run_ops_on_shard(_case(i), rank, size, group, VOCAB, chunk_size=c)
            for i, (_, _, c) in enumerate(CASES)]


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _bad_inputs(rank: int) -> dict[str, str]:
    """Inputs that are wrong on one rank or inconsistent across ranks; every rank must raise."""
    z = torch.randn(4, 52)
    y = torch.randint(0, 100, (4,))
    fresh = dist.new_group([0, 1])  # a group whose layout check is not cached yet
    other = dist.new_group([0, 1])
    uneven = torch.randn(4, 52 + rank)
    nan = z.clone()
    if rank == 1:
        nan[3, 5] = torch.nan
    all_neginf_row = z.clone()
    all_neginf_row[2] = -torch.inf
    return {
        "uneven": _error(lambda: vocab_parallel_entropy(uneven, fresh)),
        "vocab_differs": _error(lambda: vocab_parallel_entropy(z, other, vocab_size=100 + rank)),
        "too_big": _error(lambda: vocab_parallel_entropy(z, fresh, vocab_size=105)),
        "too_small": _error(lambda: vocab_parallel_entropy(z, fresh, vocab_size=52)),
        "nan_one_rank": _error(lambda: vocab_parallel_kl(z, nan, fresh)),
        "neginf_row": _error(lambda: vocab_parallel_log_probs(all_neginf_row, y, fresh)),
        "target_range": _error(lambda: vocab_parallel_log_probs(z, y + 100, fresh, vocab_size=100)),
    }


def _context_parallel(rank: int, world: int) -> dict:
    """CP=2 over the default group: zigzag gather with gradient, global token means."""
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 8, generator=gen)
    weights = torch.randn(2, 8, generator=gen)
    mask = torch.rand(2, 8, generator=gen) > 0.4
    local = zigzag_split(full, rank, world).requires_grad_()
    gathered = gather_from_context_parallel(local, dist.group.WORLD)
    (gathered * weights).sum().backward()  # the same loss on every rank
    summed = zigzag_split(full, rank, world).requires_grad_()
    own_loss = gather_from_context_parallel(summed, dist.group.WORLD, sum_grads=True) * weights * (rank + 1)
    own_loss.sum().backward()
    values = zigzag_split(full, rank, world).requires_grad_()
    part = masked_token_mean(values, zigzag_split(mask, rank, world), dist.group.WORLD)
    part.backward()
    total = part.detach().clone()
    dist.all_reduce(total)
    return {"gathered": gathered.detach(), "grad": local.grad, "grad_summed": summed.grad,
            "count": global_token_count(zigzag_split(mask, rank, world), dist.group.WORLD).item(),
            "mean": total, "mean_grad": values.grad, "full": full, "weights": weights, "mask": mask}


def _world2(rank: int, world: int) -> dict:
    tp = dist.new_group([0, 1])
    return {"vocab": _vocab_cases(tp, rank, 2), "bad": _bad_inputs(rank),
            "cp": _context_parallel(rank, world)}


def _world4(rank: int, world: int) -> dict:
    tp4 = dist.new_group([0, 1, 2, 3])
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank joins every new_group
    pair = pairs[rank // 2]
    return {"tp4": _vocab_cases(tp4, rank, 4),
            "tp2": run_ops_on_shard(_case(0), rank % 2, 2, pair, VOCAB)}


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_world2, 2, timeout=240)


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4, 4, timeout=240)


def _merge_shards(per_rank: list[dict]) -> dict:
    """Values from rank 0 (they must agree on all ranks); gradients concatenated over the vocab."""
    merged = {}
    for key, value in per_rank[0].items():
        if key == "unchanged":
            merged[key] = all(r[key] for r in per_rank)
        elif "grad" in key:
            merged[key] = torch.cat([r[key] for r in per_rank], dim=-1)
        else:
            for r in per_rank[1:]:
                assert torch.equal(r[key], value), f"{key} differs across TP ranks"
            merged[key] = value
    return merged


def _check_vocab_cases(per_rank_cases: list[list[dict]]):
    for i, (dtype, kind, chunk) in enumerate(CASES):
        got = _merge_shards([cases[i] for cases in per_rank_cases])
        assert got.pop("unchanged"), f"case {i}: inputs modified"
        failures = compare_to_reference(got, reference_results(_case(i), VOCAB), dtype)
        assert failures == [], f"{dtype} {kind} chunk={chunk}: {failures}"


def test_tp2_matches_reference(world2):
    _check_vocab_cases([r["vocab"] for r in world2])


def test_tp4_matches_reference(world4):
    _check_vocab_cases([r["tp4"] for r in world4])


def test_tp2_subgroups_of_four_ranks(world4):
    for ranks in ([0, 1], [2, 3]):
        got = _merge_shards([world4[r]["tp2"] for r in ranks])
        assert got.pop("unchanged")
        assert compare_to_reference(got, reference_results(_case(0), VOCAB), torch.float32) == []


@pytest.mark.parametrize(("key", "pattern"), [
    ("uneven", r"V_local differs across tensor-parallel ranks \(min 52, max 53\)"),
    ("vocab_differs", r"vocab_size differs across tensor-parallel ranks \(min 100, max 101\)"),
    ("too_big", r"vocab_size=105 exceeds V_local \* tp = 52 \* 2 = 104"),
    ("too_small", r"vocab_size=52 is inconsistent with V_local=52 and tp=2: expected 52 < vocab_size <= 104"),
    ("nan_one_rank", r"logits_q contains NaN or \+inf \(first at flattened token 3\)"),
    ("neginf_row", r"every logit of flattened token 2 is -inf over the whole vocabulary"),
    ("target_range", r"target holds token ids outside \[0, vocab_size=100\)"),
])
def test_bad_inputs_raise_on_every_rank(world2, key, pattern):
    import re
    for r in world2:
        assert re.search(pattern, r["bad"][key]), r["bad"][key]


def test_cp2_gather_and_gradients(world2):
    full, weights = world2[0]["cp"]["full"], world2[0]["cp"]["weights"]
    for rank, r in enumerate(world2):
        torch.testing.assert_close(r["cp"]["gathered"], full)
        # replicated loss: each rank's shard gets its own slice of d(loss)/d(full) = weights
        torch.testing.assert_close(r["cp"]["grad"], zigzag_split(weights, rank, 2))
        # rank-specific losses (rank + 1) * <gathered, weights>, summed: gradient (1 + 2) * weights
        torch.testing.assert_close(r["cp"]["grad_summed"], zigzag_split(3 * weights, rank, 2))


def test_cp2_masked_token_mean_is_global(world2):
    full, mask = world2[0]["cp"]["full"], world2[0]["cp"]["mask"]
    expected = full[mask].mean()
    grad = torch.zeros_like(full)
    grad[mask] = 1.0 / mask.sum()
    for rank, r in enumerate(world2):
        assert r["cp"]["count"] == int(mask.sum())
        torch.testing.assert_close(r["cp"]["mean"], expected)
        # the sum over ranks of the per-rank gradients is the global mean's gradient
        torch.testing.assert_close(r["cp"]["mean_grad"], zigzag_split(grad, rank, 2))
