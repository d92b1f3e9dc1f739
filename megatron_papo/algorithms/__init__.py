"""RL algorithm pieces that act on whole rollout groups: advantages and online filtering."""

from megatron_papo.algorithms.advantages import broadcast_advantages, group_normalized_advantages
from megatron_papo.algorithms.filtering import (
    GroupFilterStats,
    dapo_group_filter,
    filter_groups,
    group_mean,
)

__all__ = [
    "GroupFilterStats",
    "broadcast_advantages",
    "dapo_group_filter",
    "filter_groups",
    "group_mean",
    "group_normalized_advantages",
]
