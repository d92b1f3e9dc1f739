"""The rollout interface: what a generation engine is asked for and what it returns.

    params = SamplingParams.from_config(cfg.rollout, stop_token_ids=[tok.eos_id], seed=step_seed)
    result = engine.generate(RolloutRequest(prompt_ids, images, prompt_indices), params)
    batch = result.padded(pad_id)          # [R, P] / [R, L] tensors for the trainer

Rows are **group-major**: prompt ``i`` of the request owns rows ``i*n .. i*n + n-1`` of the
result (``n = params.n``), so a GRPO group is a contiguous slice (``result.group(i)``).

Two log-probs come back for every response token:

* ``response_log_probs`` -- log-prob under the distribution the token was actually drawn from:
  logits / temperature, restricted to the top-k / top-p set, renormalised. 0 for greedy decoding.
  This is what an importance-sampling correction for the rollout policy needs.
* ``policy_log_probs`` -- log-prob under the plain policy, ``log_softmax(logits)`` at temperature 1
  over the whole (unpadded) vocabulary. This is comparable with the trainer's own forward; the
  trainer still recomputes its ``old_log_probs`` (rollout and training numerics may differ).

Engines: :class:`megatron_papo.rollout.MegatronRolloutEngine` (shares the training model; any
machine) and :class:`megatron_papo.rollout.vllm_engine.VLLMRolloutEngine` (colocated vLLM, GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "FinishReason",
    "PaddedRollout",
    "RolloutEngine",
    "RolloutRequest",
    "RolloutResult",
    "SamplingParams",
]

FinishReason = Literal["stop", "length"]
"""``"stop"``: the response ended with eos or a stop token (kept as its last token);
``"length"``: it reached ``max_new_tokens`` without one."""


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled (one set for the whole request)."""

    n: int = 1
    """Responses per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Logits are divided by it before sampling; 0 = greedy (argmax, sampling log-prob 0)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: keep the most likely tokens until their mass reaches top_p
    (at least one token is always kept); 1 = off."""
    top_k: int = -1
    """Keep the k most likely tokens (ties at the k-th value are kept too); -1 = off."""
    max_new_tokens: int = 256
    """Response length limit (stop token included)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response besides the engine's eos id (single-token stops only)."""
    seed: int = 0
    """Seed of the sampling generator: the same seed and request give the same responses.
    The trainer derives it from (train.seed, step[, round]); rows are told apart by their place in
    the global batch (RolloutRequest.batch_offset), not by the seed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be an int >= 1, got {self.n!r}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            problems.append(f"top_k must be -1 (off) or an int >= 1, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if not isinstance(self.seed, int):
            problems.append(f"seed must be an int, got {self.seed!r}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature 0)."""
        return self.temperature == 0

    @classmethod
    def from_config(cls, rollout: Any, stop_token_ids: Sequence[int] = (), *, seed: int = 0,
                    n: int | None = None) -> SamplingParams:
        """From a ``config.RolloutConfig``; ``stop_token_ids`` are its ``stop`` strings already
        tokenised by the caller (single tokens). ``n`` overrides ``rollout.n`` (e.g. evaluation)."""
        return cls(n=rollout.n if n is None else n, temperature=rollout.temperature,
                   top_p=rollout.top_p, top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens,
                   stop_token_ids=tuple(stop_token_ids), seed=seed)


