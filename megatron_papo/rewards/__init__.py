"""Verifiable rewards: answer extraction, math-aware accuracy (math_verify) and format.

math_verify (and sympy) are imported on first use, not when this package is imported.
"""

from megatron_papo.rewards.extraction import extract_last_boxed
from megatron_papo.rewards.math_reward import (
    AnswerCheck,
    RewardConfig,
    RewardResult,
    accuracy_reward,
    check_answer,
    compute_rewards,
    format_reward,
    reference_format_reward,
)

__all__ = [
    "AnswerCheck",
    "RewardConfig",
    "RewardResult",
    "accuracy_reward",
    "check_answer",
    "compute_rewards",
    "extract_last_boxed",
    "format_reward",
    "reference_format_reward",
]
