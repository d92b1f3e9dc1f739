"""Optimizer setup: megatron-core DDP around each model chunk, megatron's Adam(W) optimizer, and
the learning-rate schedule.

    ddp_chunks, optimizer = build_optimizer(model_chunks, cfg.train, cfg.parallel)
    schedule = LrSchedule.from_config(cfg.train)
    for step in ...:
        zero_grads(ddp_chunks, optimizer)
        ... forward / backward through ddp_chunks ...
        finish_grad_sync(ddp_chunks)
        schedule.apply(optimizer)
        ok, grad_norm, _ = optimizer_step(optimizer)
        if ok:
            schedule.advance()

On a machine without Transformer Engine or apex megatron-core falls back to ``torch.optim.AdamW``
(``decoupled_weight_decay=True``, the default), which is what CPU runs use.

Weight decay: megatron-core puts biases and 1-D parameters (norms) in param groups with
``wd_mult=0`` but applies the multiplier only through its own LR scheduler; without that
scheduler every group would decay. :func:`build_optimizer` and :meth:`LrSchedule.apply` set
each group's ``weight_decay = train.weight_decay * wd_mult`` (and ``lr = lr * lr_mult``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_papo.compat import mcore_compat
from megatron_papo.config import ParallelConfig, TrainConfig

__all__ = [
    "LrSchedule",
    "build_optimizer",
    "finish_grad_sync",
    "optimizer_step",
    "set_param_group_hparams",
    "sft_lr_at",
    "zero_grads",
]


def _config_kwargs(config_cls: type, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` restricted to the fields ``config_cls`` (a megatron-core config dataclass) has.

    Keeps the builders below working across megatron-core releases that add or drop optional
    fields; a field that a release lacks then keeps that release's behaviour.
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in kwargs.items() if k in fields}


def _ddp_config(parallel: ParallelConfig) -> Any:
    """megatron-core DistributedDataParallelConfig: fp32 grad reduction, no comm/compute overlap
    (nothing to overlap on CPU/gloo, and it keeps the step synchronous everywhere)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(**_config_kwargs(
        DistributedDataParallelConfig,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    ))


def _optimizer_config(train: TrainConfig, parallel: ParallelConfig, bf16: bool) -> Any:
    """megatron-core OptimizerConfig for Adam with decoupled weight decay (AdamW)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(**_config_kwargs(
        OptimizerConfig,
        optimizer="adam",
        lr=train.lr,
        min_lr=0.0,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=1e-8,
        decoupled_weight_decay=True,
        clip_grad=train.grad_clip,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        bf16=bf16,
        fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    ))


def _transformer_config(chunk: torch.nn.Module) -> Any:
    config = getattr(chunk, "config", None)
    if config is None:
        raise TypeError(f"{type(chunk).__name__} has no `.config` (TransformerConfig): "
                        "build_optimizer needs megatron-core MegatronModule chunks")
    return config


def _check_dtypes(model_chunks: list[torch.nn.Module], bf16: bool) -> None:
    """bf16=True needs bf16 parameters (e.g. a Float16Module-wrapped model), and the reverse."""
    dtypes = {p.dtype for chunk in model_chunks for p in chunk.parameters() if p.requires_grad}
    if bf16 and torch.bfloat16 not in dtypes:
        found = sorted(map(str, dtypes))
        raise ValueError(f"bf16=True but the model has no bf16 parameters (dtypes {found}); "
                         "wrap the chunks in megatron-core's Float16Module first")
    if not bf16 and torch.bfloat16 in dtypes:
        raise ValueError("the model has bf16 parameters: pass bf16=True (fp32 main params in the optimizer)")


def build_optimizer(model_chunks: list[torch.nn.Module], train: TrainConfig, parallel: ParallelConfig,
                    *, bf16: bool = False) -> tuple[list[Any], Any]:
    """Wrap each chunk in megatron-core ``DistributedDataParallel`` and build the optimizer.

    Args:
        model_chunks: the model chunks of this rank (one per virtual pipeline stage), megatron-core
            ``MegatronModule``s; they must already be on their device and in their final dtype.
        train: lr, weight decay, Adam betas and the gradient clip (``grad_clip``, 0 = off).
        parallel: ``use_distributed_optimizer`` shards optimizer state over data-parallel ranks.
        bf16: the chunks hold bf16 parameters; the optimizer keeps fp32 main parameters.

    Returns:
        ``(ddp_chunks, optimizer)``: run forward/backward through ``ddp_chunks``; ``optimizer`` is
        megatron-core's (a ``ChainedOptimizer`` over ``DistributedOptimizer`` /
        ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``). Process groups are taken from
        megatron-core's parallel state (``init_distributed`` must have run).
    """
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer

    mcore_compat.import_megatron_core()
    if not model_chunks:
        raise ValueError("build_optimizer needs at least one model chunk")
    _check_dtypes(model_chunks, bf16)
    ddp_config = _ddp_config(parallel)
    ddp_chunks = [
        DistributedDataParallel(config=_transformer_config(chunk), ddp_config=ddp_config, module=chunk,
                                # as Megatron-LM: one bucket set for the first chunk only
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(model_chunks)
    ]
    optimizer = get_megatron_optimizer(_optimizer_config(train, parallel, bf16), ddp_chunks)
    set_param_group_hparams(optimizer, lr=train.lr, weight_decay=train.weight_decay)
    return ddp_chunks, optimizer


def set_param_group_hparams(optimizer: Any, *, lr: float, weight_decay: float) -> None:
    """Set every param group's ``lr = lr * lr_mult`` and ``weight_decay = weight_decay * wd_mult``
    (megatron-core's per-group multipliers; 1 when a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


@dataclass
class LrSchedule:
    """Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` updates, then constant.

    ``num_steps`` counts the optimizer updates taken so far: update ``i`` (0-based) runs at
    ``lr * min(1, (i + 1) / warmup_steps)`` (megatron-core's warmup, with ``init_lr = 0``).
    PAPO's recipe is a constant 1e-6 (``warmup_steps = 0``).
    """

    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    num_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr < 0 or self.warmup_steps < 0 or self.num_steps < 0:
            raise ValueError(f"LrSchedule needs lr, warmup_steps, num_steps >= 0, got {self}")

    @classmethod
    def from_config(cls, train: TrainConfig) -> LrSchedule:
        return cls(lr=train.lr, warmup_steps=train.warmup_steps, weight_decay=train.weight_decay)

    def lr_at(self, update: int) -> float:
        """Learning rate of the 0-based optimizer update ``update``."""
        if self.warmup_steps > 0 and update < self.warmup_steps:
            return self.lr * (update + 1) / self.warmup_steps
        return self.lr

    @property
    def current_lr(self) -> float:
        """Learning rate of the next update."""
        return self.lr_at(self.num_steps)

    def apply(self, optimizer: Any) -> float:
        """Set every param group of ``optimizer`` for the next update; return its lr."""
        lr = self.current_lr
        set_param_group_hparams(optimizer, lr=lr, weight_decay=self.weight_decay)
        return lr

    def advance(self, updates: int = 1) -> None:
        """Count ``updates`` successful optimizer updates."""
        self.num_steps += updates

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for the trainer state of a checkpoint)."""
        return {"num_steps": self.num_steps, "lr": self.lr, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the update count. ``lr`` and ``warmup_steps`` stay those of the current config,
        so a resumed run may change them."""
        self.num_steps = int(state["num_steps"])


