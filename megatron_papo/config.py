"""One config tree of dataclasses, loaded from YAML with dotted CLI overrides, validated.

    cfg = load_config("examples/tiny_papo_g.yaml", ["parallel.tp=2", "loss.gamma=0.01"])

Every section is a dataclass with a docstring under each field (the field's documentation).
Loading is strict: an unknown key, a value of the wrong type, or a value out of range raises
`ConfigError` naming the file, the dotted key, what was expected and what was found. Every
int / float field has an entry in `NUMERIC_BOUNDS` (finite, in range; a test keeps the table
complete), checked before the cross-field rules of `validate`.

`algorithm.name` selects a preset (grpo, dapo, papo_g, papo_d) that fills the `loss:` fields and
the DAPO group filter; anything written explicitly under `loss:` or on the command line wins.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_papo.errors import UserError
from megatron_papo.losses.papo import PapoLossConfig
from megatron_papo.masking import MaskingConfig
from megatron_papo.pipeline_layout import stage_layers
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


# ----------------------------------------------------------------------------- typed building


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 3e-6 as a string; users mean a number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r} (a bug in the config schema)")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly (unknown keys and bad types raise)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{key}'{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own __post_init__ validation
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'loss.gamma=0.01' -> ('loss.gamma', 0.01); the value is read as YAML (null, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. parallel.tp=2")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    return key, value


def config_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> PapoConfig:
    """Build and validate a PapoConfig from nested mappings (algorithm preset applied first)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    algo = data.get("algorithm", {}) or {}
    name = algo.get("name", AlgorithmConfig.name) if isinstance(algo, Mapping) else AlgorithmConfig.name
    if name not in ALGORITHM_PRESETS:
        raise ConfigError(f"{source}: algorithm.name: expected one of {list(ALGORITHM_PRESETS)}, "
                          f"got {name!r}")
    merged = _deep_merge(ALGORITHM_PRESETS[name], data)
    try:
        cfg = _build(PapoConfig, merged)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PapoConfig:
    """Read a YAML file (or nothing: defaults), apply `key=value` overrides, build, validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return config_from_dict(data, source=source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


# What a resumed run must share with the checkpoint it continues (sections, or section.field):
# everything that defines the objective, the model and the data. Steps, logging, evaluation,
# checkpointing, the parallel layout (checkpoints reshard) and the rollout budget may change.
RESUME_DRIFT_KEYS: tuple[str, ...] = ("algorithm", "loss", "model", "masking", "reward", "data", "train.seed")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_drift(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every field under RESUME_DRIFT_KEYS that differs between a
    checkpoint's saved config and this run's (both ``to_dict`` trees); fields the saved config
    does not have (an older checkpoint) are not compared."""
    old, new = _flat(saved), _flat(current)
    keep = [k for k in old if any(k == d or k.startswith(d + ".") for d in RESUME_DRIFT_KEYS)]
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in keep if old[k] != new.get(k)]


