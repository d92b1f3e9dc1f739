"""What a run is built from: the tokenizer, this rank's model chunks (+ DDP and the optimizer),
the reference model, the rollout engine, the data and the sampler; and the initial weights.

    parts = build_parts(cfg, pg)
    init_weights(parts, cfg, pg)      # checkpoint.init_weights: a project checkpoint or an HF folder

Used by the trainer, by ``python -m megatron_papo.evaluate`` and by the converter's parity check
(``pipeline_forward_fn``); it never imports either of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.config import PapoConfig
from megatron_papo.data.dataset import PromptDataset, build_prompt_dataset
from megatron_papo.data.easy_vqa import easy_vqa_tokenizer
from megatron_papo.data.sampler import PromptSampler, answer_balanced_weights
from megatron_papo.data.tokenizer import HFTokenizer, Tokenizer
from megatron_papo.distributed import ProcessGroups
from megatron_papo.models import build_model
from megatron_papo.models.base import concat_pixels, whole_sequences
from megatron_papo.models.hf_qwen2_5_vl import SafetensorsReader, check_all_hf_tensors_used, load_hf_weights
from megatron_papo.ops import gather_from_context_parallel
from megatron_papo.rollout import MegatronRolloutEngine, RolloutEngine
from megatron_papo.rollout.kv_cache import KVCache, kv_cache_bytes_per_token
from megatron_papo.rollout.vllm_engine import (
    PatchLayout,
    VLLMBackend,
    VLLMRolloutEngine,
    check_consecutive_tp,
)
from megatron_papo.training.batch import model_device
from megatron_papo.training.checkpointing import load_checkpoint
from megatron_papo.training.optim import LrSchedule, build_optimizer
from megatron_papo.training.passes import model_forward, sequence_multiple
from megatron_papo.training.schedule import configure_model_for_schedule, run_microbatches


def build_tokenizer(cfg: PapoConfig) -> Tokenizer:
    """The tokenizer of cfg.model.tokenizer: easy_vqa (the project's word tokenizer), a Hugging
    Face tokenizer folder, or auto (tiny_vlm: easy_vqa; qwen2_5_vl: the one in model.hf_path)."""
    choice = cfg.model.tokenizer
    if choice == "easy_vqa" or (choice == "auto" and cfg.model.name == "tiny_vlm"):
        return easy_vqa_tokenizer()
    if choice == "auto":
        if cfg.model.name == "qwen2_5_vl" and cfg.model.hf_path:
            return HFTokenizer(cfg.model.hf_path)
        raise ValueError(f"model.tokenizer=auto: no tokenizer is known for model.name={cfg.model.name!r}; "
                         "set model.tokenizer to easy_vqa or a Hugging Face tokenizer folder")
    return HFTokenizer(choice)


def never_generate_ids(tok: Tokenizer) -> list[int]:
    """Ids a response must never contain: padding, bos, unknown and the image placeholder (a
    generated placeholder would desynchronise image tokens and image features)."""
    ids = [tok.pad_id, tok.image_token_id, tok.bos_id, getattr(tok, "unk_id", None)]
    return sorted({i for i in ids if i is not None and i != tok.eos_id})


def ban_token_ids(logits: Tensor, ids: Sequence[int], tp_rank: int) -> Tensor:
    """Set the given global vocabulary ids to -inf in this TP rank's shard [..., V_local], in place."""
    width = logits.shape[-1]
    local = [i - tp_rank * width for i in ids if tp_rank * width <= i < (tp_rank + 1) * width]
    if local:
        logits[..., local] = float("-inf")
    return logits


def pipeline_forward_fn(model_chunks: Sequence[torch.nn.Module], pg: ProcessGroups,
                        banned_ids: Sequence[int] = ()) -> Callable[..., Tensor]:
    """forward_fn for the rollout engine: logits [B, S, V_local] on every rank of the replica.

    With pipeline parallelism the forward runs through the schedule and the last stage's
    logits are broadcast to the other stages (so every rank samples the same tokens).
    `banned_ids` are never sampled (their logits set to -inf in the engine's copy only).

    With ``cache=`` (a :class:`~megatron_papo.rollout.kv_cache.KVCache`) the forward is one
    generation step through megatron-core's inference context: the prefill of the prompts
    (``input_ids`` [B, P], padding mask, images), then one call per new token with ``input_ids``
    [B, 1] only (positions and masks come from the cache). It returns the last position's
    logits over the whole padded vocabulary [B, 1, V_pad] (megatron-core gathers the TP shards
    in inference mode; [B, V] per step is what the engine gathers without a cache too). The
    returned function's ``supports_kv_cache`` says whether this
    layout can: not under sequence parallelism (a one-token step cannot be split over the
    sequence, and megatron-core's linear layers fix sequence parallelism when they are built) nor
    with Transformer Engine specs (module docstring of rollout/kv_cache.py). Under context
    parallelism the cached forward runs whole sequences on every cp rank
    (:func:`~megatron_papo.models.base.whole_sequences`): each holds the whole cache and samples
    the same tokens, as a cp=1 model would.
    """
    chunk = model_chunks[0]
    multiple = sequence_multiple(model_chunks)

    def forward(input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
                images: list[list[Tensor]] | None, cache: KVCache | None = None) -> Tensor:
        if cache is not None:
            logits = _cached_forward(input_ids, position_ids, attention_mask, images, cache)
        elif multiple > 1:
            logits = _sharded_forward(input_ids, position_ids, attention_mask, images)
        else:
            logits = _forward(input_ids, position_ids, attention_mask, images)
        return ban_token_ids(logits, banned_ids, 0 if cache is not None else pg.tp_rank)

    def _cached_forward(input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
                        images: list[list[Tensor]] | None, cache: KVCache) -> Tensor:
        if cache.is_prefill:
            pixels = None if images is None else concat_pixels([t for row in images for t in row])
            positions = chunk.rope_positions(input_ids, position_ids, pixels)
            mask = cache.prefill_inputs(attention_mask, positions)
        else:
            positions, mask = cache.decode_inputs(input_ids.shape[1])
        with whole_sequences(model_chunks) if pg.cp_size > 1 else contextlib.nullcontext():
            logits = _forward(input_ids, positions, mask, images, cache.context)
        cache.advance(input_ids.shape[1])
        return logits

    def _sharded_forward(input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                         images: list[list[Tensor]] | None) -> Tensor:
        # context / sequence parallel: left-pad to the multiple (masked keys, the rows keep their
        # positions), run the sharded forward, all-gather the logits over cp and drop the pad
        # columns. Generation only: the training passes never gather logits.
        extra = (-input_ids.shape[1]) % multiple
        if extra:
            first = input_ids[:, :1]
            first = torch.where(first == chunk.image_token_id, torch.zeros_like(first), first)
            input_ids = torch.cat([first.expand(-1, extra), input_ids], dim=1)
            position_ids = torch.cat([position_ids[:, :1].expand(-1, extra), position_ids], dim=1)
            attention_mask = torch.cat([attention_mask.new_zeros(attention_mask.shape[0], extra),
                                        attention_mask], dim=1)
        logits = _forward(input_ids, position_ids, attention_mask, images)
        return gather_from_context_parallel(logits, pg.cp, dim=1)[:, extra:]

    def _forward(input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                 images: list[list[Tensor]] | None, context: Any = None) -> Tensor:
        pixels = None if images is None else concat_pixels([t for row in images for t in row])
        extra = {} if context is None else {"inference_context": context, "runtime_gather_output": True}
        if pg.pp_size == 1:
            return chunk(input_ids, position_ids, attention_mask, pixels, **extra)
        mb = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
              "pixel_values": pixels, "inference_context": context}
        outs = run_microbatches(model_chunks, [mb], model_forward,
                                lambda _mb, logits: (logits.new_zeros(()), {"logits": logits}),
                                forward_only=True,
                                # the schedule divides by cp; whole sequences under a cache
                                seq_length=input_ids.shape[1] * (pg.cp_size if context is not None else 1),
                                micro_batch_size=input_ids.shape[0])
        b, s = input_ids.shape
        # megatron-core returns the last position only under a cache; without one each cp rank
        # holds its 1/cp of the (already padded) sequence until _sharded_forward gathers it
        s_out = 1 if context is not None else s // pg.cp_size
        width = chunk.padded_vocab_size // (1 if context is not None else pg.tp_size)
        logits = (outs[0]["logits"] if outs else torch.empty(b, s_out, width, dtype=chunk.config.params_dtype,
                                                              device=model_device(model_chunks)))
        from megatron.core import parallel_state  # megatron-core: only after compat's import shims

        dist.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pg.pp)
        return logits

    sequence_parallel = bool(getattr(chunk.config, "sequence_parallel", False))
    can_cache = not sequence_parallel and getattr(chunk, "transformer_impl", "local") == "local"
    forward.supports_kv_cache = can_cache  # type: ignore[attr-defined]
    return forward


