"""mcore_compat: dependency probes, the import guard, CPU patches, version adapters (in-process)."""

import functools
import importlib.metadata
import inspect
import sys

import pytest
import torch
from packaging.version import Version

from megatron_papo.compat import mcore_compat as mc

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches are a no-op with CUDA")


@pytest.fixture
def cpu_patches():
    """Apply the CPU patches for one test, then undo them (they are process-global)."""
    mc.apply_cpu_patches()
    yield
    mc.revert_cpu_patches()


# --- dependency probes ------------------------------------------------------------------------
@pytest.mark.parametrize("probe", [mc.have_transformer_engine, mc.have_apex, mc.have_vllm, mc.have_triton])
def test_probes_return_cached_bools(probe):
    assert isinstance(probe(), bool)
    assert probe() is probe()


@pytest.mark.skipif(mc.have_vllm(), reason="vLLM is installed here")
def test_require_vllm_names_the_extra():
    with pytest.raises(mc.MissingDependencyError, match=r"pip install megatron_papo\[gpu\]") as info:
        mc.require("vllm")
    assert isinstance(info.value, ImportError)


@pytest.mark.skipif(mc.have_apex(), reason="apex is installed here")
def test_require_apex_points_to_ngc_not_pypi():
    with pytest.raises(mc.MissingDependencyError, match="NGC") as info:
        mc.require("apex")
    assert "unrelated" in str(info.value)


def test_require_unknown_feature():
    with pytest.raises(ValueError, match="unknown feature"):
        mc.require("flash_magic")


# --- importing megatron-core -----------------------------------------------------------------
def test_import_megatron_core_matches_metadata():
    mcore = mc.import_megatron_core()
    assert Version(mcore.__version__) == mc.MCORE_VERSION
    assert mc.MCORE_VERSION == Version(importlib.metadata.version("megatron-core"))
    assert mc.mcore_at_least("0.16.1") and not mc.mcore_at_least("99.0")


def test_import_guard_megatron_core_missing(monkeypatch):
    monkeypatch.setattr(mc, "MCORE_VERSION", None)
    monkeypatch.setattr(mc, "_mcore_file_exists", lambda relpath: False)
    with pytest.raises(RuntimeError, match=r"not installed.*pip install \"megatron-core"):
        mc.import_megatron_core()


def test_import_guard_broken_transformer_engine(monkeypatch):
    def fail(name):
        raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(mc.importlib, "import_module", fail)
    monkeypatch.setattr(mc, "_te_installed_but_broken", lambda: True)
    with pytest.raises(RuntimeError, match=r"uninstall.*NGC"):
        mc.import_megatron_core()


