"""The one place where megatron_papo patches or works around megatron-core.

Six jobs, each small:

1. **Importing megatron-core safely** (:func:`import_megatron_core`, in this module). Importing this
   module registers a placeholder for the single unguarded ``import triton`` of megatron-core 0.19.x
   (``transformer/moe/ops/paged_stash.py``) when triton is absent; it does not import
   megatron-core itself. :func:`import_megatron_core` then imports it and turns the two known
   failure modes (not installed; Transformer Engine installed but unloadable) into a
   ``RuntimeError`` that says what to do.

2. **Running megatron-core on CPU** (:func:`apply_cpu_patches`, in this module). megatron-core
   assumes CUDA in a few dozen places (RNG tracker, scratch buffers, ``device="cuda"`` literals,
   streams, ``param.type() == 'torch.cuda.FloatTensor'``). On a machine without CUDA the patches
   below send all of that to the CPU. Each patch is a named function whose docstring says which
   megatron-core call fails without it and how. Nothing is patched when CUDA is available.

3. **Absorbing version differences** between the supported megatron-core releases
   (``>=0.16.1,<0.20``; see docs/VERSIONS.md): :data:`MCORE_VERSION` and one tiny adapter per
   API difference that the project meets, in :mod:`megatron_papo.compat.mcore_versions`.

4. **Whole sequences on a model built for context parallelism** (:func:`rotary_tables_unsharded`):
   cached generation runs unsharded on every cp rank, and megatron-core's rotary embeddings would
   otherwise keep only their rank's zigzag rows of the table.

5. **The output layer's input instead of its logits** (:func:`output_layer_returns_hidden`): the
   fused linear PAPO op (``loss.fused_linear``) takes the last hidden states and the output weight
   and never materialises the logits; GPTModel has no switch for that, so its output layer's
   ``forward`` is replaced on the instance for the duration of a pass.

6. **Synchronous checkpoint writes without a server process** (:func:`sync_save_in_process`):
   megatron-core's torch_dist writer hands its write results back through a queue of a
   ``multiprocessing`` Manager, a spawned server process created at the first save that lives as
   long as the trainer. A trainer killed with SIGKILL (a scheduler's timeout, the OOM killer) leaves
   that server behind, re-parented to init, forever (~270 MB each, measured). For the synchronous
   saves the trainer makes, the results never leave the process, so a plain in-process queue
   serves; the Manager is never started.

Plus dependency probes for the optional GPU stack (:func:`have_transformer_engine`, ...,
:func:`require`), in :mod:`megatron_papo.compat.optional_deps`.

This module re-exports every name of those two modules: ``from megatron_papo.compat.mcore_compat import X``
and ``mcore_compat.X`` keep working for the version adapters and the probes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import queue
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_papo.compat.mcore_versions import (
    MCORE_VERSION,
    SUPPORTED_MCORE,
    _accepts,  # noqa: F401
    _installed_mcore_version,  # noqa: F401
    _mcore_file_exists,
    _mcore_path,  # noqa: F401
    cross_entropy_takes_tp_group,
    dist_ckpt_load,
    dist_ckpt_save,
    llava_hybrid_pattern_kwarg,
    mcore_at_least,
    mlp_submodules,
    vocab_parallel_cross_entropy,
)
from megatron_papo.compat.optional_deps import (
    _ALIASES,  # noqa: F401
    _FEATURES,  # noqa: F401
    MissingDependencyError,
    _importable,  # noqa: F401
    have_apex,
    have_transformer_engine,
    have_triton,
    have_vllm,
    require,
)

__all__ = [
    "MCORE_VERSION",
    "PAGED_STASH_STUBBED",
    "MissingDependencyError",
    "applied_patches",
    "apply_cpu_patches",
    "cp_group_cleared",
    "cross_entropy_takes_tp_group",
    "dist_ckpt_load",
    "dist_ckpt_save",
    "have_apex",
    "have_transformer_engine",
    "have_triton",
    "have_vllm",
    "import_megatron_core",
    "llava_hybrid_pattern_kwarg",
    "mcore_at_least",
    "mlp_submodules",
    "output_layer_returns_hidden",
    "output_weight",
    "require",
    "revert_cpu_patches",
    "rotary_tables_unsharded",
    "sync_save_in_process",
    "vocab_parallel_cross_entropy",
]

_INSTALL_MCORE = f'pip install "megatron-core{SUPPORTED_MCORE}"'


# ---------------------------------------------------------------------------------------------
# Importing megatron-core
# ---------------------------------------------------------------------------------------------
_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"




def _stub_paged_stash_without_triton() -> bool:
    """megatron-core 0.19.x imports ``triton`` unconditionally in transformer/moe/ops/paged_stash.py,
    reached from ``import megatron.core`` (via pipeline_parallel.schedules); without triton that is
    ``ModuleNotFoundError: No module named 'triton'``. Every other triton import is guarded.
    Register a placeholder for that one module (its kernels raise if ever called: they need CUDA).
    Only when triton is absent and the file exists (0.16.1 has no such file)."""
    if _PAGED_STASH in sys.modules:
        return isinstance(sys.modules[_PAGED_STASH], _PagedStashStub)
    if importlib.util.find_spec("triton") is not None:
        return False
    if not _mcore_file_exists(os.path.join("transformer", "moe", "ops", "paged_stash.py")):
        return False
    sys.modules[_PAGED_STASH] = _PagedStashStub(_PAGED_STASH)
    return True


class _PagedStashStub(types.ModuleType):
    """Placeholder for megatron-core's triton paged-stash kernels (MoE, CUDA only)."""

    GLOBAL_BLOCK_SIZE = 1024

    @staticmethod
    def _needs_triton(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("megatron-core's paged stash kernels need triton and CUDA")

    paged_stash_copy_kernel = _needs_triton
    paged_stash_pop_kernel = _needs_triton


PAGED_STASH_STUBBED: bool = _stub_paged_stash_without_triton()
"""True if the triton-less placeholder for megatron-core 0.19's paged_stash was registered."""


def import_megatron_core() -> types.ModuleType:
    """Import and return ``megatron.core``, with a clear RuntimeError for the known failures.

    - megatron-core not installed -> how to install it.
    - Transformer Engine installed but unable to load (typical on CPU machines: no CUDA
      libraries) -> megatron-core's own import fails; uninstall TE on CPU machines or use the
      NGC container on GPU machines.
    """
    if MCORE_VERSION is None and not _mcore_file_exists("__init__.py"):
        raise RuntimeError(f"megatron-core is not installed. Install it with: {_INSTALL_MCORE}")
    _stub_paged_stash_without_triton()
    try:
        return importlib.import_module("megatron.core")
    except Exception as err:
        if _te_installed_but_broken():
            raise RuntimeError(
                "`import megatron.core` failed because Transformer Engine is installed but cannot "
                "load (it needs CUDA libraries). On a CPU machine uninstall it "
                "(pip uninstall -y transformer-engine transformer-engine-torch transformer-engine-cu12); "
                f"on a GPU machine use an NGC PyTorch container. Original error: {err!r}"
            ) from err
        raise RuntimeError(
            f"`import megatron.core` failed ({err!r}). Supported versions: megatron-core"
            f"{SUPPORTED_MCORE} (installed: {MCORE_VERSION}); see docs/VERSIONS.md."
        ) from err


def _te_installed_but_broken() -> bool:
    """Transformer Engine is installed but its PyTorch API does not import."""
    try:
        installed = importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        installed = False
    return installed and not have_transformer_engine()


# ---------------------------------------------------------------------------------------------
# CPU patches
# ---------------------------------------------------------------------------------------------
_APPLIED: list[str] = []
_ORIGINALS: list[tuple[Any, str, Any]] = []  # (owner, attribute, original value), in patch order
_MODE: Any = None  # the entered TorchFunctionMode
_ABSENT = object()


def _set(owner: Any, name: str, value: Any) -> None:
    """setattr that remembers the original so :func:`revert_cpu_patches` can restore it."""
    _ORIGINALS.append((owner, name, getattr(owner, name, _ABSENT)))
    setattr(owner, name, value)


def _patch_rng_tracker_to_cpu_generator() -> None:
    """megatron's CUDA RNG tracker (``tensor_parallel.model_parallel_cuda_manual_seed``,
    ``get_cuda_rng_tracker().fork()`` used around dropout and by activation recomputation)
    calls ``torch.cuda.get_rng_state()`` / ``torch.cuda.default_generators``, which on a CPU
    build raise ``AssertionError: Torch not compiled with CUDA enabled`` (or IndexError).
    The tracker's states become states of the CPU default generator instead."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    _set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _set(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
    _set(mrandom, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _set(mrandom, "_set_cuda_rng_state", lambda new_state, *args, **kwargs: torch.set_rng_state(new_state))


def _patch_global_memory_buffer_to_cpu() -> None:
    """``megatron.core.utils.GlobalMemoryBuffer.get_tensor`` (scratch space of the
    sequence-parallel all-gathers in tensor_parallel) allocates with
    ``device=torch.cuda.current_device()``: ``AssertionError: Torch not compiled with CUDA
    enabled`` on a CPU build. Allocate the buffer on the CPU."""
    import operator

    import torch
    from megatron.core import utils as mutils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = functools.reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype, device="cpu")
        return buf[0:numel].view(*tensor_shape)

    _set(mutils.GlobalMemoryBuffer, "get_tensor", get_tensor)


class _CpuStream:
    """Stand-in for torch.cuda.Stream: everything is already ordered on the CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """Stand-in for torch.cuda.Event(enable_timing=True): a wall-clock timestamp."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.t: float | None = None

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        """Milliseconds from this event to ``end``, like CUDA events."""
        return (end.t - self.t) * 1000.0


def _patch_torch_cuda_device_and_streams() -> None:
    """megatron-core allocates with ``device=torch.cuda.current_device()`` in ~200 places
    (pipeline p2p buffers, DDP grad buffers, loss reductions, ...), calls
    ``torch.cuda.synchronize()``, and asks for streams/events in DDP grad sync and the
    inference controllers (``torch.cuda.Event(enable_timing=True)``). On a CPU build each of
    these raises ``AssertionError: Torch not compiled with CUDA enabled`` (or ``RuntimeError``
    for events). current_device() now answers "cpu", synchronize is a no-op, streams and
    events are CPU stand-ins."""
    import torch

    stream = _CpuStream()
    _set(torch.cuda, "current_device", lambda: "cpu")
    _set(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    _set(torch.cuda, "current_stream", lambda *args, **kwargs: stream)
    _set(torch.cuda, "default_stream", lambda *args, **kwargs: stream)
    _set(torch.cuda, "Stream", _CpuStream)
    _set(torch.cuda, "stream", lambda *args, **kwargs: contextlib.nullcontext())
    _set(torch.cuda, "Event", _CpuEvent)


def _is_cuda_device(device: Any) -> bool:
    import torch

    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # an int device is a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _enter_cuda_to_cpu_function_mode() -> None:
    """Hard-coded CUDA placement that no attribute patch reaches, e.g.
    ``torch.zeros([], dtype=torch.int, device="cuda")`` in pipeline_parallel/schedules.py,
    ``tensor.cuda()`` in the CLIP ViT and the optimizer, ``pin_memory=True`` in the inference
    engine; each fails with ``AssertionError: Torch not compiled with CUDA enabled`` (or
    ``RuntimeError: Found no NVIDIA driver``). Also the optimizer/distributed-optimizer/
    clip_grads code selects params by ``param.type() == 'torch.cuda.FloatTensor'`` and raises
    ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...`` for CPU
    tensors. A TorchFunctionMode maps device="cuda"/"cuda:N"/int devices to "cpu", makes
    ``.cuda()`` and ``.pin_memory()`` identities, drops ``pin_memory=True``, and reports CPU
    float tensors' ``.type()`` as their torch.cuda twin.

    The mode is entered once on the calling thread (TorchFunctionModes are thread-local):
    megatron calls made from other threads do not see it."""
    global _MODE
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TYPE_NAMES.get(name, name)
            return func(*args, **kwargs)

    _MODE = CudaToCpuMode()
    _MODE.__enter__()


def _patch_clip_vit_norm_without_te() -> None:
    """Without Transformer Engine, ``CLIPViTModel`` defaults ``ln_pre_impl``/``ln_post_impl`` to
    ``torch.nn.LayerNorm`` but builds them with ``build_module(..., config=...)``:
    ``TypeError: LayerNorm.__init__() got an unexpected keyword argument 'config'``
    (``LLaVAModel`` does not pass these arguments). Make megatron-core's ``WrappedTorchNorm``
    the default instead. No-op when TE is importable."""
    if have_transformer_engine():
        return
    import torch
    from megatron.core.models.vision import clip_vit_model as cvm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    init = cvm.CLIPViTModel.__init__
    if init.__defaults__:
        _set(init, "__defaults__", tuple(
            WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in init.__defaults__))
    if getattr(cvm, "NORM_IMPL", None) is torch.nn.LayerNorm:
        _set(cvm, "NORM_IMPL", WrappedTorchNorm)


def _patch_distopt_load_with_torch_adamw() -> None:
    """With the torch.optim.AdamW fallback (no TE, no apex), loading a DistributedOptimizer
    checkpoint ("fully_reshardable") fails in ``DistributedOptimizer.
    _set_main_param_and_optimizer_states`` with ``KeyError: 'step'``: torch AdamW keeps a
    per-param tensor ``step`` that the checkpoint does not carry. Fill every state key missing
    from the checkpoint with the optimizer's own tensor, so that copy leaves it unchanged.
    (Filling with None is not enough: 0.16.1 copies every key unconditionally.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        tensors = dict(tensors)
        for key, value in self.optimizer.state.get(main_param, {}).items():
            if key != "param" and key not in tensors:
                tensors[key] = value
        return original(self, model_param, tensors)

    _set(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)


def _patch_distopt_unshared_torch_adam_step() -> None:
    """With the torch.optim.Adam(W) fallback (no TE, no apex), ``DistributedOptimizer.load_state_dict``
    gives every parameter's state the SAME ``step`` tensor (``s["step"] = step`` in a loop), and
    torch's Adam increments each param's ``step`` in place: after a checkpoint load one update
    advances the shared step by the number of parameters, so bias correction (hence every update
    from the second one after resuming) differs from an uninterrupted run. Give each parameter
    its own copy after the load. (FP32Optimizer deep-copies the step and is unaffected.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        seen: set[int] = set()
        for state in getattr(self.optimizer, "state", {}).values():
            step = state.get("step")
            if step is not None and hasattr(step, "clone"):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(step))
        return result

    _set(DistributedOptimizer, "load_state_dict", load_state_dict)


def _patch_torch_norm_for_sequence_parallel() -> None:
    """megatron-core's ``WrappedTorchNorm`` (the norm of local layer specs without TE or apex)
    asserts ``not config.sequence_parallel``: ``AssertionError: sequence parallel not supported
    by torch LayerNorm``. A norm needs no collective under sequence parallelism (it normalises
    each of this rank's [S/tp, B, H] rows); only its weight gradient is partial per TP rank, and
    ``finalize_model_grads`` sums it over TP for parameters marked ``sequence_parallel`` (as TE's
    and apex's norms mark theirs). Build the torch norm with a config copy that says
    ``sequence_parallel=False``, then mark its parameters."""
    import copy

    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    original = cls.__dict__["__new__"]
    build = original.__func__ if isinstance(original, staticmethod) else original

    def __new__(klass: type, config: Any, hidden_size: int, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return build(klass, config, hidden_size, *args, **kwargs)
        local = copy.copy(config)
        local.sequence_parallel = False
        norm = build(klass, local, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    _ORIGINALS.append((cls, "__new__", original))
    cls.__new__ = staticmethod(__new__)


_CPU_PATCHES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("rng_tracker_cpu_generator", _patch_rng_tracker_to_cpu_generator),
    ("global_memory_buffer_cpu", _patch_global_memory_buffer_to_cpu),
    ("torch_cuda_device_and_streams", _patch_torch_cuda_device_and_streams),
    ("cuda_to_cpu_function_mode", _enter_cuda_to_cpu_function_mode),
    ("clip_vit_norm_without_te", _patch_clip_vit_norm_without_te),
    ("distopt_load_torch_adamw", _patch_distopt_load_with_torch_adamw),
    ("distopt_unshared_torch_adam_step", _patch_distopt_unshared_torch_adam_step),
    ("torch_norm_sequence_parallel", _patch_torch_norm_for_sequence_parallel),
)


def apply_cpu_patches() -> None:
    """Make megatron-core run on a machine without CUDA (gloo, fp32, local layer specs).

    Idempotent; does nothing when ``torch.cuda.is_available()``. Imports megatron-core.
    The names of the patches applied are returned by :func:`applied_patches`.
    """
    import torch

    if _APPLIED or torch.cuda.is_available():
        return
    import_megatron_core()
    try:
        for name, patch in _CPU_PATCHES:
            patch()
            _APPLIED.append(name)
    except BaseException:
        revert_cpu_patches()
        raise


def applied_patches() -> tuple[str, ...]:
    """Names of the CPU patches currently applied, in the order applied (empty on GPU)."""
    return tuple(_APPLIED)


def revert_cpu_patches() -> None:
    """Undo :func:`apply_cpu_patches` (for tests). Call it on the thread that applied them."""
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _APPLIED.clear()


@contextlib.contextmanager
def rotary_tables_unsharded(module: Any) -> Iterator[None]:
    """Inside, megatron-core's rotary embeddings under ``module`` build the table of the whole
    sequence, though the model was built for context parallelism.

    ``RotaryEmbedding.forward`` and ``MultimodalRotaryEmbedding.forward`` keep only this cp rank's
    zigzag rows of the table (``get_pos_emb_on_this_cp_rank``) when their ``cp_group`` attribute
    has more than one rank and no group is passed in; ``GPTModel`` passes none for padded (not
    packed) batches. Cached generation runs whole sequences on every cp rank
    (:func:`megatron_papo.models.base.whole_sequences`), so the attribute is None for the
    duration (no slicing) and restored after, also on error. Only instance attributes change.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
        RotaryEmbedding,
    )

    with cp_group_cleared([m for m in module.modules()
                           if isinstance(m, (RotaryEmbedding, MultimodalRotaryEmbedding))]):
        yield


@contextlib.contextmanager
def cp_group_cleared(modules: list[Any]) -> Iterator[None]:
    """Inside, the ``cp_group`` attribute of each of ``modules`` is None (no context-parallel
    sharding); each module's own group is put back on exit, also on error."""
    saved = [(m, m.cp_group) for m in modules]
    try:
        for m, _ in saved:
            m.cp_group = None
        yield
    finally:
        for m, group in saved:
            m.cp_group = group


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous gradient.

    megatron-core's ``copy_to_tensor_model_parallel_region`` backward all-reduces
    ``grad.contiguous()`` and returns ``grad``: for a non-contiguous gradient (ours arrives through
    GPTModel's ``transpose(0, 1)``) the reduced copy is dropped and each TP rank keeps its own
    partial gradient, silently. Its own linear layers never hit this (their input gradient is a
    fresh matmul output); the hidden states returned from the output layer's place do.
    """

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return grad.contiguous()


@contextlib.contextmanager
def output_layer_returns_hidden(module: Any) -> Iterator[None]:
    """Inside, every megatron-core ``GPTModel`` under ``module`` returns its output layer's input,
    the last hidden states [B, S, H] (the full sequence of this cp rank), instead of logits.

    ``GPTModel._postprocess`` ends in ``self.output_layer(hidden, weight=..., runtime_gather_output=...)``
    then transposes to [B, S, V_local]; a column-parallel output layer's own ``forward`` is
    replaced on the instance (restored on exit, also on error) by one that returns its input as
    the column-parallel layer sees it, with the same communication:

    - without sequence parallelism, ``copy_to_tensor_model_parallel_region`` (identity forward,
      all-reduce of the gradient over TP in backward: each rank's gradient covers only its
      vocabulary rows);
    - with it, ``gather_from_sequence_parallel_region`` (all-gather forward, reduce-scatter back).

    The weight the caller multiplies by is :func:`output_weight` of the model. Only used by
    training and log-prob passes (no inference context: under one, megatron-core slices the last
    token before the output layer).
    """
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    layers = [m.output_layer for m in module.modules()
              if isinstance(m, GPTModel) and getattr(m, "post_process", False)]

    def hidden_forward(layer: Any) -> Any:
        def forward(input_: Any, weight: Any = None, runtime_gather_output: Any = None) -> tuple[Any, None]:
            if layer.sequence_parallel:
                out = gather_from_sequence_parallel_region(input_, group=layer.tp_group)
            else:
                out = copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)
            return _ContiguousGrad.apply(out), None
        return forward

    try:
        for layer in layers:
            layer.forward = hidden_forward(layer)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def output_weight(module: Any) -> Any:
    """The [V_local, H] weight the last stage's output layer multiplies by: the shared embedding
    weight with tied embeddings, else the output layer's own (None on stages without one)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    for m in module.modules():
        if isinstance(m, GPTModel) and getattr(m, "post_process", False):
            if m.share_embeddings_and_output_weights:
                return m.shared_embedding_or_output_weight()
            return m.output_layer.weight
    return None


# ---------------------------------------------------------------------------------------------
# Synchronous checkpoint writes without a server process
# ---------------------------------------------------------------------------------------------
_WRITE_RESULTS_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"


@contextlib.contextmanager
def sync_save_in_process() -> Iterator[None]:
    """Within this block, a synchronous ``dist_checkpointing.save`` passes its write results
    through an in-process queue instead of a spawned Manager's (module doc, job 6).

    ``FileSystemWriterAsync.prepare_write_data`` asks ``_get_write_results_queue()`` for the
    queue, which starts ``multiprocessing.get_context("spawn").Manager()`` on first use; a
    synchronous save then puts into and gets from that queue in the same process
    (``AsyncRequest.execute_sync`` runs the write function here; its forked per-bucket workers
    report through their own fork-context queues). The module-level ``_results_queue`` is set to
    a ``queue.Queue`` for the block and restored after, so an asynchronous save made elsewhere
    still gets the Manager's. A no-op on a megatron-core without that module or attribute.
    Not for asynchronous saves: their writer runs in another process.
    """
    try:
        fs_async = importlib.import_module(_WRITE_RESULTS_MODULE)
    except ImportError:
        yield
        return
    if not hasattr(fs_async, "_results_queue"):
        yield
        return
    saved = fs_async._results_queue
    fs_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        fs_async._results_queue = saved