@dataclass
class Parts:
    """What the loop works with, built once by `build_parts`."""

    tokenizer: Tokenizer
    model_chunks: list[torch.nn.Module]
    """This rank's model (one chunk per virtual pipeline stage), bare modules."""
    ddp_chunks: list[torch.nn.Module]
    """The same chunks in megatron-core DDP (for the update)."""
    optimizer: Any
    lr_schedule: Any
    engine: RolloutEngine
    dataset: PromptDataset
    rl_indices: list[int]
    """Dataset indices RL samples from (the SFT slice removed)."""
    sft_indices: list[int]
    sampler: PromptSampler
    sft_weights: torch.Tensor | None = None
    """[len(sft_indices)] warm-start sampling weights (train.sft_answer_balance > 0), else None
    (uniform)."""
    ref_chunks: list[torch.nn.Module] | None = None
    """Frozen reference model when ref_kl_coef > 0."""
    extra: dict[str, Any] = field(default_factory=dict)


def vllm_backend_factory(hf_path: str, **kwargs: Any) -> Any:
    """Builds the vLLM backend (``VLLMBackend(hf_path, **kwargs)``); tests replace this function
    with one returning a fake backend."""
    return VLLMBackend(hf_path, **kwargs)


_VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_vllm_engine(cfg: PapoConfig, pg: ProcessGroups, tok: Tokenizer, model: torch.nn.Module,
                      max_images_per_prompt: int = 1) -> Any:
    """rollout.engine=vllm: one colocated vLLM per tensor-parallel group (vLLM TP = parallel.tp),
    dummy weights until the first sync (megatron_papo/rollout/vllm_engine.py)."""
    if cfg.model.name != "qwen2_5_vl":
        raise ValueError(f"rollout.engine=vllm needs model.name=qwen2_5_vl, got {cfg.model.name!r}")
    if pg.tp_size > 1:
        check_consecutive_tp(dist.get_process_group_ranks(pg.tp))
    ro = cfg.rollout
    backend = vllm_backend_factory(
        cfg.model.hf_path, tensor_parallel_size=pg.tp_size, gpu_memory_utilization=ro.gpu_memory_utilization,
        image_pixels=(model.min_pixels, model.max_pixels),
        max_images_per_prompt=max(1, ro.vllm_max_images_per_prompt or max_images_per_prompt),
        max_model_len=ro.vllm_max_model_len or cfg.data.max_prompt_length + ro.max_new_tokens,
        seed=cfg.train.seed, dtype=_VLLM_DTYPES[cfg.model.precision], enforce_eager=ro.vllm_enforce_eager,
        logprobs_mode=ro.vllm_logprobs_mode)
    # the output layer's rows beyond the tokenizer (HF config vocab > len(tokenizer)) are never
    # sampled: the trainer's log-probs cover the tokenizer's ids only
    banned = never_generate_ids(tok) + list(range(tok.vocab_size, model.vocab_size))
    return VLLMRolloutEngine(backend, eos_id=tok.eos_id, layout=PatchLayout.of(model),
                             banned_token_ids=banned, logprobs_mode=ro.vllm_logprobs_mode,
                             sleep_level=ro.vllm_sleep_level, bucket_bytes=ro.vllm_sync_bucket_mb << 20,
                             pp_group=pg.pp if pg.pp_size > 1 else None,
                             cp_group=pg.cp if pg.cp_size > 1 else None)


