"""The model passes of one RL step: no-grad log-prob passes and the policy update.

All passes run through `schedule.run_microbatches` (megatron-core's pipeline schedules), so they
work for any TP/PP layout; the per-token results live on the last pipeline stage, which is the
only stage that computes the loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.compat import mcore_compat
from megatron_papo.distributed import ProcessGroups, broadcast_object
from megatron_papo.losses import PapoLossConfig, papo_loss, papo_loss_from_hidden
from megatron_papo.models.base import sequence_multiple as config_multiple
from megatron_papo.ops import (
    gather_from_context_parallel,
    global_token_count,
    linear_vocab_parallel_log_probs,
    vocab_parallel_log_probs,
)
from megatron_papo.ops.groups import rank_and_size
from megatron_papo.rollout.megatron_engine import eval_no_grad
from megatron_papo.training.batch import TrainBatch, micro_batch_dicts, pad_columns
from megatron_papo.training.metrics import reduce_step_metrics
from megatron_papo.training.optim import optimizer_step, zero_grads
from megatron_papo.training.schedule import global_mean_loss_scale, run_microbatches


def model_forward(model: torch.nn.Module, mb: Mapping[str, Any]) -> Tensor:
    """One chunk on one micro-batch dict (see batch.micro_batch_dicts); a generation step's dict
    may carry megatron-core's ``inference_context`` (the KV cache, rollout/kv_cache.py)."""
    context = mb.get("inference_context")
    extra = {} if context is None else {"inference_context": context, "runtime_gather_output": True}
    return model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], mb["pixel_values"], **extra)


def two_branch_forward(model: torch.nn.Module, mb: Mapping[str, Any]) -> Tensor:
    """A both-branches micro-batch (batch.micro_batch_dicts(both_branches=True)) as two calls:
    the masked half under no_grad (its output is detached anyway when ``masked_grad`` is off, so
    it keeps no activations and costs no backward), then the original half with a graph; the
    outputs concatenated in the single pass's row order [original; masked]. Single pipeline
    stage only: a stage that receives its input from another runs the [2B] input as one."""
    half = mb["input_ids"].shape[0] // 2
    pixels, masked_pixels = mb["branch_pixel_values"]

    def rows(part: slice) -> tuple[Tensor, Tensor, Tensor]:
        return mb["input_ids"][part], mb["position_ids"][part], mb["attention_mask"][part]

    with torch.no_grad():
        masked = model(*rows(slice(half, None)), masked_pixels)
    return torch.cat([model(*rows(slice(0, half)), pixels), masked], dim=0)


def sequence_multiple(model_chunks: Sequence[torch.nn.Module]) -> int:
    """What a batch's column count must be a multiple of for these (bare or DDP) chunks
    (``models.base.sequence_multiple`` of their language model's config)."""
    from megatron.core.utils import get_model_config

    return config_multiple(get_model_config(model_chunks[0]))


@contextlib.contextmanager
def model_outputs(model_chunks: Sequence[torch.nn.Module], fused_linear: bool) -> Iterator[Tensor | None]:
    """What the chunks return inside: logits [B, S, V_local] (yields None), or with
    ``fused_linear`` the last hidden states [B, S, H] (yields the output weight [V_local, H] of
    this stage, None on stages without the output layer; compat.mcore_compat.output_layer_returns_hidden)."""
    if not fused_linear:
        yield None
        return
    with contextlib.ExitStack() as stack:
        for chunk in model_chunks:
            stack.enter_context(mcore_compat.output_layer_returns_hidden(chunk))
        yield mcore_compat.output_weight(model_chunks[-1])


def output_log_probs(out: Tensor, target: Tensor, tp_group: dist.ProcessGroup | None, vocab_size: int,
                     weight: Tensor | None = None) -> Tensor:
    """Per-token log-probs [B, S] of ``target`` from what the last stage returned: logits
    [B, S, V_local] (``weight`` None), or inside ``model_outputs(..., fused_linear=True)`` the
    hidden states [B, S, H] and the output weight it yielded (no logits formed)."""
    if weight is None:
        return vocab_parallel_log_probs(out, target, tp_group, vocab_size, check_finite=False)
    return linear_vocab_parallel_log_probs(out, weight, target, tp_group, vocab_size, check_finite=False)


