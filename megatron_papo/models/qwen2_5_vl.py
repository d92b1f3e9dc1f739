"""Qwen2.5-VL in megatron-core: a GPTModel language model (tensor and pipeline parallel) and the
transformers vision tower replicated on the first pipeline stage.

    pixel_values [N, P, 3*2*14*14] ──► Qwen2.5-VL vision tower (window attention, 2-D rope,
        patch merger; transformers' module, replicated over TP) ──► [N * P/4, H] image features
    input_ids [B, S] ──► GPTModel.embedding ──► [S, B, H]; image-token rows <- image features
        ──► GPTModel(decoder_input=..., 3-D mrope positions) ──► logits [B, S, V_pad / tp]

The language model is Qwen2 (RMSNorm, SwiGLU, qkv bias, GQA, tied or untied embeddings) with
multimodal rope: the 3-D positions Qwen2.5-VL uses are computed from the token layout by
:func:`qwen_mrope_positions` (text tokens: t = h = w = running position; an image's tokens:
t = start, h = start + row, w = start + column; the text after an image continues at
start + max(rows, columns)).

**Images** go through the transformers Qwen2.5-VL image processor (``Qwen2VLImageProcessorPil``,
built locally, no download). Dynamic resolution by default (Qwen's own: each image keeps its
aspect ratio, its area is brought into [min_pixels, max_pixels] with sides multiple of 28, and it
takes area / 28^2 tokens), or a fixed square ``image_size``. ``preprocess_images`` returns
:class:`QwenImages` (patches + per-image grids); the grids travel with the pixels to every
pipeline stage (the 3-D positions need them). PAPO's masked image has the original's size, hence
the same grid, token ids and positions. The architecture is read from a Hugging Face folder
(``config.json``; ``model.hf_path``), weights come from conversion
(:mod:`megatron_papo.models.hf_qwen2_5_vl`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_papo.errors import UserError
from megatron_papo.models.base import (
    VisionLanguageModel,
    _to_uint8_chw,
    common_transformer_fields,
    context_parallel_group,
    fp8_fields,
    make_transformer_config,
    model_parallel_sizes,
    pad_vocab_size,
    resolve_transformer_impl,
    torch_dtype,
)
from megatron_papo.models.registry import register_model
from megatron_papo.models.tiny_vlm import language_layer_spec
from megatron_papo.pipeline_layout import stage_layers, transformer_config_fields

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Qwen25VL",
    "Qwen25VLArch",
    "QwenImages",
    "UnsupportedArchitectureError",
    "build_qwen2_5_vl",
    "load_hf_config",
    "qwen_mrope_positions",
]

SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
"""Hugging Face ``architectures`` entries this module converts and builds."""


class UnsupportedArchitectureError(ValueError, UserError):
    """The Hugging Face folder holds a model this project cannot build or convert."""


def load_hf_config(path: str | Path) -> Any:
    """The transformers ``Qwen2_5_VLConfig`` of a Hugging Face folder (offline, no download).

    Both config layouts load: the hub's flat one (``hidden_size`` at the top, ``rope_scaling``)
    and the nested ``text_config`` one transformers 5 writes.
    Raises:
        FileNotFoundError: ``path`` or its ``config.json`` does not exist.
        UnsupportedArchitectureError: the folder holds another architecture.
    """
    import json

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file (model.hf_path / --hf must be a Hugging Face "
                                "model folder holding config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedArchitectureError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UnsupportedArchitectureError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != "qwen2_5_vl" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise UnsupportedArchitectureError(
            f"{config_file}: architectures={archs} model_type={model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2_5_vl')")
    import transformers

    return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)


@dataclass(frozen=True)
class Qwen25VLArch:
    """The architecture numbers the Megatron side needs, read from a transformers config."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    image_token_id: int
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    vision_hidden_size: int
    vision_depth: int
    hf_config: Any
    """The transformers config (builds the vision tower)."""

    @classmethod
    def from_hf_config(cls, config: Any) -> Qwen25VLArch:
        text = getattr(config, "text_config", config)
        vision = config.vision_config
        rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
        section = rope.get("mrope_section")
        if theta is None or section is None:
            raise UnsupportedArchitectureError("the config has no mrope rope parameters (rope_theta, "
                                               "mrope_section): not a Qwen2.5-VL text config")
        head_dim = text.hidden_size // text.num_attention_heads
        if sum(section) != head_dim // 2:
            raise UnsupportedArchitectureError(f"mrope_section {section} must sum to head_dim/2 = "
                                               f"{head_dim // 2}")
        tie = bool(getattr(config, "tie_word_embeddings", False)
                   or getattr(text, "tie_word_embeddings", False))
        return cls(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                   num_layers=text.num_hidden_layers,
                   num_attention_heads=text.num_attention_heads,
                   num_query_groups=text.num_key_value_heads or text.num_attention_heads,
                   ffn_hidden_size=text.intermediate_size, rms_norm_eps=float(text.rms_norm_eps),
                   rope_theta=float(theta), mrope_section=tuple(int(s) for s in section),
                   max_position_embeddings=int(text.max_position_embeddings), tie_word_embeddings=tie,
                   image_token_id=int(config.image_token_id),
                   vision_start_token_id=getattr(config, "vision_start_token_id", None),
                   vision_end_token_id=getattr(config, "vision_end_token_id", None),
                   patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                   spatial_merge_size=vision.spatial_merge_size, vision_hidden_size=vision.hidden_size,
                   vision_depth=vision.depth, hf_config=config)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_factor(self) -> int:
        """Image sides must be multiples of this (patch * merge = 28 for Qwen2.5-VL)."""
        return self.patch_size * self.spatial_merge_size

    def check_parallel(self, tp: int, pp: int, vpp: int | None = None, *,
                       first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> None:
        """ValueError naming the sizes when TP / PP (x virtual stages, with the uneven first / last
        stage counts) do not divide the architecture."""
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {self.num_attention_heads} "
                             "attention heads (num_attention_heads)")
        if self.num_query_groups % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {self.num_query_groups} "
                             "key/value heads (num_key_value_heads)")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size "
                             f"{self.ffn_hidden_size}")
        try:
            stage_layers(self.num_layers, pp, first=first_stage_layers, last=last_stage_layers, vpp=vpp)
        except ValueError as e:
            raise ValueError(f"{e} (num_hidden_layers={self.num_layers})") from None


