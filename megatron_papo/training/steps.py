"""The arrows of one RL step (DESIGN.md "The data path"), each a function with typed inputs:

    samples ─► prompt_pixels / masked_prompt_pixels ─► rollout ─► score ─► group_advantages
            ─► rollout_train_batch ─► (passes.compute_log_probs x3) ─► passes.papo_update

Everything here is per data-parallel rank and replicated across the tensor/pipeline ranks of
that replica (they see the same prompts, the same sampled tokens and the same rewards).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_papo.algorithms import filter_groups, group_normalized_advantages
from megatron_papo.config import AlgorithmConfig
from megatron_papo.data.dataset import Sample
from megatron_papo.data.tokenizer import Tokenizer
from megatron_papo.masking import MaskingConfig, mask_group_images
from megatron_papo.models.base import image_hw, resize_image
from megatron_papo.rewards import RewardConfig, RewardResult, compute_rewards
from megatron_papo.rollout import RolloutEngine, RolloutRequest, RolloutResult, SamplingParams
from megatron_papo.training.batch import TrainBatch, build_train_batch, inert_rows, pad_rows_to_multiple

SFT_RESPONSE = "<think> </think> \\boxed{{{answer}}}"
"""Target of the supervised warm start: the format the reward expects, with the right answer."""
SFT_RESPONSE_WITH_RATIONALE = "<think> {rationale} </think> \\boxed{{{answer}}}"
"""The same with the row's rationale inside the think block (``Sample.rationale``)."""


def sft_response(sample: Sample, use_rationale: bool = False) -> str:
    """The warm-start target text of ``sample``: its rationale (when it has one and
    ``use_rationale``) in the think block, then its boxed answer."""
    if use_rationale and sample.rationale:
        return SFT_RESPONSE_WITH_RATIONALE.format(rationale=sample.rationale, answer=sample.answer)
    return SFT_RESPONSE.format(answer=sample.answer)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. train seed, step, dp rank), stable across machines."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_pixels(model: torch.nn.Module, samples: Sequence[Sample]) -> list[Tensor | None]:
    """[P] per prompt: its images as model-ready pixels [n_img, C, H, W], or None (text only)."""
    return [model.preprocess_images(s.images) if s.images else None for s in samples]


def training_masking(masking: MaskingConfig, train_seed: int) -> MaskingConfig:
    """The masking config of an RL run: ``masking.seed`` mixed with ``train.seed``, so runs that
    differ only in ``train.seed`` draw different training masks (evaluation keeps
    ``masking.seed`` alone: every run is scored on the same masked images)."""
    return dataclasses.replace(masking, seed=derive_seed(train_seed, masking.seed, 13))


def masked_prompt_pixels(model: torch.nn.Module, samples: Sequence[Sample], masking: MaskingConfig,
                         step: int) -> list[Tensor | None]:
    """[P] per prompt: pixels of its patch-masked images (one mask per prompt, seeded by
    (masking.seed, step, sample.index), so independent of the rank and batch split; training
    passes ``training_masking(...)``)."""
    images = [list(s.images) for s in samples]
    if masking.space == "model_input":  # the mask's cells are model-input pixels (MaskingConfig.space)
        images = [[resize_image(im, model.resized_hw(image_hw(im))) for im in row] for row in images]
    masked = mask_group_images(images, 1, masking, step, prompt_indices=[s.index for s in samples])
    return [model.preprocess_images(m) if m else None for m in masked]


def prepare_engine(engine: RolloutEngine, model_chunks: Sequence[torch.nn.Module],
                   pg: Any) -> dict[str, float]:
    """Before generating: push the current weights (a no-op for the Megatron engine, a streamed
    sync for vLLM; collective over the model-parallel group) and take the generation memory back.
    Returns the sync's metrics (empty when the engine shares the training weights)."""
    stats = engine.sync_weights(model_chunks, pg)
    engine.resume()
    return dict(stats) if stats else {}