def test_paged_stash_stub(monkeypatch):
    """Only 0.19.x has the file; fake its presence and triton's absence to exercise the stub."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if mc.MCORE_VERSION < Version("0.19"):
        assert not mc.PAGED_STASH_STUBBED and name not in sys.modules
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(mc, "_mcore_file_exists", lambda relpath: True)
    real_find_spec = mc.importlib.util.find_spec
    monkeypatch.setattr(
        mc.importlib.util, "find_spec", lambda mod, *a: None if mod == "triton" else real_find_spec(mod, *a)
    )
    try:
        assert mc._stub_paged_stash_without_triton()
        stub = sys.modules[name]
        assert stub.GLOBAL_BLOCK_SIZE == 1024
        with pytest.raises(RuntimeError, match="triton"):
            stub.paged_stash_copy_kernel()
        assert mc._stub_paged_stash_without_triton()  # idempotent
    finally:
        sys.modules.pop(name, None)


# --- CPU patches -------------------------------------------------------------------------------
@cpu_only
def test_apply_cpu_patches_is_idempotent_and_recorded(cpu_patches):
    names = mc.applied_patches()
    assert names == (
        "rng_tracker_cpu_generator",
        "global_memory_buffer_cpu",
        "torch_cuda_device_and_streams",
        "cuda_to_cpu_function_mode",
        "clip_vit_norm_without_te",
        "distopt_load_torch_adamw",
        "distopt_unshared_torch_adam_step",
        "torch_norm_sequence_parallel",
    )
    mc.apply_cpu_patches()
    assert mc.applied_patches() == names

    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(1, device=0, pin_memory=True).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.long).type() == "torch.LongTensor"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(), end.record()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)


@cpu_only
def test_revert_cpu_patches_restores_torch():
    mc.apply_cpu_patches()
    mc.revert_cpu_patches()
    assert mc.applied_patches() == ()
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


@cpu_only
def test_rng_tracker_and_memory_buffer_on_cpu(cpu_patches):
    from megatron.core import tensor_parallel
    from megatron.core.utils import GlobalMemoryBuffer

    def draw():
        tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        outside = torch.rand(3)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        return outside, inside

    (a, b), (c, d) = draw(), draw()
    assert torch.equal(a, c) and torch.equal(b, d) and not torch.equal(a, b)
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "scratch")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"


@cpu_only
def test_clip_vit_default_norm_is_wrapped_torch_norm(cpu_patches):
    if mc.have_transformer_engine():
        pytest.skip("TE present: CLIP uses TENorm")
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    assert clip_vit_model.NORM_IMPL is WrappedTorchNorm
    assert WrappedTorchNorm in clip_vit_model.CLIPViTModel.__init__.__defaults__


# --- version adapters ------------------------------------------------------------------------
def test_mlp_submodules_of_local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    subs = mc.mlp_submodules(get_gpt_layer_local_spec().submodules.mlp)
    assert subs.linear_fc1 is ColumnParallelLinear and subs.linear_fc2 is RowParallelLinear
    # 0.18+ shape: functools.partial(MLP.as_mlp_submodule, submodules=...)
    assert mc.mlp_submodules(functools.partial(dict, submodules=subs)) is subs


def test_llava_and_cross_entropy_adapters_follow_version():
    expected_kwarg = "hybrid_layer_pattern" if mc.mcore_at_least("0.17") else "hybrid_override_pattern"
    assert mc.llava_hybrid_pattern_kwarg() == expected_kwarg
    assert mc.cross_entropy_takes_tp_group() == mc.mcore_at_least("0.19")


def test_dist_ckpt_adapters_pass_only_shared_arguments(monkeypatch):
    """Both adapters call megatron-core with arguments valid on 0.16 and on 0.19."""
    from megatron.core import dist_checkpointing

    real = {
        name: inspect.signature(getattr(dist_checkpointing, name)).parameters for name in ("save", "load")
    }
    calls = {}
    monkeypatch.setattr(dist_checkpointing, "save", lambda sd, d, **kw: calls.setdefault("save", (d, kw)))
    monkeypatch.setattr(dist_checkpointing, "load", lambda sd, d, **kw: calls.setdefault("load", (d, kw)))
    mc.dist_ckpt_save({}, "/tmp/x")
    mc.dist_ckpt_load({}, "/tmp/x")
    assert calls["save"] == (
        "/tmp/x",
        {"async_sharded_save": False, "content_metadata": None, "validate_access_integrity": True},
    )
    for name, (_, kwargs) in calls.items():
        assert set(kwargs) <= set(real[name]), name
    assert calls["load"] == ("/tmp/x", {"strict": "assume_ok_unexpected", "validate_access_integrity": True})
    for name, (_, kwargs) in calls.items():
        assert set(kwargs) <= set(real[name]), name


@cpu_only
def test_torch_norm_takes_sequence_parallel_and_marks_its_weight(cpu_patches):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    def config(sp: bool) -> TransformerConfig:
        return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                                 tensor_model_parallel_size=2, sequence_parallel=sp)

    plain, sp = WrappedTorchNorm(config(False), 8), WrappedTorchNorm(config(True), 8)
    assert isinstance(sp, torch.nn.RMSNorm) and isinstance(plain, torch.nn.RMSNorm)
    assert sp.weight.sequence_parallel is True  # finalize_model_grads sums it over TP
    assert not getattr(plain.weight, "sequence_parallel", False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(sp(x), plain(x))
