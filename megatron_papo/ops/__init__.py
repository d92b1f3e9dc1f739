"""Vocabulary-parallel and context-parallel ops (pure torch; no megatron-core import).

    vocab_parallel_log_probs(logits, target, tp_group=None, vocab_size=None)   -> logits.shape[:-1]
    vocab_parallel_entropy(logits, tp_group=None, vocab_size=None)             -> logits.shape[:-1]
    vocab_parallel_kl(logits_p, logits_q, tp_group=None, vocab_size=None)      -> KL(p || q)
    papo_token_stats(logits, masked_logits, target, tp_group=None, vocab_size=None) -> PapoTokenStats

From the output layer's input instead of its logits (never materialised; ops/fused_linear.py):

    linear_papo_token_stats(hidden, masked_hidden, weight, target, tp_group=None, vocab_size=None)
    linear_vocab_parallel_log_probs(hidden, weight, target, tp_group=None, vocab_size=None)
    linear_vocab_parallel_log_probs_entropy(hidden, weight, target, ...)  -> (log_probs, entropy)
"""

from megatron_papo.ops.context_parallel import (
    gather_from_context_parallel,
    global_token_count,
    masked_token_mean,
    pad_to_multiple,
    zigzag_merge,
    zigzag_split,
)
from megatron_papo.ops.fused import PapoTokenStats, papo_token_stats
from megatron_papo.ops.fused_linear import (
    linear_papo_token_stats,
    linear_vocab_parallel_log_probs,
    linear_vocab_parallel_log_probs_entropy,
)
from megatron_papo.ops.vocab_parallel import (
    default_chunk_size,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
)

__all__ = [
    "PapoTokenStats",
    "default_chunk_size",
    "gather_from_context_parallel",
    "global_token_count",
    "linear_papo_token_stats",
    "linear_vocab_parallel_log_probs",
    "linear_vocab_parallel_log_probs_entropy",
    "masked_token_mean",
    "pad_to_multiple",
    "papo_token_stats",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_log_probs",
    "zigzag_merge",
    "zigzag_split",
]
