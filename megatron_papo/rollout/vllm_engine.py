"""Generation with vLLM, colocated with training, behind the :class:`RolloutEngine` protocol.

    backend = VLLMBackend(hf_path, tensor_parallel_size=tp, gpu_memory_utilization=0.5, ...)
    engine = VLLMRolloutEngine(backend, image_token_id=..., eos_id=tok.eos_id, layout=PatchLayout.of(model))
    engine.sync_weights(model_chunks, pg)     # stream the trainer's weights (HF names) into vLLM
    engine.resume()                           # KV cache back
    result = engine.generate(request, params) # same contract as MegatronRolloutEngine
    engine.release()                          # sleep: weights and KV cache freed for training

**Colocation (SPMD).** Every training rank builds one in-process vLLM engine
(``distributed_executor_backend="external_launcher"``, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) whose
tensor-parallel size is the trainer's: vLLM groups consecutive ranks, which are megatron-core's TP
groups, so each TP group is one vLLM replica. All ranks of a model-parallel group pass the same
request and seed. With PP > 1 each stage's TP group holds a full replica, but only the first
stage's generates; its result is broadcast over the pipeline group (``pp_group``). With CP > 1 the
ranks of a cp group train on the same rows and each holds a replica: the request's prompts are split
into cp contiguous slices, each replica answers its slice (every row keeps its seed), and the slices
are all-gathered over ``cp_group``, so generation runs cp times wider. The engine starts with
``load_format="dummy"`` (random weights) and gets real ones from :meth:`sync_weights`.

**Memory.** ``enable_sleep_mode=True``; :meth:`release` calls ``LLM.sleep(level)`` (level 2: weights
and KV cache discarded, the next sync rewrites every weight; level 1: weights kept in CPU memory).
:meth:`sync_weights` wakes only ``"weights"``, :meth:`resume` wakes ``"kv_cache"``, so the KV cache is
allocated only after the weights are in place.

**Weights.** :func:`sync_weights` streams :func:`megatron_papo.models.hf_qwen2_5_vl.iter_hf_buckets`
(the same exporter the Megatron->HF converter writes from: full tensors with Hugging Face hub names,
on every rank of the model-parallel group) into ``model.load_weights`` of vLLM's in-process model,
one bucket at a time; vLLM's weight loaders cut each full tensor into the rank's TP shard.

**Prompts.** Our prompts hold the image placeholder already expanded (one ``<|image_pad|>`` per
image token); vLLM's Qwen2.5-VL processor expands each single ``<|image_pad|>`` of a token prompt
itself (its prompt update replaces the token with one copy per image token), so each image's run is
collapsed back to one token (:func:`collapse_image_placeholders`). Images reach the engine as the
model-ready ``QwenImages`` of ``Qwen25VL.preprocess_images`` (patches + per-image grids);
:func:`patches_to_images` turns them back into the resized RGB images they were cut from (sides
multiple of 28, area within [min_pixels, max_pixels]), and vLLM's processor, given the same bounds
(``mm_processor_kwargs``), leaves their size alone and cuts the same patches.

**Log-probs** (vLLM's ``logprobs=0`` returns the sampled token's log-prob; what it is depends on the
engine's ``logprobs_mode``):

* ``"processed_logprobs"`` (vLLM >= 0.11): log_softmax of the logits after temperature and top-k /
  top-p (and the ban on ``banned_token_ids``) -> ``response_log_probs``. ``policy_log_probs`` are the
  same numbers when temperature = 1 and top-k / top-p are off, else NaN (not available).
* ``"raw_logprobs"`` (the default here and vLLM's; the only one before 0.10): log_softmax of the
  raw logits (before logit_bias too) -> ``policy_log_probs``; ``response_log_probs`` are the same
  numbers when sampling is plain, 0 under greedy decoding, else NaN.

The trainer recomputes its own ``old_log_probs`` and uses neither; they are for logging and checks.

Only :class:`VLLMBackend` imports vLLM; everything else here is plain code tested on CPU with a fake
backend (tests/unit/test_vllm_engine.py). Written for vLLM's V1 engine, 0.9.2 (docker/versions.env)
and later; docs/SCALING.md lists the calls and where they were read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from megatron_papo.compat.optional_deps import MissingDependencyError, require
from megatron_papo.models.hf_qwen2_5_vl import iter_hf_buckets
from megatron_papo.rollout.base import RolloutRequest, RolloutResult, SamplingParams
from megatron_papo.rollout.vllm_io import (  # the pure conversions, re-exported here
    LogprobsMode,
    PatchLayout,
    collapse_image_placeholders,
    outputs_to_result,
    patches_to_images,
    request_to_prompts,
    sampling_kwargs,
)

__all__ = [
    "LogprobsMode",
    "PatchLayout",
    "VLLMBackend",
    "VLLMRolloutEngine",
    "collapse_image_placeholders",
    "outputs_to_result",
    "patches_to_images",
    "request_to_prompts",
    "sampling_kwargs",
    "sync_weights",
]

VLLM_MIN_VERSION = (0, 11, 0)
"""The oldest vLLM this engine supports (both log-prob modes mean what the trainer expects);
setup.py's ``[gpu]`` extra and docker/versions.env must agree with it (tests/unit/test_launch_lint.py)."""

