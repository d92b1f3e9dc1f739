"""Rollouts: sample responses for prompts (+ images) with the policy.

    RolloutEngine            the protocol every engine implements (generate, sync_weights, release/resume)
    MegatronRolloutEngine    generation with the training model (megatron-core, any TP, CPU or GPU)
    vllm_engine              VLLMRolloutEngine: colocated vLLM (GPU), weight sync from the exporter
    SamplingParams, RolloutRequest, RolloutResult, PaddedRollout   the data that crosses the interface
    sampling                 temperature / top-k / top-p / Gumbel-max sampling on [B, V] logits
"""

from megatron_papo.rollout.base import (
    FinishReason,
    PaddedRollout,
    RolloutEngine,
    RolloutRequest,
    RolloutResult,
    SamplingParams,
    position_ids_from_mask,
)
from megatron_papo.rollout.megatron_engine import ForwardFn, MegatronRolloutEngine, gpt_forward_fn

__all__ = [
    "FinishReason",
    "ForwardFn",
    "MegatronRolloutEngine",
    "PaddedRollout",
    "RolloutEngine",
    "RolloutRequest",
    "RolloutResult",
    "SamplingParams",
    "gpt_forward_fn",
    "position_ids_from_mask",
]
