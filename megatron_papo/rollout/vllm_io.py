"""The pure conversions between the project's rollout types and vLLM's (no vLLM import; every
function is tested on CPU): requests -> vLLM token prompts with images, ``SamplingParams`` ->
vLLM ``SamplingParams`` keyword arguments, vLLM outputs -> :class:`RolloutResult`.
:mod:`megatron_papo.rollout.vllm_engine` explains the conventions (placeholder collapse, image
rebuilding, log-prob modes) and is what callers import.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_papo.rollout.base import FinishReason, RolloutRequest, RolloutResult, SamplingParams

__all__ = [
    "BAN_BIAS",
    "LogprobsMode",
    "PatchLayout",
    "collapse_image_placeholders",
    "outputs_to_result",
    "patches_to_images",
    "plain_sampling",
    "prompt_images",
    "request_to_prompts",
    "sampling_kwargs",
]

LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]
"""The two vLLM ``logprobs_mode`` values the engine reads (vllm_engine's module docstring)."""

BAN_BIAS = -100.0
"""logit_bias of a banned token (OpenAI's range ends at -100; e^-100 of mass is nothing)."""


# ---------------------------------------------------------------------------------------------
# Requests -> vLLM prompts
# ---------------------------------------------------------------------------------------------
def collapse_image_placeholders(prompt_ids: Sequence[int], image_token_id: int,
                                tokens_per_image: Sequence[int]) -> list[int]:
    """Collapse each image's run of ``image_token_id`` into one token (vLLM re-expands it).

    ``tokens_per_image[k]`` is image k's placeholder count (images in prompt order; images back to
    back form one run, split by these counts). Raises ValueError when the runs do not match.
    """
    out: list[int] = []
    counts = list(tokens_per_image)
    k = 0
    i, n = 0, len(prompt_ids)
    while i < n:
        if prompt_ids[i] != image_token_id:
            out.append(int(prompt_ids[i]))
            i += 1
            continue
        j = i
        while j < n and prompt_ids[j] == image_token_id:
            j += 1
        run = j - i
        while run > 0:
            if k >= len(counts) or counts[k] > run:
                raise ValueError(f"the image placeholder tokens (id {image_token_id}) at position {i} do not "
                                 f"match the images' token counts {counts}")
            run -= counts[k]
            out.append(image_token_id)
            k += 1
        i = j
    if k != len(counts):
        raise ValueError(f"the prompt holds placeholders for {k} image(s) (token id {image_token_id}) "
                         f"but {len(counts)} image(s) were given")
    return out


@dataclass(frozen=True)
class PatchLayout:
    """How ``Qwen25VL.preprocess_images`` cut images into patches (transformers' Qwen2-VL image
    processor): per image ``[t * h * w, C * temporal_patch * patch^2]`` rows in merge-window order,
    normalised, with its grid (t, h, w) in ``QwenImages.grid_thw``."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    """The processor's area bounds (fixed resolution: both = image_size^2); vLLM's processor gets
    the same, so the images rebuilt here (already within them) keep their size there."""
    max_pixels: int
    rescale_factor: float = 1 / 255
    image_token_id: int | None = None
    """Placeholder token of one image token (the model's ``image_token_id``)."""

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def of(cls, model: Any) -> PatchLayout:
        """From a built ``Qwen25VL`` (its arch, resolution bounds and image processor)."""
        a, proc = model.arch, model.image_processor
        return cls(patch_size=a.patch_size, temporal_patch_size=a.temporal_patch_size,
                   merge_size=a.spatial_merge_size, image_mean=tuple(float(x) for x in proc.image_mean),
                   image_std=tuple(float(x) for x in proc.image_std), min_pixels=model.min_pixels,
                   max_pixels=model.max_pixels, rescale_factor=float(proc.rescale_factor),
                   image_token_id=a.image_token_id)


def patches_to_images(images: Any, layout: PatchLayout) -> list[Any]:
    """``QwenImages`` (patches + grids) -> one RGB ``PIL.Image`` per image, of (h * patch, w * patch).

    Inverts the processor: an image's rows are ``(h_block, w_block, h_in, w_in)`` with merge windows
    of merge_size^2 patches, each row ``(C, T, ph, pw)``; the first of the T identical frames is
    kept, then de-normalised (x * std + mean) / rescale_factor and rounded to uint8.
    """
    from PIL import Image

    values, grids = images.pixel_values.detach().float().cpu(), images.grid_thw.tolist()
    if values.dim() != 2 or values.shape[1] != layout.patch_dim:
        raise ValueError(f"image patches must be [P, {layout.patch_dim}], got {tuple(values.shape)}")
    sizes = [t * h * w for t, h, w in grids]
    if sum(sizes) != values.shape[0]:
        raise ValueError(f"the grids {grids} give {sum(sizes)} patches but there are {values.shape[0]}")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ps, m, tp = layout.patch_size, layout.merge_size, layout.temporal_patch_size
    for _, h, w in grids:  # vLLM's processor must leave the rebuilt size alone (same patches)
        again = smart_resize(h * ps, w * ps, factor=ps * m, min_pixels=layout.min_pixels,
                             max_pixels=layout.max_pixels)
        if tuple(again) != (h * ps, w * ps):
            raise ValueError(f"an image resized to {h * ps}x{w * ps} would be resized again to {again} by "
                             f"vLLM's processor (min_pixels={layout.min_pixels}, max_pixels="
                             f"{layout.max_pixels} are too tight for it); widen model.min_pixels/max_pixels")
    mean = torch.tensor(layout.image_mean).view(3, 1, 1)
    std = torch.tensor(layout.image_std).view(3, 1, 1)
    out = []
    for x, (t, h, w) in zip(values.split(sizes), grids, strict=True):
        if t != 1:
            raise ValueError(f"an image has temporal grid {t}; only still images (t = 1) are supported")
        x = x.reshape(h // m, w // m, m, m, 3, tp, ps, ps)[..., 0, :, :]  # [hb, wb, hi, wi, C, ph, pw]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * ps, w * ps)
        x = ((x * std + mean) / layout.rescale_factor).round().clamp(0, 255).to(torch.uint8)
        out.append(Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB"))
    return out


def prompt_images(items: Sequence[Any], layout: PatchLayout) -> tuple[list[Any], list[int]]:
    """One prompt's image inputs -> (PIL images, each image's placeholder count). Items are
    ``QwenImages`` (what ``steps.rollout`` passes, one per prompt)."""
    out: list[Any] = []
    counts: list[int] = []
    for item in items:
        if item is None:
            continue
        if not hasattr(item, "grid_thw"):
            raise TypeError(f"an image input must be QwenImages (Qwen25VL.preprocess_images), "
                            f"got {type(item).__name__}")
        if len(item):
            out.extend(patches_to_images(item, layout))
            counts.extend((item.grid_thw.prod(-1) // layout.merge_size ** 2).tolist())
    return out, counts


def request_to_prompts(request: RolloutRequest, layout: PatchLayout | None) -> list[dict[str, Any]]:
    """One vLLM ``TokensPrompt`` dict per prompt: ``{"prompt_token_ids": [...]}`` plus
    ``"multi_modal_data": {"image": [PIL, ...]}`` when it has images (placeholders collapsed)."""
    prompts = []
    for ids, items in zip(request.prompt_ids, request.images, strict=True):
        images, counts = ([], []) if not items else prompt_images(items, _need(layout))
        if not images:
            prompts.append({"prompt_token_ids": [int(t) for t in ids]})
            continue
        lay = _need(layout)
        if lay.image_token_id is None:
            raise ValueError("PatchLayout.image_token_id is needed to collapse image placeholders")
        tokens = collapse_image_placeholders(ids, lay.image_token_id, counts)
        prompts.append({"prompt_token_ids": tokens, "multi_modal_data": {"image": images}})
    return prompts


def _need(layout: PatchLayout | None) -> PatchLayout:
    if layout is None:
        raise ValueError("the request carries images but the vLLM engine was built without a PatchLayout")
    return layout


# ---------------------------------------------------------------------------------------------
# SamplingParams -> vLLM SamplingParams kwargs
# ---------------------------------------------------------------------------------------------
def sampling_kwargs(params: SamplingParams, *, num_prompts: int, eos_id: int,
                    banned_token_ids: Sequence[int] = (), first_prompt: int = 0) -> list[dict[str, Any]]:
    """Keyword arguments of ``vllm.SamplingParams``, one dict per prompt.

    One to one: n, temperature, top_p, top_k (-1 = off in both), max_new_tokens -> max_tokens,
    stop_token_ids (+ eos_id, so the stop set is ours whatever vLLM reads from the folder). Fixed:
    ``logprobs=0`` (the sampled token's log-prob only), ``detokenize=False`` (token ids are all we
    read). ``banned_token_ids`` get ``logit_bias`` -100. Seeds: vLLM gives the k-th of n children
    ``seed + k``; prompt i gets ``seed + i * n`` so row r = i * n + k draws with ``seed + r`` (rows
    never share a stream). ``first_prompt``: the request-wide index of the first of these prompts,
    when a request is split over several engines (each row keeps its seed).
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if eos_id < 0:
        raise ValueError(f"eos_id must be >= 0, got {eos_id}")
    base: dict[str, Any] = dict(
        n=params.n, temperature=float(params.temperature), top_p=float(params.top_p), top_k=int(params.top_k),
        max_tokens=params.max_new_tokens, stop_token_ids=sorted({eos_id, *params.stop_token_ids}),
        logprobs=0, detokenize=False)
    if banned_token_ids:
        stops = set(base["stop_token_ids"])
        clash = sorted(stops & set(banned_token_ids))
        if clash:
            raise ValueError(f"banned_token_ids {clash} are also stop tokens (eos_id / stop_token_ids)")
        base["logit_bias"] = {int(t): BAN_BIAS for t in sorted(set(banned_token_ids))}
    return [{**base, "seed": params.seed + (first_prompt + i) * params.n} for i in range(num_prompts)]


def plain_sampling(params: SamplingParams) -> bool:
    """Temperature 1 and no top-k / top-p: the sampling and policy distributions coincide."""
    return params.temperature == 1 and params.top_p >= 1 and params.top_k == -1


# ---------------------------------------------------------------------------------------------
# vLLM outputs -> RolloutResult
# ---------------------------------------------------------------------------------------------
def _token_log_probs(completion: Any) -> list[float]:
    """Per generated token, the log-prob vLLM returned for it (``logprobs=0``: a list of
    ``{token_id: Logprob}`` dicts, one per token, the sampled token always present)."""
    steps = completion.logprobs
    ids = list(completion.token_ids)
    if steps is None:
        raise ValueError("vLLM returned no logprobs (SamplingParams.logprobs must be 0)")
    if len(steps) != len(ids):
        raise ValueError(f"vLLM returned {len(steps)} logprob entries for {len(ids)} tokens")
    out = []
    for t, step in zip(ids, steps, strict=True):
        entry = step[t]
        out.append(float(getattr(entry, "logprob", entry)))
    return out


def outputs_to_result(request: RolloutRequest, params: SamplingParams, outputs: Sequence[Any], *,
                      stop_ids: Iterable[int], logprobs_mode: LogprobsMode) -> RolloutResult:
    """vLLM ``RequestOutput`` list (one per prompt, ``.outputs`` = n ``CompletionOutput`` with
    ``.index``, ``.token_ids``, ``.logprobs``, ``.finish_reason``) -> group-major RolloutResult.

    finish_reason "stop" needs the last token in ``stop_ids`` (kept, as our contract says);
    "length" needs ``max_new_tokens`` tokens; anything else ("abort", None) raises.
    """
    if len(outputs) != len(request):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(request)} prompts")
    stops = set(int(s) for s in stop_ids)
    plain = plain_sampling(params)
    nan = float("nan")
    response_ids, sampling_lp, policy_lp, reasons = [], [], [], []
    for p, out in enumerate(outputs):
        completions = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != params.n:
            raise ValueError(f"prompt {p}: vLLM returned {len(completions)} completions, "
                             f"expected n={params.n}")
        for c in completions:
            ids = [int(t) for t in c.token_ids]
            reason = c.finish_reason
            if reason == "stop":
                if not ids or ids[-1] not in stops:
                    raise ValueError(f"prompt {p}: vLLM stopped on {ids[-1:] or 'nothing'}, not one of the "
                                     f"stop tokens {sorted(stops)} (a stop string or the folder's "
                                     "generation_config? the engine passes generation_config='vllm')")
            elif reason == "length":
                if len(ids) != params.max_new_tokens:
                    raise ValueError(f"prompt {p}: finish_reason 'length' after {len(ids)} tokens, "
                                     f"max_new_tokens={params.max_new_tokens} (max_model_len too small?)")
            else:
                raise RuntimeError(f"prompt {p}: vLLM finished a response with finish_reason={reason!r}")
            lp = _token_log_probs(c)
            if logprobs_mode == "processed_logprobs":
                samp = [0.0] * len(lp) if params.greedy else lp
                pol = lp if plain else [nan] * len(lp)
            else:
                pol = lp
                samp = [0.0] * len(lp) if params.greedy else (lp if plain else [nan] * len(lp))
            response_ids.append(ids)
            sampling_lp.append(list(samp))
            policy_lp.append(list(pol))
            finish: FinishReason = reason
            reasons.append(finish)
    n = params.n
    return RolloutResult(
        group_size=n, prompt_indices=[i for i in request.prompt_indices for _ in range(n)],
        prompt_ids=[list(ids) for ids in request.prompt_ids for _ in range(n)], response_ids=response_ids,
        response_log_probs=sampling_lp, policy_log_probs=policy_lp, finish_reason=reasons)
