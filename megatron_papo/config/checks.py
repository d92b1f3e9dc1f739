"""Range and cross-field checks of a built config (``validate``).

Every int / float field has an entry in ``NUMERIC_BOUNDS`` (finite, in range; a test keeps the
table complete), checked before the cross-field rules.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

from megatron_papo.config.schema import (
    ConfigError,
    PapoConfig,
)
from megatron_papo.pipeline_layout import stage_layers

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
