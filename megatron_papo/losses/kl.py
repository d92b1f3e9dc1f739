"""Per-token KL estimators between the policy and another distribution, from sampled log-probs.

With d = log q(o_t) - log p(o_t) for tokens o_t sampled from p (Schulman's notation, p = policy):
    k1 = -d                       unbiased, high variance, can be negative
    k2 = d**2 / 2                 biased, low variance, >= 0
    k3 = exp(d) - d - 1           unbiased, low variance, >= 0   (the GRPO / PAPO default)
d is clamped to [-log_ratio_clamp, log_ratio_clamp] before use (keeps exp(d) finite) and the
result is clamped to <= `max_value` (the reference code's 10.0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(log_probs: Tensor, other_log_probs: Tensor, estimator: KLEstimator = "k3", *,
                log_ratio_clamp: float = 20.0, max_value: float | None = 10.0) -> Tensor:
    """Per-token estimate of KL(p || q) from log p = `log_probs`, log q = `other_log_probs`.

    Args:
        log_probs: [...] log-probs of the sampled tokens under the policy p (gradient flows).
        other_log_probs: [...] same tokens under q (the reference model, or the masked branch).
        estimator: "k1", "k2" or "k3" (module docstring).
        log_ratio_clamp: |log q - log p| is clamped to this before use.
        max_value: upper clamp of the estimate (None = no clamp). k2/k3 are also >= 0.
    Returns:
        [...] float tensor, same shape as the inputs.
    """
    if log_probs.shape != other_log_probs.shape:
        raise ValueError(f"kl_estimate: log_probs {tuple(log_probs.shape)} and other_log_probs "
                         f"{tuple(other_log_probs.shape)} must have the same shape")
    d = (other_log_probs - log_probs).clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        k = -d
    elif estimator == "k2":
        k = 0.5 * d.square()
    elif estimator == "k3":
        k = (torch.exp(d) - d - 1.0).clamp(min=0.0)
    else:
        raise ValueError(f"kl_estimate: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if max_value is not None:
        k = k.clamp(max=max_value)
    return k
