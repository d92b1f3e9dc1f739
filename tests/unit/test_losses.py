"""PAPO objective and its parts against hand-computed values (no ops needed here)."""

import math

import pytest
import torch

from megatron_papo.losses import (
    PapoLossConfig,
    aggregate,
    clipped_policy_loss,
    gamma_factor,
    kl_estimate,
    papo_loss_from_log_probs,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_clipped_surrogate_hand_cases():
    # token 0: A=+1, rho=1.5 -> clipped at 1.3 -> -1.3;  token 1: A=-1, rho=0.5 -> clipped at 0.8 -> 0.8
    # token 2: A=-1, rho=5 -> unclipped 5, dual cap 3 -> 3;  token 3: A=+1, rho=1 -> -1 (no clip)
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(t([1.5, 0.5, 5.0, 1.0])).requires_grad_(True)
    adv = t([1.0, -1.0, -1.0, 1.0])
    out = clipped_policy_loss(lp, old, adv, clip_low=0.2, clip_high=0.3, clip_dual=3.0)
    torch.testing.assert_close(out.loss, t([-1.3, 0.8, 3.0, -1.0]))
    assert out.clipped.tolist() == [[True, True, False, False]]
    assert out.dual_clipped.tolist() == [[False, False, True, False]]
    out.loss.sum().backward()
    # clipped and dual-clipped tokens carry no gradient; the free one gets d(-A rho)/dl = -rho
    torch.testing.assert_close(lp.grad, t([0.0, 0.0, 0.0, -1.0]))
    no_dual = clipped_policy_loss(lp.detach(), old, adv, clip_low=0.2, clip_high=0.3, clip_dual=None)
    assert no_dual.loss[0, 2].item() == pytest.approx(5.0)


def test_kl_estimators_hand_values():
    lp, other = t([-1.0]), t([-1.5])  # d = log q - log p = -0.5
    assert kl_estimate(lp, other, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(lp, other, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(lp, other, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    # clamps: d clamped to 20 then the value clamped to 10
    assert kl_estimate(t([-30.0]), t([0.0]), "k3").item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(lp, other, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(lp, t([1.0, 2.0]), "k3")


def test_aggregation_modes():
    v = t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(v, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx((6.0 + 4.0) / 2)
    # a global normaliser (e.g. 8 tokens over all data-parallel ranks) gives this rank's share
    assert aggregate(v, m, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="mode"):
        aggregate(v, m, "sum")


def _cfg(**kw):
    base = dict(gamma=0.1, entropy_coef_orig=0.05, entropy_coef_mask=0.05, ref_kl_coef=0.0,
                clip_ratio_dual=None)
    base.update(kw)
    return PapoLossConfig(**base)


def test_papo_objective_hand_computed():
    lp = t([-1.0, -2.0]).requires_grad_(True)
    old = t([-1.0, -2.0])
    lm = t([-1.5, -2.5])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = papo_loss_from_log_probs(lp, old, lm, torch.tensor([1.0]), mask, config=_cfg())
    k = math.exp(-0.5) + 0.5 - 1.0
    # L = L_pg - gamma*KL + eta1*H_orig + eta2*H_mask = -1 - 0.1 k + 0.05*1.5 + 0.05*2.0
    assert loss.item() == pytest.approx(-1.0 - 0.1 * k + 0.075 + 0.1, abs=1e-12)
    assert m["kl_prcp"].item() == pytest.approx(k)
    assert m["entropy_orig"].item() == pytest.approx(1.5)
    assert m["entropy_mask"].item() == pytest.approx(2.0)
    assert m["kl_prcp_clipfrac"].item() == 0.0
    loss.backward()
    # dL/dl_t = (1/2) * [ -A*rho - gamma * (1 - exp(d)) - eta1 ]
    g = 0.5 * (-1.0 - 0.1 * (1 - math.exp(-0.5)) - 0.05)
    torch.testing.assert_close(lp.grad, t([g, g]))
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_masked_branch_detached_unless_asked():
    lp = t([-1.0, -2.0]).requires_grad_(True)
    lm = t([-1.5, -2.5]).requires_grad_(True)
    args = (t([-1.0, -2.0]), None, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))
    loss, _ = papo_loss_from_log_probs(lp, args[0], lm, *args[2:], config=_cfg())
    loss.backward()
    assert lm.grad is None
    loss, _ = papo_loss_from_log_probs(lp, args[0], lm, *args[2:], config=_cfg(masked_grad=True))
    loss.backward()
    # d/dl_m of (-gamma k + eta2 * (-l_m)) / 2, k' = exp(d) - 1
    g = 0.5 * (-0.1 * (math.exp(-0.5) - 1.0) - 0.05)
    torch.testing.assert_close(lm.grad, t([g, g]))


def test_kl_clip_and_share_at_clip():
    lp = t([-10.0, -1.0]).requires_grad_(True)
    lm = t([0.0, -1.0])  # d = 10 -> k = e^10 - 11 >> clip; d = 0 -> k = 0
    cfg = _cfg(entropy_coef_orig=0.0, entropy_coef_mask=0.0, kl_prcp_clip=0.2)
    loss, m = papo_loss_from_log_probs(lp, lp.detach(), lm, torch.zeros(1), torch.ones(1, 2), config=cfg)
    assert m["kl_prcp"].item() == pytest.approx(0.1)  # (0.2 + 0) / 2
    assert m["kl_prcp_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0  # clipped token: no gradient through KL


def test_response_mask_and_advantage_broadcast():
    lp = t([-1.0, -2.0, -3.0])
    mask = torch.tensor([[1, 1, 0]])
    cfg = _cfg(gamma=0.0, entropy_coef_orig=0.0, entropy_coef_mask=0.0)
    l1, _ = papo_loss_from_log_probs(lp, lp, None, torch.tensor([2.0]), mask, config=cfg)
    l2, _ = papo_loss_from_log_probs(lp, lp, None, t([2.0, 2.0, 99.0]), mask, config=cfg)
    assert l1.item() == pytest.approx(-2.0) and l2.item() == pytest.approx(-2.0)


def test_ref_kl_term_and_requirements():
    lp, ref = t([-1.0]), t([-1.5])
    cfg = _cfg(gamma=0.0, entropy_coef_orig=0.0, entropy_coef_mask=0.0, ref_kl_coef=0.5)
    loss, m = papo_loss_from_log_probs(lp, lp, None, torch.zeros(1), torch.ones(1, 1), config=cfg,
                                       ref_log_probs=ref)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert m["ref_kl"].item() == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.5 * k3)
    with pytest.raises(ValueError, match="ref_log_probs"):
        papo_loss_from_log_probs(lp, lp, None, torch.zeros(1), torch.ones(1, 1), config=cfg)


def test_gamma_schedule_scales_entropies_too():
    cfg = _cfg(gamma_schedule="linear", gamma_decay_steps=10, gamma_final_factor=0.2)
    assert gamma_factor(cfg, 0) == 1.0
    assert gamma_factor(cfg, 5) == pytest.approx(0.6)
    assert gamma_factor(cfg, 50) == pytest.approx(0.2)
    lp, lm = t([-1.0, -2.0]), t([-1.5, -2.5])
    args = (lp, lp, lm, torch.zeros(1), torch.ones(1, 2))
    l0, _ = papo_loss_from_log_probs(*args, config=cfg, step=0)
    l5, m5 = papo_loss_from_log_probs(*args, config=cfg, step=5)
    assert m5["gamma"].item() == pytest.approx(0.06)
    assert l5.item() == pytest.approx(0.6 * l0.item())  # pg = 0 here (A = 0): every term scales


@pytest.mark.parametrize("field,value,match", [
    ("gamma", -0.1, "gamma"), ("clip_ratio_dual", 0.5, "clip_ratio_dual"), ("loss_agg", "sum", "loss_agg"),
    ("kl_prcp_mode", "exact", "kl_prcp_mode"), ("kl_prcp_clip", 0.0, "kl_prcp_clip"),
    ("op_impl", "cuda", "op_impl"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        PapoLossConfig(**{field: value})
    with pytest.raises(ValueError, match="gamma_decay_steps"):
        PapoLossConfig(gamma_schedule="linear")


def test_shape_and_mode_errors():
    lp = t([-1.0, -2.0])
    with pytest.raises(ValueError, match="old_log_probs"):
        papo_loss_from_log_probs(lp, t([-1.0]), lp, torch.zeros(1), torch.ones(1, 2), config=_cfg())
    with pytest.raises(ValueError, match="advantages"):
        papo_loss_from_log_probs(lp, lp, lp, torch.zeros(3), torch.ones(1, 2), config=_cfg())
    with pytest.raises(ValueError, match="masked branch"):
        papo_loss_from_log_probs(lp, lp, None, torch.zeros(1), torch.ones(1, 2), config=_cfg())
    with pytest.raises(ValueError, match="need logits"):
        papo_loss_from_log_probs(lp, lp, lp, torch.zeros(1), torch.ones(1, 2),
                                 config=_cfg(kl_prcp_mode="full"))


def test_masked_entropy_alone_with_kl_mode_full_runs():
    """gamma = 0 with entropy_coef_mask > 0 and kl_prcp_mode 'full': no KL term (so no logits
    needed), the masked entropy still enters the loss: loss = pg + eta2 * H_mask exactly."""
    lp, mlp = t([-1.0, -2.0]), t([-0.5, -3.0])  # [1, 2]
    cfg = PapoLossConfig(gamma=0.0, kl_prcp_mode="full", entropy_coef_orig=0.0, entropy_coef_mask=0.1,
                         ref_kl_coef=0.0)
    loss, m = papo_loss_from_log_probs(lp, lp.clone(), mlp, torch.ones(1, dtype=torch.float64),
                                       torch.ones(1, 2, dtype=torch.bool),
                                       config=cfg)
    assert "kl_prcp" not in m
    assert float(m["entropy_mask"]) == pytest.approx(1.75)
    assert float(loss) == pytest.approx(float(m["pg_loss"]) + 0.1 * 1.75)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_kl_prcp_is_aggregated_with_loss_agg(agg):
    """KL_prcp uses loss.loss_agg like the policy term: per-token k3 values of two uneven rows
    (3 and 1 valid tokens) aggregated by hand."""
    lp = t([-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0])
    mlp = t([-0.5, -3.0, -1.0], [-0.2, 0.0, 0.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    cfg = PapoLossConfig(gamma=0.1, kl_prcp_mode="k3", entropy_coef_orig=0.0, entropy_coef_mask=0.0,
                         ref_kl_coef=0.0, loss_agg=agg, kl_prcp_clip=1e9)
    _, m = papo_loss_from_log_probs(lp, lp.clone(), mlp, torch.ones(2, dtype=torch.float64), mask, config=cfg)
    d = mlp - lp
    k3 = (torch.exp(d) - d - 1.0) * mask
    want = {"token-mean": k3.sum() / 4, "seq-mean-token-mean": (k3[0].sum() / 3 + k3[1].sum()) / 2,
            "seq-mean-token-sum": k3.sum() / 2}[agg]
    assert float(m["kl_prcp"]) == pytest.approx(float(want), rel=1e-12)
