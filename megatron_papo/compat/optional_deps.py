"""Dependency probes for the optional GPU stack: Transformer Engine, apex, vLLM and triton.

Each probe (:func:`have_transformer_engine`, :func:`have_apex`, :func:`have_vllm`,
:func:`have_triton`) is lazy, cached and never raises; :func:`require` turns an absent one into a
:class:`MissingDependencyError` that says how to install it. Nothing here imports megatron-core.

:mod:`megatron_papo.compat.mcore_compat` re-exports every name of this module
(``mcore_compat.require(...)`` keeps working).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

from megatron_papo.errors import UserError

__all__ = [
    "MissingDependencyError",
    "have_apex",
    "have_transformer_engine",
    "have_triton",
    "have_vllm",
    "require",
]


# ---------------------------------------------------------------------------------------------
# Dependency probes (lazy, cached, never raising)
# ---------------------------------------------------------------------------------------------
class MissingDependencyError(ImportError, UserError):
    """An optional dependency that the requested feature needs is absent or cannot load."""


def _importable(*modules: str) -> bool:
    """True if every module imports; any exception (ImportError, OSError, RuntimeError) -> False."""
    try:
        if importlib.util.find_spec(modules[0].split(".")[0]) is None:
            return False
        for name in modules:
            importlib.import_module(name)
        return True
    except Exception:
        return False


@functools.cache
def have_transformer_engine() -> bool:
    """Transformer Engine's PyTorch API imports (needs CUDA libraries)."""
    return _importable("transformer_engine", "transformer_engine.pytorch")


@functools.cache
def have_apex() -> bool:
    """NVIDIA apex with its optimizers imports (the PyPI package named ``apex`` is unrelated)."""
    return _importable("apex", "apex.optimizers")


@functools.cache
def have_vllm() -> bool:
    """vLLM imports (its wheels pin a CUDA build of torch)."""
    return _importable("vllm")


@functools.cache
def have_triton() -> bool:
    """Triton imports."""
    return _importable("triton")


_FEATURES: dict[str, tuple[Callable[[], bool], str]] = {
    "transformer_engine": (
        have_transformer_engine,
        "Transformer Engine is needed (TE layer specs, fp8, context parallel attention). "
        "Install the GPU extra on a CUDA machine: pip install megatron_papo[gpu], or use an "
        "NGC PyTorch container, which ships it.",
    ),
    "apex": (
        have_apex,
        "NVIDIA apex is needed. It comes with the NGC PyTorch containers, or build it from "
        "https://github.com/NVIDIA/apex. Do not `pip install apex`: that PyPI package is an "
        "unrelated web library.",
    ),
    "vllm": (
        have_vllm,
        "vLLM is needed for the vLLM rollout engine. Install the GPU extra on a CUDA machine: "
        "pip install megatron_papo[gpu] (vLLM wheels pin a CUDA torch; not for CPU machines). "
        "On CPU use the Megatron rollout engine instead.",
    ),
    "triton": (
        have_triton,
        "Triton is needed for the fused GPU kernels. It is installed with CUDA builds of torch "
        "and in NGC containers (pip install megatron_papo[gpu] on a CUDA machine).",
    ),
}
_ALIASES = {"te": "transformer_engine", "transformer-engine": "transformer_engine"}


def require(feature: str) -> None:
    """Raise :class:`MissingDependencyError` with an install hint if ``feature`` is unavailable.

    ``feature`` is one of ``transformer_engine`` (alias ``te``), ``apex``, ``vllm``, ``triton``.
    """
    key = _ALIASES.get(feature.lower(), feature.lower())
    if key not in _FEATURES:
        raise ValueError(f"unknown feature {feature!r}; known: {sorted(_FEATURES)}")
    probe, hint = _FEATURES[key]
    if not probe():
        raise MissingDependencyError(f"{key} is not available. {hint}")
