"""Checks that a config can run on this machine, before anything is built (called by train.py).

    check_runtime(cfg)   # raises MissingDependencyError / RuntimeError naming the field and the fix

- ``model.fp8 != none``: Transformer Engine must import, a CUDA GPU must be visible, and the
  recipe must suit the GPU and the TE version (:func:`fp8_support_problem`, a pure function).
- ``model.transformer_impl: transformer_engine``: Transformer Engine.
- ``parallel.sequence_parallel`` on a GPU: Transformer Engine (its norms take sequence-parallel
  input; on CPU, ``mcore_compat``'s ``torch_norm_sequence_parallel`` patch lets the torch norms
  of the local specs do it). ``parallel.cp > 1`` needs nothing extra: its attention
  (``models.cp_attention``) is megatron-core's, around an all-gather of keys and values.
- ``rollout.engine: vllm``: vLLM must import, and model.name must be qwen2_5_vl.

FP8 recipes (Transformer Engine ``transformer_engine.common.recipe``):

| ModelConfig.fp8 | TE recipe | TE version | GPU |
|---|---|---|---|
| delayed | DelayedScaling | any 1.x / 2.x | compute capability >= 8.9 (Ada, Hopper, Blackwell) |
| current | Float8CurrentScaling | >= 2.2 | >= 8.9 |
| blockwise | Float8BlockScaling (DeepSeek-V3 style blocks) | >= 2.3 (release notes: Hopper) | >= 9.0 |
| mxfp8 (not a config value yet) | MXFP8BlockScaling | >= 2.0 | >= 10.0 (Blackwell) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from megatron_papo.compat import mcore_compat
from megatron_papo.compat.optional_deps import MissingDependencyError

__all__ = [
    "FP8_RECIPES", "Fp8Recipe", "check_runtime", "cuda_capability", "fp8_support_problem", "te_version",
]


@dataclass(frozen=True)
class Fp8Recipe:
    """What one FP8 recipe needs."""

    te_class: str
    """Class in transformer_engine.common.recipe."""
    min_te: str
    """Oldest Transformer Engine release that has it."""
    min_capability: tuple[int, int]
    """Lowest CUDA compute capability that runs it."""


FP8_RECIPES: dict[str, Fp8Recipe] = {
    "delayed": Fp8Recipe("DelayedScaling", "1.0", (8, 9)),
    "current": Fp8Recipe("Float8CurrentScaling", "2.2", (8, 9)),
    "blockwise": Fp8Recipe("Float8BlockScaling", "2.3", (9, 0)),
    "mxfp8": Fp8Recipe("MXFP8BlockScaling", "2.0", (10, 0)),
}


def fp8_support_problem(recipe: str, capability: tuple[int, int] | None, te: str | None) -> str | None:
    """Why ``recipe`` cannot run on a GPU of ``capability`` with Transformer Engine ``te``
    (None = no GPU / no TE), or None when it can. Pure: tested without a GPU."""
    if recipe not in FP8_RECIPES:
        return f"model.fp8={recipe!r}: expected one of none, {', '.join(FP8_RECIPES)}"
    need = FP8_RECIPES[recipe]
    if te is None:
        return (f"model.fp8={recipe!r} needs Transformer Engine (recipe {need.te_class}); it is not "
                "importable here")
    try:
        if Version(te) < Version(need.min_te):
            return (f"model.fp8={recipe!r} needs Transformer Engine >= {need.min_te} ({need.te_class}); "
                    f"found {te}")
    except InvalidVersion:
        pass  # an unparsable local build: let TE itself decide
    if capability is None:
        return f"model.fp8={recipe!r} needs a CUDA GPU; none is visible (FP8 never runs on CPU)"
    if tuple(capability) < need.min_capability:
        major, minor = need.min_capability
        return (f"model.fp8={recipe!r} ({need.te_class}) needs a GPU of compute capability >= "
                f"{major}.{minor}; "
                f"this GPU is {capability[0]}.{capability[1]} (FP8 tensor cores: Ada 8.9, Hopper 9.0, "
                "Blackwell 10.0). Use model.fp8=none with model.precision=bf16")
    return None


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def te_version() -> str | None:
    """Installed Transformer Engine version when it imports, else None."""
    if not mcore_compat.have_transformer_engine():
        return None
    import importlib.metadata

    for dist in ("transformer-engine", "transformer_engine", "transformer-engine-cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import transformer_engine

    return str(getattr(transformer_engine, "__version__", "0"))


def _require(feature: str, why: str) -> None:
    try:
        mcore_compat.require(feature)
    except MissingDependencyError as e:
        raise MissingDependencyError(f"{why}: {e}") from None


def check_runtime(cfg: Any) -> None:
    """Raise with a clear message when ``cfg`` asks for something this machine lacks."""
    model, par, rollout = cfg.model, cfg.parallel, cfg.rollout
    if model.transformer_impl == "transformer_engine":
        _require("transformer_engine", "model.transformer_impl=transformer_engine")
    if par.sequence_parallel and cuda_capability() is not None:
        _require("transformer_engine", "parallel.sequence_parallel=true on a GPU (Transformer Engine "
                                       "norms)")
    if model.fp8 != "none":
        if model.transformer_impl == "local":
            raise ValueError(f"model.fp8={model.fp8!r} needs Transformer Engine layer specs; "
                             "model.transformer_impl is 'local' (set it to auto or transformer_engine)")
        _require("transformer_engine", f"model.fp8={model.fp8!r}")
        problem = fp8_support_problem(model.fp8, cuda_capability(), te_version())
        if problem:
            raise RuntimeError(problem)
        if model.precision != "bf16":
            raise ValueError(f"model.fp8={model.fp8!r}: expected model.precision=bf16 (FP8 GEMMs with bf16 "
                             f"parameters and loss maths), got {model.precision!r}")
    if rollout.engine == "vllm":
        _require("vllm", "rollout.engine=vllm")
        if model.name != "qwen2_5_vl":
            raise ValueError(f"rollout.engine=vllm: vLLM builds the model from model.hf_path, which needs "
                             f"model.name=qwen2_5_vl (got {model.name!r}); use rollout.engine=megatron")
