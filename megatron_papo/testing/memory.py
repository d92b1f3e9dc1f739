"""Measured memory of one training step of the tiny VLM on CPU, by category, for validating
megatron_papo.planner (tests/unit/test_planner.py, tools/plan_memory.py --validate).

CPU torch has no allocator statistics, so each category is read from live objects:

- weights, gradients, optimizer state: bytes of the distinct storages behind the parameters,
  their ``main_grad`` (megatron DDP's gradient buffer) and the optimizer's state and main
  parameters after one optimizer step. Exact.
- activations: bytes of the distinct storages that autograd saves for backward during one
  forward of a micro-batch (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded.
  This is what stays alive between forward and backward; transient buffers freed inside an op
  are not seen (they are small next to the saved set for these layer sizes).
- logits: the [b, s, V/tp] output and its gradient (same size).

Needs a one-rank world (``megatron_papo.distributed.init_distributed()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from megatron_papo.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_papo.models import build_model
from megatron_papo.training.optim import build_optimizer, finish_grad_sync, optimizer_step, zero_grads

__all__ = ["MeasuredMemory", "measure_tiny_vlm_step", "unique_storage_bytes"]


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def unique_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Sum of nbytes over the distinct storages behind ``tensors`` (views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            ptr, nbytes = _storage_key(t)
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
    return sum(seen.values())


@dataclass(frozen=True)
class MeasuredMemory:
    """Bytes per category of one measured step."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def measure_tiny_vlm_step(model_cfg: ModelConfig, *, vocab_size: int, image_token_id: int, micro_batch: int,
                          seq_len: int, distributed_optimizer: bool = True, seed: int = 0,
                          sequence_parallel: bool = False) -> MeasuredMemory:
    """Build the tiny VLM (+ megatron DDP and optimizer) in the current world (any TP/CP layout of
    megatron-core's parallel state), run one forward/backward/optimizer step on random tokens
    with one image per sample, and measure this rank."""

    model = build_model(model_cfg, vocab_size=vocab_size, image_token_id=image_token_id, seed=seed,
                        sequence_parallel=sequence_parallel)
    ddp_chunks, optimizer = build_optimizer([model], TrainConfig(lr=1e-4),
                                            ParallelConfig(use_distributed_optimizer=distributed_optimizer),
                                            bf16=model_cfg.precision == "bf16")
    gen = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens(model.image_size)
    ids = torch.randint(0, image_token_id, (micro_batch, seq_len), generator=gen)
    ids[:, 1:1 + n_img] = image_token_id
    positions = torch.arange(seq_len).expand(micro_batch, seq_len)
    padding = torch.ones(micro_batch, seq_len, dtype=torch.long)
    pixels = torch.randn(micro_batch, 3, *model.image_size, generator=gen)

    params = [p for p in model.parameters()]
    param_ptrs = {_storage_key(p)[0] for p in params}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    zero_grads(ddp_chunks, optimizer)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = ddp_chunks[0](ids, positions, padding, pixels)
    activations = unique_storage_bytes(t for t in saved if _storage_key(t)[0] not in param_ptrs
                                       and t.numel() > 0 and _storage_key(t)[0] != _storage_key(logits)[0])
    saved.clear()
    # [B, S / cp] ids inside this TP rank's vocabulary shard (the measured step needs a loss, not a true one)
    target = torch.randint(0, min(vocab_size, logits.shape[-1]), tuple(logits.shape[:2]), generator=gen)
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None])
    log_probs.mean().backward()
    finish_grad_sync(ddp_chunks)
    ok, _, _ = optimizer_step(optimizer)
    if not ok:
        raise RuntimeError("the measured optimizer step was skipped")

    weights = unique_storage_bytes(params)
    gradients = unique_storage_bytes(getattr(p, "main_grad", None) for p in params)
    state_tensors: list[torch.Tensor] = []
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        state_tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1)
    for group in inner.param_groups:  # main (fp32) parameters that are not the model's own storage
        state_tensors.extend(p for p in group["params"] if _storage_key(p)[0] not in param_ptrs)
    optimizer_bytes = unique_storage_bytes(state_tensors)
    logits_bytes = 2 * logits.numel() * logits.element_size()
    return MeasuredMemory(weights=weights, gradients=gradients, optimizer=optimizer_bytes,
                          activations=activations, logits=logits_bytes)
