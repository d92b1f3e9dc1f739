"""Typed losses: the clipped policy surrogate, KL estimators and the PAPO objective."""

from megatron_papo.losses.aggregation import LOSS_AGGS, aggregate, token_mean
from megatron_papo.losses.kl import KL_ESTIMATORS, kl_estimate
from megatron_papo.losses.papo import (
    PapoLossConfig,
    gamma_factor,
    papo_loss,
    papo_loss_from_hidden,
    papo_loss_from_log_probs,
)
from megatron_papo.losses.policy import PolicyLossTerms, clipped_policy_loss

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "PapoLossConfig",
    "PolicyLossTerms",
    "aggregate",
    "clipped_policy_loss",
    "gamma_factor",
    "kl_estimate",
    "papo_loss",
    "papo_loss_from_hidden",
    "papo_loss_from_log_probs",
    "token_mean",
]