def _split_sft(num: int, cfg: PapoConfig) -> tuple[list[int], list[int]]:
    """(sft_indices, rl_indices): a seeded permutation; the first sft_prompts go to the warm start."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    k = min(cfg.train.sft_prompts, num // 2) if cfg.train.sft_warmup_steps > 0 else 0
    return sorted(order[:k]), sorted(order[k:])


def _sft_weights(dataset: PromptDataset, sft_indices: list[int], cfg: PapoConfig) -> torch.Tensor | None:
    """Warm-start sampling weights of train.sft_answer_balance (None = uniform)."""
    if not sft_indices or cfg.train.sft_answer_balance == 0:
        return None
    if cfg.train.sft_balance_by == "question_answer":
        keys: list = [(dataset.question(i), dataset.answer(i)) for i in sft_indices]
    else:
        keys = [dataset.answer(i) for i in sft_indices]
    return answer_balanced_weights(keys, cfg.train.sft_answer_balance)


def build_parts(cfg: PapoConfig, pg: ProcessGroups) -> Parts:
    """Tokenizer, model (+DDP, optimizer), reference model, rollout engine, data and sampler."""
    tok = build_tokenizer(cfg)

    def make_chunks() -> list[torch.nn.Module]:
        """This rank's model: one chunk, or one per virtual pipeline stage (parallel.vpp)."""
        from megatron.core import parallel_state as ps  # megatron-core: only after compat's import shims

        out = []
        for vp_stage in range(cfg.parallel.vpp or 1):
            stage = vp_stage if cfg.parallel.vpp is not None else None
            model = build_model(
                cfg.model, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
                vp_stage=stage, seed=cfg.train.seed, sequence_parallel=cfg.parallel.sequence_parallel,
                first_stage_layers=cfg.parallel.first_stage_layers,
                last_stage_layers=cfg.parallel.last_stage_layers)
            if cfg.model.freeze_vision_tower:
                model.freeze_vision()  # before DDP / the optimizer: they only take trainable parameters
            out.append(model)
        return out

    chunks = make_chunks()
    ddp_chunks, optimizer = build_optimizer(chunks, cfg.train, cfg.parallel,
                                            bf16=cfg.model.precision == "bf16")
    configure_model_for_schedule(ddp_chunks)
    ref = None
    if cfg.loss.ref_kl_coef > 0:
        ref = make_chunks()
        for m in ref:
            m.requires_grad_(False)
    model = chunks[0]
    dataset = build_prompt_dataset(cfg.data.train, cfg.data, tok, model.num_image_tokens,
                                   role="train")
    sft_idx, rl_idx = _split_sft(len(dataset), cfg)
    sampler = PromptSampler(len(rl_idx), cfg.rollout.prompts_per_step, seed=cfg.train.seed,
                            shuffle=cfg.data.shuffle, dp_rank=pg.dp_rank, dp_size=pg.dp_size)
    if cfg.rollout.engine == "vllm":
        engine: RolloutEngine = build_vllm_engine(cfg, pg, tok, model, dataset.max_images)
    else:
        ro = cfg.rollout
        local_layers = sum(len(c.language_model.decoder.layers) for c in chunks)
        engine = MegatronRolloutEngine(pipeline_forward_fn(chunks, pg, never_generate_ids(tok)),
                                       tp_group=pg.tp, vocab_size=tok.vocab_size,
                                       eos_id=tok.eos_id, pad_id=tok.pad_id, model=chunks,
                                       max_batch_size=ro.max_batch_size, kv_cache=ro.kv_cache,
                                       kv_cache_bytes_per_token=kv_cache_bytes_per_token(
                                           chunks[0].config, local_layers, pg.tp_size),
                                       kv_cache_gb=ro.kv_cache_gb)
    extra: dict[str, Any] = {}
    if cfg.evaluation.interval >= 0:  # the run evaluates: a bad eval file fails now, not after training
        extra["eval_dataset"] = build_prompt_dataset(cfg.data.eval, cfg.data, tok, model.num_image_tokens,
                                                     role="eval")
    return Parts(tokenizer=tok, model_chunks=chunks, ddp_chunks=ddp_chunks, optimizer=optimizer,
                 lr_schedule=LrSchedule.from_config(cfg.train), engine=engine, dataset=dataset,
                 rl_indices=rl_idx, sft_indices=sft_idx, sampler=sampler, ref_chunks=ref, extra=extra,
                 sft_weights=_sft_weights(dataset, sft_idx, cfg))




