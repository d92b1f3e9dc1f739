"""The per-GPU memory planner: architectures (:mod:`.archs`) and the plan (:mod:`.memory`).

    from megatron_papo.planner import PRESETS, RunShape, plan_memory, format_plan

Pure arithmetic over dataclasses (no torch, no megatron-core); ``tools/plan_memory.py`` is its CLI.
"""

from megatron_papo.planner.archs import (
    PRESETS,
    Architecture,
    LanguageArch,
    VisionArch,
    architecture_from_hf_config,
)
from megatron_papo.planner.memory import (
    GIB,
    GPUS,
    MemoryPlan,
    RunShape,
    check_layout,
    format_plan,
    kv_bytes_per_token,
    parse_gpu,
    plan_memory,
    stage_params,
    verdict,
    vllm_weight_bytes,
)

__all__ = [
    "GIB",
    "GPUS",
    "PRESETS",
    "Architecture",
    "LanguageArch",
    "MemoryPlan",
    "RunShape",
    "VisionArch",
    "architecture_from_hf_config",
    "check_layout",
    "format_plan",
    "kv_bytes_per_token",
    "parse_gpu",
    "plan_memory",
    "stage_params",
    "verdict",
    "vllm_weight_bytes",
]
