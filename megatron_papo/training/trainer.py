"""The RL loop: the parts are built once (``training.parts``), then steps that read like
DESIGN.md's diagram.

    train(cfg, pg)               # [resume] -> [SFT warm start] -> RL steps -> checkpoints -> evaluation

One RL step (`rl_step`): prompts -> rollout (original images) -> rewards -> group advantages
(+ DAPO filter) -> one masked image per prompt -> no-grad passes (old, masked, reference) ->
micro-batched PAPO update(s) through megatron-core's schedule -> metrics.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.algorithms import group_normalized_advantages
from megatron_papo.config import PapoConfig, resume_drift, save_config, to_dict
from megatron_papo.distributed import ProcessGroups, barrier, is_rank_zero
from megatron_papo.losses import PapoLossConfig, token_mean
from megatron_papo.ops import global_token_count
from megatron_papo.ops.groups import all_reduce_int
from megatron_papo.rewards import RewardResult
from megatron_papo.rollout import RolloutResult, SamplingParams
from megatron_papo.training import dynamic_sampling, steps
from megatron_papo.training.batch import (
    TrainBatch,
    inert_rows,
    micro_batch_dicts,
    model_device,
    pad_columns,
    pad_rows_to_multiple,
)
from megatron_papo.training.checkpointing import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_papo.training.evaluation import evaluate
from megatron_papo.training.metrics import (
    MetricsLogger,
    ProgressBar,
    combine_update_metrics,
    reduce_step_metrics,
)
from megatron_papo.training.optim import (
    NonFiniteTrainingError,
    optimizer_step,
    set_param_group_hparams,
    sft_lr_at,
    zero_grads,
)
from megatron_papo.training.parts import Parts, build_parts, init_weights
from megatron_papo.training.passes import (
    compute_log_probs,
    model_forward,
    model_outputs,
    output_log_probs,
    papo_update,
    sequence_multiple,
    share_from_last_stage,
)
from megatron_papo.training.schedule import global_mean_loss_scale, run_microbatches

# ----------------------------------------------------------------------------- one step


def _sampling_params(cfg: PapoConfig, step: int, rnd: int = 0) -> SamplingParams:
    """The step's (round's) sampling: one seed for all data-parallel ranks; each row's stream is
    keyed by its place in the global batch (``RolloutRequest.batch_offset``), so the rollouts of
    a step do not depend on the data-parallel split."""
    keys = (cfg.train.seed, step) if rnd == 0 else (cfg.train.seed, step, rnd)
    seed = steps.derive_seed(*keys)
    return SamplingParams.from_config(cfg.rollout, seed=seed)


def log_prob_temperature(cfg: PapoConfig) -> float:
    """Temperature of the RL log-prob passes (old, masked, reference, update): the sampling
    temperature when ``loss.divide_logits_by_temperature`` (the reference), else 1."""
    return cfg.rollout.temperature if cfg.loss.divide_logits_by_temperature else 1.0


def fill_log_probs(parts: Parts, batch: TrainBatch, cfg: PapoConfig, pg: ProcessGroups) -> None:
    """The no-grad passes: old (original image), masked (masked image; only when the update does
    not run the masked branch itself, ``loss.masked_in_update``), reference (if beta > 0)."""
    kw = dict(micro_batch_size=cfg.train.micro_batch_size, tp_group=pg.tp,
              vocab_size=parts.tokenizer.vocab_size, cp_group=pg.cp, fused_linear=cfg.loss.fused_linear,
              temperature=log_prob_temperature(cfg))
    batch.old_log_probs = compute_log_probs(parts.model_chunks, batch, **kw)
    if cfg.loss.uses_masked_branch and not cfg.loss.masked_in_update:
        batch.masked_log_probs = compute_log_probs(parts.model_chunks, batch, masked_branch=True, **kw)
    if parts.ref_chunks is not None:
        batch.ref_log_probs = compute_log_probs(parts.ref_chunks, batch, **kw)


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
    count = all_reduce_int(-(-batch.num_rows // rows_per_update), pg.dp, dist.ReduceOp.MAX)
    out = []
    for _ in range(cfg.train.epochs_per_step):
        for mini in _mini_batches(batch, rows_per_update, cfg.train.micro_batch_size, count):
            lr = parts.lr_schedule.apply(parts.optimizer)
            m = papo_update(parts.ddp_chunks, parts.optimizer, mini, loss_config,
                            micro_batch_size=cfg.train.micro_batch_size, pg=pg,
                            vocab_size=parts.tokenizer.vocab_size, step=step,
                            temperature=log_prob_temperature(cfg))
            if not m.get("update_skipped"):
                parts.lr_schedule.advance()
            out.append({**m, "lr": lr})
    return out


def _sampling_round(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int,
                    rnd: int) -> dynamic_sampling.Round:
    """Round ``rnd`` of a step: the sampler's next prompts, their rollout and rewards. Round 0
    samples with the step's seed, later rounds with seeds of their own."""
    samples = [parts.dataset[parts.rl_indices[i]] for i in parts.sampler.next_batch()]
    pixels = steps.prompt_pixels(parts.model_chunks[0], samples)
    params = _sampling_params(cfg, step, rnd)
    result = steps.rollout(parts.engine, samples, pixels, params,
                           batch_offset=pg.dp_rank * parts.sampler.local_batch_size)
    return dynamic_sampling.Round(samples=samples, pixels=pixels, result=result,
                                  rewards=steps.score(result, samples, parts.tokenizer, cfg.reward))