PROCESSED_LOGPROBS_SINCE = (0, 11, 0)
"""vLLM version from which ``logprobs_mode="processed_logprobs"`` means after temperature and
top-k / top-p (the engine arg arrived in 0.10, first applied before temperature; vLLM 0.9.x, the
version docker/versions.env pins, has no such arg and returns raw log-probs)."""

# ---------------------------------------------------------------------------------------------
# The backend: the only code that touches vLLM
# ---------------------------------------------------------------------------------------------
class Backend(Protocol):
    """What :class:`VLLMRolloutEngine` needs from vLLM (a fake one in CPU tests)."""

    def generate(self, prompts: list[dict[str, Any]], sampling: list[dict[str, Any]]) -> list[Any]: ...

    def sleep(self, level: int) -> None: ...

    def wake_up(self, tags: list[str]) -> None: ...

    def load_weights(self, weights: list[tuple[str, Tensor]]) -> None: ...

    def reset_prefix_cache(self) -> None: ...


def _load_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Runs inside vLLM's worker (``LLM.collective_rpc`` passes the worker first)."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMBackend:
    """One colocated in-process ``vllm.LLM`` on this rank (module docstring).

    Args:
        hf_path: Hugging Face folder (config, tokenizer, processor; weights are not read:
            ``load_format="dummy"``, they come from ``load_weights``).
        tensor_parallel_size: the trainer's TP size (vLLM groups consecutive ranks).
        gpu_memory_utilization: share of the GPU vLLM may take for weights + KV cache.
        image_pixels: (min_pixels, max_pixels) for vLLM's image processor, the model's own bounds
            (None: no images).
        max_images_per_prompt: ``limit_mm_per_prompt["image"]``.
        max_model_len: prompt + response limit (None: the folder's).
        seed, dtype, enforce_eager: passed to ``vllm.LLM``.
        logprobs_mode: see the module docstring.
    """

    def __init__(self, hf_path: str, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                 image_pixels: tuple[int, int] | None, max_images_per_prompt: int = 1,
                 max_model_len: int | None = None,
                 seed: int = 0, dtype: str = "bfloat16", enforce_eager: bool = False,
                 logprobs_mode: LogprobsMode = "raw_logprobs") -> None:
        require("vllm")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (SPMD)
        import vllm  # optional, GPU only

        if version_tuple(vllm.__version__) < VLLM_MIN_VERSION:
            least = ".".join(map(str, VLLM_MIN_VERSION))
            raise MissingDependencyError(f"vLLM {vllm.__version__} is older than this engine supports "
                                         f"({least}); pip install -U 'vllm>={least}'")
        self._vllm = vllm
        self.llm = vllm.LLM(**self.llm_kwargs(
            hf_path, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            image_pixels=image_pixels, max_images_per_prompt=max_images_per_prompt,
            max_model_len=max_model_len, seed=seed, dtype=dtype, enforce_eager=enforce_eager,
            logprobs_mode=logprobs_mode,
            vllm_version=version_tuple(vllm.__version__)))

    @staticmethod
    def llm_kwargs(hf_path: str, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                   image_pixels: tuple[int, int] | None, max_images_per_prompt: int,
                   max_model_len: int | None, seed: int, dtype: str, enforce_eager: bool,
                   logprobs_mode: LogprobsMode,
                   vllm_version: tuple[int, ...] = PROCESSED_LOGPROBS_SINCE) -> dict[str, Any]:
        """The ``vllm.LLM`` keyword arguments (plain data, checked on CPU). Before vLLM 0.10 there is
        no ``logprobs_mode`` argument (log-probs are raw); processed ones need
        :data:`PROCESSED_LOGPROBS_SINCE`."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError("rollout.gpu_memory_utilization must be in (0, 1], "
                             f"got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError("logprobs_mode must be processed_logprobs or raw_logprobs, "
                             f"got {logprobs_mode!r}")
        kw: dict[str, Any] = dict(
            model=str(hf_path), tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher", load_format="dummy", enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed, dtype=dtype,
            enforce_eager=enforce_eager, generation_config="vllm")
        if logprobs_mode == "processed_logprobs" and vllm_version < PROCESSED_LOGPROBS_SINCE:
            raise ValueError(f"rollout.vllm_logprobs_mode=processed_logprobs needs vLLM >= "
                             f"{'.'.join(map(str, PROCESSED_LOGPROBS_SINCE))}, this is "
                             f"{'.'.join(map(str, vllm_version))}; use raw_logprobs")
        if vllm_version >= (0, 10, 0):
            kw["logprobs_mode"] = logprobs_mode
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        if image_pixels is None:
            kw["limit_mm_per_prompt"] = {"image": 0, "video": 0}
        else:
            kw["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}
            kw["mm_processor_kwargs"] = {"min_pixels": image_pixels[0], "max_pixels": image_pixels[1]}
        return kw

    def generate(self, prompts: list[dict[str, Any]], sampling: list[dict[str, Any]]) -> list[Any]:
        params = [self._vllm.SamplingParams(**kw) for kw in sampling]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)

    def load_weights(self, weights: list[tuple[str, Tensor]]) -> None:
        self.llm.collective_rpc(_load_on_worker, args=(weights,))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.11.0rc2.dev5+gabc' -> (0, 11, 0): the leading dotted numbers."""
    import re

    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
