"""DAPO dynamic sampling (training.dynamic_sampling): rounds until enough groups survive the
filter, the cut to exactly the target in stream order, a short step, per-rank quotas."""

import pytest
import torch

from megatron_papo.data.dataset import Sample
from megatron_papo.rewards import RewardResult
from megatron_papo.rollout import RolloutResult
from megatron_papo.training.dynamic_sampling import Round, gather_groups, group_quotas, select_groups

N = 4  # responses per prompt


def _round(first_index: int, accuracies: list[list[float]]) -> Round:
    """A round of len(accuracies) prompts with global ids first_index..; prompt p's N rollouts
    score accuracies[p]; response tokens encode (prompt id, rollout) to follow rows around."""
    prompts = len(accuracies)
    ids = [first_index + p for p in range(prompts)]
    rows = [(i, k) for i in ids for k in range(N)]
    zeros = [[0.0]] * len(rows)
    result = RolloutResult(group_size=N, prompt_indices=[i for i, _ in rows], prompt_ids=[[1, 2]] * len(rows),
                           response_ids=[[100 * i + k] for i, k in rows], response_log_probs=zeros,
                           policy_log_probs=zeros, finish_reason=["stop"] * len(rows))
    acc = torch.tensor([a for group in accuracies for a in group])
    samples = [Sample(prompt_ids=[1, 2], images=[], answer="a", question="q", source=f"x:{i}", index=i)
               for i in ids]
    return Round(samples=samples, pixels=[None] * prompts, result=result,
                 rewards=RewardResult(reward=acc * 2.0, accuracy=acc, format=torch.ones_like(acc),
                                      num_parse_failures=0))


MIXED, RIGHT, WRONG = [1.0, 0.0, 0.0, 1.0], [1.0] * N, [0.0] * N


def test_refill_stops_at_the_target_and_cuts_to_it_in_stream_order():
    plan = [[MIXED, RIGHT, WRONG, MIXED], [WRONG, MIXED, MIXED, RIGHT], [MIXED] * 4]
    seen = []

    def run_round(r):
        seen.append(r)
        return _round(10 * r, plan[r])

    got = gather_groups(run_round, target_groups=3, max_rounds=20, low=0.01, high=0.99, dp_group=None)
    assert seen == [0, 1]  # 2 kept in round 0, 2 more in round 1: enough, round 2 never runs
    assert [s.index for s in got.samples] == [0, 3, 11]  # the first 3 survivors, in stream order
    assert [r[0] // 100 for r in got.result.response_ids] == [0] * N + [3] * N + [11] * N
    assert got.rewards.tolist() == [2.0 * a for a in MIXED * 3]
    assert got.metrics["filter/sampling_rounds"] == 2 and got.metrics["filter/trained_groups"] == 3
    assert got.metrics["filter/kept_groups"] == 4  # kept by the filter, before the cut
    assert got.metrics["filter/dropped_all_correct"] == 2 and got.metrics["filter/dropped_all_wrong"] == 2
    assert len(got.generated) == 2


def test_a_step_still_short_after_the_last_round_trains_on_what_it_has():
    got = gather_groups(lambda r: _round(10 * r, [WRONG, MIXED] if r == 1 else [WRONG, WRONG]),
                        target_groups=4, max_rounds=3, low=0.01, high=0.99, dp_group=None)
    assert got.metrics["filter/sampling_rounds"] == 3 and got.metrics["filter/trained_groups"] == 1
    assert [s.index for s in got.samples] == [11]


def test_one_round_is_the_plain_filter_and_nothing_kept_is_empty():
    got = gather_groups(lambda r: _round(0, [WRONG, RIGHT]), target_groups=2, max_rounds=1, low=0.01,
                        high=0.99, dp_group=None)
    assert got.samples == [] and len(got.result) == 0 and got.rewards.numel() == 0
    with pytest.raises(ValueError, match="max_rounds"):
        gather_groups(lambda r: _round(0, [MIXED]), target_groups=1, max_rounds=0, low=0.01, high=0.99,
                      dp_group=None)


def test_group_quotas_take_the_first_target_groups_in_rank_order():
    assert group_quotas([3, 5, 0, 2], 6) == [3, 3, 0, 0]
    assert group_quotas([1, 1], 8) == [1, 1]  # short: every kept group trains
    assert group_quotas([4, 4], 0) == [0, 0]
    with pytest.raises(ValueError):
        group_quotas([-1], 2)


def test_select_groups_keeps_whole_groups_in_the_given_order():
    r = _round(0, [MIXED, RIGHT, WRONG]).result
    sel = select_groups(r, [2, 0])
    assert sel.prompt_indices == [2] * N + [0] * N and len(sel) == 2 * N
