"""TrainBatch: next-token shift, response mask alignment, micro-batching, padding rows."""

import pytest
import torch

from megatron_papo.losses.aggregation import aggregate
from megatron_papo.ops.context_parallel import zigzag_merge, zigzag_split
from megatron_papo.training.batch import (
    build_train_batch,
    micro_batch_dicts,
    pad_columns,
    pad_rows_to_multiple,
    stack_pixels,
)

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
    from megatron_papo.training.batch import concat_batches, inert_rows
    from megatron_papo.training.trainer import _mini_batches

    b = _batch()
    inert = inert_rows(b, 3)
    assert inert.num_rows == 3 and not inert.loss_mask.any() and not inert.advantages.any()
    assert concat_batches(b, inert).num_rows == 5
    # a replica with 2 rows and one with 6 rows (4 per update) must both take 2 updates
    minis = _mini_batches(b, rows_per_update=4, micro=2, count=2)
    assert [m.num_rows for m in minis] == [2, 2]
    assert minis[0].loss_mask.any() and not minis[1].loss_mask.any()


def test_pad_columns_adds_masked_padding_only():
    b = _batch()
    b.old_log_probs = torch.randn(2, 6)
    assert pad_columns(b, 3) is b  # 6 columns are already a multiple of 3
    p = pad_columns(b, 4)
    assert p.seq_length == 8 and p.num_rows == 2
    assert not p.attention_mask[:, 6:].any() and not p.loss_mask[:, 6:].any()
    for name in ("input_ids", "attention_mask", "position_ids", "target", "loss_mask", "old_log_probs"):
        assert torch.equal(getattr(p, name)[:, :6], getattr(b, name)), name
    assert torch.equal(p.input_ids[:, 6:], b.input_ids[:, -1:].expand(-1, 2))
    assert p.masked_log_probs is None and p.pixel_values is b.pixel_values


def test_context_parallel_micro_batches_shard_the_loss_fields():
    b = pad_columns(_batch(), 4)
    b.old_log_probs = torch.arange(16.0).view(2, 8)
    shards = [micro_batch_dicts(b, 2, cp_rank=r, cp_size=2)[0] for r in range(2)]
    for d in shards:
        assert d["input_ids"].shape == (2, 8)  # model inputs stay whole
        assert d["target"].shape == d["loss_mask"].shape == d["old_log_probs"].shape == (2, 4)
        assert d["row_tokens"].tolist() == [2, 1]  # counts of the whole rows
    for k in ("target", "loss_mask", "old_log_probs"):
        assert torch.equal(zigzag_merge([d[k] for d in shards], 2), getattr(b, k)), k
    # zigzag: rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2
    assert shards[0]["old_log_probs"][0].tolist() == [0.0, 1.0, 6.0, 7.0]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregation_shares_over_cp_shards_add_up(mode):
    g = torch.Generator().manual_seed(0)
    b = pad_columns(_batch(), 4)
    values = torch.randn(2, 8, generator=g)
    whole = aggregate(values, b.loss_mask, mode)
    n_tok, n_seq = b.loss_mask.sum(), b.loss_mask.any(1).sum()
    total = 0.0
    for r in range(2):
        d = micro_batch_dicts(b, 2, cp_rank=r, cp_size=2)[0]
        total = total + aggregate(zigzag_split(values, r, 2), d["loss_mask"], mode, num_tokens=n_tok,
                                  num_seqs=n_seq, row_tokens=d["row_tokens"])
    torch.testing.assert_close(total, whole)