_TAGS = ("weights", "kv_cache")


class VLLMRolloutEngine:
    """:class:`RolloutEngine` over a :class:`VLLMBackend` (or any object with its four methods).

    Args:
        backend: the vLLM backend (a fake in CPU tests).
        eos_id: ends a response (always a stop token).
        layout: how prompt images were cut into patches (None: text-only requests).
        banned_token_ids: never sampled (logit_bias -100), e.g. pad and the image placeholder.
        logprobs_mode: the backend's (module docstring).
        sleep_level: 2 discards the weights on ``release`` (every sync rewrites them all); 1 keeps a
            CPU copy (``resume`` without a sync then restores them).
        bucket_bytes: default weight-sync bucket size.
        pp_group: the pipeline group (None without pipeline parallelism), see ``pp_group`` below.
        cp_group: the context-parallel group (None without context parallelism): its replicas
            answer consecutive slices of each request (module docstring).

    State: after construction vLLM holds dummy weights and is awake. ``release`` puts both tags to
    sleep; ``sync_weights`` wakes "weights" and loads; ``resume`` wakes "kv_cache" (and, at level 1,
    "weights"); ``generate`` needs both awake.
    """

    def __init__(self, backend: Backend, *, eos_id: int, layout: PatchLayout | None = None,
                 banned_token_ids: Sequence[int] = (), logprobs_mode: LogprobsMode = "raw_logprobs",
                 sleep_level: int = 2, bucket_bytes: int = 1 << 30, pp_group: Any = None,
                 cp_group: Any = None) -> None:
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.backend = backend
        self.eos_id = eos_id
        self.layout = layout
        self.banned_token_ids = sorted({int(t) for t in banned_token_ids if t != eos_id})
        self.logprobs_mode = logprobs_mode
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self.pp_group = pp_group
        """With pipeline parallelism: the first stage's vLLM generates and its result is broadcast to
        the other stages (every stage must train on the same tokens)."""
        self.cp_group = cp_group
        """With context parallelism: each replica of the group answers one slice of the prompts."""
        self.asleep: set[str] = set()
        """Memory tags now released ("weights", "kv_cache")."""
        self.weights_synced = False
        """True once real weights were loaded (and not discarded by a level-2 sleep since)."""

    # -- memory ---------------------------------------------------------------------------------
    def release(self) -> None:
        """Sleep: free the KV cache and the weights (level 2) or move them to CPU (level 1)."""
        if set(_TAGS) <= self.asleep:
            return
        self.backend.sleep(self.sleep_level)
        self.asleep = set(_TAGS)
        if self.sleep_level == 2:
            self.weights_synced = False

    def wake_weights(self) -> None:
        """Wake the weight memory only (before loading weights; KV cache stays released)."""
        if "weights" in self.asleep:
            self.backend.wake_up(["weights"])
            self.asleep.discard("weights")

    def resume(self) -> None:
        """Wake whatever sleeps so that ``generate`` can run."""
        if "weights" in self.asleep:
            if self.sleep_level == 2:
                raise RuntimeError("vLLM discarded its weights at sleep level 2: "
                                   "call sync_weights before resume")
            self.wake_weights()
            self.weights_synced = True
        if "kv_cache" in self.asleep:
            self.backend.wake_up(["kv_cache"])
            self.asleep.discard("kv_cache")
            self.backend.reset_prefix_cache()  # cached blocks were computed before the sleep

    # -- weights --------------------------------------------------------------------------------
    def load_buckets(self, buckets: Iterable[list[tuple[str, Tensor]]]) -> dict[str, float]:
        """Load (HF name, full tensor) buckets, one at a time.

        Returns {"tensors", "bytes", "buckets", "max_bucket_bytes"}."""
        self.wake_weights()
        tensors = nbytes = count = biggest = 0
        for bucket in buckets:
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            self.backend.load_weights(bucket)
            tensors += len(bucket)
            nbytes += size
            biggest = max(biggest, size)
            count += 1
            del bucket  # drop our reference before the exporter builds the next one
        self.weights_synced = True
        self.backend.reset_prefix_cache()  # cached KV came from the previous weights
        return {"tensors": float(tensors), "bytes": float(nbytes), "buckets": float(count),
                "max_bucket_bytes": float(biggest)}

    def sync_weights(self, model_chunks: Sequence[torch.nn.Module], pg: Any,
                     bucket_bytes: int | None = None) -> dict[str, float]:
        """Push the trainer's weights (collective over the model-parallel group); see :func:`sync_weights`."""
        size = self.bucket_bytes if bucket_bytes is None else bucket_bytes
        return sync_weights(self, model_chunks, pg, size)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, request: RolloutRequest, params: SamplingParams) -> RolloutResult:
        """``params.n`` responses per prompt, group-major rows (see ``RolloutResult``)."""
        if self.asleep:
            raise RuntimeError(f"vLLM is asleep ({sorted(self.asleep)}): call sync_weights / resume first")
        if not self.weights_synced:
            raise RuntimeError("vLLM still holds its dummy weights: call sync_weights before generate")
        if self.cp_group is None and self.pp_group is None:
            return self._generate(request, params)
        import torch.distributed as dist

        # the first pipeline stage generates (its cp ranks one slice each, then all-gathered); the
        # result then goes down the pipeline. Later stages' cp all-gathers move Nones, replaced by
        # the pipeline broadcast from stage 0.
        first_stage = self.pp_group is None or dist.get_rank(self.pp_group) == 0
        if self.cp_group is None:
            result = self._generate(request, params) if first_stage else None
        else:
            rank, size = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
            start, stop = cp_slice(len(request), rank, size)
            part = None
            if first_stage and stop > start:
                part = self._generate(request_slice(request, start, stop), params)
            parts: list[Any] = [None] * size
            dist.all_gather_object(parts, part, group=self.cp_group)
            result = RolloutResult.concat([p for p in parts if p is not None]) if first_stage else None
        if self.pp_group is None:
            return result
        box: list[Any] = [result]
        source = dist.get_process_group_ranks(self.pp_group)[0]
        dist.broadcast_object_list(box, src=source, group=self.pp_group)
        return box[0]

    def _generate(self, request: RolloutRequest, params: SamplingParams) -> RolloutResult:
        start = time.perf_counter()
        prompts = request_to_prompts(request, self.layout)
        kwargs = sampling_kwargs(params, num_prompts=len(request), eos_id=self.eos_id,
                                 banned_token_ids=self.banned_token_ids, first_prompt=request.batch_offset)
        outputs = self.backend.generate(prompts, kwargs)
        result = outputs_to_result(request, params, outputs, stop_ids=kwargs[0]["stop_token_ids"],
                                   logprobs_mode=self.logprobs_mode)
        result.metrics.update(seconds=time.perf_counter() - start,
                              generated_tokens=float(sum(len(r) for r in result.response_ids)))
        return result


