"""Generation with the training model itself (megatron-core, any machine, any tensor parallelism).

    engine = MegatronRolloutEngine(gpt_forward_fn(model), tp_group=pg.tp, vocab_size=V,
                                   eos_id=tok.eos_id, pad_id=tok.pad_id, model=model)
    result = engine.generate(RolloutRequest(prompt_ids), SamplingParams(n=5, seed=step))

Decoding is batched over all prompts x n responses (optionally in chunks of ``max_batch_size``
rows). Prompts are left-padded so every row's next token sits in the last column; positions
count from each row's first real token, so padding does not change a row's tokens.

Tensor parallelism: each TP rank runs ``forward_fn`` on its shard and gets ``[B, S, V/tp]``
vocab-parallel logits; only the LAST position ``[B, V/tp]`` is all-gathered (``[B, V]``, small),
and every TP rank draws the same per-row uniforms (``sampling.counter_uniform``, keyed by the
request's seed and each row's global id ``(request.batch_offset + prompt) * n + k``), so all ranks
pick the same tokens without broadcasting them, and a row's tokens do not depend on the rows it
is batched with nor on how the step's prompts are split over data-parallel ranks. One all-reduce
per batch checks that they did (``check_tp_agreement``; ``debug=True`` checks after every step).

Cost. With a KV cache (``kv_cache=True``, the default where the forward supports it: see
``ForwardFn``), each distinct prompt goes through the model once (the prefill: its images
through the vision tower once, then its KV cache copied to the n rows of its group), and each
new token costs one token-forward over the cached keys: O(P + L) token-forwards for L tokens
after a P-token prompt (rollout/kv_cache.py: megatron-core's static inference context and what
this engine adds to it; under context parallelism every cp rank runs the whole, unsharded
sequence). Without one (``kv_cache=False``, or a forward that cannot cache: sequence parallelism,
Transformer Engine specs) the engine recomputes the whole sequence at
every step, ~sum_{t<L} (P + t) token-forwards, O(L (P + L)), and reruns the vision encoder each
step; that path stays as the reference the cached one is tested against. Rows that finished are
dropped from the next forward (their outputs are pad). The sampling noise is drawn for the live
rows only, so a seed reproduces responses for the same request, ``max_batch_size`` and ``n``
(and any TP size, cached or not), not across different batchings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.data.collate import left_pad
from megatron_papo.rollout.base import (
    FinishReason,
    RolloutRequest,
    RolloutResult,
    SamplingParams,
    position_ids_from_mask,
)
from megatron_papo.rollout.kv_cache import KVCache
from megatron_papo.rollout.sampling import counter_uniform, policy_log_probs, row_keys, sample

__all__ = ["ForwardFn", "MegatronRolloutEngine", "gpt_forward_fn"]

ForwardFn = Callable[..., Tensor]
"""``forward_fn(input_ids [B, S] int64, position_ids [B, S] int64, attention_mask [B, S] bool
(True = real token), pixel_values) -> logits [B, S, V_local]``, vocab-parallel (this TP rank's
contiguous vocabulary slice). ``pixel_values`` is None for a text-only batch, else one list per
row holding that row's image inputs (the adapter collates them as its model needs).

A forward that can decode with a KV cache says so with the attribute ``supports_kv_cache =
True`` and takes ``cache=`` (a :class:`~megatron_papo.rollout.kv_cache.KVCache`): first the
prompts as above (the prefill), then ``forward_fn(new_tokens [B, 1], None, None, None,
cache=cache)`` per step; with a cache it returns the last position's logits over the whole
padded vocabulary [B, 1, V_pad] (megatron-core gathers the TP shards in inference mode)."""


def gpt_forward_fn(model: torch.nn.Module) -> ForwardFn:
    """A ``ForwardFn`` for a text-only megatron-core ``GPTModel`` (local or TE spec, no labels).

    Builds megatron's boolean attention mask ``[B, 1, S, S]`` (True = masked out): causal, and
    padded keys masked. Padded query rows then see no key; megatron's local softmax fills masked
    scores with -10000, so they stay finite (and are never used).
    """

    def forward(input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
                pixel_values: list[list[Any]] | None, cache: KVCache | None = None) -> Tensor:
        if pixel_values is not None:
            raise ValueError("gpt_forward_fn is text-only but the request carries images")
        if cache is None:
            s = input_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).triu(1)
            mask = causal[None, None] | ~attention_mask[:, None, None, :]
            return model(input_ids, position_ids, mask)
        if cache.is_prefill:
            positions = position_ids.unsqueeze(0).expand(3, -1, -1)
            mask = cache.prefill_inputs(attention_mask, positions)
        else:
            positions, mask = cache.decode_inputs(input_ids.shape[1])
        logits = model(input_ids, positions[0], mask, inference_context=cache.context,
                       runtime_gather_output=True)
        cache.advance(input_ids.shape[1])
        return logits

    forward.supports_kv_cache = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def eval_no_grad(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd inside; each module's training flag restored after."""
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def gather_vocab(local: Tensor, tp_group: dist.ProcessGroup | None) -> Tensor:
    """[B, V/tp] this rank's vocabulary slice -> [B, V] float32, slices in TP-rank order."""
    local = local.float().contiguous()
    size = _group_size(tp_group)
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=tp_group)
    return torch.cat(parts, dim=-1)


