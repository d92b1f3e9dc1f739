"""The RL trainer: build the parts once, then loop over steps that read like DESIGN.md's diagram.

    parts = build_parts(cfg, pg)
    train(cfg, parts)            # [SFT warm start] -> RL steps -> checkpoints -> evaluation

One RL step (`rl_step`): prompts -> rollout (original images) -> rewards -> group advantages
(+ DAPO filter) -> one masked image per prompt -> no-grad passes (old, masked, reference) ->
micro-batched PAPO update(s) through megatron-core's schedule -> metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo import steps
from megatron_papo.batch import TrainBatch, inert_rows, pad_rows_to_multiple
from megatron_papo.config import PapoConfig, to_dict
from megatron_papo.data.dataset import PromptDataset, build_prompt_dataset
from megatron_papo.data.sampler import PromptSampler
from megatron_papo.distributed import ProcessGroups, is_rank_zero
from megatron_papo.losses import PapoLossConfig
from megatron_papo.metrics import MetricsLogger, ProgressBar, reduce_step_metrics
from megatron_papo.models import build_model
from megatron_papo.models.base import concat_pixels
from megatron_papo.ops import gather_from_context_parallel
from megatron_papo.passes import (
    compute_log_probs,
    model_forward,
    papo_update,
    sequence_multiple,
    share_from_last_stage,
)
from megatron_papo.rollout import MegatronRolloutEngine, RolloutEngine, SamplingParams
from megatron_papo.schedule import configure_model_for_schedule, run_microbatches
from megatron_papo.tokenizer import Tokenizer


def build_tokenizer(cfg: PapoConfig) -> Tokenizer:
    """The tokenizer of cfg.model.tokenizer: easy_vqa (the project's word tokenizer), a Hugging
    Face tokenizer folder, or auto (tiny_vlm: easy_vqa; qwen2_5_vl: the one in model.hf_path)."""
    from megatron_papo.tokenizer import HFTokenizer, easy_vqa_tokenizer

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
    """
    chunk = model_chunks[0]
    multiple = sequence_multiple(model_chunks)

    def forward(input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                images: list[list[Tensor]] | None) -> Tensor:
        if multiple > 1:
            logits = _sharded_forward(input_ids, position_ids, attention_mask, images)
        else:
            logits = _forward(input_ids, position_ids, attention_mask, images)
        return ban_token_ids(logits, banned_ids, pg.tp_rank)

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
                 images: list[list[Tensor]] | None) -> Tensor:
        pixels = None if images is None else concat_pixels([t for row in images for t in row])
        if pg.pp_size == 1:
            return chunk(input_ids, position_ids, attention_mask, pixels)
        mb = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
              "pixel_values": pixels}
        outs = run_microbatches(model_chunks, [mb], model_forward,
                                lambda _mb, logits: (logits.new_zeros(()), {"logits": logits}),
                                forward_only=True, seq_length=input_ids.shape[1],
                                micro_batch_size=input_ids.shape[0])
        b, s = input_ids.shape
        width = chunk.padded_vocab_size // pg.tp_size
        logits = outs[0]["logits"] if outs else torch.empty(b, s, width, dtype=chunk.config.params_dtype)
        from megatron.core import parallel_state

        dist.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pg.pp)
        return logits

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
    ref_chunks: list[torch.nn.Module] | None = None
    """Frozen reference model when ref_kl_coef > 0."""
    extra: dict[str, Any] = field(default_factory=dict)


def vllm_backend_factory(hf_path: str, **kwargs: Any) -> Any:
    """Builds the vLLM backend (``VLLMBackend(hf_path, **kwargs)``); tests replace this function
    with one returning a fake backend."""
    from megatron_papo.rollout.vllm_engine import VLLMBackend

    return VLLMBackend(hf_path, **kwargs)


_VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_vllm_engine(cfg: PapoConfig, pg: ProcessGroups, tok: Tokenizer, model: torch.nn.Module,
                      max_images_per_prompt: int = 1) -> Any:
    """rollout.engine=vllm: one colocated vLLM per tensor-parallel group (vLLM TP = parallel.tp),
    dummy weights until the first sync (megatron_papo/rollout/vllm_engine.py)."""
    from megatron_papo.rollout.vllm_engine import PatchLayout, VLLMRolloutEngine, check_consecutive_tp

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