@dataclass
class StepRollouts:
    """What an RL step trains on, after its sampling round(s)."""

    samples: list
    """The prompts, one per group (rows of ``result`` are ``rollout.n`` per prompt)."""
    pixels: list
    """Each prompt's image tensor (None for a text-only prompt)."""
    result: RolloutResult
    """The rollouts trained on."""
    advantages: steps.Advantages
    """Their advantages and the rows the filter kept."""
    metrics: dict[str, float]
    """Rollout, reward and filter metrics of every rollout generated this step (this rank)."""
    generated_tokens: float
    """Tokens generated this step on this rank, over every round."""


def _gather_step_rollouts(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int) -> StepRollouts:
    """The rollouts of an RL step: one round, or with the DAPO filter, rounds until enough groups
    survive (:mod:`~megatron_papo.training.dynamic_sampling`)."""
    algo = cfg.algorithm
    if not algo.group_filter:
        rnd = _sampling_round(parts, cfg, pg, step, 0)
        adv = steps.group_advantages(rnd.rewards, cfg.rollout.n, algo)
        local = {**steps.rollout_metrics(rnd.result, rnd.rewards), **adv.metrics}
        return StepRollouts(rnd.samples, rnd.pixels, rnd.result, adv, local,
                            float(rnd.result.metrics.get("generated_tokens", 0.0)))
    got = dynamic_sampling.gather_groups(lambda r: _sampling_round(parts, cfg, pg, step, r),
                                         target_groups=cfg.rollout.prompts_per_step,
                                         max_rounds=algo.max_sampling_rounds, low=algo.filter_low,
                                         high=algo.filter_high, dp_group=pg.dp)
    everything = RolloutResult.concat([g.result for g in got.generated])
    local = steps.rollout_metrics(everything, RewardResult.concat([g.rewards for g in got.generated]))
    generated_groups = everything.num_prompts
    local.update(got.metrics, **{"filter/kept_fraction": got.metrics["filter/kept_groups"] / generated_groups,
                                 "filter/generated_prompts": float(generated_groups)})
    generated = float(everything.metrics.get("generated_tokens", 0.0))
    if got.samples:
        adv = steps.Advantages(advantages=group_normalized_advantages(got.rewards, cfg.rollout.n,
                                                                      norm_by_std=algo.norm_adv_by_std),
                               kept_rows=torch.arange(len(got.result)), metrics=got.metrics)
        return StepRollouts(got.samples, got.pixels, got.result, adv, local, generated)
    first = got.generated[0]  # nothing to train on here: round 0's rows, made inert by update_batch
    adv = steps.Advantages(advantages=torch.zeros(0), kept_rows=torch.zeros(0, dtype=torch.long),
                           metrics=got.metrics)
    return StepRollouts(first.samples, first.pixels, first.result, adv, local, generated)


