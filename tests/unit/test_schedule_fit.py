"""How the interleaved pipeline schedule is fitted to any number of micro-batches."""

import pytest
import torch

from megatron_papo.training.schedule import _fit_interleaved_schedule


class _Chunk(torch.nn.Module):
    def __init__(self, pp: int):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(pipeline_model_parallel_size=pp, microbatch_group_size_per_vp_stage=pp)


@pytest.mark.parametrize("pp,m,padded,group,scale", [
    (2, 1, 2, 2, 2.0),   # fewer than pp: one loss-free repeat, loss scaled by 2 / 1
    (2, 4, 4, 2, 1.0),   # a multiple of pp: megatron's default groups of pp
    (2, 3, 3, 3, 1.0),   # otherwise one group of all M
    (4, 6, 6, 6, 1.0),
    (4, 2, 4, 4, 2.0),
])
def test_interleaved_schedule_fit(pp, m, padded, group, scale):
    chunks = [_Chunk(pp), _Chunk(pp)]
    mbs = [{"i": i} for i in range(m)]
    out, loss_scale = _fit_interleaved_schedule(chunks, mbs, 1.0)
    assert len(out) == padded and out[:m] == mbs
    assert all(x is not mbs[-1] for x in out[m:])  # repeats are distinct objects (marked inert by id)
    assert loss_scale == scale
    assert all(c.config.microbatch_group_size_per_vp_stage == group for c in chunks)
    # megatron-core's conditions: pp <= N <= M and M % N in {0} or >= pp
    assert pp <= group <= padded and (padded % group == 0 or padded % group >= pp)
