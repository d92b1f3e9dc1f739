"""DAPO online filtering: drop prompt groups that carry no learning signal.

When every rollout of a prompt is right (or every one is wrong) the group-normalised
advantages are all zero, so the group only dilutes the batch. DAPO (arXiv 2503.14476), and
PAPO-D after it, keep a group only when its mean accuracy lies strictly inside
``(low, high)`` = (0.01, 0.99) by default. Groups are kept or dropped whole.

Layout: B = n_groups * group_size rollouts in group-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_papo.algorithms.advantages import check_group_layout


@dataclass
class GroupFilterStats:
    """What the filter did to one batch of groups."""

    kept: int
    """Groups whose mean accuracy lies strictly inside (low, high)."""

    dropped_all_correct: int
    """Groups dropped with mean accuracy >= high (all, or nearly all, rollouts right)."""

    dropped_all_wrong: int
    """Groups dropped with mean accuracy <= low (all, or nearly all, rollouts wrong)."""

    @property
    def total(self) -> int:
        """Groups seen."""
        return self.kept + self.dropped_all_correct + self.dropped_all_wrong

    def metrics(self, prefix: str = "filter/") -> dict[str, float]:
        """Counts and the kept fraction, for logging."""
        return {
            f"{prefix}kept_groups": float(self.kept),
            f"{prefix}dropped_all_correct": float(self.dropped_all_correct),
            f"{prefix}dropped_all_wrong": float(self.dropped_all_wrong),
            f"{prefix}kept_fraction": self.kept / self.total if self.total else 0.0,
        }


def _validate_bounds(low: float, high: float) -> None:
    if not low < high:
        raise ValueError(f"need low < high, got low={low}, high={high}")


def group_mean(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` group-major values -> ``[n_groups]`` per-group means (float32 or wider)."""
    n_groups = check_group_layout(values, group_size, "values")
    dtype = values.dtype if values.dtype.is_floating_point else torch.float32
    return values.to(dtype).reshape(n_groups, group_size).mean(dim=1)


def dapo_group_filter(
    accuracy: torch.Tensor, group_size: int, low: float = 0.01, high: float = 0.99
) -> torch.Tensor:
    """Which groups to keep.

    Args:
        accuracy: ``[B]`` per-rollout accuracy (0/1), group-major.
        group_size: rollouts per prompt.
        low, high: keep a group iff ``low < mean accuracy < high``.

    Returns:
        BoolTensor ``[n_groups]``.
    """
    _validate_bounds(low, high)
    means = group_mean(accuracy, group_size)
    return (means > low) & (means < high)


def filter_groups(
    accuracy: torch.Tensor, group_size: int, low: float = 0.01, high: float = 0.99
) -> tuple[torch.Tensor, GroupFilterStats]:
    """Indices of the rollouts that survive the DAPO filter, and counts.

    Args:
        accuracy: ``[B]`` per-rollout accuracy (0/1), group-major.
        group_size: rollouts per prompt.
        low, high: keep a group iff ``low < mean accuracy < high``.

    Returns:
        ``(indices, stats)``: ``indices`` is a LongTensor ``[n_kept * group_size]`` of rollout
        positions, whole groups in their original order (still group-major); ``stats``
        counts kept groups and the two kinds of dropped groups.
    """
    _validate_bounds(low, high)
    means = group_mean(accuracy, group_size)
    keep = (means > low) & (means < high)
    groups = torch.nonzero(keep, as_tuple=False).reshape(-1)
    offsets = torch.arange(group_size, device=groups.device)
    indices = (groups.unsqueeze(1) * group_size + offsets).reshape(-1)
    stats = GroupFilterStats(
        kept=int(keep.sum()),
        dropped_all_correct=int((means >= high).sum()),
        dropped_all_wrong=int((means <= low).sum()),
    )
    return indices, stats
