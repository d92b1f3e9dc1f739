"""Model registry: ``ModelConfig.name`` -> a builder of a :class:`VisionLanguageModel`.

    @register_model("tiny_vlm")
    def build_tiny_vlm(cfg, *, vocab_size, image_token_id, pre_process, post_process, vp_stage, seed):
        ...

    model = build_model(cfg.model, vocab_size=len(tokenizer), image_token_id=tok.image_token_id,
                        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())

A builder receives the ``ModelConfig`` (size fields left None mean "the builder's own
defaults") and the tokenizer facts, reads the tensor/pipeline sizes from megatron-core's
parallel_state (initialised by ``megatron_papo.distributed.init_distributed``), and returns the
model part of this rank's pipeline stage. The project's built-in models register themselves
when their module is imported; :func:`build_model` imports them on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from megatron_papo.config import ModelConfig
    from megatron_papo.models.base import VisionLanguageModel

__all__ = ["ModelBuilder", "ModelSpec", "build_model", "get_model_spec", "list_models", "register_model"]

_BUILTIN_MODULES = ("megatron_papo.models.tiny_vlm", "megatron_papo.models.qwen2_5_vl")
"""Modules that register the project's own models when imported."""


class ModelBuilder(Protocol):
    """Signature every registered builder has."""

    def __call__(self, cfg: ModelConfig, *, vocab_size: int, image_token_id: int, pre_process: bool,
                 post_process: bool, vp_stage: int | None, seed: int) -> VisionLanguageModel: ...


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    """Registry key (``ModelConfig.name``)."""
    builder: ModelBuilder
    """Builds this rank's part of the model (see :class:`ModelBuilder`)."""
    description: str
    """First line of the builder's docstring."""


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTINS_LOADED = False


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register ``builder`` under ``name``. A second builder for a name is a ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.builder is not builder:
            raise ValueError(f"model {name!r} is already registered (by {existing.builder!r})")
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelSpec(name=name, builder=builder, description=doc[0] if doc else "")
        return builder

    return decorate


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _BUILTINS_LOADED = True


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ValueError listing the registered names if unknown."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_model(cfg: ModelConfig, *, vocab_size: int, image_token_id: int, pre_process: bool = True,
                post_process: bool = True, vp_stage: int | None = None,
                seed: int = 1234, sequence_parallel: bool = False, first_stage_layers: int | None = None,
                last_stage_layers: int | None = None) -> VisionLanguageModel:
    """Build this rank's part of model ``cfg.name``.

    Args:
        cfg: the model section of the config (None sizes = the builder's defaults).
        vocab_size: the tokenizer's vocabulary size (true size; the model pads it).
        image_token_id: the id of the image placeholder token.
        pre_process / post_process: whether this pipeline stage holds the embedding (and the
            vision encoder) / the output layer.
        vp_stage: virtual pipeline stage (interleaved schedule), None without interleaving.
        seed: seed of the random initialisation (weights are the same for any TP size).
        sequence_parallel: megatron sequence parallelism in the language model (``parallel.
            sequence_parallel``; only when tp > 1). Passed to builders only when True.
        first_stage_layers / last_stage_layers: uneven pipeline stages (``parallel.*``,
            megatron_papo.pipeline_layout); passed to builders only when set.
    Raises:
        ValueError: unknown ``cfg.name`` (the message lists the registered models).
        RuntimeError: megatron-core's parallel state is not initialised.
    """
    spec = get_model_spec(cfg.name)
    extra: dict = {"sequence_parallel": True} if sequence_parallel else {}
    if first_stage_layers is not None:
        extra["first_stage_layers"] = first_stage_layers
    if last_stage_layers is not None:
        extra["last_stage_layers"] = last_stage_layers
    return spec.builder(cfg, vocab_size=vocab_size, image_token_id=image_token_id, pre_process=pre_process,
                        post_process=post_process, vp_stage=vp_stage, seed=seed, **extra)