def rl_step(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int) -> dict[str, float]:
    """One RL step (module docstring); returns metrics reduced over data-parallel ranks."""
    t0 = time.perf_counter()
    model = parts.model_chunks[0]
    sync = steps.prepare_engine(parts.engine, parts.model_chunks, pg)  # vLLM: weights in, KV cache back
    got = _gather_step_rollouts(parts, cfg, pg, step)
    samples, pixels, result, adv, local = got.samples, got.pixels, got.result, got.advantages, got.metrics
    parts.engine.release()  # vLLM: sleep, its memory goes back to training
    t_rollout = time.perf_counter() - t0
    # Updates are collective over data-parallel replicas: skip only when no replica kept a group
    # (DAPO filter); a replica that kept none takes part with inert rows (no loss, no gradient).
    kept_anywhere = all_reduce_int(int(adv.kept_rows.numel()), pg.dp, dist.ReduceOp.SUM)
    update_metrics: list[dict[str, float]] = []
    if kept_anywhere > 0:
        masked_pixels = (steps.masked_prompt_pixels(model, samples, steps.training_masking(
            cfg.masking, cfg.train.seed), step) if cfg.loss.uses_masked_branch else [None] * len(samples))
        batch = steps.update_batch(result, adv, pixels, masked_pixels, pad_id=parts.tokenizer.pad_id,
                                   micro_batch_size=cfg.train.micro_batch_size,
                                   device=model_device(parts.model_chunks))
        fill_log_probs(parts, batch, cfg, pg)
        local.update(steps.rollout_logprob_mismatch(batch))
        update_metrics = _update(parts, batch, cfg, pg, step, cfg.loss)
    seconds = time.perf_counter() - t0
    local["data/read_failures_total"] = float(_read_failures(parts))  # summed over dp with the rest
    out = reduce_step_metrics([{k: torch.tensor(v) for k, v in local.items()}], pg.dp)
    out.update(combine_update_metrics(update_metrics))
    out.update(step_time=seconds, rollout_time=t_rollout,
               tokens_per_s=got.generated_tokens * pg.dp_size / max(seconds, 1e-9),
               updates=float(len(update_metrics)))
    if "sync_seconds" in sync:
        out.update(weight_sync_time=sync["sync_seconds"], weight_sync_gb=sync["bytes"] / 2**30)
    return out