@dataclass
class RolloutRequest:
    """A batch of prompts to answer (each answered ``params.n`` times)."""

    prompt_ids: list[list[int]]
    """Token ids of each prompt (image placeholder tokens already expanded by the processor)."""
    images: list[list[Any]] | None = None
    """Per prompt, its model-ready image inputs (pixel tensors) or an empty list / None for a
    text-only prompt. None = no images at all."""
    prompt_indices: list[int] | None = None
    """Global id of each prompt (dataset index); None = 0..len-1."""
    batch_offset: int = 0
    """Position of this request's first prompt in the step's batch over all data-parallel ranks
    (rank r of a contiguous split: r * prompts per rank). Row k of prompt i draws its tokens from
    the stream of (params.seed, (batch_offset + i) * n + k), so a row's responses depend on its
    place in the global batch, not on the split (the Megatron engine's per-row uniforms,
    vLLM's per-request seeds)."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("RolloutRequest needs at least one prompt")
        if any(len(p) == 0 for p in self.prompt_ids):
            raise ValueError("every prompt needs at least one token")
        num = len(self.prompt_ids)
        if self.images is None:
            self.images = [[] for _ in range(num)]
        self.images = [[] if imgs is None else list(imgs) for imgs in self.images]
        if self.prompt_indices is None:
            self.prompt_indices = list(range(num))
        if not isinstance(self.batch_offset, int) or self.batch_offset < 0:
            raise ValueError(f"batch_offset must be an int >= 0, got {self.batch_offset!r}")
        if len(self.images) != num or len(self.prompt_indices) != num:
            raise ValueError(f"{num} prompts but {len(self.images)} image lists and "
                             f"{len(self.prompt_indices)} prompt indices")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def has_images(self) -> bool:
        """True if any prompt carries an image."""
        return any(any(img is not None for img in imgs) for imgs in self.images)


@dataclass
class PaddedRollout:
    """A :class:`RolloutResult` as tensors (R rows, P = longest prompt, L = longest response).

    Prompts are LEFT-padded and responses RIGHT-padded, so ``input_ids`` is one contiguous
    sequence per row with the response starting at column P.
    """

    prompt_ids: Tensor
    """[R, P] int64, left-padded with pad_id."""
    prompt_mask: Tensor
    """[R, P] bool, True at real prompt tokens."""
    response_ids: Tensor
    """[R, L] int64, right-padded with pad_id."""
    response_mask: Tensor
    """[R, L] bool, True at generated tokens (the final stop token included)."""
    response_log_probs: Tensor
    """[R, L] float32, sampling-distribution log-probs (0 at padding)."""
    policy_log_probs: Tensor
    """[R, L] float32, temperature-1 policy log-probs (0 at padding)."""

    @property
    def input_ids(self) -> Tensor:
        """[R, P + L] prompt then response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[R, P + L] bool padding mask (True = real token)."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> Tensor:
        """[R, P + L] positions counted from each row's first real token (0 at left padding)."""
        return position_ids_from_mask(self.attention_mask)


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """[B, S] bool padding mask -> [B, S] int64 positions: 0, 1, ... from the first real token;
    left padding gets 0, positions after a real token keep counting."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _pad_rows(rows: Sequence[Sequence[float | int]], width: int, value: float | int,
              dtype: torch.dtype, left: bool) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for r, row in enumerate(rows):
        if len(row):
            vals = torch.tensor(row, dtype=dtype)
            if left:
                out[r, width - len(row):] = vals
            else:
                out[r, :len(row)] = vals
    return out


def _lengths_mask(lengths: Sequence[int], width: int, left: bool) -> Tensor:
    lens = torch.tensor(list(lengths), dtype=torch.long).unsqueeze(1)
    cols = torch.arange(width).unsqueeze(0)
    return cols >= width - lens if left else cols < lens


@dataclass
class RolloutResult:
    """Responses of one request, group-major (prompt i -> rows i*n .. i*n+n-1); one entry per row."""

    group_size: int
    """n: responses per prompt."""
    prompt_indices: list[int]
    """Global prompt id of each row (repeated n times per prompt)."""
    prompt_ids: list[list[int]]
    """Prompt tokens of each row (unpadded)."""
    response_ids: list[list[int]]
    """Generated tokens of each row (unpadded; ends with the stop token when finish_reason is
    "stop")."""
    response_log_probs: list[list[float]]
    """Per generated token: log-prob under the SAMPLING distribution (temperature, top-k, top-p
    applied, renormalised); 0 under greedy decoding."""
    policy_log_probs: list[list[float]]
    """Per generated token: log-prob under the plain policy at temperature 1 (full vocabulary)."""
    finish_reason: list[FinishReason]
    """Either "stop" (eos / stop token generated) or "length" (max_new_tokens reached)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Engine-side numbers (seconds, tokens generated, ...), for logging only."""

    def __post_init__(self) -> None:
        rows = len(self.prompt_ids)
        fields = (self.prompt_indices, self.response_ids, self.response_log_probs,
                  self.policy_log_probs, self.finish_reason)
        if any(len(f) != rows for f in fields):
            raise ValueError("RolloutResult fields must all have one entry per row")
        if self.group_size < 1 or rows % self.group_size:
            raise ValueError(f"{rows} rows are not a whole number of groups of {self.group_size}")
        for r in range(rows):
            if not (len(self.response_ids[r]) == len(self.response_log_probs[r])
                    == len(self.policy_log_probs[r])):
                raise ValueError(f"row {r}: response ids and log-probs differ in length")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def concat(cls, parts: Sequence[RolloutResult]) -> RolloutResult:
        """The results of consecutive slices of one request, as one result (rows in order).
        Metrics: "seconds" is the slowest part's, the others are summed."""
        if not parts:
            raise ValueError("RolloutResult.concat needs at least one part")
        if len({p.group_size for p in parts}) != 1:
            raise ValueError(f"parts have different group sizes {sorted({p.group_size for p in parts})}")
        metrics: dict[str, float] = {}
        for p in parts:
            for k, v in p.metrics.items():
                metrics[k] = max(metrics.get(k, v), v) if k == "seconds" else metrics.get(k, 0.0) + v
        return cls(group_size=parts[0].group_size,
                   prompt_indices=[x for p in parts for x in p.prompt_indices],
                   prompt_ids=[x for p in parts for x in p.prompt_ids],
                   response_ids=[x for p in parts for x in p.response_ids],
                   response_log_probs=[x for p in parts for x in p.response_log_probs],
                   policy_log_probs=[x for p in parts for x in p.policy_log_probs],
                   finish_reason=[x for p in parts for x in p.finish_reason], metrics=metrics)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids) // self.group_size

    def group(self, i: int) -> slice:
        """Rows of prompt i (its GRPO group)."""
        return slice(i * self.group_size, (i + 1) * self.group_size)

    def response_lengths(self) -> Tensor:
        """[R] int64 number of generated tokens per row."""
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def padded(self, pad_id: int, device: torch.device | str | None = None) -> PaddedRollout:
        """All rows as tensors: prompts left-padded to P, responses right-padded to L."""
        p = max(len(x) for x in self.prompt_ids)
        resp_len = max(1, max(len(x) for x in self.response_ids))
        out = PaddedRollout(
            prompt_ids=_pad_rows(self.prompt_ids, p, pad_id, torch.long, left=True),
            prompt_mask=_lengths_mask([len(x) for x in self.prompt_ids], p, left=True),
            response_ids=_pad_rows(self.response_ids, resp_len, pad_id, torch.long, left=False),
            response_mask=_lengths_mask([len(x) for x in self.response_ids], resp_len, left=False),
            response_log_probs=_pad_rows(self.response_log_probs, resp_len, 0.0, torch.float32, False),
            policy_log_probs=_pad_rows(self.policy_log_probs, resp_len, 0.0, torch.float32, False),
        )
        if device is not None:
            out = PaddedRollout(**{k: v.to(device) for k, v in vars(out).items()})
        return out


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns prompts into sampled responses (Megatron generation, vLLM, ...).

    Collective: on a model-parallel group every rank calls ``generate`` with the same request
    and gets the same result.
    """

    def generate(self, request: RolloutRequest, params: SamplingParams) -> RolloutResult:
        """Sample ``params.n`` responses per prompt; rows group-major."""
        ...

    def sync_weights(self, *args: Any, **kwargs: Any) -> None:
        """Push the trainer's current weights to the engine (no-op when the engine shares them)."""
        ...

    def release(self) -> None:
        """Free generation memory (weights copy, KV cache) while the trainer runs."""
        ...

    def resume(self) -> None:
        """Take the memory back before the next ``generate``."""
        ...
