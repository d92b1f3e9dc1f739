"""Group-normalised advantages (GRPO / DAPO / PAPO), one scalar per rollout.

PAPO (arXiv 2507.06448) keeps GRPO's outcome advantage: the n rollouts of a prompt form a
group and each rollout's reward is compared with its group,

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps),    std unbiased (divides by n - 1),

or, Dr.GRPO style (``norm_by_std=False``), ``A_i = r_i - mean_group(r)``. Every response
token of the rollout gets the same A_i (:func:`broadcast_advantages`).

Layout: B = n_groups * group_size rollouts in group-major order (all rollouts of prompt 0
first), as produced by the rollout step.
"""

from __future__ import annotations

import torch


def check_group_layout(values: torch.Tensor, group_size: int, name: str) -> int:
    """Validate a ``[B]`` group-major tensor; return the number of groups."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(values.shape)}")
    if values.numel() % group_size != 0:
        raise ValueError(f"{name} has B={values.numel()} entries, not a multiple of group_size={group_size}")
    return values.numel() // group_size


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, norm_by_std: bool = True
) -> torch.Tensor:
    """Per-rollout advantages from per-rollout rewards.

    Args:
        rewards: ``[B]`` scalar rewards, group-major, ``B = n_groups * group_size``.
        group_size: rollouts per prompt (n).
        eps: added to the group std (not to its variance).
        norm_by_std: divide by ``std + eps`` (GRPO); False gives ``r - mean`` (Dr.GRPO).

    Returns:
        ``[B]`` advantages in the rewards' floating dtype (float32 for integer rewards).
        A group of one rollout, or a group whose rewards are all equal, gets exactly 0.
    """
    n_groups = check_group_layout(rewards, group_size, "rewards")
    dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    grouped = rewards.to(dtype).reshape(n_groups, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if group_size == 1:
        # torch.std of one sample is nan (n - 1 = 0); a lone rollout has nothing to compare with.
        return torch.zeros_like(centred).reshape(-1)
    if norm_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    # A constant group must give exactly 0. Floating-point round-off in the mean leaves a
    # residue of ~1 ulp that eps does not absorb: float32 [0.9, 0.9, 0.9] would otherwise
    # give 6e-8 / (7e-8 + 1e-6) = 0.06 for every rollout.
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0).reshape(-1)


def broadcast_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its rollout's advantage.

    Args:
        advantages: ``[B]`` one value per rollout.
        response_mask: ``[B, L]`` 1/True on response tokens, 0/False on prompt and padding.

    Returns:
        ``[B, L]`` ``advantages[b]`` where the mask is set, 0 elsewhere (advantages' dtype).
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [B], got shape {tuple(advantages.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"response_mask must be [B, L] with B={advantages.shape[0]}, "
            f"got shape {tuple(response_mask.shape)}"
        )
    return advantages.unsqueeze(1) * response_mask.to(advantages.dtype)
