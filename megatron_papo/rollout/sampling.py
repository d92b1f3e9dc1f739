"""Next-token sampling on full-vocabulary logits ``[B, V]`` (pure functions, no communication).

Order of the transforms (as vLLM and HF apply them):
    logits[:, :vocab_size]  ->  / temperature  ->  top-k  ->  top-p  ->  softmax  ->  draw
Columns ``>= vocab_size`` (the vocabulary padding of megatron's output layer) are cut off
first, so they are never sampled whatever they hold (even NaN).

Drawing uses the Gumbel-max trick: ``argmax(log p + g)`` with ``g = -log(-log u)``, one uniform
``u`` per (row, column). It is exactly a categorical draw, never picks a ``-inf`` (removed)
column, and every tensor-parallel rank holding the same logits and the same uniforms draws the
same tokens. The uniforms come either from the caller's ``torch.Generator`` (one [B, V] draw per
call: the stream depends on which rows share the batch), or, with :func:`row_keys` /
:func:`counter_uniform`, from a counter-based hash of (row key, decode step, column): then a
row's tokens depend on its own key alone, not on how rows are batched or split over data-parallel
ranks (the trainer keys a row by (seed, its prompt's position in the step's global batch, k)).

The hash is 32-bit integer arithmetic held in int64 and masked after every product, so no
operation overflows (defined on every device): ``lowbias32`` (x ^= x >> 16; x *= 0x7feb352d;
x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16), applied twice around the column mix. The top 23 bits
give ``u = (h + 0.5) / 2^23``, exact in float32 and strictly inside (0, 1) (24 bits would round
the largest to 1.0, whose Gumbel noise is infinite).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_papo.rollout.base import SamplingParams

__all__ = [
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "counter_uniform",
    "policy_log_probs",
    "process_logits",
    "row_keys",
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


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant c, without overflow: the
    product is split at 16 bits of c (each part < 2^48)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _lowbias32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (each bit of x changes about half the output bits)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, rows: Tensor) -> Tensor:
    """[B] int64 32-bit keys of global row ids ``rows`` under ``seed`` (any Python int)."""
    s_lo, s_hi = seed & _MASK32, (seed >> 32) & _MASK32
    x = _lowbias32((rows.to(torch.int64) & _MASK32) ^ s_lo)
    return _lowbias32(x ^ s_hi)


def counter_uniform(keys: Tensor, step: int, num_cols: int) -> Tensor:
    """[B, num_cols] float32 uniforms in (0, 1) of (row key, decode ``step``, column), on the
    keys' device: the same numbers whatever rows share the batch (module doc)."""
    k = _lowbias32(keys.to(torch.int64) ^ (step & _MASK32))  # [B]
    cols = torch.arange(num_cols, device=keys.device, dtype=torch.int64)
    h = _lowbias32(_lowbias32(k[:, None] ^ _mul32(cols, 0x9E3779B9)[None, :]) ^ k[:, None])
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)  # h + 0.5 exact in float32: u < 1


def _gumbel(u: Tensor) -> Tensor:
    return -torch.log(-torch.log(u))


def _gumbel_noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """[*shape] standard Gumbel noise from ``generator`` (finite: u is kept inside (0, 1))."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           vocab_size: int | None = None, *, uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row.

    Args:
        logits: [B, V_pad] full-vocabulary logits (any float dtype; read only).
        params: temperature / top_k / top_p (the other fields are ignored here).
        generator: source of randomness, on ``logits.device``; advanced by one [B, vocab_size]
            draw per call (also under greedy decoding, so the stream does not depend on it).
            None when ``uniform`` is given.
        vocab_size: true vocabulary size; columns >= it are never sampled. None = all columns.
        uniform: [B, vocab_size] uniforms in (0, 1) to draw with instead of the generator
            (:func:`counter_uniform`: per-row streams).

    Returns:
        tokens [B] int64 in [0, vocab_size), and their log-probs [B] float32 under the sampling
        distribution (0 for greedy decoding, where the argmax has probability 1; ties in the
        argmax share the mass).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects [B, V] logits, got shape {tuple(logits.shape)}")
    logp = sampling_log_probs(logits, params, vocab_size)
    if (generator is None) == (uniform is None):
        raise ValueError("sample needs exactly one of generator and uniform")
    if uniform is not None:
        if uniform.shape != logp.shape:
            raise ValueError(f"uniform has shape {tuple(uniform.shape)}, logits {tuple(logp.shape)}")
        noise = _gumbel(uniform.to(logp.device))
    else:
        noise = _gumbel_noise(logp.shape, generator, logp.device)
    if params.greedy:
        tokens = logp.argmax(dim=-1)
    else:
        tokens = (logp + noise).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