def check_same_across_group(tokens: Tensor, group: dist.ProcessGroup | None) -> None:
    """Raise if ``tokens`` (any int tensor, same shape on all ranks) differ across ``group``;
    one all-reduce (max of +x and -x gives max and min at once)."""
    if _group_size(group) == 1:
        return
    both = torch.stack([tokens, -tokens]).long()
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not (torch.equal(both[0], tokens.long()) and torch.equal(-both[1], tokens.long())):
        raise RuntimeError("tensor-parallel ranks sampled different tokens: the gathered logits or "
                           "the sampling seeds differ between ranks")


@dataclass
class _Rows:
    """The rows of one decoding batch (B rows)."""

    prompts: list[list[int]]
    images: list[list[Any]] | None


@dataclass
class _Decoded:
    """What one batch produced; [B, T] tensors with T <= max_new_tokens."""

    tokens: Tensor
    """[B, T] int64 generated tokens, pad after a row finished."""
    sampling_lp: Tensor
    """[B, T] float32 log-probs under the sampling distribution (0 at padding)."""
    policy_lp: Tensor
    """[B, T] float32 log-probs at temperature 1 (0 at padding)."""
    lengths: Tensor
    """[B] int64 generated tokens per row."""
    stopped: Tensor
    """[B] bool, True when the row ended with a stop token."""


def left_pad_with_room(prompts: Sequence[Sequence[int]], pad_id: int, extra: int) -> tuple[Tensor, Tensor]:
    """Prompts -> (tokens [B, P + extra] int64, mask [B, P + extra] bool): prompts left-padded
    into the first P columns (data.collate.left_pad), then ``extra`` empty (pad, False) columns
    for the response."""
    ids, mask = left_pad(prompts, pad_id)
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id),
            torch.nn.functional.pad(mask, (0, extra), value=False))