def sft_step(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, step: int) -> dict[str, float]:
    """One supervised warm-start step: cross-entropy on the correct answer in the reward's format."""
    g = torch.Generator().manual_seed(steps.derive_seed(cfg.train.seed, step, 7))
    per_rank = max(1, cfg.train.sft_batch_size // pg.dp_size)
    if parts.sft_weights is None:
        pick = torch.randint(0, len(parts.sft_indices), (per_rank * pg.dp_size,), generator=g)
    else:  # train.sft_answer_balance: rows drawn by their answer's weight
        pick = torch.multinomial(parts.sft_weights, per_rank * pg.dp_size, replacement=True, generator=g)
    mine = pick[pg.dp_rank * per_rank:(pg.dp_rank + 1) * per_rank].tolist()
    samples = [parts.dataset[parts.sft_indices[i]] for i in mine]
    pixels = steps.prompt_pixels(parts.model_chunks[0], samples)
    batch = steps.sft_update_batch(samples, pixels, parts.tokenizer,
                                   micro_batch_size=cfg.train.micro_batch_size,
                                   device=model_device(parts.model_chunks),
                                   use_rationale=cfg.train.sft_rationale)
    batch = pad_columns(batch, sequence_multiple(parts.ddp_chunks))
    n_tok = global_token_count(batch.loss_mask, pg.dp)  # cp ranks hold the same rows
    vocab = parts.tokenizer.vocab_size

    def loss_fn(mb: dict, out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        nll = -token_mean(output_log_probs(out, mb["target"], pg.tp, vocab, weight), mb["loss_mask"], n_tok)
        return nll, {"sft_nll": nll.detach()}

    mbs = micro_batch_dicts(batch, cfg.train.micro_batch_size, cp_rank=pg.cp_rank, cp_size=pg.cp_size)
    lr = sft_lr_at(step, cfg.train)
    set_param_group_hparams(parts.optimizer, lr=lr, weight_decay=cfg.train.weight_decay)
    zero_grads(parts.ddp_chunks, parts.optimizer)
    with model_outputs(parts.ddp_chunks, cfg.loss.fused_linear) as weight:
        outs = run_microbatches(parts.ddp_chunks, mbs, model_forward, loss_fn, forward_only=False,
                                seq_length=batch.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                                loss_scale=global_mean_loss_scale(pg.dp_size, len(mbs)))
    failures = float(_read_failures(parts)) if pg.cp_rank == 0 else 0.0  # a count: each replica's once,
    for i, mb in enumerate(outs):  # in micro-batch 0, summed over dp with the step's metrics
        mb["data/read_failures_total"] = torch.tensor(failures if i == 0 else 0.0)
    out = share_from_last_stage(reduce_step_metrics(outs, pg.dp_cp, mode="sum") if outs else {}, pg)
    ok, grad_norm, _ = optimizer_step(parts.optimizer, loss_finite=math.isfinite(out.get("sft_nll", 0.0)))
    if not ok:
        zero_grads(parts.ddp_chunks, parts.optimizer)
    out.update(grad_norm=grad_norm, update_skipped=float(not ok), lr=lr)
    return out


# ----------------------------------------------------------------------------- the loop


_log = logging.getLogger("megatron_papo.trainer")


class _NonFiniteCounter:
    """Steps whose update was skipped for a non-finite gradient norm or loss: the total goes into
    the metrics (``nonfinite_grad_steps``); ``limit`` in a row ends the run."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        """Count step ``step`` (1-based); the stop message once ``limit`` in a row, else None."""
        if metrics.get("update_skipped", 0.0) > 0:
            self.total += 1
            self.in_a_row += 1
            _log.warning("step %d: non-finite gradient norm or loss (grad_norm=%s): update skipped "
                         "(gradients zeroed, no optimizer step, lr schedule not advanced); %d in a row",
                         step, metrics.get("grad_norm"), self.in_a_row)
        else:
            self.in_a_row = 0
        metrics["nonfinite_grad_steps"] = float(self.total)
        if self.in_a_row >= self.limit:
            return (f"step {step}: {self.in_a_row} steps in a row had a non-finite gradient norm or loss "
                    f"(train.max_consecutive_nonfinite={self.limit}); stopping before writing a checkpoint. "
                    "Lower train.lr / train.sft_lr, check the data, or resume from the last checkpoint")
        return None


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
    if not cfg.checkpoint.dir:
        return None
    return save_checkpoint(cfg.checkpoint.dir, step, parts.ddp_chunks, parts.optimizer,
                           _trainer_state(parts, cfg, step, phase), pg, keep_last=cfg.checkpoint.keep_last)


def _ref_dir(cfg: PapoConfig) -> Path:
    return Path(cfg.checkpoint.dir) / "reference"


def _sync_reference(parts: Parts, cfg: PapoConfig, pg: ProcessGroups, *, resumed: bool) -> None:
    """The reference model = the policy when RL starts (after the warm start); kept on disk so a
    resumed run uses the same one."""
    if parts.ref_chunks is None:
        return
    if resumed and cfg.checkpoint.dir:  # the reference is the policy as RL began: it cannot be rebuilt now
        if resolve_checkpoint(_ref_dir(cfg)) is None:  # checked at start (_check_reference): gone since
            raise _missing_reference(cfg)
        load_checkpoint(_ref_dir(cfg), parts.ref_chunks, None, pg, load_optimizer=False, load_rng=False)
        return
    for ref, pol in zip(parts.ref_chunks, parts.model_chunks, strict=True):
        ref.load_state_dict(pol.state_dict())
    if cfg.checkpoint.dir:
        save_checkpoint(_ref_dir(cfg), 0, parts.ref_chunks, None, {"step": 0}, pg, keep_last=1)


def _newest_intact(ckpt_dir: str, pg: ProcessGroups) -> Path | None:
    """The newest checkpoint under ``ckpt_dir`` that passes its integrity check (``latest`` first,
    then the older ones ``keep_last`` kept), each damaged one named in a warning; None when there
    is none at all; CheckpointError when there are some but none is intact."""
    latest = resolve_checkpoint(ckpt_dir) if Path(ckpt_dir).exists() else None
    if latest is None:
        return None
    candidates = [latest] + [c for c in reversed(list_checkpoints(ckpt_dir)) if c != latest]
    problems = []
    for ckpt in candidates:
        problem = verify_checkpoint(ckpt, pg)
        if problem is None:
            return ckpt
        problems.append(problem)
        if is_rank_zero():
            _log.warning("checkpoint %s is damaged (%s); trying an older one", ckpt, problem)
    raise CheckpointError(f"no intact checkpoint under {ckpt_dir}: " + "; ".join(problems))


def _earlier_checkpoints(ckpt_dir: str) -> str:
    """The checkpoints (complete or not) already under ``ckpt_dir``, said briefly; '' for none."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return ""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if (root / "reference").is_dir():
        found.append("reference")
    if not found:
        return ""
    return ", ".join(found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def _set_earlier_run_aside(cfg: PapoConfig, ckpt_dir: str, earlier: str, pg: ProcessGroups) -> None:
    """A fresh run into a ``checkpoint.dir`` that holds checkpoints: an earlier run of the same
    maths (no RESUME_DRIFT_KEYS field differs from its newest checkpoint's config; the layout may)
    is moved to ``<dir>.prev-<n>`` and said in one line, so nothing is pruned or mixed; another
    run's is refused, naming the fields (collective: rank 0 moves, then a barrier)."""
    root = Path(ckpt_dir)
    newest = list_checkpoints(root)
    drift = resume_drift(read_trainer_state(newest[-1]).get("config") or {}, to_dict(cfg)) if newest else []
    if drift:
        raise CheckpointError(f"checkpoint.dir {ckpt_dir} holds another run's checkpoints ({earlier}), whose "
                              f"config differs in fields that change the maths: {'; '.join(drift)}. A "
                              "fresh run there would prune them and mix the two: set checkpoint.dir to a new "
                              "folder, or pass --resume to continue that run")
    if is_rank_zero():
        n = 1
        while (aside := root.with_name(f"{root.name}.prev-{n}")).exists():
            n += 1
        root.rename(aside)
        _log.info("%s held an earlier run's checkpoints (%s), same config: moved to %s", root, earlier, aside)
    barrier(pg.world)


def _missing_reference(cfg: PapoConfig) -> CheckpointError:
    return CheckpointError(f"{_ref_dir(cfg)}: the reference model's checkpoint is missing; a run resumed "
                           "in its RL phase cannot rebuild it (it is the policy at the first RL step). "
                           "Restore the folder, or set loss.ref_kl_coef=0 with --resume-allow-changes")


def _check_reference(cfg: PapoConfig, found: Path, pg: ProcessGroups) -> None:
    """A run resumed in its RL phase with a reference model needs ``<checkpoint.dir>/reference``
    intact: checked now, with the policy's checkpoint, not at the first RL step (collective)."""
    if cfg.loss.ref_kl_coef <= 0:
        return
    state = read_trainer_state(found)
    if state.get("phase") != "rl" or int(state.get("step", 0)) <= cfg.train.sft_warmup_steps:
        return  # RL has not begun in that checkpoint: the reference is built from the policy then
    ref = resolve_checkpoint(_ref_dir(cfg)) if _ref_dir(cfg).exists() else None
    if ref is None:
        raise _missing_reference(cfg)
    problem = verify_checkpoint(ref, pg)
    if problem is not None:
        raise CheckpointError(f"the reference model's checkpoint {ref} is damaged ({problem}); it has no "
                              "older copy (every policy checkpoint of the RL phase shares it)")


def resume_point(cfg: PapoConfig, pg: ProcessGroups) -> Path | None:
    """The checkpoint this run continues (None: a fresh start), said in one line on rank 0.

    ``checkpoint.resume`` with no checkpoint under ``checkpoint.dir`` is a CheckpointError (a
    mistyped dir must not silently start over) unless ``checkpoint.resume_or_start``; a damaged
    newest checkpoint gives way to the newest intact one (collective: the integrity check)."""
    ckpt_dir = cfg.checkpoint.dir
    found = None
    if cfg.checkpoint.resume:
        found = _newest_intact(ckpt_dir, pg)
        if found is None and not cfg.checkpoint.resume_or_start:
            raise CheckpointError(f"--resume: no checkpoint under {ckpt_dir} (checkpoint.dir); pass "
                                  "--resume-or-start to start fresh when there is none")
        if found is not None:
            _check_reference(cfg, found, pg)
    elif ckpt_dir and (earlier := _earlier_checkpoints(ckpt_dir)):
        _set_earlier_run_aside(cfg, ckpt_dir, earlier, pg)
    if is_rank_zero():
        if found is not None:
            _log.info("resuming from %s", found)
        else:
            _log.info("starting fresh (%s)", f"no checkpoint under {ckpt_dir}" if cfg.checkpoint.resume
                      else "no --resume")
    return found


def _check_resume_drift(cfg: PapoConfig, state: dict[str, Any], ckpt: Path) -> None:
    """Stop (CheckpointError) when fields that change the maths differ from the checkpoint's saved
    config, unless ``checkpoint.resume_allow_changes`` (then each is logged)."""
    drift = resume_drift(state.get("config") or {}, to_dict(cfg))
    if drift and not cfg.checkpoint.resume_allow_changes:
        raise CheckpointError(f"{ckpt}: this run differs from the checkpoint's config in fields that change "
                              f"the maths: {'; '.join(drift)}. Restore them, or pass --resume-allow-changes")
    if is_rank_zero():
        for line in drift:
            _log.warning("resuming with a changed field (--resume-allow-changes): %s", line)


def _read_failures(parts: Parts) -> int:
    """Image reads that failed on this rank since the datasets were built (training and eval):
    each sample was replaced by the next good row (data.dataset); counted, never silent."""
    datasets = [parts.dataset, parts.extra.get("eval_dataset")]
    return sum(d.stats.read_failures for d in datasets if d is not None)


def _report_read_failures(parts: Parts, pg: ProcessGroups) -> None:
    """One line at the end of a run that met unreadable images (collective over dp)."""
    total = all_reduce_int(_read_failures(parts), pg.dp)
    if total and is_rank_zero():
        first = parts.dataset.stats.examples[-3:]
        _log.warning("%d image read(s) failed during the run (files removed or damaged after the data were "
                     "checked); each sample was replaced by the next good row (metric "
                     "data/read_failures_total). Last named here: %s", total, "; ".join(first) or "none")


def train(cfg: PapoConfig, pg: ProcessGroups, parts: Parts | None = None) -> TrainResult:
    """Run the whole job: [resume] -> [SFT warm start] -> RL steps (+ checkpoints, eval) -> summary."""
    found = resume_point(cfg, pg)  # before the model is built: a wrong dir fails in seconds
    parts = parts or build_parts(cfg, pg)
    run_dir = Path(cfg.logging.dir)
    start, phase = 0, "sft" if cfg.train.sft_warmup_steps > 0 else "rl"
    state = None
    if found is not None:
        state = load_checkpoint(found, parts.ddp_chunks, parts.optimizer, pg, verify=False)  # just verified
        _check_resume_drift(cfg, state, found)
        start, phase = int(state["step"]), state["phase"]
        parts.sampler.load_state_dict(state["sampler"])
        parts.lr_schedule.load_state_dict(state["lr_schedule"])
        if is_rank_zero():
            _log.info("resumed at step %d (%s phase)", start, phase)
    if state is None and cfg.checkpoint.init_weights:  # a fresh run (nothing to resume yet)
        init_weights(parts, cfg, pg)
    logger = MetricsLogger(run_dir, enabled=is_rank_zero(), tensorboard=cfg.logging.tensorboard,
                           resume=cfg.checkpoint.resume and start > 0, resume_step=start)
    if is_rank_zero():  # after the resume checks: a refused run overwrites nothing
        save_config(cfg, run_dir / "config.yaml")
    sft_steps, total = cfg.train.sft_warmup_steps, cfg.train.sft_warmup_steps + cfg.train.steps
    bar = ProgressBar(total, initial=start, enabled=is_rank_zero() and cfg.logging.progress_bar)
    metrics: dict[str, float] = {}
    ckpt = None
    rl_started = False
    nonfinite = _NonFiniteCounter(cfg.train.max_consecutive_nonfinite)
    on_cuda = torch.cuda.is_available()
    for step in range(start, total):
        if on_cuda:  # peak memory of each step (host-side counters: no device sync)
            torch.cuda.reset_peak_memory_stats()
        if step < sft_steps:
            metrics = sft_step(parts, cfg, pg, step)
            metrics["phase_sft"] = 1.0
        else:
            if not rl_started:
                _sync_reference(parts, cfg, pg, resumed=start > sft_steps)
                parts.lr_schedule.apply(parts.optimizer)
                rl_started = True
            metrics = rl_step(parts, cfg, pg, step - sft_steps)
        if on_cuda:
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        phase = "sft" if step + 1 < sft_steps else "rl"
        stop = nonfinite.update(step + 1, metrics)  # counts into metrics; checked after logging them
        if (step + 1) % cfg.logging.log_interval == 0 or step + 1 == total or stop:
            logger.log(step + 1, metrics)
        if stop:  # before any checkpoint of this step: the last one written stays the newest
            logger.close()
            raise NonFiniteTrainingError(stop)
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
    _report_read_failures(parts, pg)
    return TrainResult(run_dir=run_dir, metrics_path=logger.path, checkpoint=ckpt,
                       final_metrics=metrics, eval_metrics=eval_metrics)

