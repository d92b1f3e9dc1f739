"""papo_loss from logits (fused vocab-parallel op, TP=1) against the float64 formula reference."""

import pytest
import torch

from megatron_papo.losses import PapoLossConfig, papo_loss, papo_loss_from_log_probs
from tests.papo_reference import make_case, reference_papo_loss

MODES = [
    dict(kl_prcp_mode="k3", entropy_mode="sampled", masked_grad=False),
    dict(kl_prcp_mode="full", entropy_mode="sampled", masked_grad=False),
    dict(kl_prcp_mode="full", entropy_mode="full", masked_grad=False),
    dict(kl_prcp_mode="full", entropy_mode="full", masked_grad=True),
    dict(kl_prcp_mode="k3", entropy_mode="full", masked_grad=True),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_papo_loss_matches_reference(mode):
    cfg = PapoLossConfig(gamma=0.3, entropy_coef_orig=0.05, entropy_coef_mask=0.07, ref_kl_coef=0.1, **mode)
    logits, masked, target, old_lp, adv, mask, ref_lp = make_case(vocab=37, padded=40)
    a = logits.clone().requires_grad_(True)
    am = masked.clone().requires_grad_(True)
    loss, metrics = papo_loss(a, target, old_lp, adv, mask, config=cfg, masked_logits=am,
                              ref_log_probs=ref_lp, vocab_size=37)
    loss.backward()
    r = logits.clone().requires_grad_(True)
    rm = masked.clone().requires_grad_(True)
    ref = reference_papo_loss(r, rm, target, old_lp, adv, mask, ref_lp, cfg, vocab_size=37)
    ref.backward()
    # float64 in and out: agreement to ~1e-12 is expected; 1e-9 leaves room for summation order
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-8, atol=1e-10)
    if cfg.masked_grad:
        torch.testing.assert_close(am.grad, rm.grad, rtol=1e-8, atol=1e-10)
    else:
        assert am.grad is None or not am.grad.abs().any()
    assert a.grad[..., 37:].abs().max() == 0  # padded columns carry no gradient
    assert torch.equal(a.detach(), logits)  # inputs untouched
    assert {"kl_prcp", "kl_prcp_clipfrac", "entropy_orig", "entropy_mask", "pg_clipfrac"} <= set(metrics)


def test_sampled_forms_agree_with_log_prob_entry_point():
    cfg = PapoLossConfig(gamma=0.2, entropy_coef_orig=0.05, entropy_coef_mask=0.05, ref_kl_coef=0.0)
    logits, masked, target, old_lp, adv, mask, _ = make_case(seed=3)
    a = logits.clone().requires_grad_(True)
    loss, _ = papo_loss(a, target, old_lp, adv, mask, config=cfg, masked_logits=masked)
    loss.backward()
    b = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(b, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    lq = torch.log_softmax(masked, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss2, _ = papo_loss_from_log_probs(lp, old_lp, lq, adv, mask, config=cfg)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def test_bf16_logits_close_to_fp64_reference():
    cfg = PapoLossConfig(gamma=0.3, entropy_coef_orig=0.05, entropy_coef_mask=0.05, ref_kl_coef=0.0,
                         kl_prcp_mode="full", entropy_mode="full")
    logits, masked, target, old_lp, adv, mask, _ = make_case(seed=5)
    lo, ma = logits.bfloat16(), masked.bfloat16()
    a = lo.clone().requires_grad_(True)
    loss, _ = papo_loss(a, target, old_lp.float(), adv.float(), mask, config=cfg, masked_logits=ma)
    loss.backward()
    assert a.grad.dtype == torch.bfloat16
    r = lo.double().requires_grad_(True)  # reference on the same bf16 values
    ref = reference_papo_loss(r, ma.double(), target, old_lp.float().double(), adv.float().double(), mask,
                              None, cfg)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 maths inside
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=2e-2, atol=1e-4)  # bf16 grad rounding


def test_logit_entry_point_errors():
    cfg = PapoLossConfig(kl_prcp_mode="full")
    logits, masked, target, old_lp, adv, mask, _ = make_case()
    with pytest.raises(ValueError, match="needs masked_logits"):
        papo_loss(logits, target, old_lp, adv, mask, config=cfg)
    with pytest.raises(ValueError, match="masked_logits"):
        papo_loss(logits, target, old_lp, adv, mask, config=cfg, masked_logits=masked[:, :2])
    with pytest.raises(ValueError, match=r"logits must be \[B, L, V_local\]"):
        papo_loss(logits[0], target, old_lp, adv, mask, config=cfg, masked_logits=masked)
