"""The clipped policy-gradient surrogate of PPO / GRPO / DAPO, with dual clip, per token.

    rho_t   = exp(clamp(l_t - l_old_t, -c, c))
    pg_t    = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
    dual:     for A_t < 0, pg_t = min(pg_t, -A_t * clip_dual)       (clip_dual > 1, e.g. 3.0)
GRPO uses eps 0.2 / 0.3 in the PAPO reference code, DAPO 0.2 / 0.28 ("clip-higher").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PolicyLossTerms:
    """Per-token outputs of `clipped_policy_loss`; every field [B, L]."""

    loss: Tensor
    """pg_t (minimised), with gradient."""
    ratio: Tensor
    """rho_t, detached."""
    clipped: Tensor
    """bool: the clipped branch was active (the gradient through rho_t is zero)."""
    dual_clipped: Tensor
    """bool: the dual clip was active (A_t < 0 and the loss capped at -A_t * clip_dual)."""


def clipped_policy_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, *,
                        clip_low: float, clip_high: float, clip_dual: float | None = 3.0,
                        log_ratio_clamp: float = 20.0) -> PolicyLossTerms:
    """Per-token clipped surrogate (module docstring). Inputs [B, L] (advantages broadcast)."""
    if clip_dual is not None and clip_dual <= 1.0:
        raise ValueError(f"clipped_policy_loss: clip_dual must be > 1 (or None), got {clip_dual}")
    log_ratio = (log_probs - old_log_probs).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_val = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_val)
    clipped = clipped_val > unclipped
    dual = torch.zeros_like(clipped)
    if clip_dual is not None:
        cap = -advantages * clip_dual
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
    return PolicyLossTerms(loss=loss, ratio=ratio.detach(), clipped=clipped, dual_clipped=dual)
