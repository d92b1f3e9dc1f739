"""A tiny vision-language model from megatron-core parts, sized to train in minutes on 2 CPU cores.

    pixel_values [N, 3, 64, 64] ──► CLIPViTModel (patch 16, no class token) ──► [N, 16, 64]
        ──► MultimodalProjector (MLP) ──► [N*16, 128] image features
    input_ids [B, S] ──► GPTModel.embedding ──► [S, B, 128]; image-token rows <- image features
        ──► GPTModel(decoder_input=...) ──► logits [B, S, V_pad / tp]

The language model is Qwen-like (RMSNorm, SwiGLU, qkv bias, multimodal rope); ``[B, S]``
position ids are used as 1-D rope positions (the three mrope sections get the same positions),
``[3, B, S]`` ones as they are, exactly as a Qwen2.5-VL model would take them. Layer specs:
Transformer Engine when ``transformer_impl`` resolves to it, megatron-core local specs otherwise.
Weights are drawn on the CPU from ``seed`` (``use_cpu_initialization``), so the full weights are
the same for every tensor-parallel size. The vision encoder and projector live on the first
pipeline stage only (``pre_process``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.models.vision.vit_layer_specs import (
    get_vit_layer_with_local_spec,
    get_vit_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_papo.compat import mcore_compat
from megatron_papo.models.base import (
    VisionLanguageModel,
    common_transformer_fields,
    context_parallel_group,
    fp8_fields,
    images_to_tensor,
    make_transformer_config,
    model_parallel_sizes,
    mrope_position_ids,
    pad_vocab_size,
    resolve_transformer_impl,
    torch_dtype,
)
from megatron_papo.models.cp_attention import AllGatherContextParallelAttention
from megatron_papo.models.registry import register_model
from megatron_papo.pipeline_layout import stage_layers, transformer_config_fields

__all__ = ["TinyVLM", "TinyVLMConfig", "build_tiny_vlm"]


@dataclass
class TinyVLMConfig:
    """Everything a :class:`TinyVLM` is built from (defaults: the CPU-sized model)."""

    vocab_size: int
    """True vocabulary size (the tokenizer's); padded to make_vocab_size_divisible_by * tp."""
    image_token_id: int
    """Id of the image placeholder token."""
    image_size: int = 64
    """Images are resized to image_size x image_size RGB."""
    patch_size: int = 16
    """ViT patch side; (image_size / patch_size)^2 image tokens per image."""
    vision_hidden_size: int = 64
    """ViT width."""
    vision_num_layers: int = 2
    """ViT depth."""
    vision_num_attention_heads: int = 4
    """ViT heads (divisible by tp)."""
    vision_ffn_hidden_size: int = 256
    """ViT MLP inner size."""
    projector_ffn_hidden_size: int | None = None
    """Projector MLP inner size; None = the language model's hidden size."""
    num_layers: int = 2
    """Language-model layers."""
    hidden_size: int = 128
    """Language-model width."""
    num_attention_heads: int = 4
    """Language-model query heads."""
    num_query_groups: int | None = None
    """Key/value heads (GQA); None = num_attention_heads."""
    ffn_hidden_size: int = 256
    """Language-model SwiGLU inner size."""
    rotary_base: int = 10000
    """Rope base."""
    seq_length: int = 1024
    """Longest sequence (prompt + response) the model is used with."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding granule, times tp."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype (fp32 on CPU)."""
    fp8: str = "none"
    """FP8 recipe of the language model (Transformer Engine only)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer specs: auto = Transformer Engine when it imports, else local."""
    recompute_activations: bool = False
    """Full activation recomputation in the language model's layers."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the language model's head dim must be even (rope)")

    @classmethod
    def from_model_config(cls, cfg: Any, *, vocab_size: int, image_token_id: int) -> TinyVLMConfig:
        """Defaults overridden by the ``ModelConfig`` fields that are set (not None).

        ``cfg.vocab_size``, when set, must cover the tokenizer's ``vocab_size`` and wins.
        """
        if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({vocab_size})")
        sizes = {name: getattr(cfg, name) for name in
                 ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
                 if getattr(cfg, name) is not None}
        for name in ("image_size", "patch_size", "vision_hidden_size", "vision_num_layers"):
            if getattr(cfg, name, None):
                sizes[name] = getattr(cfg, name)
        return cls(vocab_size=cfg.vocab_size or vocab_size, image_token_id=image_token_id,
                   seq_length=cfg.seq_length, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                   precision=cfg.precision, fp8=cfg.fp8, transformer_impl=cfg.transformer_impl,
                   recompute_activations=cfg.recompute_activations, **sizes)

    @property
    def image_tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def mrope_section(head_dim: int) -> list[int]:
    """Split the head_dim/2 rotary frequencies into (temporal, height, width) sections in
    Qwen2-VL's 1:1.5:1.5 proportions ([16, 24, 24] for head_dim 128)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


# ---------------------------------------------------------------------------------------------
# TransformerConfigs and layer specs
# ---------------------------------------------------------------------------------------------
def language_config(c: TinyVLMConfig, tp: int, pp: int, vpp: int | None, impl: str,
                    cp: int = 1, sequence_parallel: bool = False, first_stage_layers: int | None = None,
                    last_stage_layers: int | None = None) -> TransformerConfig:
    """The GPT language model's TransformerConfig (Qwen-like, multimodal rope; uneven pipeline
    stages: pipeline_layout)."""
    stage_layers(c.num_layers, pp, first=first_stage_layers, last=last_stage_layers, vpp=vpp)
    recompute = (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                 if c.recompute_activations else {})
    return make_transformer_config(
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_query_groups, ffn_hidden_size=c.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=True,
        mrope_section=mrope_section(c.hidden_size // c.num_attention_heads),
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        **recompute, **fp8_fields(c.fp8, impl),
        **transformer_config_fields(first_stage_layers, last_stage_layers),
        **common_transformer_fields(tp, c.precision, cp, sequence_parallel))


def vision_config(c: TinyVLMConfig, tp: int) -> TransformerConfig:
    """The ViT's TransformerConfig (CLIP-like: LayerNorm, GELU, biases). It is never pipelined:
    the whole encoder sits on the first stage."""
    return make_transformer_config(
        num_layers=c.vision_num_layers, hidden_size=c.vision_hidden_size,
        num_attention_heads=c.vision_num_attention_heads, ffn_hidden_size=c.vision_ffn_hidden_size,
        normalization="LayerNorm", layernorm_epsilon=1e-6, activation_func=F.gelu, add_bias_linear=True,
        add_qkv_bias=True, pipeline_model_parallel_size=1, **common_transformer_fields(tp, c.precision))


def projector_config(c: TinyVLMConfig, tp: int) -> TransformerConfig:
    """The projector MLP's TransformerConfig: vision width -> ffn -> language-model width."""
    return make_transformer_config(
        num_layers=1, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.projector_ffn_hidden_size or c.hidden_size, activation_func=F.gelu,
        add_bias_linear=True, pipeline_model_parallel_size=1, **common_transformer_fields(tp, c.precision))


def language_layer_spec(impl: str, cp: int = 1) -> ModuleSpec:
    """GPT layer spec: TE (fused norms, TE attention) or megatron-core local with RMSNorm.

    cp > 1: the core attention is
    :class:`~megatron_papo.models.cp_attention.AllGatherContextParallelAttention` in either backend
    (zigzag-sharded sequences, arbitrary masks).
    """
    if impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if cp > 1:
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = AllGatherContextParallelAttention
    return spec


def vision_layer_spec(impl: str) -> ModuleSpec:
    """ViT layer spec with bidirectional attention (megatron-core's local ViT spec is causal)."""
    if impl == "transformer_engine":
        return get_vit_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_vit_layer_with_local_spec())
    attention = spec.submodules.self_attention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.no_mask}
    return spec


