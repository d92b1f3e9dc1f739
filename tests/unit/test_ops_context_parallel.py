"""Context-parallel helpers in one process: zigzag layout, padding, token means without a group."""

import pytest
import torch

from megatron_papo.ops import (
    gather_from_context_parallel,
    global_token_count,
    masked_token_mean,
    pad_to_multiple,
    zigzag_merge,
    zigzag_split,
)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_round_trip(cp):
    x = torch.arange(2 * 8 * cp * 3).reshape(2, 8 * cp, 3)
    shards = [zigzag_split(x, r, cp, dim=1) for r in range(cp)]
    assert all(s.shape == (2, 8, 3) for s in shards)
    torch.testing.assert_close(zigzag_merge(shards, cp, dim=1), x)


def test_zigzag_layout_cp2():
    x = torch.arange(8)[None]  # chunks [0 1] [2 3] [4 5] [6 7]
    assert zigzag_split(x, 0, 2).tolist() == [[0, 1, 6, 7]]
    assert zigzag_split(x, 1, 2).tolist() == [[2, 3, 4, 5]]


def test_pad_to_multiple_then_split():
    x = torch.ones(2, 7)
    with pytest.raises(ValueError, match=r"size 7 of dim 1 is not a multiple of 2 \* cp_size = 4"):
        zigzag_split(x, 0, 2)
    padded = pad_to_multiple(x, 4, dim=1)
    assert padded.shape == (2, 8) and padded[:, 7].eq(0).all()
    assert pad_to_multiple(padded, 4) is padded
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, cp_size=2\), got 2"):
        zigzag_split(padded, 2, 2)
    with pytest.raises(ValueError, match="expected 2 shards"):
        zigzag_merge([padded], 2)


def test_single_process_means():
    values = torch.tensor([[1.0, 2.0, torch.nan], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert global_token_count(mask).item() == 4
    torch.testing.assert_close(masked_token_mean(values, mask), torch.tensor(13.0 / 4))
    torch.testing.assert_close(masked_token_mean(values, mask.bool()), torch.tensor(13.0 / 4))
    assert masked_token_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="mask must have the shape of values"):
        masked_token_mean(values, mask[:, :2])
    x = torch.randn(2, 4)
    assert gather_from_context_parallel(x, None) is x
