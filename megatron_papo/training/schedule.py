"""Micro-batched forward (and backward) passes through megatron-core's pipeline schedules.

Every pass over a batch, the no-grad log-prob passes and the update alike, goes through
`run_microbatches`, so pipeline parallelism (1F1B, interleaved) works unchanged:

    outs = run_microbatches(chunks, micro_batches, forward_fn, loss_fn, forward_only=True, ...)

`forward_fn(model, mb)` runs one chunk on one micro-batch and returns its output tensor (the
logits on the last stage, hidden states elsewhere: the model reads its pipeline input from
`set_input_tensor`). `loss_fn(mb, output)` runs on the last stage only and returns
`(loss, metrics)`; the metrics dicts of all micro-batches come back on the last stage (empty
list elsewhere).

Loss scaling. With a 2-tuple loss, megatron-core's schedule multiplies each micro-batch loss by
cp / M (M micro-batches) and its DDP averages gradients over dp * cp ranks, so the gradient is
that of sum_{ranks, micro-batches} loss / (dp * M). A loss that is already this rank's share of
a global mean (normalised by the global token count) must therefore be scaled by dp * M:
`global_mean_loss_scale(dp_size, num_microbatches)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

ForwardFn = Callable[[torch.nn.Module, Mapping[str, Any]], Tensor]
LossFn = Callable[[Mapping[str, Any], Tensor], tuple[Tensor, dict[str, Tensor]]]


def global_mean_loss_scale(dp_size: int, num_microbatches: int) -> float:
    """Factor that turns per-rank shares of a global mean into the right gradient (module doc)."""
    return float(dp_size * num_microbatches)


def configure_model_for_schedule(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Point the model config at megatron-core's grad finalisation (DDP sync, embedding sync).

    Needed once after wrapping in megatron-core DDP: the schedule then calls
    `finalize_model_grads` after the last backward, which finishes the data-parallel gradient
    reduction and the tied-embedding all-reduce across pipeline stages.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    if all(hasattr(chunk, "no_sync") for chunk in model_chunks):
        no_sync = [chunk.no_sync for chunk in model_chunks]  # one per virtual stage (interleaved)
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def run_microbatches(model_chunks: Sequence[torch.nn.Module], micro_batches: Sequence[Mapping[str, Any]],
                     forward_fn: ForwardFn, loss_fn: LossFn, *, forward_only: bool, seq_length: int,
                     micro_batch_size: int, loss_scale: float = 1.0) -> list[dict[str, Tensor]]:
    """Run every micro-batch through the pipeline schedule; return the loss_fn metrics (last stage).

    Args:
        model_chunks: the model (one chunk, or one per virtual pipeline stage), DDP-wrapped for
            training or bare for forward-only passes.
        micro_batches: dicts of tensors, each with `micro_batch_size` rows and `seq_length`
            positions (pipeline p2p buffers are [seq_length, micro_batch_size, hidden]).
        forward_fn, loss_fn: see the module docstring.
        forward_only: no backward (log-prob passes); wrap the call in torch.no_grad().
        loss_scale: multiplies each micro-batch loss before backward (`global_mean_loss_scale`).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[Tensor, Callable]:
        mb = next(data_iterator)
        output = forward_fn(model, mb)

        def loss_func(output_tensor: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            loss, metrics = loss_fn(mb, output_tensor)
            return loss * loss_scale, metrics

        return output, loss_func

    chunks = list(model_chunks)
    real = len(micro_batches)
    if len(chunks) > 1:
        micro_batches, loss_scale = _fit_interleaved_schedule(chunks, list(micro_batches), loss_scale)
    inert = {id(mb) for mb in micro_batches[real:]}

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[Tensor, Callable]:
        mb = next(data_iterator)
        if id(mb) not in inert:
            return forward_step(iter([mb]), model)
        output = forward_fn(model, mb)  # a repeat that fills the interleaved schedule: no loss
        return output, lambda out: (out.sum() * 0.0, {})

    # one iterator per virtual stage: each chunk walks the same micro-batches
    data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=data,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return list(out or [])[:real]  # the last stage stores them in micro-batch order; repeats last


def _fit_interleaved_schedule(chunks: Sequence[torch.nn.Module], micro_batches: list[Mapping[str, Any]],
                              loss_scale: float) -> tuple[list[Mapping[str, Any]], float]:
    """The interleaved schedule runs micro-batches in groups of N per virtual stage, pp <= N <= M,
    and M % N must be 0 or >= pp. Use N = pp when M is a multiple of pp, else N = M; with M < pp,
    repeat the last micro-batch up to pp (those repeats carry no loss) and scale the loss by
    M_padded / M, since the schedule divides each loss by the number of micro-batches."""
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])
    pp = config.pipeline_model_parallel_size
    real = len(micro_batches)
    if real < pp:
        micro_batches = micro_batches + [dict(micro_batches[-1]) for _ in range(pp - real)]
        loss_scale *= len(micro_batches) / real
    group = pp if len(micro_batches) % pp == 0 else len(micro_batches)
    for chunk in chunks:
        get_model_config(chunk).microbatch_group_size_per_vp_stage = group
    return micro_batches, loss_scale