def _norm_impl(impl: str) -> dict[str, Any]:
    """CLIPViTModel's ln_pre/ln_post class: its TE default, or megatron-core's torch norm wrapper."""
    if impl == "transformer_engine":
        return {}
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return dict(ln_pre_impl=WrappedTorchNorm, ln_post_impl=WrappedTorchNorm)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class TinyVLM(VisionLanguageModel):
    """CLIP-style ViT + MLP projector + GPT language model (megatron-core modules).

    Submodules (their names are the checkpoint key prefixes): ``vision_model`` (CLIPViTModel)
    and ``vision_projection`` (MultimodalProjector) on the first pipeline stage only (None
    elsewhere), ``language_model`` (GPTModel) everywhere.
    """

    def __init__(self, c: TinyVLMConfig, *, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None, seed: int = 1234, sequence_parallel: bool = False,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> None:
        tp, pp, vpp = model_parallel_sizes()
        if vpp is not None and vp_stage is None:
            raise ValueError(f"the pipeline is interleaved ({vpp} virtual stages per rank): pass vp_stage")
        impl = resolve_transformer_impl(c.transformer_impl)
        cp_group = context_parallel_group()
        cp = cp_group.size()
        lm_config = language_config(c, tp, pp, vpp if vp_stage is not None else None, impl, cp,
                                    sequence_parallel, first_stage_layers, last_stage_layers)
        super().__init__(config=lm_config)
        self.cp_group = cp_group
        self.tiny_config = c
        self.transformer_impl = impl
        self.vocab_size = c.vocab_size
        self.padded_vocab_size = pad_vocab_size(c.vocab_size, c.make_vocab_size_divisible_by, tp)
        self.image_token_id = c.image_token_id
        self.image_size = (c.image_size, c.image_size)
        self.pre_process, self.post_process = pre_process, post_process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # CPU init draws full weights, then keeps this rank's shard
            self.vision_model, self.vision_projection = (
                self._build_vision(c, tp, impl) if pre_process else (None, None))
            self.language_model = GPTModel(
                config=lm_config, transformer_layer_spec=language_layer_spec(impl, cp),
                vocab_size=self.padded_vocab_size, max_sequence_length=c.seq_length,
                pre_process=pre_process, post_process=post_process,
                share_embeddings_and_output_weights=False, position_embedding_type="mrope",
                rotary_base=c.rotary_base, vp_stage=vp_stage,
                scatter_embedding_sequence_parallel=False)  # shard_sequence scatters, after the images
        dtype = torch_dtype(c.precision)
        if dtype != torch.float32:
            self.to(dtype)  # the ViT's conv / position embedding are plain torch modules

    @staticmethod
    def _build_vision(c: TinyVLMConfig, tp: int, impl: str) -> tuple[CLIPViTModel, MultimodalProjector]:
        vit_config = vision_config(c, tp)
        vit_spec = vision_layer_spec(impl)
        encoder = CLIPViTModel(vit_config, vit_spec, add_class_token=False, class_token_len=0,
                               patch_dim=c.patch_size, img_h=c.image_size, img_w=c.image_size,
                               **_norm_impl(impl))
        mlp = mcore_compat.mlp_submodules(vit_spec.submodules.mlp)
        projector = MultimodalProjector(projector_config(c, tp), mlp, projector_type="mlp",
                                        input_size=c.vision_hidden_size)
        return encoder, projector

    # --- interface -------------------------------------------------------------------------
    def num_image_tokens(self, image_hw: tuple[int, int]) -> int:
        """(image_size / patch_size)^2 for any input size: every image is resized first."""
        if len(image_hw) != 2 or min(image_hw) < 1:
            raise ValueError(f"image_hw must be a positive (height, width), got {image_hw!r}")
        return self.tiny_config.image_tokens_per_image

    def preprocess_images(self, images: Sequence[Any]) -> Tensor:
        """PIL images / uint8 CHW tensors -> [N, 3, image_size, image_size] float32, CLIP-normalised."""
        return images_to_tensor(images, self.image_size)

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Pipeline parallelism: the previous stage's [S, B, H] output goes to the language model."""
        self.language_model.set_input_tensor(input_tensor)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] -> projected image features [N * tokens_per_image, H_lm]."""
        if self.vision_model is None:
            raise RuntimeError("the vision encoder lives on the first pipeline stage only")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, *self.image_size):
            raise ValueError(f"pixel_values must be [N, 3, {self.image_size[0]}, {self.image_size[1]}] "
                             f"(use preprocess_images), got {tuple(pixel_values.shape)}")
        weight = self.vision_model.conv1.weight
        patches = self.vision_model(pixel_values.to(device=weight.device, dtype=weight.dtype))  # [N, P, Hv]
        features = self.vision_projection(patches)  # [N, P, H]
        return features.reshape(-1, features.shape[-1])

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, **lm_kwargs: Any) -> Tensor:
        """See :meth:`VisionLanguageModel.forward`: [B, S] ids -> [B, S, V_pad / tp] logits
        (last stage) or [S, B, H] hidden states (other stages)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        mask = self.lm_attention_mask(attention_mask, input_ids)
        rope_positions = mrope_position_ids(position_ids)
        flat_positions = rope_positions[0]  # [B, S]; only the rope uses positions
        decoder_input = self.embed(input_ids, flat_positions, pixel_values) if self.pre_process else None
        decoder_input = self.shard_sequence(decoder_input)
        return self.language_model(input_ids, rope_positions, mask, decoder_input=decoder_input, **lm_kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """megatron-core distributed-checkpoint view: each submodule's own sharded state dict
        under its attribute name (``vision_model.``, ``vision_projection.``, ``language_model.``).
        A Hugging Face adapter maps these keys; nothing is renamed here."""
        out: dict = {}
        for name, module in self.named_children():
            out.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return out


@register_model("tiny_vlm")
def build_tiny_vlm(cfg: Any, *, vocab_size: int, image_token_id: int, pre_process: bool = True,
                   post_process: bool = True, vp_stage: int | None = None, seed: int = 1234,
                   sequence_parallel: bool = False, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None) -> TinyVLM:
    """Tiny CLIP-ViT + GPT vision-language model (CPU-sized; ModelConfig sizes override the defaults)."""
    c = TinyVLMConfig.from_model_config(cfg, vocab_size=vocab_size, image_token_id=image_token_id)
    model = TinyVLM(c, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, seed=seed,
                    sequence_parallel=sequence_parallel, first_stage_layers=first_stage_layers,
                    last_stage_layers=last_stage_layers)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model

