"""The fused PAPO token statistics: every per-token quantity the PAPO loss needs, in one pass.

PAPO compares the policy on the original image (logits z_p) with the policy on the masked image
(logits z_q) at the same response tokens. ``papo_token_stats`` reads both logit tensors once,
chunk by chunk, and returns the five per-token statistics below from one autograd Function, so
the loss may combine any subset of them (unused outputs contribute no gradient). The maths, the
collectives and the backward formulas are documented in ``megatron_papo.ops.vocab_parallel``.

Two implementations give the same results (within fp32 rounding):
- ``"torch"``: ``vocab_parallel.VocabParallelStats``, token-chunked torch ops (any device, float64 too);
- ``"triton"``: ``triton_papo.TritonPapoStats``, one Triton kernel per pass that reads each logit once
  forward and once backward (CUDA; or CPU under TRITON_INTERPRET=1 for tests).
``impl="auto"`` picks triton for CUDA fp32/bf16/fp16 logits when triton imports, else torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.compat.optional_deps import have_triton, require
from megatron_papo.ops.vocab_parallel import VocabParallelStats, _check_logits, _check_pair, _check_target

OpImpl = Literal["auto", "torch", "triton"]
OP_IMPLS: tuple[str, ...] = ("auto", "torch", "triton")

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, logits: Tensor, masked_logits: Tensor) -> str:
    """"torch" or "triton" for ``impl`` in OP_IMPLS and these inputs.

    "auto" -> "triton" when both tensors are CUDA fp32/bf16/fp16 and triton imports, else "torch".
    "triton" -> raises megatron_papo.compat.mcore_compat.MissingDependencyError (with an install hint) when
    triton is absent.
    """
    if impl not in OP_IMPLS:
        raise ValueError(f"impl must be one of {list(OP_IMPLS)}, got {impl!r}")

    if impl == "triton":
        require("triton")
        return "triton"
    if impl == "auto" and logits.is_cuda and all(x.dtype in _TRITON_DTYPES for x in (logits, masked_logits)):
        return "triton" if have_triton() else "torch"
    return "torch"


@dataclass
class PapoTokenStats:
    """Per-token statistics; every field has shape ``logits.shape[:-1]``, dtype float32."""

    log_probs: Tensor
    """log p(y_t): the sampled token's log-prob on the original-image branch."""
    masked_log_probs: Tensor
    """log q(y_t): the same token's log-prob on the masked-image branch."""
    kl: Tensor
    """KL(p || q) over the full vocabulary (the exact implicit perception term)."""
    entropy: Tensor
    """H(p), full-vocabulary entropy of the original-image branch."""
    masked_entropy: Tensor
    """H(q), full-vocabulary entropy of the masked-image branch."""


def papo_token_stats(logits: Tensor, masked_logits: Tensor, target: Tensor,
                     tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None, *,
                     chunk_size: int | None = None, check_finite: bool = True,
                     impl: OpImpl = "auto") -> PapoTokenStats:
    """log p(y), log q(y), KL(p||q), H(p), H(q) for p = softmax(logits), q = softmax(masked_logits).

    Args:
        logits: [..., V_local] original-image logits, this rank's contiguous vocabulary slice
            (rank r holds global columns [r*V_local, (r+1)*V_local)); fp32, bf16 or fp16.
        masked_logits: [..., V_local] masked-image logits, same layout. Receives a gradient only
            if it requires grad (detach it for the reference code's no-grad masked branch).
        target: [...] integer GLOBAL token ids in [0, vocab_size).
        tp_group: tensor-parallel group; None = vocabulary not sharded.
        vocab_size: true vocabulary size when the model pads it (default V_local * tp); padded
            columns count as probability 0 and get gradient 0.
        chunk_size: tokens per chunk (default keeps a chunk's fp32 scratch under ~128 MiB).
        check_finite: one host sync validating NaN/+inf logits, rows that are -inf everywhere and the
            target range; pass False on GPU to avoid the sync (invalid inputs then give garbage).
        impl: "torch", "triton" (fused kernels; chunk_size is then unused) or "auto" (see
            ``resolve_impl``).
    Returns:
        PapoTokenStats, each field [...] = logits.shape[:-1], float32.

    Collectives (TP > 1): all-reduce MAX [2, T], all-reduce SUM [7, T]; none in backward.
    """
    _check_logits("logits", logits)
    _check_pair(logits, masked_logits, ("logits", "masked_logits"))
    _check_target(target, logits)
    lead = logits.shape[:-1]
    flat = [x.reshape(-1, x.shape[-1]) for x in (logits, masked_logits)]
    if resolve_impl(impl, logits, masked_logits) == "triton":
        from megatron_papo.ops.triton_papo import papo_token_stats_triton  # triton: optional, GPU only

        outs = papo_token_stats_triton(flat[0], flat[1], target.reshape(-1), tp_group, vocab_size,
                                       check_finite=check_finite)
    else:
        outs = VocabParallelStats.apply(flat[0], flat[1], target.reshape(-1), tp_group, vocab_size,
                                        chunk_size, check_finite, ("logits", "masked_logits"))
    logp, logq, kl, h_p, h_q = (o.view(lead) for o in outs)
    return PapoTokenStats(log_probs=logp, masked_log_probs=logq, kl=kl, entropy=h_p, masked_entropy=h_q)