def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: config.json and safetensors weights."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / "model.safetensors").is_file()
                                              or (p / "model.safetensors.index.json").is_file())


def init_weights(parts: Parts, cfg: PapoConfig, pg: ProcessGroups) -> None:
    """checkpoint.init_weights: a project checkpoint (model weights only) or a Hugging Face
    folder (each rank reads its own TP/PP shards). The reference model copies the policy when
    RL starts."""
    path = cfg.checkpoint.init_weights
    if is_hf_folder(path):
        if cfg.model.name != "qwen2_5_vl":
            raise ValueError(f"checkpoint.init_weights={path} is a Hugging Face folder, which only "
                             f"model.name=qwen2_5_vl reads (model.name is {cfg.model.name!r})")
        reader = SafetensorsReader(path)
        for chunk in parts.model_chunks:
            load_hf_weights(chunk, reader)
        check_all_hf_tensors_used(reader, parts.model_chunks, pg)
        with torch.no_grad():
            parts.optimizer.reload_model_params()  # bf16: refresh the fp32 main params
        return
    if load_checkpoint(path, parts.ddp_chunks, parts.optimizer, pg, load_optimizer=False,
                       load_rng=False) is None:
        raise FileNotFoundError(f"checkpoint.init_weights: no checkpoint under {path}")