def sync_weights(engine: VLLMRolloutEngine, model_chunks: Sequence[torch.nn.Module], pg: Any,
                 bucket_bytes: int = 1 << 30) -> dict[str, float]:
    """Stream the Megatron model into the engine: ``iter_hf_buckets`` (full HF tensors on every
    rank of the model-parallel group; collective, every rank must call) -> ``load_weights``, one
    bucket alive at a time. Wakes the weight memory first if it sleeps.

    Returns {"sync_seconds", "tensors", "bytes", "buckets", "max_bucket_bytes"} (this rank).
    """
    start = time.perf_counter()
    stats = engine.load_buckets(iter_hf_buckets(model_chunks, pg, bucket_bytes))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"sync_seconds": time.perf_counter() - start, **stats}


def cp_slice(num_prompts: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of the prompts context-parallel rank ``rank`` of ``size`` answers: contiguous,
    sizes differing by at most one, the larger ones first (a slice may be empty)."""
    base, extra = divmod(num_prompts, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def request_slice(request: RolloutRequest, start: int, stop: int) -> RolloutRequest:
    """Prompts [start, stop) of ``request`` (with their images, global indices and batch
    positions: each row keeps its seed)."""
    return RolloutRequest(request.prompt_ids[start:stop], images=request.images[start:stop],
                          prompt_indices=request.prompt_indices[start:stop],
                          batch_offset=request.batch_offset + start)


def check_consecutive_tp(tp_ranks: Sequence[int]) -> None:
    """vLLM's external launcher makes TP groups of consecutive global ranks; the trainer's TP
    group must be such a block (megatron-core's default order puts TP fastest)."""
    ranks = list(tp_ranks)
    size = len(ranks)
    if ranks != list(range(ranks[0], ranks[0] + size)) or ranks[0] % size:
        raise ValueError("rollout.engine=vllm needs each tensor-parallel group to be consecutive global "
                         f"ranks starting at a multiple of tp (vLLM groups ranks that way), got {ranks}")

