"""The PAPO objective at TP=2 (vocabulary split over two gloo ranks) equals TP=1, values and grads."""

import pytest
import torch
import torch.distributed as dist

from megatron_papo.losses import PapoLossConfig, papo_loss
from megatron_papo.testing import run_distributed
from tests.papo_reference import make_case

pytestmark = pytest.mark.slow

VOCAB, PADDED = 37, 40  # V_local = 20 at TP=2; 3 padded columns on the last rank
CONFIGS = [
    dict(kl_prcp_mode="full", entropy_mode="full", masked_grad=True),
    dict(kl_prcp_mode="k3", entropy_mode="sampled", masked_grad=False),
]


def _run(cfg_kw, rank, world, tp_group):
    cfg = PapoLossConfig(gamma=0.3, entropy_coef_orig=0.05, entropy_coef_mask=0.07, ref_kl_coef=0.1, **cfg_kw)
    logits, masked, target, old_lp, adv, mask, ref_lp = make_case(vocab=VOCAB, padded=PADDED, seed=11)
    width = PADDED // world
    sl = slice(rank * width, (rank + 1) * width)
    a = logits[..., sl].clone().requires_grad_(True)
    am = masked[..., sl].clone().requires_grad_(True)
    loss, metrics = papo_loss(a, target, old_lp, adv, mask, config=cfg, masked_logits=am,
                              ref_log_probs=ref_lp, tp_group=tp_group, vocab_size=VOCAB)
    loss.backward()
    gm = am.grad if am.grad is not None else torch.zeros_like(am)
    return loss.detach(), a.grad, gm, {k: v for k, v in metrics.items()}


def _tp2_vs_tp1(rank, world):
    tp_group = dist.new_group(list(range(world)))
    out = []
    for cfg_kw in CONFIGS:
        out.append((_run(cfg_kw, rank, world, tp_group), _run(cfg_kw, 0, 1, None) if rank == 0 else None))
    return out


def test_papo_objective_tp2_equals_tp1():
    results = run_distributed(_tp2_vs_tp1, 2)
    for i, _ in enumerate(CONFIGS):
        (l0, g0, gm0, m0), ref = results[0][i]
        (l1, g1, gm1, _), _ = results[1][i]
        rl, rg, rgm, rm = ref
        width = PADDED // 2
        # float64 end to end: only summation order differs between TP=1 and TP=2
        torch.testing.assert_close(l0, rl, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(l1, rl, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.cat([g0, g1], -1), rg, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.cat([gm0, gm1], -1), rgm, rtol=1e-9, atol=1e-12)
        assert g1[..., VOCAB - width:].abs().max() == 0  # padded columns
        for k in rm:
            torch.testing.assert_close(m0[k], rm[k], rtol=1e-9, atol=1e-12, msg=k)
