"""The config tree: one dataclass per section, a docstring under each field, the algorithm presets.

``PapoConfig`` is the root; ``ALGORITHM_PRESETS`` fill the ``loss:`` fields of ``algorithm.name``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_papo.errors import UserError
from megatron_papo.losses.papo import PapoLossConfig
from megatron_papo.masking import MaskingConfig
from megatron_papo.rewards import RewardConfig


class ConfigError(ValueError, UserError):
    """A config file or override is wrong; the message names the source, the key and the fix."""


AlgorithmName = Literal["grpo", "dapo", "papo_g", "papo_d"]

# Loss fields and the DAPO filter per algorithm (PAPO_SPEC.md "Defaults that the paper reports").
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"loss": dict(gamma=0.0, entropy_coef_orig=0.0, entropy_coef_mask=0.0, ref_kl_coef=0.01,
                          clip_ratio_low=0.2, clip_ratio_high=0.3),
             "algorithm": dict(group_filter=False)},
    "dapo": {"loss": dict(gamma=0.0, entropy_coef_orig=0.0, entropy_coef_mask=0.0, ref_kl_coef=0.0,
                          clip_ratio_low=0.2, clip_ratio_high=0.28),
             "algorithm": dict(group_filter=True)},
    "papo_g": {"loss": dict(gamma=0.02, entropy_coef_orig=0.05, entropy_coef_mask=0.05, ref_kl_coef=0.01,
                            clip_ratio_low=0.2, clip_ratio_high=0.3),
               "algorithm": dict(group_filter=False)},
    "papo_d": {"loss": dict(gamma=0.01, entropy_coef_orig=0.03, entropy_coef_mask=0.03, ref_kl_coef=0.0,
                            clip_ratio_low=0.2, clip_ratio_high=0.28),
               "algorithm": dict(group_filter=True)},
}


@dataclass
class ModelConfig:
    """Which model to build and its sizes (sizes None = the registry entry's own defaults)."""

    name: str = "tiny_vlm"
    """Registry key of the model builder (e.g. tiny_vlm, qwen2_5_vl)."""
    hf_path: str | None = None
    """Hugging Face folder to read the architecture (and, via conversion, weights) from."""
    num_layers: int | None = None
    """Transformer layers of the language model."""
    hidden_size: int | None = None
    """Hidden size of the language model."""
    num_attention_heads: int | None = None
    """Query heads of the language model."""
    num_query_groups: int | None = None
    """Key/value heads (GQA); None = num_attention_heads."""
    ffn_hidden_size: int | None = None
    """MLP inner size."""
    vocab_size: int | None = None
    """True vocabulary size (the embedding is padded to a multiple of make_vocab_size_divisible_by * tp)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding granule (Megatron convention), times tp."""
    seq_length: int = 1024
    """Maximum total tokens (prompt + response) of one sample."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter / compute dtype. CPU runs use fp32; GPU runs bf16."""
    fp8: Literal["none", "delayed", "current", "blockwise"] = "none"
    """FP8 recipe through Transformer Engine (GPU only); the loss maths never runs in FP8."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer specs: auto = Transformer Engine when it imports, else megatron-core local specs."""
    recompute_activations: bool = False
    """Full activation recomputation in the transformer layers."""
    freeze_vision_tower: bool = False
    """Train the language model only: the vision encoder (and its projector / patch merger) keeps
    its initial weights (no gradients, no optimizer state for it)."""
    image_size: int | None = None
    """Fixed resolution: images are resized to image_size x image_size before the vision encoder
    (None = the model's default: 64 for tiny_vlm; dynamic resolution for qwen2_5_vl, where a
    fixed size must be a multiple of 28)."""
    patch_size: int | None = None
    """tiny_vlm only: ViT patch side (must divide image_size); (image_size / patch_size)^2 image
    tokens per image (None = 16: 16 tokens for 64x64 images)."""
    vision_hidden_size: int | None = None
    """tiny_vlm only: ViT width (None = 64; divisible by the ViT's 4 heads and by tp)."""
    vision_num_layers: int | None = None
    """tiny_vlm only: ViT depth (None = 2)."""
    min_pixels: int | None = None
    """qwen2_5_vl dynamic resolution: smallest image area after resizing (None = 56*56)."""
    max_pixels: int | None = None
    """qwen2_5_vl dynamic resolution: largest image area after resizing (None = 28*28*1280, i.e.
    at most 1280 image tokens per image)."""
    tokenizer: str = "auto"
    """auto: the model's own (tiny_vlm: the easy-VQA word tokenizer; qwen2_5_vl: the Hugging Face
    tokenizer in hf_path); easy_vqa: the project's easy-VQA word tokenizer; or a folder with a
    Hugging Face tokenizer."""


@dataclass
class ParallelConfig:
    """Model parallel sizes; data parallel = world_size / (tp * pp * cp)."""

    tp: int = 1
    """Tensor parallel size (the vocabulary is split over these ranks too)."""
    pp: int = 1
    """Pipeline parallel size."""
    cp: int = 1
    """Context parallel size: every sequence split zigzag over these ranks (models.cp_attention);
    its ranks hold the same rows, so data parallel = world / (tp * pp * cp)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None = off."""
    first_stage_layers: int | None = None
    """Language-model layers on the first pipeline stage (it also holds the embedding and the
    vision tower, so fewer is common); the other stages share the rest evenly. None = even split
    (pp must then divide the layer count). megatron-core's num_layers_in_first_pipeline_stage."""
    last_stage_layers: int | None = None
    """Language-model layers on the last pipeline stage (it also holds the output layer and the
    loss); None = even share. megatron-core's num_layers_in_last_pipeline_stage."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside TP (tp > 1): the language model's activations outside the
    TP regions are split along the sequence. GPU: needs Transformer Engine's norms; CPU: torch norms
    (mcore_compat patch)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (gloo or NCCL, the default group and megatron-core's groups alike)
    waits for the other ranks before it fails: a rank that hangs (stopped, deadlocked, a stuck
    file system) then ends the whole job within about this time instead of holding every other
    rank. Keep it above the longest legitimate wait (a checkpoint save, the first step's
    compile, a slow rollout on another rank)."""


@dataclass
class AlgorithmConfig:
    """The RL algorithm: preset name and advantage / filter settings."""

    name: AlgorithmName = "papo_g"
    """grpo, dapo, papo_g or papo_d: fills `loss:` fields and group_filter (explicit values win)."""
    group_filter: bool = False
    """DAPO online filter: keep groups whose mean accuracy lies in (filter_low, filter_high)."""
    filter_low: float = 0.01
    """Lower bound (exclusive) of a kept group's mean accuracy."""
    filter_high: float = 0.99
    """Upper bound (exclusive) of a kept group's mean accuracy."""
    max_sampling_rounds: int = 20
    """DAPO dynamic sampling (group_filter only): generate up to this many rounds of
    rollout.prompts_per_step prompts until that many groups survive the filter, then train on
    exactly that many (the first ones, in stream order); a step still short after the last round
    trains on what it has (metrics filter/trained_groups, filter/sampling_rounds). 1 = one round,
    no refill (groups are only dropped). The reference's max_try_make_batch is 20."""
    norm_adv_by_std: bool = True
    """GRPO: divide (r - mean) by the group std; False = Dr. GRPO style r - mean."""


@dataclass
class RolloutConfig:
    """Response sampling."""

    engine: Literal["megatron", "vllm"] = "megatron"
    """megatron: built-in generation (any machine); vllm: colocated vLLM (GPU, extra [gpu])."""
    n: int = 5
    """Responses per prompt (the GRPO group size)."""
    prompts_per_step: int = 16
    """Prompts sampled per RL step (the rollout batch)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 0.99
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Top-k sampling; -1 = off."""
    max_new_tokens: int = 256
    """Response length limit."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the tokenizer's end-of-sequence always stops)."""
    kv_cache: bool = True
    """megatron engine: decode with a KV cache (megatron-core's inference context; each prompt
    prefilled once, then one token-forward per new token). False = recompute the whole sequence
    every step (the reference path). Layouts that cannot cache (context or sequence parallel,
    Transformer Engine specs) recompute whatever this says."""
    max_batch_size: int | None = None
    """megatron engine: rows (prompts x n) decoded together; None = the whole rollout at once."""
    kv_cache_gb: float = 0.0
    """megatron engine: cap the rows decoded together so their KV cache (rows x (longest prompt +
    max_new_tokens) x layers x 2 x kv heads x head dim x dtype) fits in this many GiB; 0 = no cap."""
    gpu_memory_utilization: float = 0.5
    """vLLM only: share of GPU memory for weights + KV cache while generating."""
    vllm_max_model_len: int | None = None
    """vLLM only: prompt + response token limit; None = data.max_prompt_length + max_new_tokens."""
    vllm_enforce_eager: bool = False
    """vLLM only: no CUDA graphs (slower decoding, faster start, less memory)."""
    vllm_max_images_per_prompt: int = 0
    """vLLM only: images one prompt may carry (limit_mm_per_prompt); 0 = the training data's maximum."""
    vllm_sleep_level: int = 2
    """vLLM only: 2 = weights and KV cache discarded while training (each step re-syncs all
    weights); 1 = weights kept in CPU memory."""
    vllm_logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "raw_logprobs"
    """vLLM only: which log-prob vLLM returns per token: raw = the temperature-1 policy (any vLLM),
    processed = the sampling distribution (vLLM >= 0.11); see megatron_papo/rollout/vllm_engine.py."""
    vllm_sync_bucket_mb: int = 1024
    """vLLM only: weight-sync bucket size (MiB): the extra memory a sync holds at once."""


@dataclass
class DataConfig:
    """Training / evaluation data."""

    train: str = "easy_vqa:train"
    """A JSONL/Parquet path, or a built-in source like easy_vqa:train."""
    eval: str = "easy_vqa:test"
    """Held-out data for evaluation (never used in training)."""
    prompt_template: str = "think_boxed"
    """Name of the prompt template that wraps the question."""
    image_key: str = "image"
    """Column holding the image path or bytes."""
    question_key: str = "problem"
    """Column holding the question."""
    answer_key: str = "answer"
    """Column holding the ground-truth answer."""
    rationale_key: str = "rationale"
    """Optional column: a row's rationale, written inside the warm start's think block
    (train.sft_rationale); rows without it get an empty think block."""
    max_prompt_length: int = 512
    """Prompts longer than this (tokens, image tokens included) are skipped and counted."""
    shuffle: bool = True
    """Shuffle the training data each epoch (seeded)."""
    limit: int | None = None
    """Use only the first N rows (quick runs)."""


@dataclass
class TrainConfig:
    """Optimisation."""

    steps: int = 100
    """RL steps (rollout + update) to run."""
    lr: float = 1e-6
    """Learning rate (constant after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    update_prompts: int = 16
    """Prompts per optimizer update (mini-batch); prompts_per_step / update_prompts updates per step."""
    micro_batch_size: int = 4
    """Responses per forward/backward micro-batch."""
    epochs_per_step: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    seed: int = 1234
    """Global seed (model init, data order, sampling, masks)."""
    sft_warmup_steps: int = 0
    """Optional supervised warm-start steps before RL (0 = off): cross-entropy on
    `<think> </think> \\boxed{answer}` targets from a slice of the training data kept apart from RL."""
    sft_batch_size: int = 32
    """Prompts per supervised warm-start step."""
    sft_lr: float = 1e-3
    """Peak learning rate of the warm-start steps."""
    sft_lr_warmup_steps: int = 0
    """Warm-start steps of linear lr warmup (from sft_lr / N to sft_lr); counts inside sft_warmup_steps."""
    sft_lr_decay: Literal["constant", "cosine"] = "constant"
    """Warm-start lr after its warmup: constant sft_lr, or a cosine from sft_lr down to
    sft_lr * sft_min_lr_ratio at the last warm-start step."""
    sft_min_lr_ratio: float = 0.1
    """Final warm-start lr as a fraction of sft_lr (sft_lr_decay=cosine only)."""
    sft_answer_balance: float = 0.0
    """Warm-start rows are drawn with probability proportional to count(their answer) ** -alpha
    (this alpha, in [0, 1]): 0 = uniform over rows, 1 = every distinct answer equally often
    (data.sampler.answer_balanced_weights). Raising it takes the answer prior away from a
    model that reads only the question, so the warm start has to look at the image."""
    sft_rationale: bool = False
    """Warm-start targets carry a row's rationale inside the think block (``<think> red circle
    </think> \\boxed{no}`` for an easy-VQA row: the image's colour and shape, read off its
    questions), so every row teaches what the image shows; rows without one (and False) get an
    empty think block. rollout.max_new_tokens must leave room for it (easy-VQA: 10 tokens)."""
    sft_balance_by: Literal["answer", "question_answer"] = "answer"
    """What train.sft_answer_balance counts: the answer alone, or the (question text, answer)
    pair (alpha = 1: every pair equally often, so no answer follows from its question's text)."""
    sft_prompts: int = 2000
    """Training prompts reserved for the warm start (the first N of the shuffled set; RL uses the rest)."""
    max_consecutive_nonfinite: int = 3
    """Steps in a row whose update had a non-finite gradient norm or loss (each skipped: grads
    zeroed, no optimizer step, no lr advance) after which the run stops with an error, before
    any checkpoint is written; >= 1."""


@dataclass
class EvalConfig:
    """Held-out evaluation (accuracy avg@k with original and with masked images)."""

    num_prompts: int = 256
    """Prompts of the eval split to score (the first N; 0 = all)."""
    k: int = 4
    """Responses per prompt; accuracy is averaged over them (avg@k)."""
    temperature: float = 1.0
    """Sampling temperature for evaluation (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus mass for evaluation."""
    interval: int = 0
    """Evaluate every N steps during training (0 = only at the end; -1 = never)."""
    masked: bool = True
    """Also evaluate with patch-masked images (the gap measures reliance on vision)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints of model + optimizer + trainer state."""

    dir: str | None = None
    """Where checkpoints go; None = no checkpointing."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest N checkpoints (0 = keep every one)."""
    resume: bool = False
    """Continue from the newest checkpoint in `dir` (``--resume``); none there is an error unless
    `resume_or_start`."""
    resume_or_start: bool = False
    """With `resume`: start fresh when `dir` holds no checkpoint (``--resume-or-start``: a launch
    line that works for the first run and every restart)."""
    resume_allow_changes: bool = False
    """With `resume`: continue although fields that change the maths (RESUME_DRIFT_KEYS) differ from
    the checkpoint's saved config, logging each (``--resume-allow-changes``); else they stop the run."""
    init_weights: str | None = None
    """Initial model weights: a megatron-core distributed checkpoint (a root with `latest`, or one
    step directory, e.g. from tools/convert_hf_to_megatron.py; resharded to this run's TP/PP), or
    a Hugging Face folder (config.json + safetensors; qwen2_5_vl), read shard by shard per rank."""


@dataclass
class LoggingConfig:
    """Metrics output."""

    dir: str = "runs/default"
    """Run folder: metrics.jsonl, TensorBoard events, plots."""
    log_interval: int = 1
    """Log every N steps."""
    tensorboard: bool = True
    """Write TensorBoard events (if tensorboard is installed)."""
    progress_bar: bool = True
    """tqdm progress bar with ETA on rank 0."""


@dataclass
class PapoConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: PapoLossConfig = field(default_factory=PapoLossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def type_name(tp: Any) -> str:
    """A field type as the errors and --help write it (``one of 'a', 'b'`` for a Literal)."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")