def save_config(cfg: PapoConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal config)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- self-description


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a config dataclass: the string literal written under each
    field (the convention of this tree), whitespace folded to one line; "" where none is."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): fields stay undocumented
        return {f.name: "" for f in dataclasses.fields(cls)}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                doc = " ".join(nxt.value.value.split())
            out[node.target.id] = doc
    return out


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def describe_config(cls: type | None = None) -> str:
    """The config tree as text: one block per section, one line per field with its type, default
    and docstring (what ``--help`` of train and evaluate prints)."""
    cls = cls or PapoConfig
    hints = typing.get_type_hints(cls)
    lines = ["config sections (YAML keys, or section.key=value on the command line):"]
    for section in dataclasses.fields(cls):
        sub = hints[section.name]
        lines.append(f"\n  {section.name}: {' '.join((sub.__doc__ or '').split())}")
        sub_hints, docs = typing.get_type_hints(sub), field_docs(sub)
        for f in dataclasses.fields(sub):
            lines.append(f"    {section.name}.{f.name}  ({_type_name(sub_hints[f.name])}, "
                         f"default {_default_text(f)})")
            if docs.get(f.name):
                lines.append(f"        {docs[f.name]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cross-field checks


def _validate_vllm(cfg: PapoConfig) -> None:
    """rollout.engine=vllm: the fields only that engine reads (these errors show on any machine;
    runtime_checks then checks that vLLM imports and that model.name is one vLLM can build)."""
    ro = cfg.rollout  # the numeric ranges: NUMERIC_BOUNDS
    if ro.vllm_logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
        raise ConfigError(f"rollout.vllm_logprobs_mode: expected processed_logprobs or raw_logprobs, got "
                          f"{ro.vllm_logprobs_mode!r}")
    need = cfg.data.max_prompt_length + ro.max_new_tokens
    if ro.vllm_max_model_len is not None and ro.vllm_max_model_len < need:
        raise ConfigError(f"rollout.vllm_max_model_len={ro.vllm_max_model_len} is below "
                          f"data.max_prompt_length + rollout.max_new_tokens = {need}")


@dataclass(frozen=True)
class Bound:
    """The values one numeric config field accepts: finite, in [lo, hi] (ends excluded where
    marked open, None = unbounded), or one of ``also`` (sentinels such as -1 = off)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()

    def accepts(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        lo = "-inf" if self.lo is None else repr(self.lo)
        hi = "inf" if self.hi is None else repr(self.hi)
        text = f"a finite value in {'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}" \
               f"{')' if self.hi_open or self.hi is None else ']'}"
        return text + "".join(f" or {a!r}" for a in self.also)


POSITIVE, NON_NEGATIVE, FINITE = Bound(1), Bound(0), Bound()
UNIT, OPEN_UNIT_LEFT = Bound(0.0, 1.0), Bound(0.0, 1.0, lo_open=True)

# Every int / float field of the tree (tests/unit/test_config.py checks that none is missing).
# Cross-field rules (divisibility, filter_low < filter_high, lengths within seq_length) stay in
# `validate`; None stays allowed where the field's type allows it.
NUMERIC_BOUNDS: dict[str, Bound] = {
    **{f"model.{k}": POSITIVE for k in ("num_layers", "hidden_size", "num_attention_heads",
                                        "num_query_groups", "ffn_hidden_size",
                                        "make_vocab_size_divisible_by", "image_size", "min_pixels",
                                        "max_pixels", "patch_size", "vision_hidden_size",
                                        "vision_num_layers")},
    "model.vocab_size": Bound(2), "model.seq_length": Bound(2),
    **{f"parallel.{k}": POSITIVE for k in ("tp", "pp", "cp", "vpp")},
    "parallel.first_stage_layers": NON_NEGATIVE, "parallel.last_stage_layers": NON_NEGATIVE,
    "parallel.collective_timeout_s": Bound(0.0, 7 * 86400.0, lo_open=True),
    "algorithm.filter_low": UNIT, "algorithm.filter_high": UNIT, "algorithm.max_sampling_rounds": POSITIVE,
    **{f"loss.{k}": NON_NEGATIVE for k in ("gamma", "entropy_coef_orig", "entropy_coef_mask",
                                           "ref_kl_coef", "gamma_decay_steps")},
    **{f"loss.{k}": Bound(0.0, lo_open=True) for k in ("ref_kl_clip", "log_ratio_clamp", "kl_prcp_clip")},
    "loss.clip_ratio_low": Bound(0.0, 1.0, hi_open=True),
    "loss.clip_ratio_high": Bound(0.0, 10.0, hi_open=True),
    "loss.clip_ratio_dual": Bound(1.0, lo_open=True), "loss.gamma_final_factor": UNIT,
    "masking.cell_size": POSITIVE, "masking.ratio": UNIT, "masking.seed": FINITE,
    "reward.accuracy_weight": NON_NEGATIVE, "reward.format_weight": NON_NEGATIVE,
    "reward.math_timeout_s": POSITIVE,
    **{f"rollout.{k}": POSITIVE for k in ("n", "prompts_per_step", "max_new_tokens", "max_batch_size",
                                          "vllm_max_model_len", "vllm_sync_bucket_mb")},
    "rollout.temperature": Bound(0.0, lo_open=True), "rollout.top_p": OPEN_UNIT_LEFT,
    "rollout.top_k": Bound(1, also=(-1,)), "rollout.kv_cache_gb": NON_NEGATIVE,
    "rollout.gpu_memory_utilization": OPEN_UNIT_LEFT, "rollout.vllm_max_images_per_prompt": NON_NEGATIVE,
    "rollout.vllm_sleep_level": Bound(1, 2),
    "data.max_prompt_length": POSITIVE, "data.limit": POSITIVE,
    **{f"train.{k}": POSITIVE for k in ("steps", "update_prompts", "micro_batch_size", "epochs_per_step",
                                        "sft_batch_size", "max_consecutive_nonfinite")},
    # learning rates: Adam steps of more than 1 per unit gradient are a typo, not a setting
    "train.lr": Bound(0.0, 1.0, lo_open=True), "train.sft_lr": Bound(0.0, 1.0, lo_open=True),
    "train.warmup_steps": NON_NEGATIVE, "train.weight_decay": UNIT,
    "train.adam_beta1": Bound(0.0, 1.0, hi_open=True), "train.adam_beta2": Bound(0.0, 1.0, hi_open=True),
    "train.grad_clip": NON_NEGATIVE, "train.seed": FINITE, "train.sft_warmup_steps": NON_NEGATIVE,
    "train.sft_prompts": NON_NEGATIVE,
    "train.sft_lr_warmup_steps": NON_NEGATIVE, "train.sft_min_lr_ratio": UNIT,
    "train.sft_answer_balance": UNIT,
    "evaluation.num_prompts": NON_NEGATIVE, "evaluation.k": POSITIVE, "evaluation.temperature": NON_NEGATIVE,
    "evaluation.top_p": OPEN_UNIT_LEFT, "evaluation.interval": Bound(0, also=(-1,)),
    "checkpoint.save_interval": NON_NEGATIVE, "checkpoint.keep_last": NON_NEGATIVE,
    "logging.log_interval": POSITIVE,
}


def numeric_fields(cls: type | None = None, prefix: str = "") -> list[str]:
    """Dotted paths of every int / float field of the config tree (PapoConfig by default)."""
    cls = PapoConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        nested = [a for a in args if dataclasses.is_dataclass(a)]
        if nested:
            out += numeric_fields(nested[0], f"{prefix}{f.name}.")
        elif any(a in (int, float) for a in args):
            out.append(prefix + f.name)
    return out


def check_numeric_bounds(cfg: PapoConfig) -> None:
    """Raise ConfigError for the first numeric field outside its ``NUMERIC_BOUNDS`` entry."""
    for path, bound in NUMERIC_BOUNDS.items():
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not isinstance(value, bool) and not bound.accepts(value):
            raise ConfigError(f"{path}: expected {bound.describe()}, got {value!r}")


def validate(cfg: PapoConfig, world_size: int | None = None) -> None:
    """Checks that span sections. Raises ConfigError naming the fields involved."""
    check_numeric_bounds(cfg)  # first: the rules below divide by and compare these values
    par, model, ro, tr = cfg.parallel, cfg.model, cfg.rollout, cfg.train
    if par.vpp is not None and (par.vpp < 1 or par.pp == 1):
        raise ConfigError(f"parallel.vpp: needs parallel.pp > 1 and vpp >= 1, got vpp={par.vpp}, pp={par.pp}")
    if model.num_attention_heads is not None and model.num_attention_heads % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} must divide model.num_attention_heads="
                          f"{model.num_attention_heads}")
    groups = model.num_query_groups
    if groups is not None:
        if model.num_attention_heads is not None and model.num_attention_heads % groups:
            raise ConfigError(f"model.num_query_groups={groups} must divide model.num_attention_heads="
                              f"{model.num_attention_heads}")
        if groups % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} must divide model.num_query_groups={groups}")
    if model.ffn_hidden_size is not None and model.ffn_hidden_size % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} must divide model.ffn_hidden_size={model.ffn_hidden_size}")
    if (par.first_stage_layers is not None or par.last_stage_layers is not None) and par.pp < 2:
        raise ConfigError("parallel.first_stage_layers / last_stage_layers: need parallel.pp >= 2, "
                          f"got pp={par.pp}")
    if model.num_layers is not None:
        try:
            stage_layers(model.num_layers, par.pp, first=par.first_stage_layers, last=par.last_stage_layers,
                         vpp=par.vpp)
        except ValueError as e:
            raise ConfigError(f"{e} (model.num_layers={model.num_layers})") from None
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel: needs parallel.tp > 1")
    if world_size is not None:
        mp = par.tp * par.pp * par.cp
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp = "
                              f"{par.tp}*{par.pp}*{par.cp} = {mp}")
    if ro.n < 2:  # every algorithm here normalises advantages within a prompt's group
        raise ConfigError(f"rollout.n={ro.n}: algorithm {cfg.algorithm.name} normalises advantages within "
                          "each prompt's group of n responses, so n = 1 makes every advantage 0; "
                          "set rollout.n >= 2")
    if ro.engine == "vllm":
        _validate_vllm(cfg)
    if tr.update_prompts < 1 or ro.prompts_per_step % tr.update_prompts:
        raise ConfigError(f"train.update_prompts={tr.update_prompts} must divide rollout.prompts_per_step="
                          f"{ro.prompts_per_step}")
    if tr.micro_batch_size < 1 or (tr.update_prompts * ro.n) % tr.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={tr.micro_batch_size} must divide the responses per "
                          f"update, train.update_prompts*rollout.n = {tr.update_prompts * ro.n}")
    if not 0 <= cfg.algorithm.filter_low < cfg.algorithm.filter_high <= 1:
        raise ConfigError("algorithm.filter_low/filter_high: expected 0 <= low < high <= 1, got "
                          f"{cfg.algorithm.filter_low}, {cfg.algorithm.filter_high}")
    if tr.sft_lr_warmup_steps > tr.sft_warmup_steps:
        raise ConfigError(f"train.sft_lr_warmup_steps={tr.sft_lr_warmup_steps} exceeds the warm start "
                          f"(train.sft_warmup_steps={tr.sft_warmup_steps})")
    if tr.sft_warmup_steps and tr.sft_prompts < 1:
        raise ConfigError("train.sft_prompts: the warm start (train.sft_warmup_steps > 0) needs >= 1 "
                          f"reserved prompts, got {tr.sft_prompts}")
    tiny_only = [k for k in ("patch_size", "vision_hidden_size", "vision_num_layers")
                 if getattr(model, k) is not None]
    if tiny_only and model.name != "tiny_vlm":
        raise ConfigError(f"model.{tiny_only[0]}: only model.name=tiny_vlm reads it (model.name is "
                          f"{model.name!r}, whose vision tower comes from its own architecture); remove it")
    side = model.image_size or 64
    if model.name == "tiny_vlm" and model.patch_size is not None and side % model.patch_size:
        raise ConfigError(f"model.patch_size={model.patch_size} must divide model.image_size={side}")
    if model.name == "qwen2_5_vl":
        if not model.hf_path:
            raise ConfigError("model.hf_path: model.name=qwen2_5_vl reads its architecture from a Hugging "
                              "Face folder (config.json); set model.hf_path")
        if model.image_size is not None and (model.image_size < 28 or model.image_size % 28):
            raise ConfigError(f"model.image_size={model.image_size}: qwen2_5_vl needs a positive multiple of "
                              "28 (patch 14 x spatial merge 2)")
    if model.image_size is not None and (model.min_pixels is not None or model.max_pixels is not None):
        raise ConfigError("model.image_size (fixed resolution) and model.min_pixels/max_pixels (dynamic "
                          "resolution) exclude each other; set one")
    if model.min_pixels is not None and model.max_pixels is not None and model.min_pixels > model.max_pixels:
        raise ConfigError(f"model.min_pixels={model.min_pixels} exceeds model.max_pixels={model.max_pixels}")
    if cfg.checkpoint.resume and not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.resume: needs checkpoint.dir")
    for name in ("resume_or_start", "resume_allow_changes"):
        if getattr(cfg.checkpoint, name) and not cfg.checkpoint.resume:
            raise ConfigError(f"checkpoint.{name}: needs checkpoint.resume (--resume)")
    if cfg.data.max_prompt_length + ro.max_new_tokens > model.seq_length:
        raise ConfigError(f"data.max_prompt_length ({cfg.data.max_prompt_length}) + rollout.max_new_tokens "
                          f"({ro.max_new_tokens}) exceeds model.seq_length ({model.seq_length})")