def with_temperature(out: Tensor, weight: Tensor | None, temperature: float) -> tuple[Tensor, Tensor | None]:
    """(logits / T, None), or on the fused path (hidden, weight / T): the same scaled logits
    either way (differentiable; identity at T = 1)."""
    if temperature == 1.0:
        return out, weight
    if weight is None:
        return out / temperature, None
    return out, weight / temperature


def compute_log_probs(model_chunks: Sequence[torch.nn.Module], batch: TrainBatch, *, micro_batch_size: int,
                      tp_group: dist.ProcessGroup | None, vocab_size: int, masked_branch: bool = False,
                      cp_group: dist.ProcessGroup | None = None, fused_linear: bool = False,
                      temperature: float = 1.0) -> Tensor | None:
    """No-grad per-token log-probs [R, S] of batch.target (original or masked images), of the
    policy at ``temperature`` (logits / temperature, the reference's log-prob passes).

    Under context parallelism (`cp_group` of size > 1) each rank computes its zigzag shard and
    the [R, S] result is all-gathered over the cp group (a per-token tensor, never logits).
    With ``fused_linear`` the log-probs come from the last hidden states and the output weight
    (ops.linear_vocab_parallel_log_probs): no logits are formed.
    Returns None on pipeline stages other than the last (they never need them).
    """
    cp_rank, cp_size = rank_and_size(cp_group)

    def loss_fn(mb: Mapping[str, Any], out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out_t, weight_t = with_temperature(out, weight, temperature)
        lp = output_log_probs(out_t, mb["target"], tp_group, vocab_size, weight_t)
        return out.new_zeros(()), {"log_probs": gather_from_context_parallel(lp, cp_group, dim=1)}

    padded = pad_columns(batch, sequence_multiple(model_chunks))
    mbs = micro_batch_dicts(padded, micro_batch_size, masked_branch=masked_branch, cp_rank=cp_rank,
                            cp_size=cp_size)
    with eval_no_grad(model_chunks), model_outputs(model_chunks, fused_linear) as weight:
        outs = run_microbatches(model_chunks, mbs, model_forward, loss_fn, forward_only=True,
                                seq_length=padded.seq_length, micro_batch_size=micro_batch_size)
    if not outs:
        return None
    return torch.cat([o["log_probs"].float() for o in outs], dim=0)[:, :batch.seq_length]


def share_from_last_stage(metrics: dict[str, float], pg: ProcessGroups) -> dict[str, float]:
    """Loss metrics exist on the last pipeline stage only; give every stage (rank 0 logs) a copy."""
    if pg.pp_size == 1:
        return metrics
    from megatron.core import parallel_state

    return broadcast_object(metrics, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pg.pp)


def micro_batch_normalisers(row_tokens: Tensor, num_microbatches: int, dp_size: int) -> tuple[Tensor, Tensor]:
    """``loss.token_mean_scope: micro_batch``: the (token, sequence) divisors that make a
    micro-batch's loss share its own masked mean divided by ``num_microbatches * dp_size``.

    The schedule's scaling (dp * M) and the DDP average then leave the gradient of
    ``mean over ranks and micro-batches of (micro-batch masked mean)``: the reference's
    arithmetic. ``row_tokens`` [mbs] counts each whole row's loss tokens (before any
    context-parallel split, so cp ranks agree); an inert micro-batch (no tokens) divides by 1.
    """
    scale = num_microbatches * dp_size
    tokens = row_tokens.sum().clamp(min=1).to(torch.float32) * scale
    seqs = (row_tokens > 0).sum().clamp(min=1).to(torch.float32) * scale
    return tokens, seqs


def papo_update(ddp_chunks: Sequence[torch.nn.Module], optimizer: Any, batch: TrainBatch,
                loss_config: PapoLossConfig, *, micro_batch_size: int, pg: ProcessGroups, vocab_size: int,
                step: int, temperature: float = 1.0) -> dict[str, float]:
    """One optimizer update on `batch` with the PAPO objective; returns reduced metrics.

    Token means are global over the data-parallel ranks and all micro-batches: the loss of each
    micro-batch is its share sum / N_global, scaled by dp * M for megatron-core's schedule and
    DDP averaging (schedule module docstring); with ``loss.token_mean_scope: micro_batch`` each
    micro-batch's own count instead (``micro_batch_normalisers``). The ranks of a context-parallel
    group hold the same rows (N_global counts them once, over the dp group) and each computes the share of its
    zigzag shard; the shares of all dp x cp ranks add up to the global mean. When the masked
    branch needs logits at update time (full KL/entropies, or masked_grad), each micro-batch
    carries both branches and one pipeline pass computes both; with the masked branch detached
    (``masked_grad`` off) and one pipeline stage, its half runs under no_grad
    (:func:`two_branch_forward`). With ``loss_config.fused_linear``
    the chunks return hidden states and the loss multiplies by the output weight tile by tile
    (losses.papo_loss_from_hidden): no logits are formed, forward or backward.
    """
    both = loss_config.masked_in_update
    batch = pad_columns(batch, sequence_multiple(ddp_chunks))
    mbs = micro_batch_dicts(batch, micro_batch_size, both_branches=both, cp_rank=pg.cp_rank,
                            cp_size=pg.cp_size)
    num_tokens = global_token_count(batch.loss_mask, pg.dp)
    num_seqs = global_token_count(batch.loss_mask.any(dim=1), pg.dp)

    def loss_fn(mb: Mapping[str, Any], out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        masked = None
        out, w = with_temperature(out, weight, temperature)
        if both:
            out, masked = out.chunk(2, dim=0)
        n_tok, n_seq = num_tokens, num_seqs
        if loss_config.token_mean_scope == "micro_batch":
            n_tok, n_seq = micro_batch_normalisers(mb["row_tokens"], len(mbs), pg.dp_size)
        kw = dict(config=loss_config, masked_log_probs=mb["masked_log_probs"],
                  ref_log_probs=mb["ref_log_probs"], tp_group=pg.tp, vocab_size=vocab_size, step=step,
                  num_tokens=n_tok, num_seqs=n_seq,
                  row_tokens=mb["row_tokens"] if pg.cp_size > 1 else None, check_finite=False)
        if loss_config.fused_linear:
            return papo_loss_from_hidden(out, w, mb["target"], mb["old_log_probs"], mb["advantages"],
                                         mb["loss_mask"], masked_hidden=masked, **kw)
        return papo_loss(out, mb["target"], mb["old_log_probs"], mb["advantages"], mb["loss_mask"],
                         masked_logits=masked, **kw)

    # both branches, the masked one detached, one stage: its forward runs under no_grad
    split = both and not loss_config.masked_grad and pg.pp_size == 1
    forward = two_branch_forward if split else model_forward
    zero_grads(list(ddp_chunks), optimizer)
    with model_outputs(ddp_chunks, loss_config.fused_linear) as weight:
        outs = run_microbatches(ddp_chunks, mbs, forward, loss_fn, forward_only=False,
                                seq_length=batch.seq_length,
                                micro_batch_size=micro_batch_size * (2 if both else 1),
                                loss_scale=global_mean_loss_scale(pg.dp_size, len(mbs)))
    # the loss is known (and the same) on every rank before the step: it joins the finiteness check
    metrics = reduce_step_metrics(outs, pg.dp_cp, mode="sum") if outs else {}
    metrics = share_from_last_stage(metrics, pg)
    ok, grad_norm, _ = optimizer_step(optimizer, loss_finite=math.isfinite(metrics.get("loss", 0.0)))
    if not ok:
        zero_grads(list(ddp_chunks), optimizer)  # nothing of a skipped update stays in the buffers
    metrics.update(grad_norm=float(grad_norm), update_skipped=float(not ok))
    return metrics