def build_parts(cfg: PapoConfig, pg: ProcessGroups) -> Parts:
    """Tokenizer, model (+DDP, optimizer), reference model, rollout engine, data and sampler."""
    from megatron_papo.optim import LrSchedule, build_optimizer

    tok = build_tokenizer(cfg)

    def make_chunks() -> list[torch.nn.Module]:
        """This rank's model: one chunk, or one per virtual pipeline stage (parallel.vpp)."""
        from megatron.core import parallel_state as ps

        out = []
        for vp_stage in range(cfg.parallel.vpp or 1):
            stage = vp_stage if cfg.parallel.vpp is not None else None
            model = build_model(
                cfg.model, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
                vp_stage=stage, seed=cfg.train.seed, sequence_parallel=cfg.parallel.sequence_parallel)
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
        engine = MegatronRolloutEngine(pipeline_forward_fn(chunks, pg, never_generate_ids(tok)),
                                       tp_group=pg.tp, vocab_size=tok.vocab_size,
                                       eos_id=tok.eos_id, pad_id=tok.pad_id, model=chunks)
    return Parts(tokenizer=tok, model_chunks=chunks, ddp_chunks=ddp_chunks, optimizer=optimizer,
                 lr_schedule=LrSchedule.from_config(cfg.train), engine=engine, dataset=dataset,
                 rl_indices=rl_idx, sft_indices=sft_idx, sampler=sampler, ref_chunks=ref)


# ----------------------------------------------------------------------------- one step


def _sampling_params(cfg: PapoConfig, step: int, pg: ProcessGroups) -> SamplingParams:
    return SamplingParams.from_config(cfg.rollout, seed=steps.derive_seed(cfg.train.seed, step, pg.dp_rank))


def fill_log_probs(parts: Parts, batch: TrainBatch, cfg: PapoConfig, pg: ProcessGroups) -> None:
    """The no-grad passes: old (original image), masked (masked image), reference (if beta > 0)."""
    kw = dict(micro_batch_size=cfg.train.micro_batch_size, tp_group=pg.tp,
              vocab_size=parts.tokenizer.vocab_size, cp_group=pg.cp)
    batch.old_log_probs = compute_log_probs(parts.model_chunks, batch, **kw)
    if cfg.loss.uses_masked_branch:
        batch.masked_log_probs = compute_log_probs(parts.model_chunks, batch, masked_branch=True, **kw)
    if parts.ref_chunks is not None:
        batch.ref_log_probs = compute_log_probs(parts.ref_chunks, batch, **kw)


