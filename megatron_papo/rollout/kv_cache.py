"""The KV cache of one generation batch: megatron-core's ``StaticInferenceContext`` plus the
three things RL rollouts need that it does not do.

megatron-core (0.16.1 and 0.19.x) owns the cache itself: ``GPTModel.forward(...,
inference_context=ctx)`` allocates ``[max_sequence_length, max_batch_size, kv_hidden]`` key and
value buffers per layer on first use, writes each forward's keys/values at
``ctx.sequence_len_offset``, attends over everything written so far, and returns only the last
position's logits (``materialize_only_last_token_logits``). What this module adds, and why:

1. **Per-row key padding.** Rows are left-padded to a common prompt length. megatron-core's
   static decoding switches the attention to ``no_mask`` after the prefill, so a left-padded row
   would attend to its pad keys. We pass an explicit bool mask instead: ``[B, 1, P, P]`` (causal
   and padded keys) for the prefill, ``[B, 1, 1, S]`` (padded keys) for each decoded token.
   megatron-core's local attention applies a given mask whatever the mask type; Transformer
   Engine's fused attention honours the type and would ignore it, so TE specs fall back to the
   recompute path (``rollout.kv_cache`` has no effect there, see docs/ARCHITECTURE.md).
2. **mrope positions during decode.** Both models use multimodal rope (3-D positions). With a
   static context megatron-core slices the rope table by *column* (``[offset:offset + 1]`` for
   the query, ``[:offset + 1]`` for the keys), but builds an mrope table only for the positions
   it is given; given one new token's positions the slice is empty. So every decode forward gets
   the positions of the whole sequence so far (``positions``: the prefill's 3-D positions, then
   +1 per generated token, which is Qwen2.5-VL's rule for text after the prompt).
3. **Rows that finish, and groups that share a prompt.** ``select(index)`` re-indexes the batch:
   dropping finished rows, and turning the prefill of each distinct prompt into its group's n
   rows (the prompt and its images go through the model once per prompt, not once per
   response). megatron-core's ``swap_key_value_dict`` only permutes (it asserts an index as long
   as the batch), so the buffers are indexed directly, the masks and positions alongside.

The cache lives for one batch: it is created before the prefill and dropped with the batch, so
its memory is free again before the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["KVCache", "kv_cache_bytes_per_token"]


@dataclass
class KVCache:
    """A batch's KV cache (see the module docstring); made by :meth:`create`."""

    context: Any
    """megatron-core's ``StaticInferenceContext`` (holds the key/value buffers and the offset)."""
    key_padding: Tensor | None = None
    """[B, S] bool, True at padded (never attended) keys; None before the prefill."""
    positions: Tensor | None = None
    """[3, B, S] int64 rope positions of every cached token; None before the prefill."""

    @classmethod
    def create(cls, max_batch_size: int, max_sequence_length: int) -> KVCache:
        """An empty cache for at most ``max_batch_size`` rows of ``max_sequence_length`` tokens."""
        from megatron.core.inference.contexts import StaticInferenceContext  # after compat's shims

        context = StaticInferenceContext(max_batch_size, max_sequence_length)
        context.materialize_only_last_token_logits = True  # some releases default to all positions
        return cls(context)

    @property
    def offset(self) -> int:
        """Tokens per row already in the cache."""
        return int(self.context.sequence_len_offset)

    @property
    def is_prefill(self) -> bool:
        return self.key_padding is None

    def prefill_inputs(self, attention_mask: Tensor, positions: Tensor) -> Tensor:
        """Record the prompt's padding [B, P] and 3-D positions [3, B, P]; the prefill's attention
        mask [B, 1, P, P] (True = masked out: a future or padded key)."""
        p = attention_mask.shape[1]
        self.key_padding = ~attention_mask.bool()
        self.positions = positions
        causal = torch.ones(p, p, dtype=torch.bool, device=attention_mask.device).triu(1)
        return causal[None, None] | self.key_padding[:, None, None, :]

    def decode_inputs(self, new_tokens: int = 1) -> tuple[Tensor, Tensor]:
        """Positions [3, B, S + new] of the whole sequence with ``new_tokens`` more (one past each
        row's last), and the decode mask [B, 1, new, S + new] (padded keys; causal among the new)."""
        assert self.positions is not None and self.key_padding is not None, "prefill first"
        last = self.positions[:, :, -1:]
        step = torch.arange(1, new_tokens + 1, device=last.device)
        self.positions = torch.cat([self.positions, last + step], dim=2)
        self.key_padding = torch.nn.functional.pad(self.key_padding, (0, new_tokens), value=False)
        s = self.key_padding.shape[1]
        future = torch.ones(new_tokens, s, dtype=torch.bool, device=last.device).triu(s - new_tokens + 1)
        return self.positions, future[None, None] | self.key_padding[:, None, None, :]

    def advance(self, tokens: int) -> None:
        """After a forward of ``tokens`` positions per row: later ones go after them."""
        self.context.sequence_len_offset += tokens
        self.context.enable_decode_mode()

    def select(self, index: Tensor) -> None:
        """Row i of the batch becomes row ``index[i]`` of the current one: fewer rows (finished
        ones leave) or more (a prompt's prefill copied to its group's rows)."""
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in list(memory.items()):
            rows = index.to(keys.device)
            memory[layer] = (keys.index_select(1, rows), values.index_select(1, rows))
        self.context.max_batch_size = max(self.context.max_batch_size, int(index.numel()))
        self._index(index)

    def _index(self, rows: Tensor) -> None:
        if self.key_padding is not None:
            self.key_padding = self.key_padding[rows.to(self.key_padding.device)]
        if self.positions is not None:
            self.positions = self.positions[:, rows.to(self.positions.device)]


def kv_cache_bytes_per_token(config: Any, num_local_layers: int, tp_size: int) -> int:
    """Bytes one row's cache takes per token on this rank: keys and values of each local layer,
    ``num_query_groups / tp`` heads of ``kv_channels`` each, in the model's parameter dtype."""
    groups = config.num_query_groups or config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=config.params_dtype).element_size()
    return 2 * num_local_layers * max(1, groups // tp_size) * head_dim * element