def sft_lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of the 0-based warm-start step ``step`` of ``train.sft_warmup_steps``.

    Linear warmup over ``train.sft_lr_warmup_steps`` steps (step ``i`` at
    ``sft_lr * (i + 1) / warmup``), then ``train.sft_lr_decay``: ``constant`` keeps ``sft_lr``;
    ``cosine`` falls from ``sft_lr`` to ``sft_lr * sft_min_lr_ratio`` at the last step,
    ``lr = min + (sft_lr - min) * (1 + cos(pi * t)) / 2`` with ``t`` = decay step / (decay steps - 1).
    """
    peak, warmup, total = train.sft_lr, train.sft_lr_warmup_steps, train.sft_warmup_steps
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if train.sft_lr_decay == "constant":
        return peak
    span = max(1, total - warmup - 1)
    t = min(1.0, max(0.0, (step - warmup) / span))
    floor = peak * train.sft_min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def zero_grads(ddp_chunks: list[Any], optimizer: Any) -> None:
    """Zero the DDP grad buffers (``param.main_grad``) and the optimizer's grads before a step."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def finish_grad_sync(ddp_chunks: list[Any]) -> None:
    """Reduce gradients over data-parallel ranks (all-reduce, or reduce-scatter with the
    distributed optimizer); call after the last backward of a step."""
    for chunk in ddp_chunks:
        chunk.finish_grad_sync()


class NonFiniteTrainingError(RuntimeError):
    """Too many updates in a row had a non-finite gradient norm or loss
    (``train.max_consecutive_nonfinite``)."""


def _clip_by_total_norm(optimizer: Any, max_norm: float, total_norm: float) -> None:
    """Scale every main gradient by min(1, max_norm / total_norm) (megatron-core's clip, given
    the global norm already computed, so it is not computed twice)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32  # after compat's shims

    accepts_decoupled = "use_decoupled_grad" in inspect.signature(clip_grad_by_total_norm_fp32).parameters
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        params = opt.get_parameters()
        if not params:
            continue
        kwargs = {}
        if accepts_decoupled:
            kwargs["use_decoupled_grad"] = bool(getattr(
                opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))
        clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=total_norm, **kwargs)


def optimizer_step(optimizer: Any, *, loss_finite: bool = True) -> tuple[bool, float, int | None]:
    """One optimizer update (grad-norm clip included) that never applies a non-finite gradient.

    megatron-core checks inf/NaN only when a loss scaler exists (fp16), and clipping by a NaN
    norm is a no-op, so with bf16/fp32 a NaN gradient would reach the weights and the Adam
    moments. Here the global gradient norm (the same number on every rank: it is reduced over
    the model- and data-parallel grad-stats group) decides: when it, or the loss
    (``loss_finite``, also the same on every rank), is not finite, the main gradients are zeroed
    and nothing is stepped.

    Returns ``(update_successful, grad_norm, num_zeros_in_grad)``; ``grad_norm`` is the global
    norm before clipping (inf/NaN when the update was skipped for a non-finite gradient),
    ``num_zeros`` is None unless ``log_num_zeros_in_grad`` is configured.
    """
    found_inf = bool(optimizer.prepare_grads())  # fp16: unscale + megatron-core's own inf check
    norm = optimizer.get_grad_norm()
    grad_norm = math.nan if norm is None else float(norm)
    if found_inf or not math.isfinite(grad_norm) or not loss_finite:
        optimizer.zero_grad()
        return False, grad_norm, None
    clip = float(optimizer.config.clip_grad)
    if clip > 0:
        _clip_by_total_norm(optimizer, clip, grad_norm)
    num_zeros = optimizer.count_zeros() if optimizer.config.log_num_zeros_in_grad else None
    return bool(optimizer.step_with_ready_grads()), grad_norm, num_zeros
