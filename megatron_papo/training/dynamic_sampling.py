"""DAPO dynamic sampling: generate rounds of prompts until enough groups survive the filter.

DAPO's online filter drops every group whose rollouts are all right or all wrong (their GRPO
advantages are zero). Dropping alone shrinks the trained batch as accuracy rises; DAPO instead
keeps sampling. One RL step here:

    round r = 0, 1, ...: next rollout.prompts_per_step prompts of the sampler -> rollout -> score
        -> filter; the kept groups are appended (stream order) -> stop once the kept groups of
        all data-parallel ranks reach the target (rollout.prompts_per_step), or after
        algorithm.max_sampling_rounds rounds
    cut: exactly `target` groups over all ranks, the first ones in (rank, round, position)
        order (`group_quotas`); a step that is still short trains on what it has

The rounds run in lockstep on every data-parallel rank (one all-reduce of the kept count per
round, one all-gather of the counts at the end), each rank draws its own share of every round's
prompts from the sampler, so the stream, and with it a resumed run, is the same as without
refill. Everything here is a pure function of the rounds it is given, except the two
collectives over ``dp_group``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.algorithms import filter_groups
from megatron_papo.data.dataset import Sample
from megatron_papo.ops.groups import all_gather_int, all_reduce_int, rank_and_size
from megatron_papo.rewards import RewardResult
from megatron_papo.rollout import RolloutResult

__all__ = ["Gathered", "Round", "gather_groups", "group_quotas", "select_groups"]


@dataclass
class Round:
    """One round of one rank: its prompts, their pixels, the rollout and its rewards."""

    samples: list[Sample]
    pixels: list[Tensor | None]
    result: RolloutResult
    rewards: RewardResult


@dataclass
class Gathered:
    """What a step trains on (this rank's kept groups) and what its rounds generated."""

    samples: list[Sample]
    """[G] prompts of the kept groups, in stream order."""
    pixels: list[Tensor | None]
    """[G] their pixels."""
    result: RolloutResult
    """The kept groups' rollouts (G * n rows, group-major)."""
    rewards: Tensor
    """[G * n] the kept rows' rewards (float32)."""
    generated: list[Round] = field(default_factory=list)
    """Every round of this rank, kept or not (for the step's reward and length metrics)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """filter/* counts of this rank (kept_groups, dropped_*: summed over rounds and later over
    ranks), filter/sampling_rounds, filter/trained_groups and filter/target_groups (global)."""


def select_groups(result: RolloutResult, groups: Sequence[int]) -> RolloutResult:
    """The rows of prompts ``groups`` (indices into ``result``'s prompts), in that order.

    Args:
        result: P * n rows, group-major.
        groups: prompt indices, each in [0, P).
    Returns:
        len(groups) * n rows; engine metrics kept as they are.
    """
    rows = [r for g in groups for r in range(*result.group(g).indices(len(result)))]
    return RolloutResult(group_size=result.group_size,
                         prompt_indices=[result.prompt_indices[r] for r in rows],
                         prompt_ids=[result.prompt_ids[r] for r in rows],
                         response_ids=[result.response_ids[r] for r in rows],
                         response_log_probs=[result.response_log_probs[r] for r in rows],
                         policy_log_probs=[result.policy_log_probs[r] for r in rows],
                         finish_reason=[result.finish_reason[r] for r in rows],
                         metrics=dict(result.metrics))


def group_quotas(kept_per_rank: Sequence[int], target: int) -> list[int]:
    """How many of its kept groups each rank trains on: the first ``target`` groups in rank
    order (rank 0's first), so the total is ``min(target, sum(kept_per_rank))``.

    >>> group_quotas([3, 5, 0, 2], 6)
    [3, 3, 0, 0]
    """
    if target < 0 or any(k < 0 for k in kept_per_rank):
        raise ValueError(f"group_quotas needs non-negative counts, got {list(kept_per_rank)} and {target}")
    out, left = [], target
    for kept in kept_per_rank:
        take = min(kept, left)
        out.append(take)
        left -= take
    return out


def gather_groups(run_round: Callable[[int], Round], *, target_groups: int, max_rounds: int,
                  low: float, high: float, dp_group: dist.ProcessGroup | None) -> Gathered:
    """Run rounds until ``target_groups`` groups (over all dp ranks) survive the filter (module doc).

    Args:
        run_round: ``run_round(r)`` samples, generates and scores round ``r`` of this rank
            (collective over the model-parallel group, as a rollout is).
        target_groups: groups to train on over all data-parallel ranks (rollout.prompts_per_step).
        max_rounds: >= 1; 1 = filter only, no refill.
        low, high: the filter bounds (a group is kept iff low < mean accuracy < high).
        dp_group: the data-parallel group (None = one rank).
    Returns:
        :class:`Gathered` with this rank's quota of the kept groups.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    rounds: list[Round] = []
    kept: list[tuple[int, int]] = []  # (round, prompt position in it), stream order
    counts = {"filter/kept_groups": 0, "filter/dropped_all_correct": 0, "filter/dropped_all_wrong": 0}
    for r in range(max_rounds):
        rnd = run_round(r)
        rounds.append(rnd)
        rows, stats = filter_groups(rnd.rewards.accuracy, rnd.result.group_size, low, high)
        n = rnd.result.group_size
        kept += [(r, int(row) // n) for row in rows[::n].tolist()]
        counts["filter/kept_groups"] += stats.kept
        counts["filter/dropped_all_correct"] += stats.dropped_all_correct
        counts["filter/dropped_all_wrong"] += stats.dropped_all_wrong
        if all_reduce_int(len(kept), dp_group) >= target_groups:
            break
    per_rank = all_gather_int(len(kept), dp_group)
    rank, _ = rank_and_size(dp_group)
    quota = group_quotas(per_rank, target_groups)[rank]
    mine = kept[:quota]
    samples = [rounds[r].samples[g] for r, g in mine]
    pixels = [rounds[r].pixels[g] for r, g in mine]
    n = rounds[0].result.group_size
    parts = [select_groups(rounds[r].result, [g]) for r, g in mine]
    result = RolloutResult.concat(parts) if parts else select_groups(rounds[0].result, [])
    rewards = torch.cat([rounds[r].rewards.reward[g * n:(g + 1) * n] for r, g in mine]) if mine \
        else torch.zeros(0, dtype=torch.float32)
    metrics: dict[str, Any] = {k: float(v) for k, v in counts.items()}
    metrics.update({"filter/sampling_rounds": float(len(rounds)),
                    "filter/trained_groups": float(sum(group_quotas(per_rank, target_groups))),
                    "filter/target_groups": float(target_groups)})
    return Gathered(samples=samples, pixels=pixels, result=result, rewards=rewards, generated=rounds,
                    metrics=metrics)