def _all_reduce_int(value: int, group: dist.ProcessGroup | None, op: dist.ReduceOp) -> int:
    t = torch.tensor(value, dtype=torch.int64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def _mini_batches(batch: TrainBatch, rows_per_update: int, micro: int, count: int) -> list[TrainBatch]:
    """Split into mini-batches of <= rows_per_update rows (padded to whole micro-batches), then
    append inert mini-batches up to `count` (every data-parallel replica takes `count` updates)."""
    out = []
    for start in range(0, batch.num_rows, rows_per_update):
        idx = list(range(start, min(start + rows_per_update, batch.num_rows)))
        out.append(pad_rows_to_multiple(batch.rows(idx), micro))
    while len(out) < count:
        out.append(inert_rows(batch, micro))
    return out


def _update(parts: Parts, batch: TrainBatch, cfg: PapoConfig, pg: ProcessGroups, step: int,
            loss_config: PapoLossConfig) -> list[dict[str, float]]:
    rows_per_update = max(cfg.train.micro_batch_size,
                          cfg.train.update_prompts * cfg.rollout.n // pg.dp_size)
    # the DAPO filter can leave replicas with different row counts: agree on the update count
    count = _all_reduce_int(-(-batch.num_rows // rows_per_update), pg.dp, dist.ReduceOp.MAX)
    out = []
    for _ in range(cfg.train.epochs_per_step):
        for mini in _mini_batches(batch, rows_per_update, cfg.train.micro_batch_size, count):
            lr = parts.lr_schedule.apply(parts.optimizer)
            m = papo_update(parts.ddp_chunks, parts.optimizer, mini, loss_config,
                            micro_batch_size=cfg.train.micro_batch_size, pg=pg,
                            vocab_size=parts.tokenizer.vocab_size, step=step)
            if not m.get("update_skipped"):
                parts.lr_schedule.advance()
            out.append({**m, "lr": lr})
    return out


def rl_step(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int) -> dict[str, float]:
    """One RL step (module docstring); returns metrics reduced over data-parallel ranks."""
    t0 = time.perf_counter()
    samples = [parts.dataset[parts.rl_indices[i]] for i in parts.sampler.next_batch()]
    model = parts.model_chunks[0]
    pixels = steps.prompt_pixels(model, samples)
    sync = steps.prepare_engine(parts.engine, parts.model_chunks, pg)  # vLLM: weights in, KV cache back
    result = steps.rollout(parts.engine, samples, pixels, _sampling_params(cfg, step, pg))
    parts.engine.release()  # vLLM: sleep, its memory goes back to training
    t_rollout = time.perf_counter() - t0
    rewards = steps.score(result, samples, parts.tokenizer, cfg.reward)
    adv = steps.group_advantages(rewards, cfg.rollout.n, cfg.algorithm)
    local = steps.rollout_metrics(result, rewards)
    local.update(adv.metrics)
    # Updates are collective over data-parallel replicas: skip only when no replica kept a group
    # (DAPO filter); a replica that kept none takes part with inert rows (no loss, no gradient).
    kept_anywhere = _all_reduce_int(int(adv.kept_rows.numel()), pg.dp, dist.ReduceOp.SUM)
    update_metrics: list[dict[str, float]] = []
    generated = float(result.metrics.get("generated_tokens", 0.0))
    if kept_anywhere > 0:
        masked_pixels = steps.masked_prompt_pixels(model, samples, cfg.masking, step)
        if adv.kept_rows.numel() == 0:
            adv = steps.Advantages(advantages=torch.zeros(len(result)), kept_rows=torch.arange(len(result)),
                                   metrics=adv.metrics)
            batch = inert_rows(steps.rollout_train_batch(result, adv, pixels, masked_pixels,
                                                         pad_id=parts.tokenizer.pad_id), len(result))
        else:
            batch = steps.rollout_train_batch(result, adv, pixels, masked_pixels,
                                              pad_id=parts.tokenizer.pad_id)
        batch = pad_rows_to_multiple(batch, cfg.train.micro_batch_size)
        fill_log_probs(parts, batch, cfg, pg)
        update_metrics = _update(parts, batch, cfg, pg, step, cfg.loss)
    seconds = time.perf_counter() - t0
    out = reduce_step_metrics([{k: torch.tensor(v) for k, v in local.items()}], pg.dp)
    if update_metrics:
        n = len(update_metrics)
        out.update({k: sum(m.get(k, 0.0) for m in update_metrics) / n for k in update_metrics[0]})
    out.update(step_time=seconds, rollout_time=t_rollout,
               tokens_per_s=generated * pg.dp_size / max(seconds, 1e-9), updates=float(len(update_metrics)))
    if "sync_seconds" in sync:
        out.update(weight_sync_time=sync["sync_seconds"], weight_sync_gb=sync["bytes"] / 2**30)
    return out


def sft_step(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int) -> dict[str, float]:
    """One supervised warm-start step: cross-entropy on the correct answer in the reward's format."""
    from megatron_papo.batch import micro_batch_dicts, pad_columns
    from megatron_papo.losses import token_mean
    from megatron_papo.ops import global_token_count, vocab_parallel_log_probs
    from megatron_papo.optim import optimizer_step, set_param_group_hparams, zero_grads
    from megatron_papo.schedule import global_mean_loss_scale

    g = torch.Generator().manual_seed(steps.derive_seed(cfg.train.seed, step, 7))
    per_rank = max(1, cfg.train.sft_batch_size // pg.dp_size)
    pick = torch.randint(0, len(parts.sft_indices), (per_rank * pg.dp_size,), generator=g)
    mine = pick[pg.dp_rank * per_rank:(pg.dp_rank + 1) * per_rank].tolist()
    samples = [parts.dataset[parts.sft_indices[i]] for i in mine]
    pixels = steps.prompt_pixels(parts.model_chunks[0], samples)
    batch = steps.sft_train_batch(samples, pixels, parts.tokenizer)
    batch = pad_rows_to_multiple(batch, cfg.train.micro_batch_size)
    batch = pad_columns(batch, sequence_multiple(parts.ddp_chunks))
    n_tok = global_token_count(batch.loss_mask, pg.dp)  # cp ranks hold the same rows
    vocab = parts.tokenizer.vocab_size

    def loss_fn(mb: dict, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        lp = vocab_parallel_log_probs(logits, mb["target"], pg.tp, vocab)
        nll = -token_mean(lp, mb["loss_mask"], n_tok)
        return nll, {"sft_nll": nll.detach()}

    mbs = micro_batch_dicts(batch, cfg.train.micro_batch_size, cp_rank=pg.cp_rank, cp_size=pg.cp_size)
    set_param_group_hparams(parts.optimizer, lr=cfg.train.sft_lr, weight_decay=cfg.train.weight_decay)
    zero_grads(parts.ddp_chunks, parts.optimizer)
    outs = run_microbatches(parts.ddp_chunks, mbs, model_forward, loss_fn, forward_only=False,
                            seq_length=batch.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                            loss_scale=global_mean_loss_scale(pg.dp_size, len(mbs)))
    _, grad_norm, _ = optimizer_step(parts.optimizer)
    out = share_from_last_stage(reduce_step_metrics(outs, pg.dp_cp, mode="sum") if outs else {}, pg)
    out["grad_norm"] = grad_norm
    return out


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a run leaves behind."""

    run_dir: Path
    metrics_path: Path
    checkpoint: Path | None
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float] = field(default_factory=dict)


def _trainer_state(parts: Parts, cfg: PapoConfig, step: int, phase: str) -> dict[str, Any]:
    return {"step": step, "phase": phase, "sampler": parts.sampler.state_dict(),
            "lr_schedule": parts.lr_schedule.state_dict(), "config": to_dict(cfg)}


def _save(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int, phase: str) -> Path | None:
    from megatron_papo.checkpointing import save_checkpoint

    if not cfg.checkpoint.dir:
        return None
    return save_checkpoint(cfg.checkpoint.dir, step, parts.ddp_chunks, parts.optimizer,
                           _trainer_state(parts, cfg, step, phase), pg, keep_last=cfg.checkpoint.keep_last)


def _ref_dir(cfg: PapoConfig) -> Path:
    return Path(cfg.checkpoint.dir) / "reference"


def _sync_reference(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, *, resumed: bool) -> None:
    """The reference model = the policy when RL starts (after the warm start); kept on disk so a
    resumed run uses the same one."""
    from megatron_papo.checkpointing import load_checkpoint, save_checkpoint

    if parts.ref_chunks is None:
        return
    if resumed and cfg.checkpoint.dir and (_ref_dir(cfg) / "latest").exists():
        load_checkpoint(_ref_dir(cfg), parts.ref_chunks, None, pg, load_optimizer=False, load_rng=False)
        return
    for ref, pol in zip(parts.ref_chunks, parts.model_chunks, strict=True):
        ref.load_state_dict(pol.state_dict())
    if cfg.checkpoint.dir:
        save_checkpoint(_ref_dir(cfg), 0, parts.ref_chunks, None, {"step": 0}, pg, keep_last=1)


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: config.json and safetensors weights."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / "model.safetensors").is_file()
                                              or (p / "model.safetensors.index.json").is_file())


def init_weights(parts: Parts, cfg: PapoConfig, pg: ProcessGroups) -> None:
    """checkpoint.init_weights: a project checkpoint (model weights only) or a Hugging Face
    folder (each rank reads its own TP/PP shards). The reference model copies the policy when
    RL starts."""
    from megatron_papo.checkpointing import load_checkpoint

    path = cfg.checkpoint.init_weights
    if is_hf_folder(path):
        if cfg.model.name != "qwen2_5_vl":
            raise ValueError(f"checkpoint.init_weights={path} is a Hugging Face folder, which only "
                             f"model.name=qwen2_5_vl reads (model.name is {cfg.model.name!r})")
        from megatron_papo.convert import check_all_hf_tensors_used
        from megatron_papo.models.hf_qwen2_5_vl import SafetensorsReader, load_hf_weights

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


def train(cfg: PapoConfig, pg: ProcessGroups, parts: Parts | None = None) -> TrainResult:
    """Run the whole job: [resume] -> [SFT warm start] -> RL steps (+ checkpoints, eval) -> summary."""
    from megatron_papo.checkpointing import load_checkpoint
    from megatron_papo.evaluate import evaluate

    parts = parts or build_parts(cfg, pg)
    run_dir = Path(cfg.logging.dir)
    start, phase = 0, "sft" if cfg.train.sft_warmup_steps > 0 else "rl"
    state = None
    if cfg.checkpoint.resume and Path(cfg.checkpoint.dir).exists():  # else: a first run, nothing yet
        state = load_checkpoint(cfg.checkpoint.dir, parts.ddp_chunks, parts.optimizer, pg)
        if state is not None:
            start, phase = int(state["step"]), state["phase"]
            parts.sampler.load_state_dict(state["sampler"])
            parts.lr_schedule.load_state_dict(state["lr_schedule"])
    if state is None and cfg.checkpoint.init_weights:  # a fresh run (nothing to resume yet)
        init_weights(parts, cfg, pg)
    logger = MetricsLogger(run_dir, enabled=is_rank_zero(), tensorboard=cfg.logging.tensorboard,
                           resume=cfg.checkpoint.resume and start > 0)
    sft_steps, total = cfg.train.sft_warmup_steps, cfg.train.sft_warmup_steps + cfg.train.steps
    bar = ProgressBar(total, initial=start, enabled=is_rank_zero() and cfg.logging.progress_bar)
    metrics: dict[str, float] = {}
    ckpt = None
    rl_started = False
    for step in range(start, total):
        if step < sft_steps:
            metrics = sft_step(parts, cfg, pg, step)
            metrics["phase_sft"] = 1.0
        else:
            if not rl_started:
                _sync_reference(parts, cfg, pg, resumed=start > sft_steps)
                parts.lr_schedule.apply(parts.optimizer)
                rl_started = True
            metrics = rl_step(parts, cfg, pg, step - sft_steps)
        phase = "sft" if step + 1 < sft_steps else "rl"
        if (step + 1) % cfg.logging.log_interval == 0 or step + 1 == total:
            logger.log(step + 1, metrics)
        bar.update(metrics, keys=("reward/mean", "reward/accuracy", "kl_prcp", "sft_nll"))
        interval = cfg.checkpoint.save_interval
        if interval and (step + 1) % interval == 0 and step + 1 < total:
            ckpt = _save(parts, cfg, pg, step + 1, phase)
        ev = cfg.evaluation.interval
        if ev > 0 and step >= sft_steps and (step + 1 - sft_steps) % ev == 0 and step + 1 < total:
            logger.log(step + 1, evaluate(parts, cfg, pg))
    bar.close()
    if total > start:
        ckpt = _save(parts, cfg, pg, total, phase) or ckpt
    eval_metrics = evaluate(parts, cfg, pg) if cfg.evaluation.interval >= 0 else {}
    if eval_metrics:
        logger.log(total, eval_metrics)
    logger.close()
    return TrainResult(run_dir=run_dir, metrics_path=logger.path, checkpoint=ckpt,
                       final_metrics=metrics, eval_metrics=eval_metrics)

