"""TrainBatch: next-token shift, response mask alignment, micro-batching, padding rows."""

import pytest
import torch

from megatron_papo.batch import build_train_batch, micro_batch_dicts, pad_rows_to_multiple, stack_pixels

PAD = 0


def _batch():
    # prompts (left-padded, P=3) + responses (right-padded, L=3)
    ids = torch.tensor([[0, 5, 6, 7, 8, 0],
                        [4, 5, 6, 9, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    resp_mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    pix = [torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)]
    masked = [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)]
    return build_train_batch(ids, attn, 3, resp_mask, torch.tensor([1.0, -1.0]), pix, masked, pad_id=PAD)


def test_shift_aligns_targets_with_response_tokens():
    b = _batch()
    # row 0: response tokens 7, 8 at columns 3, 4 -> predicted at positions 2, 3
    assert b.loss_mask[0].tolist() == [False, False, True, True, False, False]
    assert b.target[0, 2].item() == 7 and b.target[0, 3].item() == 8
    assert b.loss_mask[1].tolist() == [False, False, True, False, False, False]
    assert b.target[1, 2].item() == 9
    assert b.position_ids[0].tolist() == [0, 0, 1, 2, 3, 3]  # left padding counts from the first real token
    assert b.target[:, -1].tolist() == [PAD, PAD]


def test_micro_batches_and_both_branches():
    b = _batch()
    mbs = micro_batch_dicts(b, 1)
    assert len(mbs) == 2 and mbs[1]["rows"].tolist() == [1]
    assert mbs[0]["pixel_values"].sum() > 0
    masked = micro_batch_dicts(b, 1, masked_branch=True)
    assert masked[0]["pixel_values"].sum() == 0
    both = micro_batch_dicts(b, 2, both_branches=True)[0]
    assert both["input_ids"].shape == (4, 6) and both["target"].shape == (2, 6)
    assert both["pixel_values"].shape[0] == 4 and both["pixel_values"][2:].sum() == 0
    with pytest.raises(ValueError, match="multiple"):
        micro_batch_dicts(b, 3)


def test_padding_rows_carry_no_loss():
    b = pad_rows_to_multiple(_batch().rows([0, 1, 0]), 4)
    assert b.num_rows == 4 and not b.loss_mask[3].any() and b.advantages[3] == 0
    assert b.loss_mask[:3].sum() == 5
    assert stack_pixels([None, None]) is None


def test_shape_errors():
    b = _batch()
    with pytest.raises(ValueError, match="response_mask"):
        build_train_batch(b.input_ids, b.attention_mask, 2, torch.ones(2, 3, dtype=torch.bool), b.advantages,
                          b.pixel_values, b.masked_pixel_values, pad_id=PAD)
    with pytest.raises(ValueError, match="rows"):
        build_train_batch(b.input_ids, b.attention_mask, 3, torch.ones(2, 3, dtype=torch.bool),
                          torch.zeros(3), b.pixel_values, b.masked_pixel_values, pad_id=PAD)


def test_inert_rows_and_equal_update_counts():
    from megatron_papo.batch import concat_batches, inert_rows
    from megatron_papo.trainer import _mini_batches

    b = _batch()
    inert = inert_rows(b, 3)
    assert inert.num_rows == 3 and not inert.loss_mask.any() and not inert.advantages.any()
    assert concat_batches(b, inert).num_rows == 5
    # a replica with 2 rows and one with 6 rows (4 per update) must both take 2 updates
    minis = _mini_batches(b, rows_per_update=4, micro=2, count=2)
    assert [m.num_rows for m in minis] == [2, 2]
    assert minis[0].loss_mask.any() and not minis[1].loss_mask.any()
