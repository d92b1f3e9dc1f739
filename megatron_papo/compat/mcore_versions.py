"""Versions of megatron-core: which release is installed, and the differences between them.

:data:`MCORE_VERSION` is found without importing megatron-core. The supported releases are
:data:`SUPPORTED_MCORE` (see docs/VERSIONS.md); the project meets a few API differences between
them (0.16.1 vs 0.19.x), and absorbs each with one tiny adapter below, so that nothing else in
the tree branches on the version.

:mod:`megatron_papo.compat.mcore_compat` re-exports every name of this module
(``mcore_compat.dist_ckpt_save(...)`` keeps working).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import Any

from packaging.version import InvalidVersion, Version

from megatron_papo.compat.optional_deps import _importable

__all__ = [
    "MCORE_VERSION",
    "SUPPORTED_MCORE",
    "cross_entropy_takes_tp_group",
    "dist_ckpt_load",
    "dist_ckpt_save",
    "llava_hybrid_pattern_kwarg",
    "mcore_at_least",
    "mlp_submodules",
    "vocab_parallel_cross_entropy",
]

SUPPORTED_MCORE = ">=0.16.1,<0.20"


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------
def _mcore_path(relpath: str) -> str | None:
    """Path of megatron/core/<relpath> on sys.path if it exists, found without importing megatron.core."""
    try:
        spec = importlib.util.find_spec("megatron")
    except (ImportError, ValueError):
        return None
    for directory in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(directory, "core", relpath)
        if os.path.exists(path):
            return path
    return None


def _mcore_file_exists(relpath: str) -> bool:
    """Whether megatron/core/<relpath> exists, found without importing megatron.core."""
    return _mcore_path(relpath) is not None


def _installed_mcore_version() -> Version | None:
    """Version of the megatron-core that ``import megatron.core`` would load, found without
    importing it: its package_info.py (right for source checkouts on PYTHONPATH too), else
    the installed distribution's metadata."""
    path = _mcore_path("package_info.py")
    if path is not None:
        try:
            namespace: dict[str, Any] = {}
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), namespace)  # constants only
            return Version(namespace["__version__"])
        except Exception:
            pass
    try:
        return Version(importlib.metadata.version("megatron-core"))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


MCORE_VERSION: Version | None = _installed_mcore_version()
"""Installed megatron-core version (``packaging.version.Version``), or None if not installed."""


def mcore_at_least(version: str) -> bool:
    """True if the installed megatron-core is at least ``version`` (False when not installed)."""
    return MCORE_VERSION is not None and MCORE_VERSION >= Version(version)


# ---------------------------------------------------------------------------------------------
# Version adapters (0.16.1 vs 0.19.x)
# ---------------------------------------------------------------------------------------------
def mlp_submodules(mlp_spec: Any) -> Any:
    """The ``MLPSubmodules`` (linear_fc1, linear_fc2, ...) of a layer spec's ``mlp`` entry.

    0.16: ``ModuleSpec(module=MLP, submodules=MLPSubmodules(...))``;
    0.19: ``functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))``.
    Example: ``mlp_submodules(get_gpt_layer_local_spec().submodules.mlp)``.
    """
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords["submodules"]
    return mlp_spec.submodules


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def llava_hybrid_pattern_kwarg() -> str:
    """LLaVAModel's keyword for a hybrid (Mamba) language model's layer pattern:
    ``hybrid_override_pattern`` (0.16) or ``hybrid_layer_pattern`` (0.19)."""
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    if _accepts(LLaVAModel.__init__, "hybrid_layer_pattern"):
        return "hybrid_layer_pattern"
    return "hybrid_override_pattern"


@functools.cache
def cross_entropy_takes_tp_group() -> bool:
    """Whether megatron-core's ``vocab_parallel_cross_entropy`` accepts ``tp_group`` (0.19+)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as ce

    return _accepts(ce, "tp_group")


def vocab_parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing: float = 0.0,
                                 tp_group=None):
    """megatron-core's ``vocab_parallel_cross_entropy`` with an explicit ``tp_group`` on every version.

    Before 0.19 the function always reduces over parallel_state's tensor-parallel group; a
    different ``tp_group`` is then a ValueError. NOTE: megatron-core overwrites
    ``vocab_parallel_logits`` in place; pass a copy if the logits are needed afterwards.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as ce

    if cross_entropy_takes_tp_group():
        return ce(vocab_parallel_logits, target, label_smoothing, tp_group=tp_group)
    if tp_group is not None and tp_group is not parallel_state.get_tensor_model_parallel_group():
        raise ValueError(
            f"megatron-core {MCORE_VERSION} reduces cross entropy over parallel_state's "
            "tensor-parallel group only; got a different tp_group")
    return ce(vocab_parallel_logits, target, label_smoothing)


def dist_ckpt_save(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, *,
                   async_save: bool = False, content_metadata: dict | None = None,
                   validate_access_integrity: bool = True):
    """``dist_checkpointing.save`` with the default torch_dist strategy on every version.

    Uses only the arguments both versions share. 0.16 also takes ``common_strategy`` and
    strategy tuples; 0.19 drops them (always torch_dist) and defaults async saves to NVIDIA
    resiliency-ext ("nvrx"), so without it the built-in "mcore" async strategy is chosen.
    Returns the AsyncRequest when ``async_save`` (the caller schedules it), else None.
    """
    from megatron.core import dist_checkpointing

    kwargs: dict[str, Any] = dict(async_sharded_save=async_save, content_metadata=content_metadata,
                                  validate_access_integrity=validate_access_integrity)
    if async_save and _accepts(dist_checkpointing.save, "async_strategy") and not _importable(
            "nvidia_resiliency_ext"):
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, str(checkpoint_dir), **kwargs)


def dist_ckpt_load(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, *,
                   strict: str = "assume_ok_unexpected", validate_access_integrity: bool = True):
    """``dist_checkpointing.load`` with the arguments both versions share, plus megatron-core's
    own integrity check (``verify_integrity=True``) on the versions whose ``load`` takes it.

    (0.16 also takes ``common_strategy``; 0.19 adds ``process_group``/``verify_integrity``.)
    0.19 reads checkpoints written by 0.16; 0.16 cannot read those written by 0.19. The project's
    manifest check (training/checkpointing.py) runs first on every version.
    """
    from megatron.core import dist_checkpointing

    kwargs: dict[str, Any] = dict(strict=strict, validate_access_integrity=validate_access_integrity)
    if _accepts(dist_checkpointing.load, "verify_integrity"):
        kwargs["verify_integrity"] = True
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), **kwargs)