# ---------------------------------------------------------------------------------------------
# 3-D multimodal rope positions
# ---------------------------------------------------------------------------------------------
def qwen_mrope_positions(input_ids: Tensor, position_ids: Tensor, image_token_id: int,
                         grids: Tensor) -> Tensor:
    """Qwen2.5-VL's 3-D rope positions from 1-D ones.

    Args:
        input_ids: [B, S]; image k is a run of ``gh_k * gw_k`` consecutive ``image_token_id``
            (images numbered in row-major [B, S] order; one row's images may follow each other).
        position_ids: [B, S] 1-D positions, consecutive over a row's real tokens (padding anywhere).
        image_token_id: the placeholder id.
        grids: [N_img, 2] merged-token grids (gh_k, gw_k).
    Returns:
        [3, B, S] int64 (temporal, height, width). The k-th image's j-th token, the image starting
        at 1-D position p0: (p0', p0' + j // gw_k, p0' + j % gw_k), p0' = p0 + shift; text tokens:
        all three = p + shift; shift = sum over the row's earlier images of max(gh, gw) - gh * gw.
        One host sync (the image-token count) when there are images.
    """
    pos = position_ids.long()
    is_img = input_ids == image_token_id  # [B, S]
    flat_img = is_img.reshape(-1).nonzero().squeeze(1)  # image-token positions, row-major
    if flat_img.numel() == 0:
        return pos.unsqueeze(0).expand(3, -1, -1).clone()
    device = pos.device
    grids = grids.to(device=device, dtype=torch.long)
    if grids.shape[0] == 0:
        raise ValueError(f"the text holds {flat_img.numel()} image tokens but no image grids were given")
    sizes = grids[:, 0] * grids[:, 1]  # [N] tokens per image
    ends = torch.cumsum(sizes, 0)  # [N] exclusive end ordinal of each image
    ordinal = torch.arange(flat_img.numel(), device=device)
    image_of = torch.searchsorted(ends, ordinal, right=True).clamp_max(len(sizes) - 1)  # [T_img]
    within = ordinal - (ends[image_of] - sizes[image_of])
    if int(ends[-1]) != flat_img.numel():
        raise ValueError(f"the text holds {flat_img.numel()} image tokens but the images' grids give "
                         f"{int(ends[-1])}")
    seq = pos.shape[1]
    first_row = (flat_img[ends - sizes] // seq)[image_of]  # row of each token's image's first token
    split = bool((flat_img // seq != first_row).any())
    if split or bool((flat_img[ends - 1] - flat_img[ends - sizes] != sizes - 1).any()):
        raise ValueError("an image's placeholder tokens must be one unbroken run within one row "
                         f"(grids {grids.tolist()})")
    delta = torch.maximum(grids[:, 0], grids[:, 1]) - sizes  # [N] position shift after image k
    # the shift of image k lands on the token after its last one: exclusive cumsum per row
    delta_at = torch.zeros(pos.numel(), dtype=torch.long, device=device)
    last = within == sizes[image_of] - 1
    delta_at[flat_img[last]] = delta[image_of[last]]
    delta_at = delta_at.view_as(pos)
    shift = torch.cumsum(delta_at, dim=1) - delta_at  # [B, S]
    base = (pos + shift).reshape(-1)
    t, h, w = base.clone(), base.clone(), base.clone()
    gw = grids[image_of, 1]
    p0 = base[flat_img] - within
    t[flat_img] = p0
    h[flat_img] = p0 + within // gw
    w[flat_img] = p0 + within % gw
    return torch.stack([t, h, w]).view(3, *pos.shape)


@dataclass(frozen=True)
class QwenImages:
    """A batch of preprocessed images for :class:`Qwen25VL` (what ``preprocess_images`` returns):
    patches of all images concatenated, as transformers' Qwen2.5-VL takes them, and their grids."""

    pixel_values: Tensor
    """[sum_k t_k * h_k * w_k, 3 * temporal_patch * patch^2] float32."""
    grid_thw: Tensor
    """[N, 3] int64 patch grid (t, h, w) of each image (before the 2x2 merge)."""

    def __len__(self) -> int:
        return int(self.grid_thw.shape[0])

    def to(self, device: torch.device | str) -> QwenImages:
        """The patches on ``device``; the grids stay on the host (the vision tower's loops read
        them as numbers)."""
        return QwenImages(self.pixel_values.to(device, non_blocking=True), self.grid_thw)

    @classmethod
    def concat(cls, items: Sequence[QwenImages]) -> QwenImages:
        """Images of several batches, in order."""
        return cls(torch.cat([i.pixel_values for i in items]), torch.cat([i.grid_thw for i in items]))

    def token_grids(self, merge: int) -> Tensor:
        """[N, 2] merged-token grids (h / merge, w / merge)."""
        return self.grid_thw[:, 1:] // merge

    def num_tokens(self, merge: int) -> int:
        """Image-token placeholders all images need."""
        return int((self.grid_thw.prod(-1) // (merge * merge)).sum())


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def qwen_language_config(a: Qwen25VLArch, *, tp: int, pp: int, vpp: int | None, impl: str, precision: str,
                         fp8: str, recompute: bool, init_weights: bool, cp: int = 1,
                         sequence_parallel: bool = False, first_stage_layers: int | None = None,
                         last_stage_layers: int | None = None) -> TransformerConfig:
    """The Qwen2 language model's TransformerConfig (uneven pipeline stages: pipeline_layout)."""
    extra = (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
             if recompute else {})
    return make_transformer_config(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups, ffn_hidden_size=a.ffn_hidden_size, kv_channels=a.head_dim,
        normalization="RMSNorm", layernorm_epsilon=a.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, mrope_section=list(a.mrope_section),
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        perform_initialization=init_weights, **extra, **fp8_fields(fp8, impl),
        **transformer_config_fields(first_stage_layers, last_stage_layers),
        **common_transformer_fields(tp, precision, cp, sequence_parallel))


def build_vision_tower(a: Qwen25VLArch) -> torch.nn.Module:
    """transformers' Qwen2.5-VL vision tower (patch embed, window-attention blocks, merger)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision_config = a.hf_config.vision_config
    if getattr(vision_config, "_attn_implementation", None) in (None, "flash_attention_2"):
        vision_config._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel(vision_config)


DEFAULT_MIN_PIXELS = 56 * 56
"""Smallest image area (pixels) in dynamic-resolution mode (the Qwen2-VL processor's default)."""
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
"""Largest image area in dynamic-resolution mode: at most 1280 image tokens per image."""


def build_image_processor(a: Qwen25VLArch, min_pixels: int, max_pixels: int) -> Any:
    """The transformers Qwen2-VL image processor (PIL backend: torchvision has no CPU build)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=a.patch_size, temporal_patch_size=a.temporal_patch_size,
                                    merge_size=a.spatial_merge_size, min_pixels=min_pixels,
                                    max_pixels=max_pixels)


def _to_pil(image: Any) -> Any:
    """PIL image (any mode) / CHW tensor / HWC array -> RGB PIL image."""
    from PIL import Image

    chw = _to_uint8_chw(image)
    if chw.is_floating_point():
        chw = (chw.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(chw.permute(1, 2, 0).numpy()), "RGB")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class Qwen25VL(VisionLanguageModel):
    """Qwen2.5-VL: ``visual`` (transformers vision tower, first stage only, replicated over TP)
    and ``language_model`` (megatron-core GPTModel). State-dict keys: ``visual.*`` exactly as
    Hugging Face names them, ``language_model.*`` megatron-core's.

    Images: dynamic resolution (``image_size=None``: each image keeps its aspect ratio, resized by
    the processor so that its area lies in [min_pixels, max_pixels] and its sides are multiples
    of 28; tokens = area / 28^2), or a fixed ``image_size`` (every image resized to a square).
    """

    def __init__(self, arch: Qwen25VLArch, *, image_size: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, seq_length: int = 4096,
                 precision: str = "bf16", fp8: str = "none", transformer_impl: str = "auto",
                 recompute_activations: bool = False, make_vocab_size_divisible_by: int = 128,
                 pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                 seed: int = 1234, init_weights: bool = True, sequence_parallel: bool = False,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> None:
        tp, pp, vpp = model_parallel_sizes()
        if vpp is not None and vp_stage is None:
            raise ValueError(f"the pipeline is interleaved ({vpp} virtual stages per rank): pass vp_stage")
        arch.check_parallel(tp, pp, vpp, first_stage_layers=first_stage_layers,
                            last_stage_layers=last_stage_layers)
        factor = arch.image_factor
        if image_size is not None:
            if image_size < factor or image_size % factor:
                raise ValueError(f"model.image_size={image_size} must be a positive multiple of patch_size * "
                                 f"spatial_merge_size = {factor}")
            if min_pixels is not None or max_pixels is not None:
                raise ValueError("model.image_size (fixed resolution) and model.min_pixels/max_pixels "
                                 "(dynamic resolution) exclude each other")
            min_pixels = max_pixels = image_size * image_size
        min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
        max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if not factor * factor <= min_pixels <= max_pixels:
            raise ValueError(f"need {factor * factor} <= model.min_pixels <= model.max_pixels, got "
                             f"{min_pixels}, {max_pixels}")
        impl = resolve_transformer_impl(transformer_impl)
        cp_group = context_parallel_group()
        lm_config = qwen_language_config(arch, tp=tp, pp=pp, vpp=vpp if vp_stage is not None else None,
                                         impl=impl, precision=precision, fp8=fp8,
                                         recompute=recompute_activations, init_weights=init_weights,
                                         cp=cp_group.size(), sequence_parallel=sequence_parallel,
                                         first_stage_layers=first_stage_layers,
                                         last_stage_layers=last_stage_layers)
        super().__init__(config=lm_config)
        self.cp_group = cp_group
        self.arch = arch
        self.transformer_impl = impl
        self.vocab_size = arch.vocab_size
        self.padded_vocab_size = pad_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp)
        self.image_token_id = arch.image_token_id
        self.image_size = None if image_size is None else (image_size, image_size)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.pre_process, self.post_process = pre_process, post_process
        self._image_processor = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.visual = build_vision_tower(arch) if pre_process else None
            self.language_model = GPTModel(
                config=lm_config, transformer_layer_spec=language_layer_spec(impl, cp_group.size()),
                vocab_size=self.padded_vocab_size, max_sequence_length=max(seq_length, 1),
                pre_process=pre_process, post_process=post_process,
                share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="mrope",
                rotary_base=arch.rope_theta, vp_stage=vp_stage,
                scatter_embedding_sequence_parallel=False)  # shard_sequence scatters, after the images
        self._to_keeping_fp32_buffers(torch_dtype(precision))

    def _to_keeping_fp32_buffers(self, dtype: torch.dtype) -> None:
        """Cast parameters to ``dtype`` but keep the vision tower's float buffers (its rope
        frequencies) in fp32, as transformers and vLLM do: in bf16 they would be off by ~1e-3."""
        saved = {} if self.visual is None else {
            (id(m), name): buf.clone() for m in self.visual.modules() for name, buf in m._buffers.items()
            if buf is not None and buf.is_floating_point()}
        self.to(dtype)
        if self.visual is not None:
            for m in self.visual.modules():
                for name in list(m._buffers):
                    if (id(m), name) in saved:
                        m._buffers[name] = saved[(id(m), name)].to(m._buffers[name].device)

    # --- interface -------------------------------------------------------------------------
    def resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) the processor resizes an image of ``image_hw`` to."""
        if len(image_hw) != 2 or min(image_hw) < 1:
            raise ValueError(f"image_hw must be a positive (height, width), got {image_hw!r}")
        if self.image_size is not None:
            return self.image_size
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(image_hw[0], image_hw[1], factor=self.arch.image_factor,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def num_image_tokens(self, image_hw: tuple[int, int]) -> int:
        """Image-token placeholders of one image of (height, width) ``image_hw``: resized area / 28^2.

        Raises ValueError for an aspect ratio above 200 (the processor cannot take it).
        """
        h, w = self.resized_hw(image_hw)
        return (h // self.arch.image_factor) * (w // self.arch.image_factor)

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            self._image_processor = build_image_processor(self.arch, self.min_pixels, self.max_pixels)
        return self._image_processor

    def preprocess_images(self, images: Sequence[Any]) -> QwenImages:
        """PIL images / CHW tensors / HWC arrays -> :class:`QwenImages` (patches of every image and
        their grids), through the transformers Qwen2-VL image processor. A fixed ``image_size``
        squares each image first (bicubic); dynamic resolution keeps the aspect ratio."""
        patch_dim = 3 * self.arch.temporal_patch_size * self.arch.patch_size ** 2
        if len(images) == 0:
            return QwenImages(torch.empty(0, patch_dim), torch.empty(0, 3, dtype=torch.long))
        from PIL import Image

        pil = [_to_pil(image) for image in images]
        if self.image_size is not None:
            side = self.image_size[0]
            pil = [p.resize((side, side), Image.Resampling.BICUBIC) for p in pil]
        out = self.image_processor(images=pil, return_tensors="pt")
        grid = out["image_grid_thw"].long()
        patch = self.arch.patch_size
        expected = [(1, *(s // patch for s in self.resized_hw((p.height, p.width)))) for p in pil]
        if [tuple(g) for g in grid.tolist()] != expected:
            raise RuntimeError(f"the image processor produced grids {grid.tolist()}, expected {expected}")
        return QwenImages(out["pixel_values"].float(), grid)

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def encode_images(self, pixel_values: QwenImages) -> Tensor:
        """:class:`QwenImages` -> image features [sum_k tokens_k, H] (images in order)."""
        if self.visual is None:
            raise RuntimeError("the vision tower lives on the first pipeline stage only")
        if not isinstance(pixel_values, QwenImages):
            raise TypeError(f"pixel_values must be QwenImages (use preprocess_images), got "
                            f"{type(pixel_values).__name__}")
        weight = self.visual.patch_embed.proj.weight
        grid = pixel_values.grid_thw.to(weight.device)
        values = pixel_values.pixel_values.to(device=weight.device, dtype=weight.dtype)
        out = self.visual(values, grid_thw=grid)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def rope_positions(self, input_ids: Tensor, position_ids: Tensor, images: QwenImages | None) -> Tensor:
        """[B, S] 1-D positions -> Qwen2.5-VL's [3, B, S] (needs the images' grids when the text
        holds image tokens); [3, B, S] positions are kept."""
        if position_ids.dim() == 3:
            return position_ids
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, S] or [3, B, S], got {tuple(position_ids.shape)}")
        merge = self.arch.spatial_merge_size
        grids = (torch.empty(0, 2, dtype=torch.long) if images is None
                 else images.token_grids(merge))
        if images is None and bool((input_ids == self.image_token_id).any()):
            raise ValueError(f"the text holds image tokens (id {self.image_token_id}) but pixel_values is "
                             "None: every pipeline stage needs the images' grids for the 3-D positions")
        return qwen_mrope_positions(input_ids, position_ids, self.image_token_id, grids)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: QwenImages | None = None, **lm_kwargs: Any) -> Tensor:
        """See :meth:`VisionLanguageModel.forward`; ``pixel_values`` is a :class:`QwenImages`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        mask = self.lm_attention_mask(attention_mask, input_ids)
        rope = self.rope_positions(input_ids, position_ids, pixel_values)
        decoder_input = self.embed(input_ids, rope[0], pixel_values) if self.pre_process else None
        decoder_input = self.shard_sequence(decoder_input)
        return self.language_model(input_ids, rope, mask, decoder_input=decoder_input, **lm_kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Distributed-checkpoint view: the GPTModel's own sharded state dict under
        ``language_model.``; the vision tower's tensors replicated (one writer per TP group)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.module import MegatronModule
        from megatron.core.transformer.utils import sharded_state_dict_default

        out: dict = {}
        for name, module in self.named_children():
            if isinstance(module, MegatronModule):
                out.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=parallel_state.get_tensor_model_parallel_group()))
        return out


def _check_overrides(cfg: Any, arch: Qwen25VLArch) -> None:
    """ModelConfig size fields, when set, must agree with the Hugging Face config (they are read
    from it, not overridden)."""
    pairs = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
             "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.num_query_groups,
             "ffn_hidden_size": arch.ffn_hidden_size, "vocab_size": arch.vocab_size}
    for name, value in pairs.items():
        given = getattr(cfg, name, None)
        if given is not None and given != value:
            raise ValueError(f"model.{name}={given} disagrees with {cfg.hf_path}/config.json ({value}); "
                             "leave it unset for qwen2_5_vl (sizes come from the Hugging Face config)")


@register_model("qwen2_5_vl")
def build_qwen2_5_vl(cfg: Any, *, vocab_size: int, image_token_id: int, pre_process: bool = True,
                     post_process: bool = True, vp_stage: int | None = None, seed: int = 1234,
                     init_weights: bool = True, sequence_parallel: bool = False,
                     first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> Qwen25VL:
    """Qwen2.5-VL (architecture from model.hf_path; megatron-core LM + transformers vision tower)."""
    if not getattr(cfg, "hf_path", None):
        raise ValueError("model.name=qwen2_5_vl needs model.hf_path: a Hugging Face folder with the "
                         "model's config.json (e.g. a converted checkpoint's hf_config/)")
    arch = Qwen25VLArch.from_hf_config(load_hf_config(cfg.hf_path))
    _check_overrides(cfg, arch)
    if vocab_size > arch.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} ids but {cfg.hf_path}/config.json vocab_size is "
                         f"{arch.vocab_size}")
    if image_token_id != arch.image_token_id:
        raise ValueError(f"the tokenizer's image token id {image_token_id} differs from "
                         f"{cfg.hf_path}/config.json image_token_id {arch.image_token_id}")
    model = Qwen25VL(arch, image_size=getattr(cfg, "image_size", None),
                     min_pixels=getattr(cfg, "min_pixels", None), max_pixels=getattr(cfg, "max_pixels", None),
                     seq_length=cfg.seq_length,
                     precision=cfg.precision, fp8=cfg.fp8, transformer_impl=cfg.transformer_impl,
                     recompute_activations=cfg.recompute_activations,
                     make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                     pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, seed=seed,
                     init_weights=init_weights, sequence_parallel=sequence_parallel,
                     first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
