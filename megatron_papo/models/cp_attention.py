"""Context-parallel core attention for megatron-core layer specs, by all-gathering keys and values.

Under context parallelism (``parallel.cp = c > 1``) every rank of the cp group holds a zigzag
shard of each sequence: chunks ``r`` and ``2c-1-r`` of ``2c`` (``ops.context_parallel``). The
queries stay local; keys and values are all-gathered over the cp group and put back in token
order, so each rank attends from its ``S / c`` queries to all ``S`` keys with the rows of the
full mask that belong to its queries (``[B, 1, S / c, S]``, made by the model; see
``VisionLanguageModel.lm_attention_mask``). The backward of the gather sums the key/value
gradients of all ranks and keeps this rank's shard (``gather_from_context_parallel(...,
sum_grads=True)``): each rank's loss is its own tokens' share, the total is their sum.

Memory: keys/values of the whole sequence ([S, B, n_kv, d], small next to the MLP's
activations) and the [B, n, S / c, S] scores of the local queries. The softmax is
megatron-core's own (``DotProductAttention``), so values equal the unsharded layer's up to the
order of floating-point sums. This is the all-gather flavour of context parallelism (one of
Transformer Engine's ``cp_comm_type`` choices); it takes arbitrary masks, which Transformer
Engine's fused context-parallel kernels do not (they need packed THD sequences), and it runs on
CPU with gloo. It is what ``language_layer_spec(impl, cp)`` puts in both the local and the
Transformer Engine layer specs when ``cp > 1``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_papo.ops.context_parallel import gather_from_context_parallel

__all__ = ["AllGatherContextParallelAttention"]


class AllGatherContextParallelAttention(DotProductAttention):
    """``DotProductAttention`` over zigzag-sharded sequences (module docstring).

    Same constructor as megatron-core's ``DotProductAttention``. The mask is always used as
    given (``AttnMaskType.arbitrary``): under context parallelism it is not square.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None) -> None:
        # the parent refuses cp > 1 (it knows no sharded sequences); it is given a copy that
        # says 1, and this class does the context-parallel part around its forward.
        local_config = copy.copy(config)
        local_config.context_parallel_size = 1
        super().__init__(local_config, layer_number, AttnMaskType.arbitrary, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         pg_collection=pg_collection)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None:
            from megatron.core import parallel_state

            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group: dist.ProcessGroup = cp_group

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: Any = None) -> Tensor:
        """query/key/value: [S / c, B, n, d] (key/value with n_kv heads) this rank's zigzag shard;
        attention_mask: [B or 1, 1, S / c, S] bool, True = masked out. Returns [S / c, B, n * d]."""
        if attention_mask is None:
            raise ValueError("context-parallel attention needs an explicit [B, 1, S/cp, S] mask "
                             "(VisionLanguageModel.lm_attention_mask makes it)")
        key = gather_from_context_parallel(key, self.cp_group, dim=0, sum_grads=True)
        value = gather_from_context_parallel(value, self.cp_group, dim=0, sum_grads=True)
        if attention_mask.shape[-2] != query.shape[0] or attention_mask.shape[-1] != key.shape[0]:
            raise ValueError(f"context-parallel attention: mask {tuple(attention_mask.shape)} does not "
                             f"fit {query.shape[0]} local queries and {key.shape[0]} keys")
        return super().forward(query, key, value, attention_mask, attention_bias=attention_bias,
                                packed_seq_params=packed_seq_params)
