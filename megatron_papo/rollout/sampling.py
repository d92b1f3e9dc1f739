"""Next-token sampling on full-vocabulary logits ``[B, V]`` (pure functions, no communication).

Order of the transforms (as vLLM and HF apply them):
    logits[:, :vocab_size]  ->  / temperature  ->  top-k  ->  top-p  ->  softmax  ->  draw
Columns ``>= vocab_size`` (the vocabulary padding of megatron's output layer) are cut off
first, so they are never sampled whatever they hold (even NaN).

Drawing uses the Gumbel-max trick: ``argmax(log p + g)`` with ``g = -log(-log u)``, one uniform
``u`` per (row, column) from the caller's ``torch.Generator``. It is exactly a categorical draw,
deterministic for a given generator state, never picks a ``-inf`` (removed) column, and every
tensor-parallel rank holding the same logits and the same generator draws the same tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_papo.rollout.base import SamplingParams

__all__ = [
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "policy_log_probs",
    "process_logits",
    "sample",
    "sampling_log_probs",
    "truncate_vocab",
]


def truncate_vocab(logits: Tensor, vocab_size: int | None = None) -> Tensor:
    """[B, V_pad] -> [B, vocab_size] float32 (a new tensor; the input is never modified)."""
    if vocab_size is not None:
        if not 1 <= vocab_size <= logits.shape[-1]:
            raise ValueError(f"vocab_size {vocab_size} outside [1, {logits.shape[-1]}] (logits width)")
        logits = logits[..., :vocab_size]
    return logits.float() if logits.dtype != torch.float32 else logits.clone()


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """[B, V] -> logits / temperature (temperature > 0; 1 returns the input unchanged)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (greedy is handled by `sample`), got {temperature}")
    return logits if temperature == 1 else logits / temperature


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """[B, V] -> the same with every column below the k-th largest value set to -inf.

    Columns tied with the k-th value are kept. ``top_k`` of -1 or >= V is a no-op.
    """
    if top_k == -1 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """[B, V] -> nucleus filtering: keep the most likely tokens, in order, while the mass of the
    tokens before them is < top_p; the rest get -inf. The most likely token is always kept.
    ``top_p`` >= 1 is a no-op."""
    if top_p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V], 0 for the top token
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, params: SamplingParams, vocab_size: int | None = None) -> Tensor:
    """[B, V_pad] raw logits -> [B, vocab_size] float32 logits of the sampling distribution
    (temperature, top-k, top-p applied; removed tokens at -inf). Under greedy decoding
    (temperature 0) the result keeps only the argmax column(s)."""
    z = truncate_vocab(logits, vocab_size)
    if params.greedy:
        return z.masked_fill(z < z.max(dim=-1, keepdim=True).values, float("-inf"))
    return apply_top_p(apply_top_k(apply_temperature(z, params.temperature), params.top_k), params.top_p)


def sampling_log_probs(logits: Tensor, params: SamplingParams, vocab_size: int | None = None) -> Tensor:
    """[B, V_pad] -> [B, vocab_size] log-probabilities of the sampling distribution (-inf outside
    its support)."""
    return torch.log_softmax(process_logits(logits, params, vocab_size), dim=-1)


def policy_log_probs(logits: Tensor, tokens: Tensor, vocab_size: int | None = None) -> Tensor:
    """[B, V_pad] logits, [B] tokens -> [B] float32 log-prob of each token under the plain policy
    (temperature 1, no filtering, padded columns excluded)."""
    logp = torch.log_softmax(truncate_vocab(logits, vocab_size), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _gumbel_noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """[*shape] standard Gumbel noise from ``generator`` (finite: u is kept inside (0, 1))."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator,
           vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row.

    Args:
        logits: [B, V_pad] full-vocabulary logits (any float dtype; read only).
        params: temperature / top_k / top_p (the other fields are ignored here).
        generator: source of randomness, on ``logits.device``; advanced by one [B, vocab_size]
            draw per call (also under greedy decoding, so the stream does not depend on it).
        vocab_size: true vocabulary size; columns >= it are never sampled. None = all columns.

    Returns:
        tokens [B] int64 in [0, vocab_size), and their log-probs [B] float32 under the sampling
        distribution (0 for greedy decoding, where the argmax has probability 1; ties in the
        argmax share the mass).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects [B, V] logits, got shape {tuple(logits.shape)}")
    logp = sampling_log_probs(logits, params, vocab_size)
    noise = _gumbel_noise(logp.shape, generator, logp.device)
    if params.greedy:
        tokens = logp.argmax(dim=-1)
    else:
        tokens = (logp + noise).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
