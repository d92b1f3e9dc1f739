"""Test utilities shipped with the package (used by tests/ and benchmarks/)."""

from megatron_papo.testing.dist import DistributedTestError, run_distributed

__all__ = ["DistributedTestError", "run_distributed"]
