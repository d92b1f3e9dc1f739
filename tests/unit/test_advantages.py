"""Group advantages and the DAPO group filter (megatron_papo.algorithms)."""

import math

import pytest
import torch

from megatron_papo.algorithms import (
    GroupFilterStats,
    broadcast_advantages,
    dapo_group_filter,
    filter_groups,
    group_normalized_advantages,
)

# ---------------------------------------------------------------- advantages


def test_hand_computed_unbiased_std():
    # group [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> +-0.5 / 0.7071 = +-0.7071
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a]))
    assert abs(a - 0.70710) < 1e-4


def test_hand_computed_group_of_three():
    # [1, 0, 0]: mean 1/3, unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3, eps=0.0)
    std = math.sqrt(1 / 3)
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std
    assert torch.allclose(adv, expected)
    assert abs(adv.sum().item()) < 1e-6


def test_matches_reference_loop():
    torch.manual_seed(0)
    rewards = torch.rand(5 * 4)
    adv = group_normalized_advantages(rewards, 4)
    for g in range(5):
        r = rewards[g * 4 : (g + 1) * 4]
        assert torch.allclose(adv[g * 4 : (g + 1) * 4], (r - r.mean()) / (r.std() + 1e-6))


def test_constant_group_is_zero():
    adv = group_normalized_advantages(torch.tensor([0.9, 0.9, 0.9, 0.1, 1.0, 0.1]), group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3:].abs().sum() > 0
    # exactly zero despite round-off in the float32 mean of 0.9s, with or without std
    no_std = group_normalized_advantages(torch.full((4,), 0.9), 4, norm_by_std=False)
    assert torch.equal(no_std, torch.zeros(4))


def test_group_size_one_is_zero():
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.5]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))
    assert not torch.isnan(adv).any()


def test_dr_grpo_no_std():
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, norm_by_std=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_dtypes():
    assert group_normalized_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32
    assert (
        group_normalized_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64
    )


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "not a multiple of group_size"),
        (torch.zeros(2, 2), 2, "1-D"),
        (torch.zeros(4), 0, "group_size"),
    ],
)
def test_invalid_inputs(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_normalized_advantages(rewards, group_size)


def test_broadcast():
    adv = torch.tensor([0.5, -1.0])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = broadcast_advantages(adv, mask)
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="response_mask"):
        broadcast_advantages(adv, torch.ones(3, 4))
    with pytest.raises(ValueError, match="advantages"):
        broadcast_advantages(adv.reshape(2, 1), mask)


# ---------------------------------------------------------------- DAPO filter


def test_dapo_group_filter_hand_case():
    acc = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 0], dtype=torch.float32)
    # groups of 3: [1,1,1] all correct, [0,0,0] all wrong, [1,0,0] mixed, [1,1,0] mixed
    keep = dapo_group_filter(acc, 3)
    assert keep.tolist() == [False, False, True, True]


def test_filter_groups_indices_and_stats():
    acc = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1], dtype=torch.float32)
    idx, stats = filter_groups(acc, 2)
    # groups: [1,1] correct, [0,0] wrong, [1,0] kept, [0,1] kept
    assert idx.dtype == torch.long
    assert idx.tolist() == [4, 5, 6, 7]
    assert stats == GroupFilterStats(kept=2, dropped_all_correct=1, dropped_all_wrong=1)
    assert stats.total == 4
    assert stats.metrics()["filter/kept_fraction"] == 0.5


def test_filter_bounds_are_strict_and_configurable():
    acc = torch.tensor([1.0, 1.0, 1.0, 0.0])  # mean 0.75
    assert dapo_group_filter(acc, 4, low=0.0, high=0.75).tolist() == [False]
    assert dapo_group_filter(acc, 4, low=0.0, high=0.76).tolist() == [True]
    idx, stats = filter_groups(acc, 4, low=0.75, high=1.0)
    assert idx.numel() == 0 and stats.dropped_all_wrong == 1
    with pytest.raises(ValueError, match="low < high"):
        dapo_group_filter(acc, 4, low=0.5, high=0.5)


def test_filter_everything_dropped_and_shape_errors():
    idx, stats = filter_groups(torch.ones(6), 3)
    assert idx.shape == (0,) and stats == GroupFilterStats(0, 2, 0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        filter_groups(torch.ones(5), 3)
