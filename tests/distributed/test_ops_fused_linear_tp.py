"""The fused linear PAPO op at TP=2 (output weight split over two gloo ranks, the last shard
padded) against float64 autograd of the unfused composition on one process.

Each rank holds rows [r V_local, (r + 1) V_local) of the weight and the replicated hidden states;
as a column-parallel output layer's input would, the hidden-state gradients are summed over the
group (tests/unit/test_ops_fused_linear.py states the contract). The weight gradient shards are
concatenated. Tolerances: float64 1e-10 (the sums in another order); fp32 from the arithmetic as
in the unit test: logits rounded to fp32 after an H-term fp32 dot product, |dz| <= H u32 M with
M = max |h| |W|^T (~10 here): 24 * 6e-8 * 10 = 1.4e-5; values move by at most twice that plus the
fp32 sums over the vocabulary (8 V u32 (1 + |ref|) ~ 5e-5 (1 + |ref|)); gradients relative to their
largest entry: (k + 2) u32 + 4 |dz| ~ 6e-5 with k <= 5 tiles summed. Both bounds are rounded up
to 1e-4.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_papo.ops import linear_papo_token_stats, papo_token_stats
from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow

FIELDS = ("log_probs", "masked_log_probs", "kl", "entropy", "masked_entropy")
T, H, VOCAB, PADDED = 37, 24, 97, 104  # V_local = 52 at TP=2; the last shard has 45 real rows


def _case(dtype):
    g = torch.Generator().manual_seed(21)
    h = torch.randn(T, H, generator=g).to(dtype)
    hq = (h.double() + 0.5 * torch.randn(T, H, generator=g, dtype=torch.float64)).to(dtype)
    w = (0.25 * torch.randn(PADDED, H, generator=g)).to(dtype)
    y = torch.randint(0, VOCAB, (T,), generator=g)
    up = {f: torch.randn(T, generator=g, dtype=torch.float64) for f in FIELDS}
    return h, hq, w, y, up


def _loss(stats, up):
    return sum((getattr(stats, f).double() * up[f]).sum() for f in FIELDS)


def _sharded(rank, world, dtype, masked_weight_grad):
    group = dist.new_group(list(range(world)))
    h, hq, w, y, up = _case(dtype)
    width = PADDED // world
    h, hq = h.clone().requires_grad_(True), hq.clone().requires_grad_(masked_weight_grad)
    ws = w[rank * width:(rank + 1) * width].clone().requires_grad_(True)
    stats = linear_papo_token_stats(h, hq, ws, y, group, VOCAB, chunk_size=8, vocab_block=16,
                                    masked_weight_grad=masked_weight_grad)
    _loss(stats, up).backward()
    grads = [h.grad] + ([hq.grad] if masked_weight_grad else [])
    for g in grads:  # what copy_to_tensor_model_parallel_region's backward does
        dist.all_reduce(g, group=group)
    return {f: getattr(stats, f).detach() for f in FIELDS}, [g.detach() for g in grads], ws.grad.detach()


def _all_cases(rank, world):
    return [_sharded(rank, world, dtype, mwg)
            for dtype in (torch.float64, torch.float32) for mwg in (True, False)] + [
        _sharded(rank, world, torch.bfloat16, True)]


def _reference(dtype, masked_weight_grad):
    h, hq, w, y, up = _case(dtype)
    h, hq, w = (x.double() for x in (h, hq, w))
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    hq = hq.requires_grad_(masked_weight_grad)
    zq = hq @ w.T
    stats = papo_token_stats(h @ w.T, zq if masked_weight_grad else zq.detach(), y, vocab_size=VOCAB)
    _loss(stats, up).backward()
    grads = [h.grad] + ([hq.grad] if masked_weight_grad else [])
    return {f: getattr(stats, f).detach() for f in FIELDS}, grads, w.grad


def test_tp2_equals_the_single_process_composition():
    results = run_distributed(_all_cases, 2)
    i = 0
    for dtype in (torch.float64, torch.float32):
        for mwg in (True, False):
            want_vals, want_grads, want_w = _reference(dtype, mwg)
            value_tol, grad_rel = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
            for rank in range(2):
                vals, grads, _ = results[rank][i]
                for f in FIELDS:  # every rank holds the same replicated values
                    err = (vals[f].double() - want_vals[f]).abs().max().item()
                    assert err <= value_tol * (1 + want_vals[f].abs().max().item()), (dtype, mwg, f, err)
                for have, want in zip(grads, want_grads):
                    err = (have.double() - want).abs().max().item()
                    assert err <= grad_rel * want.abs().max().item(), (dtype, mwg, "hidden", err)
            gw = torch.cat([results[r][i][2] for r in range(2)]).double()
            err = (gw - want_w).abs().max().item()
            assert err <= grad_rel * want_w.abs().max().item(), (dtype, mwg, "weight", err)
            assert bool((gw[VOCAB:] == 0).all())
            i += 1


def test_tp2_bf16_within_the_first_order_rounding_bound():
    """bf16 at TP=2 against float64 of the same bf16 inputs, with the unit test's tolerances
    (tests/unit/test_ops_fused_linear.py: first-order bound of the bf16 logit rounding, tiles
    summed per shard: 8-token chunks, 16-row blocks)."""
    from types import SimpleNamespace

    from tests.unit.test_ops_fused_linear import _check
    from tests.unit.test_ops_fused_linear import _reference as unit_reference

    results = run_distributed(_all_cases, 2)
    h, hq, w, y, up = _case(torch.bfloat16)
    ref = unit_reference(h, hq, w, y, up, "grad", vocab=VOCAB)
    for rank in range(2):
        vals, grads, _ = results[rank][-1]
        gw = torch.cat([results[r][-1][2] for r in range(2)])
        failures = _check(SimpleNamespace(**vals), (grads[0], grads[1], gw), ref, torch.bfloat16,
                          chunk=8, block=16)
        assert not failures, (rank, failures)
