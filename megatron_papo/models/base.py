"""What every vision-language model of megatron_papo offers, and the pieces they share.

The trainer, the rollout engine and the model builders (tiny VLM, Qwen2.5-VL) meet at
:class:`VisionLanguageModel`:

    logits = model(input_ids, position_ids, attention_mask, pixel_values)   # [B, S, V_pad / tp]

**Image tokens are expanded in the text** (the Qwen2.5-VL convention): a tokenized prompt
already holds ``model.num_image_tokens(hw)`` copies of ``image_token_id`` where each image
goes. The model embeds the text, overwrites the embeddings at the image-token positions with
the projected vision features (images in batch order, positions in row-major ``[B, S]`` order;
:func:`scatter_image_features`) and runs the language model on the result. The sequence length
never changes, so a response has the same token positions whatever the image's pixels are
(PAPO's masked-image branch reuses the token ids and positions as they are).

Shared helpers: vocabulary padding (:func:`pad_vocab_size`), attention-mask normalisation
(:func:`build_attention_mask`), ``[B, S]`` -> ``[3, B, S]`` positions for multimodal rope
(:func:`mrope_position_ids`), the layer-spec backend choice (:func:`resolve_transformer_impl`)
and image preprocessing (:func:`images_to_tensor`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_papo.compat import mcore_compat
from megatron_papo.models.cp_attention import AllGatherContextParallelAttention
from megatron_papo.ops.context_parallel import zigzag_split
from megatron_papo.ops.groups import rank_and_size

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "VisionLanguageModel",
    "build_attention_mask",
    "causal_attention_mask",
    "concat_pixels",
    "context_parallel_group",
    "count_image_tokens",
    "images_to_tensor",
    "mrope_position_ids",
    "pad_vocab_size",
    "resolve_transformer_impl",
    "scatter_image_features",
    "torch_dtype",
    "whole_sequences",
]

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of CLIP's (and Qwen2.5-VL's) image normalisation, on pixels in [0, 1]."""
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of the same normalisation."""


class VisionLanguageModel(MegatronModule):
    """Base of the project's vision-language models (a megatron-core ``MegatronModule``).

    ``config`` is the language model's ``TransformerConfig`` (what megatron-core's pipeline
    schedules and DDP read through ``get_model_config``).

    Attributes every subclass sets:
        vocab_size: the tokenizer's (true) vocabulary size.
        padded_vocab_size: the embedding / output-layer rows, ``pad_vocab_size(...)``; each TP
            rank's logits hold ``padded_vocab_size // tp`` columns, padded ones never count.
        image_token_id: the placeholder id that marks image positions in ``input_ids``.
        image_size: ``(H, W)`` the images are resized to by :meth:`preprocess_images`.
        pre_process / post_process: first / last pipeline stage (embedding and vision encoder
            live on the first, the output layer on the last).
    """

    model_type = ModelType.encoder_or_decoder
    """What megatron-core's pipeline schedules ask of a model (a decoder-only pipeline)."""
    vocab_size: int
    padded_vocab_size: int
    image_token_id: int
    image_size: tuple[int, int]
    pre_process: bool
    post_process: bool

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, **lm_kwargs: Any) -> Tensor:
        """Logits of this TP rank's vocabulary shard, or hidden states before the last stage.

        Args:
            input_ids: [B, S] int64, image tokens already expanded.
            position_ids: [B, S] (or [3, B, S] multimodal-rope positions).
            attention_mask: None (causal), a [B, S] padding mask (1/True = real token) or a
                megatron bool mask [B or 1, 1, S, S] (True = masked out); see
                :func:`build_attention_mask`.
            pixel_values: [N_img, C, H, W] float from :meth:`preprocess_images`, or None.
            lm_kwargs: passed to the language model (e.g. ``inference_context``).
        Returns:
            last pipeline stage: [B, S, padded_vocab_size / tp] contiguous logits;
            other stages: [S, B, H] hidden states (megatron-core convention).
        """
        raise NotImplementedError

    def rope_positions(self, input_ids: Tensor, position_ids: Tensor, pixel_values: Any = None) -> Tensor:
        """[B, S] 1-D positions -> the [3, B, S] multimodal-rope positions this model's language
        model uses (plain rope: the three equal); [3, B, S] positions are returned as they are."""
        return mrope_position_ids(position_ids)

    def num_image_tokens(self, image_hw: tuple[int, int]) -> int:
        """Image-token placeholders that one image of height/width ``image_hw`` needs in the text."""
        raise NotImplementedError

    def resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) :meth:`preprocess_images` resizes an image of ``image_hw`` to
        (the model input's size; default: the fixed ``image_size``)."""
        if len(image_hw) != 2 or min(image_hw) < 1:
            raise ValueError(f"image_hw must be a positive (height, width), got {image_hw!r}")
        return tuple(self.image_size)

    def preprocess_images(self, images: Sequence[Any]) -> Tensor:
        """PIL images / uint8 CHW tensors -> pixel_values [N, C, H, W] float for :meth:`forward`."""
        raise NotImplementedError

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Pipeline parallelism: the previous stage's output, handed to the language model."""
        raise NotImplementedError

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """pixel_values from :meth:`preprocess_images` -> image features [N_img * tokens, H] (first stage)."""
        raise NotImplementedError

    def vision_modules(self) -> list[torch.nn.Module]:
        """The vision encoder and its projector (empty on later pipeline stages)."""
        return [m for name, m in self.named_children() if name != "language_model"]

    def freeze_vision(self) -> int:
        """Stop training the vision side (``model.freeze_vision_tower``); returns the parameters frozen."""
        count = 0
        for module in self.vision_modules():
            for p in module.parameters():
                p.requires_grad_(False)
                count += p.numel()
        return count

    def embed(self, input_ids: Tensor, position_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """First stage: text embeddings [S, B, H] with the image-token rows replaced by image features.

        Without image tokens in ``input_ids`` the images are not encoded (pixel_values ignored).
        """
        text = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)  # [S, B, H]
        placeholders = count_image_tokens(input_ids, self.image_token_id)
        if placeholders == 0:
            return text
        if pixel_values is None:
            raise ValueError(f"the text holds {placeholders} image-token positions "
                             f"(id {self.image_token_id}) but pixel_values is None")
        return scatter_image_features(text, input_ids, self.image_token_id, self.encode_images(pixel_values))

    cp_group: Any = None
    """Context-parallel group of the language model (None or size 1: whole sequences)."""

    def lm_attention_mask(self, attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
        """The language model's bool mask (:func:`build_attention_mask`); an explicit causal one for
        local specs (megatron's default one is made with device="cuda", which the CPU patches
        cannot redirect while activations are recomputed in backward) and under context
        parallelism, where only this rank's query rows are kept: [B or 1, 1, S / cp, S]."""
        seq_len = input_ids.shape[1]
        mask = build_attention_mask(attention_mask, seq_len)
        cp_rank, cp_size = self.context_parallel_rank_size()
        if mask is None and (cp_size > 1 or getattr(self, "transformer_impl", "local") == "local"):
            mask = causal_attention_mask(seq_len, input_ids.device)
        if cp_size > 1:
            mask = zigzag_split(mask, cp_rank, cp_size, dim=2)
        return mask

    def context_parallel_rank_size(self) -> tuple[int, int]:
        """(rank, size) of this model in its context-parallel group ((0, 1) without one)."""
        return rank_and_size(self.cp_group)

    def shard_sequence(self, decoder_input: Tensor | None) -> Tensor | None:
        """First stage: the embedded sequence [S, B, H] (images merged into the whole sequence
        first) as the language model takes it: this context-parallel rank's zigzag shard
        [S / cp, B, H], then, under sequence parallelism, this TP rank's contiguous slice
        [S / (cp * tp), B, H]. S must be a multiple of 2 * cp (times tp with sequence
        parallelism; ``batch.pad_columns``). Identity without either."""
        if decoder_input is None:
            return None
        cp_rank, cp_size = self.context_parallel_rank_size()
        sequence_parallel = bool(getattr(self.config, "sequence_parallel", False))
        # from the group, not the config: inside `whole_sequences` the cp group is None
        multiple = (2 * cp_size if cp_size > 1 else 1) * (
            self.config.tensor_model_parallel_size if sequence_parallel else 1)
        if decoder_input.shape[0] % multiple:
            raise ValueError(f"cp={cp_size}, sequence_parallel={sequence_parallel}: sequence length "
                             f"{decoder_input.shape[0]} is not a multiple of {multiple}; pad the batch's "
                             "columns first (megatron_papo.training.batch.pad_columns)")
        if cp_size > 1:
            decoder_input = zigzag_split(decoder_input, cp_rank, cp_size, dim=0).contiguous()
        if sequence_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            decoder_input = scatter_to_sequence_parallel_region(decoder_input)
        return decoder_input

    # megatron-core's finalize_model_grads (pipeline parallel) asks the top module about tied
    # embeddings; the answer is the language model's (a subclass keeps it in `language_model`).
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Whether the input embedding and the output layer share one weight (the LM's setting)."""
        return bool(self.language_model.share_embeddings_and_output_weights)

    def shared_embedding_or_output_weight(self) -> Tensor | None:
        """The shared weight on the first / last pipeline stage (megatron-core API), if tied."""
        return self.language_model.shared_embedding_or_output_weight()


# ---------------------------------------------------------------------------------------------
# Configuration helpers
# ---------------------------------------------------------------------------------------------
def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the smallest multiple of ``divisible_by * tp`` >= vocab_size."""
    if vocab_size < 1 or divisible_by < 1 or tp < 1:
        raise ValueError(f"vocab_size, divisible_by and tp must be positive, got "
                         f"{vocab_size}, {divisible_by}, {tp}")
    multiple = divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


def resolve_transformer_impl(impl: str) -> Literal["local", "transformer_engine"]:
    """``ModelConfig.transformer_impl`` -> the layer-spec backend to build with.

    auto: Transformer Engine when it imports, else megatron-core's local specs;
    transformer_engine: required (MissingDependencyError with the install hint otherwise).
    """
    if impl == "auto":
        return "transformer_engine" if mcore_compat.have_transformer_engine() else "local"
    if impl == "transformer_engine":
        mcore_compat.require("transformer_engine")
        return "transformer_engine"
    if impl == "local":
        return "local"
    raise ValueError(f"transformer_impl must be auto, local or transformer_engine, got {impl!r}")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(precision: str) -> torch.dtype:
    """``ModelConfig.precision`` (fp32 / bf16 / fp16) -> torch dtype."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    return _DTYPES[precision]


def precision_fields(precision: str) -> dict[str, Any]:
    """TransformerConfig keyword arguments for one precision (params, pipeline p2p dtype, flags)."""
    dtype = torch_dtype(precision)
    return dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16)


_FP8_RECIPES = {  # ModelConfig.fp8 -> (TransformerConfig.fp8 format, fp8_recipe)
    "delayed": ("hybrid", "delayed"),
    "current": ("hybrid", "tensorwise"),
    "blockwise": ("e4m3", "blockwise"),
}


def fp8_fields(fp8: str, impl: str) -> dict[str, Any]:
    """TransformerConfig keyword arguments for ``ModelConfig.fp8`` (empty for "none")."""
    if fp8 == "none":
        return {}
    if fp8 not in _FP8_RECIPES:
        raise ValueError(f"fp8 must be none or one of {sorted(_FP8_RECIPES)}, got {fp8!r}")
    if impl != "transformer_engine":
        raise ValueError(f"fp8={fp8!r} needs Transformer Engine layer specs, but transformer_impl "
                         f"resolved to {impl!r}")
    fmt, recipe = _FP8_RECIPES[fp8]
    return dict(fp8=fmt, fp8_recipe=recipe)


def context_parallel_group() -> Any:
    """megatron-core's context-parallel group (size 1 when cp is off); parallel state must be initialised."""
    from megatron.core import parallel_state as ps

    model_parallel_sizes()  # the clear error when parallel state is missing
    return ps.get_context_parallel_group()


@contextlib.contextmanager
def whole_sequences(model_chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside, models built for context parallelism run whole, unsharded sequences on each rank.

    Cached generation needs it: a decode step feeds one token per row, which cannot be split
    into 2 * cp zigzag chunks. Every cp rank then holds the whole KV cache and computes the same
    tokens as a cp=1 model (the cp ranks sample with the same seeds, as the TP ranks do). For
    the duration the cp group is None in the three places that read it: the model
    (:meth:`VisionLanguageModel.shard_sequence` and ``lm_attention_mask`` keep the whole sequence
    and mask), the context-parallel core attention (keys and values are not gathered: they
    already cover the sequence) and megatron-core's rotary tables
    (:func:`~megatron_papo.compat.mcore_compat.rotary_tables_unsharded`). Restored on exit, also
    on error. Sequence parallelism cannot be switched off like this (megatron-core's linear
    layers read it at construction), so generation under it recomputes the sharded forward.
    """
    ours = [m for chunk in model_chunks for m in chunk.modules()
            if isinstance(m, (VisionLanguageModel, AllGatherContextParallelAttention))]
    with contextlib.ExitStack() as stack:
        for chunk in model_chunks:
            stack.enter_context(mcore_compat.rotary_tables_unsharded(chunk))
        stack.enter_context(mcore_compat.cp_group_cleared(ours))
        yield


def sequence_multiple(config: TransformerConfig) -> int:
    """What a sequence length must be a multiple of for a language model with this config: 2 * cp
    under context parallelism (zigzag shards), times tp under sequence parallelism; 1 otherwise."""
    cp = config.context_parallel_size
    multiple = 2 * cp if cp > 1 else 1
    if getattr(config, "sequence_parallel", False):
        multiple *= config.tensor_model_parallel_size
    return multiple


def model_parallel_sizes() -> tuple[int, int, int | None]:
    """(tp, pp, vpp) from megatron-core's parallel_state; a clear error when it is not initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron-core's parallel state is not initialised: call "
                           "megatron_papo.distributed.init_distributed(...) before building a model")
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size())


# ---------------------------------------------------------------------------------------------
# Forward-pass helpers
# ---------------------------------------------------------------------------------------------
def build_attention_mask(attention_mask: Tensor | None, seq_len: int) -> Tensor | None:
    """Normalise what :meth:`VisionLanguageModel.forward` accepts to megatron's bool mask.

    Args:
        attention_mask:
            - None: plain causal attention (the layer specs' built-in causal mask);
            - [B, S] bool or integer padding mask, True/1 = real token, False/0 = padding (the
              Hugging Face tokenizer convention; left or right padding): becomes causal AND
              "key is a real token";
            - [B or 1, 1, S, S_keys] bool, True = masked out (megatron's convention): used as is
              (S_keys > S while decoding with a KV cache: the keys of the cached tokens too).
        seq_len: S.
    Returns:
        None or a bool [B or 1, 1, S, S] mask, True = masked out. Rows of padding queries may
        be fully masked; their outputs are finite and meaningless (never read by the loss).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape[1] != seq_len:
            raise ValueError(f"padding mask has shape {tuple(attention_mask.shape)}, expected [B, {seq_len}]")
        if attention_mask.is_floating_point():
            raise TypeError("a [B, S] padding mask must be bool or integer (1 = token, 0 = padding)")
        key_is_padding = ~attention_mask.bool()  # [B, S]
        future = causal_attention_mask(seq_len, attention_mask.device)  # [1, 1, S, S]
        return future | key_is_padding[:, None, None, :]  # [B, 1, S, S]
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise TypeError("a 4-D attention mask must be bool (True = masked out), "
                            f"got {attention_mask.dtype}")
        _, one, queries, keys = attention_mask.shape
        if one != 1 or queries != seq_len or keys < seq_len:
            raise ValueError(f"attention mask has shape {tuple(attention_mask.shape)}, "
                             f"expected [B or 1, 1, {seq_len}, S_keys >= {seq_len}]")
        return attention_mask
    raise ValueError("attention_mask must be [B, S] or [B, 1, S, S], "
                     f"got shape {tuple(attention_mask.shape)}")


def causal_attention_mask(seq_len: int, device: torch.device | str | None = None) -> Tensor:
    """Megatron's causal mask [1, 1, S, S] bool, True = masked out (the future)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def mrope_position_ids(position_ids: Tensor) -> Tensor:
    """[B, S] positions -> [3, B, S] (temporal, height, width all equal: plain 1-D rope);
    [3, B, S] positions are returned as they are."""
    if position_ids.dim() == 2:
        return position_ids.unsqueeze(0).expand(3, -1, -1)
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return position_ids
    raise ValueError(f"position_ids must be [B, S] or [3, B, S], got shape {tuple(position_ids.shape)}")


def concat_pixels(parts: Sequence[Any]) -> Any:
    """Several batches' ``preprocess_images`` outputs as one, in order (None when empty).

    Tensors ([N, ...]) are concatenated along dim 0; a model-specific container (e.g. Qwen2.5-VL's
    :class:`~megatron_papo.models.qwen2_5_vl.QwenImages`, which carries each image's grid) through
    its ``concat`` classmethod.
    """
    items = [p for p in parts if p is not None]
    if not items:
        return None
    if all(isinstance(p, Tensor) for p in items):
        return torch.cat(items, dim=0)
    kind = type(items[0])
    if not hasattr(kind, "concat") or any(type(p) is not kind for p in items):
        kinds = sorted({type(p).__name__ for p in items})
        raise TypeError(f"cannot concatenate pixel batches of types {kinds}")
    return kind.concat(items)


def count_image_tokens(input_ids: Tensor, image_token_id: int) -> int:
    """Number of image-token placeholders in a [B, S] batch (one host sync)."""
    return int((input_ids == image_token_id).sum().item())


def scatter_image_features(text_embeddings: Tensor, input_ids: Tensor, image_token_id: int,
                           image_features: Tensor) -> Tensor:
    """Put the image features in place of the image-token embeddings (out of place).

    Args:
        text_embeddings: [S, B, H] the language model's input embeddings.
        input_ids: [B, S].
        image_token_id: placeholder id.
        image_features: [N_tok, H] projected features, N_tok = number of placeholders; feature
            k goes to the k-th placeholder in row-major [B, S] order (sample 0's first).
    Returns:
        [S, B, H] contiguous, differentiable wrt both inputs.
    Raises:
        ValueError: when the placeholder count differs from the number of features.
    """
    is_image = input_ids == image_token_id  # [B, S]
    positions = count_image_tokens(input_ids, image_token_id)
    if positions != image_features.shape[0]:
        raise ValueError(
            f"the text holds {positions} image-token positions (id {image_token_id}) but the images "
            f"give {image_features.shape[0]} image features; each image needs exactly "
            "num_image_tokens(...) placeholders in the prompt")
    batch_first = text_embeddings.transpose(0, 1)  # [B, S, H]
    merged = batch_first.masked_scatter(is_image.unsqueeze(-1), image_features.to(batch_first.dtype))
    return merged.transpose(0, 1).contiguous()


def image_hw(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, a CHW tensor or an HWC array."""
    if hasattr(image, "size") and not callable(image.size) and not isinstance(image, np.ndarray):
        width, height = image.size  # PIL
        return int(height), int(width)
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return int(image.shape[0]), int(image.shape[1])  # HWC array


def resize_image(image: Any, hw: tuple[int, int]) -> Any:
    """``image`` (PIL, uint8/float CHW tensor or uint8 HWC array) resized to ``hw`` = (H, W),
    bicubic (the Qwen image processor's resampling), same kind out (arrays come back as uint8
    CHW tensors); returned as it is when it already has that size."""
    if hasattr(image, "resize") and hasattr(image, "size") and not isinstance(image, Tensor | np.ndarray):
        from PIL import Image

        if image.size == (hw[1], hw[0]):
            return image
        return image.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    chw = _to_uint8_chw(image)
    if tuple(chw.shape[1:]) == tuple(hw):
        return chw
    out = torch.nn.functional.interpolate(chw[None].float(), size=tuple(hw), mode="bicubic",
                                          align_corners=False, antialias=True)[0]
    if chw.is_floating_point():
        return out.clamp(0.0, 1.0)
    return out.round().clamp(0, 255).to(torch.uint8)


def _to_uint8_chw(image: Any) -> Tensor:
    """One PIL image, uint8/float CHW tensor or HWC numpy array -> [3, H, W] (uint8, or float in [0, 1])."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image.Image
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 3 else image[:, :, None]
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError("expected a PIL image, a CHW tensor or an HWC numpy array, "
                        f"got {type(image).__name__}")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected a [C, H, W] image with C in (1, 3, 4), got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3]


def images_to_tensor(images: Sequence[Any], size: tuple[int, int], mean: Sequence[float] = CLIP_IMAGE_MEAN,
                     std: Sequence[float] = CLIP_IMAGE_STD) -> Tensor:
    """Resize (bilinear, antialiased) and normalise images to pixel_values.

    Args:
        images: PIL images (any mode; converted to RGB), uint8 [C, H, W] tensors (C = 1, 3 or
            4; alpha dropped), float [C, H, W] tensors in [0, 1], or uint8 [H, W, C] arrays.
        size: (H, W) output size.
    Returns:
        [N, 3, H, W] float32, ``(pixel / 255 - mean) / std``.
    """
    if len(images) == 0:
        return torch.empty(0, 3, *size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for image in images:
        chw = _to_uint8_chw(image)
        pixels = chw.float() / 255.0 if not chw.is_floating_point() else chw.float()
        if tuple(pixels.shape[1:]) != tuple(size):
            pixels = torch.nn.functional.interpolate(pixels[None], size=size, mode="bilinear",
                                                     align_corners=False, antialias=True)[0]
        out.append((pixels.clamp(0.0, 1.0) - mean_t) / std_t)
    return torch.stack(out)


def common_transformer_fields(tp: int, precision: str, cp: int = 1,
                              sequence_parallel: bool = False) -> dict[str, Any]:
    """TransformerConfig fields every tower shares: TP (and, for a language model, CP size and
    sequence parallelism), CPU init (weights independent of tp), no dropout (RL needs
    deterministic log-probs), precision."""
    return dict(tensor_model_parallel_size=tp, context_parallel_size=cp, use_cpu_initialization=True,
                hidden_dropout=0.0, attention_dropout=0.0, sequence_parallel=sequence_parallel and tp > 1,
                **precision_fields(precision))


def make_transformer_config(**fields: Any) -> TransformerConfig:
    """``TransformerConfig(**fields)`` (a seam for version differences in its fields)."""
    return TransformerConfig(**fields)
