"""The multi-process harness itself: collectives run, results return, failures surface."""

import pytest
import torch
import torch.distributed as dist

from megatron_papo.testing import DistributedTestError, run_distributed

pytestmark = pytest.mark.slow


def _allreduce(rank: int, world: int) -> float:
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    return x.item()


def _fail_on_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")


def test_allreduce_three_ranks():
    assert run_distributed(_allreduce, 3) == [6.0, 6.0, 6.0]


def test_failure_names_rank():
    with pytest.raises(DistributedTestError, match="boom on rank one"):
        run_distributed(_fail_on_one, 2, timeout=60)
