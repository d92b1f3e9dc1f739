"""Fixtures shared by the Qwen2.5-VL unit tests (conversion, parity, the vLLM engine)."""

import pytest

from megatron_papo.compat import mcore_compat
from megatron_papo.distributed import destroy_distributed, init_distributed


@pytest.fixture(scope="module")
def pg():
    """A one-rank world (megatron-core parallel state) for the module; CPU patches undone after
    when they were applied here."""
    patched_before = bool(mcore_compat.applied_patches())
    groups = init_distributed(seed=0)
    yield groups
    destroy_distributed()
    if not patched_before:
        mcore_compat.revert_cpu_patches()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL Hugging Face folder (fp32, untied, seed 3)."""
    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("hf") / "tiny", seed=3)