class MegatronRolloutEngine:
    """Batched autoregressive sampling over a vocab-parallel ``forward_fn`` (see module doc).

    Args:
        forward_fn: the model's forward (see :data:`ForwardFn`), e.g. ``gpt_forward_fn(model)``.
        tp_group: tensor-parallel group of ``forward_fn``'s logits; None = not parallel.
        vocab_size: true vocabulary size (columns >= it are padding and never sampled).
        eos_id: ends a response (kept as its last token).
        pad_id: fills prompts' left padding and finished rows.
        max_batch_size: rows decoded together; None = all prompts x n at once.
        model: module(s) behind ``forward_fn``: put in eval mode while generating, their
            training flags restored after. None = the caller handles modes.
        check_tp_agreement: one all-reduce per batch verifying all TP ranks generated the same.
        debug: also verify after every step (one all-reduce per step).
        kv_cache: decode with a KV cache when ``forward_fn.supports_kv_cache`` (module docstring);
            False = recompute every step (the reference path).
        kv_cache_bytes_per_token, kv_cache_gb: with both > 0, the rows decoded together are also
            capped so that their cache (rows x (longest prompt + max_new_tokens) x bytes per
            token, ``kv_cache.kv_cache_bytes_per_token``) stays within ``kv_cache_gb`` GiB.

    Collective over ``tp_group``: every TP rank calls ``generate`` with the same request and
    params. Ranks of different data-parallel replicas generate independently.
    """

    def __init__(self, forward_fn: ForwardFn, *, tp_group: dist.ProcessGroup | None, vocab_size: int,
                 eos_id: int, pad_id: int, max_batch_size: int | None = None,
                 model: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
                 check_tp_agreement: bool = True, debug: bool = False, kv_cache: bool = True,
                 kv_cache_bytes_per_token: int = 0, kv_cache_gb: float = 0.0) -> None:
        if vocab_size < 1 or not 0 <= eos_id < vocab_size:
            raise ValueError(f"need vocab_size >= 1 and 0 <= eos_id < vocab_size, got {vocab_size}, {eos_id}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.forward_fn = forward_fn
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.modules: list[torch.nn.Module] = (
            [] if model is None else [model] if isinstance(model, torch.nn.Module) else list(model))
        self.check_tp_agreement = check_tp_agreement
        self.debug = debug
        self.kv_cache = kv_cache and bool(getattr(forward_fn, "supports_kv_cache", False))
        self.kv_cache_bytes_per_token = kv_cache_bytes_per_token
        self.kv_cache_gb = kv_cache_gb

    @property
    def device(self) -> torch.device:
        """Where inputs are sent: the first parameter's device of ``model``, else CPU."""
        for m in self.modules:
            for param in m.parameters():
                return param.device
        return torch.device("cpu")

    # -- RolloutEngine hooks -------------------------------------------------------------------
    def sync_weights(self, *args: Any, **kwargs: Any) -> None:
        """No-op: generation runs on the training model's own weights."""

    def release(self) -> None:
        """No-op: nothing is held between ``generate`` calls."""

    def resume(self) -> None:
        """No-op (see ``release``)."""

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: RolloutRequest, params: SamplingParams) -> RolloutResult:
        """``params.n`` responses per prompt, group-major rows (see ``RolloutResult``)."""
        start = time.perf_counter()
        n = params.n
        prompts = [p for p in request.prompt_ids for _ in range(n)]
        images = [imgs for imgs in request.images for _ in range(n)] if request.has_images else None
        stop_ids = sorted({self.eos_id, *params.stop_token_ids})
        keys = row_keys(params.seed, torch.arange(len(prompts)) + request.batch_offset * n)  # [R]
        step = self._rows_per_batch(prompts, params.max_new_tokens)
        decoded: list[_Decoded] = []
        with eval_no_grad(self.modules):
            for lo in range(0, len(prompts), step):
                rows = _Rows(prompts[lo:lo + step], None if images is None else images[lo:lo + step])
                decoded.append(self._decode(rows, params, stop_ids, keys[lo:lo + step]))
        result = self._to_result(request, params, prompts, decoded)
        generated = sum(len(r) for r in result.response_ids)
        result.metrics.update(seconds=time.perf_counter() - start, generated_tokens=float(generated))
        return result

    def _rows_per_batch(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """Rows decoded together: ``max_batch_size`` (None = all), and with a KV-cache budget no
        more than fit in it (the same number on every rank: it depends on the request only)."""
        rows = self.max_batch_size or len(prompts)
        if self.kv_cache and self.kv_cache_gb > 0 and self.kv_cache_bytes_per_token > 0 and prompts:
            per_row = self.kv_cache_bytes_per_token * (max(map(len, prompts)) + max_new_tokens)
            rows = min(rows, max(1, int(self.kv_cache_gb * 2**30 // per_row)))
        return max(1, rows)

    def _last_logits(self, tokens: Tensor, mask: Tensor, images: list[list[Any]] | None) -> Tensor:
        """Forward the [B, S] rows (leading all-padding columns dropped); the gathered
        full-vocabulary logits [B, V_pad] float32 of the last position."""
        first = int(mask.any(dim=0).long().argmax())  # every row is left-padded at least this far
        tokens, mask = tokens[:, first:].to(self.device), mask[:, first:].to(self.device)
        logits = self.forward_fn(tokens, position_ids_from_mask(mask), mask, images)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(f"forward_fn returned shape {tuple(logits.shape)} for input "
                             f"{tuple(tokens.shape)}; expected [B, S, V_local]")
        return gather_vocab(logits[:, -1, :], self.tp_group)

    def _decode(self, rows: _Rows, params: SamplingParams, stop_ids: list[int],
                keys: Tensor) -> _Decoded:
        """Decode one batch; only still-running rows are forwarded at each step."""
        b, t_max = len(rows.prompts), params.max_new_tokens
        tokens, mask = left_pad_with_room(rows.prompts, self.pad_id, t_max)  # [B, P + T]
        p = tokens.shape[1] - t_max
        out = _Decoded(tokens=torch.full((b, t_max), self.pad_id, dtype=torch.long),
                       sampling_lp=torch.zeros(b, t_max), policy_lp=torch.zeros(b, t_max),
                       lengths=torch.zeros(b, dtype=torch.long), stopped=torch.zeros(b, dtype=torch.bool))
        stepper = (_CachedSteps(self, rows, tokens, mask, p, t_max) if self.kv_cache
                   else _RecomputeSteps(self, rows, tokens, mask, p))
        stop = torch.tensor(stop_ids, dtype=torch.long)
        live = torch.arange(b)  # indices of rows still generating
        steps = 0
        for t in range(t_max):
            logits = stepper.logits(t, live)  # [live, V_pad] float32
            width = logits.shape[-1] if self.vocab_size is None else self.vocab_size
            uniform = counter_uniform(keys[live].to(logits.device), t, width)  # [live, V]
            tok, lp = sample(logits, params, None, self.vocab_size, uniform=uniform)
            plp = policy_log_probs(logits, tok, self.vocab_size)
            tok, lp, plp = tok.cpu(), lp.float().cpu(), plp.float().cpu()
            if self.debug:
                check_same_across_group(tok, self.tp_group)
            tokens[live, p + t] = tok
            mask[live, p + t] = True
            out.tokens[live, t], out.sampling_lp[live, t], out.policy_lp[live, t] = tok, lp, plp
            out.lengths[live] += 1
            hit = torch.isin(tok, stop)
            out.stopped[live[hit]] = True
            live = live[~hit]
            steps = t + 1
            if live.numel() == 0:
                break
            if bool(hit.any()):
                stepper.keep(torch.nonzero(~hit).squeeze(1))
        out.tokens, out.sampling_lp, out.policy_lp = (x[:, :steps] for x in
                                                      (out.tokens, out.sampling_lp, out.policy_lp))
        if self.check_tp_agreement:
            check_same_across_group(out.tokens, self.tp_group)
        return out

    def _to_result(self, request: RolloutRequest, params: SamplingParams, prompts: list[list[int]],
                   decoded: list[_Decoded]) -> RolloutResult:
        response_ids, sampling_lp, policy_lp, reasons = [], [], [], []
        for d in decoded:
            for r in range(d.tokens.shape[0]):
                length = int(d.lengths[r])
                response_ids.append(d.tokens[r, :length].tolist())
                sampling_lp.append(d.sampling_lp[r, :length].tolist())
                policy_lp.append(d.policy_lp[r, :length].tolist())
                reason: FinishReason = "stop" if bool(d.stopped[r]) else "length"
                reasons.append(reason)
        return RolloutResult(
            group_size=params.n,
            prompt_indices=[i for i in request.prompt_indices for _ in range(params.n)],
            prompt_ids=[list(p) for p in prompts],
            response_ids=response_ids,
            response_log_probs=sampling_lp,
            policy_log_probs=policy_lp,
            finish_reason=reasons,
        )


class _RecomputeSteps:
    """Next-token logits by running the whole sequence again (no cache; the reference path)."""

    def __init__(self, engine: MegatronRolloutEngine, rows: _Rows, tokens: Tensor, mask: Tensor,
                 p: int) -> None:
        self.engine, self.rows, self.tokens, self.mask, self.p = engine, rows, tokens, mask, p

    def logits(self, t: int, live: Tensor) -> Tensor:
        imgs = None if self.rows.images is None else [self.rows.images[i] for i in live.tolist()]
        return self.engine._last_logits(self.tokens[live, :self.p + t], self.mask[live, :self.p + t], imgs)

    def keep(self, rows: Tensor) -> None:
        """Nothing to drop: each step forwards only the live rows anyway."""


class _CachedSteps:
    """Next-token logits from a KV cache: the distinct prompts' prefill at step 0 (copied to the
    rows of each group), one token per live row after (rollout/kv_cache.py)."""

    def __init__(self, engine: MegatronRolloutEngine, rows: _Rows, tokens: Tensor, mask: Tensor, p: int,
                 t_max: int) -> None:
        self.engine, self.rows, self.tokens, self.p = engine, rows, tokens, p
        # rows i and i-1 share a prompt when they hold the same objects (generate() repeats each
        # prompt and its images n times); a group split by max_batch_size is simply two prompts
        b = len(rows.prompts)
        same = [i > 0 and rows.prompts[i] is rows.prompts[i - 1]
                and (rows.images is None or rows.images[i] is rows.images[i - 1]) for i in range(b)]
        self.distinct = [i for i in range(b) if not same[i]]
        self.expand = torch.tensor([sum(1 for j in self.distinct if j <= i) - 1 for i in range(b)])
        self.prompt_mask = mask[:, :p]
        self.cache = KVCache.create(max_batch_size=len(self.distinct), max_sequence_length=p + t_max)

    def logits(self, t: int, live: Tensor) -> Tensor:
        engine, device = self.engine, self.engine.device
        if t == 0:
            idx = torch.tensor(self.distinct)
            ids, mask = self.tokens[idx, :self.p].to(device), self.prompt_mask[idx].to(device)
            imgs = None if self.rows.images is None else [self.rows.images[i] for i in self.distinct]
            local = engine.forward_fn(ids, position_ids_from_mask(mask), mask, imgs, cache=self.cache)
            self.cache.select(self.expand)
            return local[:, -1, :].float()[self.expand.to(local.device)]  # full vocabulary already
        new = self.tokens[live, self.p + t - 1:self.p + t].to(device)  # the token sampled last step
        return engine.forward_fn(new, None, None, None, cache=self.cache)[:, -1, :].float()

    def keep(self, rows: Tensor) -> None:
        self.cache.select(rows)