def rollout(engine: RolloutEngine, samples: Sequence[Sample], pixels: Sequence[Tensor | None],
            params: SamplingParams, batch_offset: int = 0) -> RolloutResult:
    """params.n responses per prompt, group-major; ``batch_offset``: the first prompt's position
    in the step's batch over all data-parallel ranks (each row's sampling stream is keyed by it,
    ``RolloutRequest.batch_offset``)."""
    request = RolloutRequest(prompt_ids=[list(s.prompt_ids) for s in samples],
                             images=[[] if p is None else [p] for p in pixels],
                             prompt_indices=[s.index for s in samples], batch_offset=batch_offset)
    return engine.generate(request, params)


def response_texts(result: RolloutResult, tokenizer: Tokenizer) -> list[str]:
    """Decoded responses with eos/pad removed (special reasoning tokens kept as text)."""
    drop = {tokenizer.eos_id, tokenizer.pad_id}
    return [tokenizer.decode([t for t in ids if t not in drop]) for ids in result.response_ids]


def score(result: RolloutResult, samples: Sequence[Sample], tokenizer: Tokenizer,
          reward: RewardConfig) -> RewardResult:
    """Rewards of every row (each row is scored against its prompt's ground truth)."""
    answers = [s.answer for s in samples for _ in range(result.group_size)]
    return compute_rewards(response_texts(result, tokenizer), answers, reward)


@dataclass
class Advantages:
    """Advantages of the rows kept for the update, and what the filter did."""

    advantages: Tensor
    """[R_kept] float32."""
    kept_rows: Tensor
    """[R_kept] int64 row indices into the rollout (whole groups)."""
    metrics: dict[str, float]


def group_advantages(rewards: RewardResult, group_size: int, algo: AlgorithmConfig) -> Advantages:
    """GRPO advantages over each group; with algo.group_filter, DAPO's online filter first."""
    adv = group_normalized_advantages(rewards.reward, group_size, norm_by_std=algo.norm_adv_by_std)
    rows = torch.arange(adv.shape[0])
    metrics: dict[str, float] = {}
    if algo.group_filter:
        rows, stats = filter_groups(rewards.accuracy, group_size, algo.filter_low, algo.filter_high)
        metrics.update(stats.metrics())
    return Advantages(advantages=adv[rows], kept_rows=rows, metrics=metrics)


def rollout_train_batch(result: RolloutResult, adv: Advantages, pixels: Sequence[Tensor | None],
                        masked_pixels: Sequence[Tensor | None], *, pad_id: int) -> TrainBatch:
    """The kept rows of a rollout as a TrainBatch (prompt pixels repeated over each group)."""
    padded = result.padded(pad_id)
    n = result.group_size
    rows = adv.kept_rows
    row_pixels = [pixels[int(r) // n] for r in rows]
    row_masked = [masked_pixels[int(r) // n] for r in rows]
    p = padded.prompt_ids.shape[1]
    batch = build_train_batch(padded.input_ids[rows], padded.attention_mask[rows], p,
                              padded.response_mask[rows], adv.advantages, row_pixels, row_masked,
                              pad_id=pad_id)
    # the engine's own log-probs of the sampled tokens (temperature 1), where the batch's loss
    # positions are (target t = token t + 1): for the rollout/training mismatch metric
    rollout_lp = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    rollout_lp[:, p - 1:p - 1 + padded.policy_log_probs.shape[1]] = padded.policy_log_probs[rows]
    batch.extras["rollout_log_probs"] = rollout_lp
    return batch


def rollout_logprob_mismatch(batch: TrainBatch) -> dict[str, float]:
    """|log p_rollout - log p_train| over the response tokens: mean and max (the engine's
    temperature-1 log-probs against the trainer's no-grad pass with the same weights). Empty on
    pipeline stages without the training log-probs; 0 for a batch of inert rows, so every
    data-parallel replica reports the same keys (the step's mean is then over replicas)."""
    rollout = batch.extras.get("rollout_log_probs")
    if batch.old_log_probs is None or rollout is None:
        return {}
    diff = (batch.old_log_probs - rollout.to(batch.old_log_probs.device)).abs()[batch.loss_mask]
    if diff.numel() == 0:
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    return {"rollout/logprob_diff_mean": float(diff.mean()), "rollout/logprob_diff_max": float(diff.max())}


def update_batch(result: RolloutResult, adv: Advantages, pixels: Sequence[Tensor | None],
                 masked_pixels: Sequence[Tensor | None], *, pad_id: int, micro_batch_size: int,
                 device: torch.device | str) -> TrainBatch:
    """The batch one RL step trains on, on the model's ``device`` (the RL path's device boundary).

    The kept rows (``rollout_train_batch``), or, on a data-parallel replica whose groups the DAPO
    filter all dropped while another replica kept some, every row made inert (no loss, no
    gradient: it takes part in the collectives only); padded with inert rows to whole
    micro-batches, then moved to ``device`` in one go.
    """
    if adv.kept_rows.numel() == 0:
        everything = Advantages(advantages=torch.zeros(len(result)), kept_rows=torch.arange(len(result)),
                                metrics=adv.metrics)
        batch = inert_rows(rollout_train_batch(result, everything, pixels, masked_pixels, pad_id=pad_id),
                           len(result))
    else:
        batch = rollout_train_batch(result, adv, pixels, masked_pixels, pad_id=pad_id)
    return pad_rows_to_multiple(batch, micro_batch_size).to(device)


def sft_update_batch(samples: Sequence[Sample], pixels: Sequence[Tensor | None], tokenizer: Tokenizer, *,
                     micro_batch_size: int, device: torch.device | str,
                     use_rationale: bool = False) -> TrainBatch:
    """The warm-start batch (``sft_train_batch``) padded to whole micro-batches, on ``device``
    (the SFT path's device boundary)."""
    batch = sft_train_batch(samples, pixels, tokenizer, use_rationale=use_rationale)
    return pad_rows_to_multiple(batch, micro_batch_size).to(device)


def sft_train_batch(samples: Sequence[Sample], pixels: Sequence[Tensor | None],
                    tokenizer: Tokenizer, *, use_rationale: bool = False) -> TrainBatch:
    """Supervised warm-start batch: each prompt followed by ``sft_response`` + eos (advantage 1)."""
    responses = [[*tokenizer.encode(sft_response(s, use_rationale)), tokenizer.eos_id] for s in samples]
    prompts = [list(s.prompt_ids) for s in samples]
    p, length = max(map(len, prompts)), max(map(len, responses))
    rows = len(samples)
    ids = torch.full((rows, p + length), tokenizer.pad_id, dtype=torch.long)
    attn = torch.zeros(rows, p + length, dtype=torch.bool)
    resp_mask = torch.zeros(rows, length, dtype=torch.bool)
    for r, (q, a) in enumerate(zip(prompts, responses, strict=True)):
        ids[r, p - len(q):p] = torch.tensor(q)
        ids[r, p:p + len(a)] = torch.tensor(a)
        attn[r, p - len(q):p + len(a)] = True
        resp_mask[r, :len(a)] = True
    return build_train_batch(ids, attn, p, resp_mask, torch.ones(rows), list(pixels), list(pixels),
                             pad_id=tokenizer.pad_id)


def rollout_metrics(result: RolloutResult, rewards: RewardResult) -> dict[str, float]:
    """Per-step rollout statistics (this rank's rows)."""
    lengths = result.response_lengths().float()
    out = {f"{k}": float(v) for k, v in rewards.metrics().items()}
    out.update(response_length=float(lengths.mean()),
               stop_fraction=sum(r == "stop" for r in result.finish_reason) / max(1, len(result)))
    return out
