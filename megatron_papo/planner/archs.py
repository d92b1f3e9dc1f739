"""The model architectures the memory planner (:mod:`megatron_papo.planner`) plans for: the
language model (:class:`LanguageArch`), the vision tower and projector (:class:`VisionArch`),
the pair (:class:`Architecture`), the Qwen2.5-VL and tiny-VLM :data:`PRESETS` (numbers cited
from each model's config.json), and :func:`architecture_from_hf_config`, which reads a Hugging
Face config.json.

Pure dataclasses (no torch, no megatron-core); :mod:`megatron_papo.planner` re-exports the public names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "PRESETS",
    "Architecture",
    "LanguageArch",
    "VisionArch",
    "architecture_from_hf_config",
]


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LanguageArch:
    """The decoder: Qwen2-style (RMSNorm, SwiGLU, qkv bias, no other biases, GQA)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads."""
    ffn_hidden_size: int
    vocab_size: int
    """True vocabulary; padded to a multiple of ``vocab_divisible_by * tp`` like megatron."""
    tied_embeddings: bool = False
    """Input embedding and output layer share one matrix (Qwen2.5-VL-3B)."""
    gated_mlp: bool = True
    """SwiGLU (fc1 emits 2f) vs a plain 2-matrix MLP."""
    qkv_bias: bool = True
    vocab_divisible_by: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab(self, tp: int) -> int:
        multiple = self.vocab_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple


@dataclass(frozen=True)
class VisionArch:
    """The vision tower (ViT) plus the projector into the language model's width."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    patch_size: int
    """Pixels per patch side."""
    spatial_merge: int = 1
    """Patches merged per side before the projector (Qwen2.5-VL: 2, i.e. 4 patches -> 1 token)."""
    temporal_patch: int = 1
    """Frames per patch (Qwen2.5-VL: 2; an image is repeated to fill them)."""
    gated_mlp: bool = False
    norm: Literal["rmsnorm", "layernorm"] = "layernorm"
    linear_bias: bool = True
    patch_bias: bool = False
    learned_positions: int = 0
    """Learned position-embedding rows (0 = none)."""
    projector_norm: bool = False
    """A norm on the merged features before the projector MLP (Qwen2.5-VL's ln_q)."""
    projector_ffn: int | None = None
    """Projector MLP inner size; None = its input width (vision hidden x merge^2)."""
    rope: bool = True
    """2-D rope in the attention (Qwen2.5-VL) vs learned positions (CLIP-style, tiny_vlm)."""

    @property
    def projector_in(self) -> int:
        return self.hidden_size * self.spatial_merge**2


@dataclass(frozen=True)
class Architecture:
    """A vision-language model: its language model and vision tower."""

    name: str
    language: LanguageArch
    vision: VisionArch | None
    source: str = ""
    """Where the numbers come from."""


# Qwen2.5-VL vision tower, shared by every size: depth 32, width 1280, 16 heads, patch 14,
# temporal patch 2, spatial merge 2, SwiGLU MLP with biases, RMSNorm, merger = RMSNorm(1280) ->
# Linear(5120, 5120) -> GELU -> Linear(5120, hidden). The MLP inner size is 3420 in the 3B/7B
# config.json files and 3456 in the 72B one (the 32B follows the 72B).
def _qwen_vision(ffn: int) -> VisionArch:
    return VisionArch(num_layers=32, hidden_size=1280, num_attention_heads=16, ffn_hidden_size=ffn,
                      patch_size=14, spatial_merge=2, temporal_patch=2, gated_mlp=True, norm="rmsnorm",
                      linear_bias=True, patch_bias=False, projector_norm=True)


PRESETS: dict[str, Architecture] = {
    # huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct config.json: hidden 2048, 36 layers, 16 heads,
    # 2 kv heads, intermediate 11008, vocab 151936, tie_word_embeddings true; vision depth 32,
    # hidden 1280, intermediate 3420, 16 heads, out_hidden_size 2048.
    "qwen2_5_vl_3b": Architecture(
        "qwen2_5_vl_3b",
        LanguageArch(num_layers=36, hidden_size=2048, num_attention_heads=16, num_query_groups=2,
                     ffn_hidden_size=11008, vocab_size=151936, tied_embeddings=True),
        _qwen_vision(3420), source="Qwen/Qwen2.5-VL-3B-Instruct config.json"),
    # Qwen/Qwen2.5-VL-7B-Instruct config.json: hidden 3584, 28 layers, 28 heads, 4 kv heads,
    # intermediate 18944, vocab 152064, untied; vision as 3B with out_hidden_size 3584.
    "qwen2_5_vl_7b": Architecture(
        "qwen2_5_vl_7b",
        LanguageArch(num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                     ffn_hidden_size=18944, vocab_size=152064),
        _qwen_vision(3420), source="Qwen/Qwen2.5-VL-7B-Instruct config.json"),
    # Qwen/Qwen2.5-VL-32B-Instruct config.json: hidden 5120, 64 layers, 40 heads, 8 kv heads,
    # intermediate 27648, vocab 152064, untied.
    "qwen2_5_vl_32b": Architecture(
        "qwen2_5_vl_32b",
        LanguageArch(num_layers=64, hidden_size=5120, num_attention_heads=40, num_query_groups=8,
                     ffn_hidden_size=27648, vocab_size=152064),
        _qwen_vision(3456), source="Qwen/Qwen2.5-VL-32B-Instruct config.json"),
    # Qwen/Qwen2.5-VL-72B-Instruct config.json: hidden 8192, 80 layers, 64 heads, 8 kv heads,
    # intermediate 29696 (not Qwen2.5-72B's 29568), vocab 152064, untied; vision intermediate 3456.
    "qwen2_5_vl_72b": Architecture(
        "qwen2_5_vl_72b",
        LanguageArch(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                     ffn_hidden_size=29696, vocab_size=152064),
        _qwen_vision(3456), source="Qwen/Qwen2.5-VL-72B-Instruct config.json"),
    # megatron_papo/models/tiny_vlm.py defaults with the easy-VQA tokenizer (192 words): CLIP-style
    # ViT (LayerNorm, GELU, biases, learned positions, 64x64 images, patch 16 -> 16 tokens),
    # 2-layer MLP projector, 2-layer Qwen-like language model without tied embeddings.
    "tiny_vlm": Architecture(
        "tiny_vlm",
        LanguageArch(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=4,
                     ffn_hidden_size=256, vocab_size=192),
        VisionArch(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, patch_size=16,
                   learned_positions=16, projector_ffn=128, rope=False),
        source="megatron_papo/models/tiny_vlm.py"),
}


def architecture_from_hf_config(config: Mapping[str, Any] | str | Path,
                                name: str | None = None) -> Architecture:
    """A Qwen2.5-VL style Hugging Face config.json (path or dict) -> Architecture.

    Reads the language fields at the top level (or under ``text_config``) and ``vision_config``;
    vision fields missing from a config (older files list only a few) take Qwen2.5-VL's values.
    """
    if not isinstance(config, Mapping):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        config = json.loads(path.read_text())
        name = name or path.parent.name
    text = config.get("text_config") or config
    try:
        language = LanguageArch(
            num_layers=int(text["num_hidden_layers"]), hidden_size=int(text["hidden_size"]),
            num_attention_heads=int(text["num_attention_heads"]),
            num_query_groups=int(text.get("num_key_value_heads", text["num_attention_heads"])),
            ffn_hidden_size=int(text["intermediate_size"]), vocab_size=int(text["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))
    except KeyError as e:
        raise ValueError(f"HF config: missing language field {e.args[0]!r} (expected a Qwen2-style "
                         "config.json with num_hidden_layers, hidden_size, ...)") from None
    vc = config.get("vision_config")
    vision = None
    if vc is not None:
        base = _qwen_vision(3420)
        vision = replace(base, num_layers=int(vc.get("depth", base.num_layers)),
                         hidden_size=int(vc.get("hidden_size", base.hidden_size)),
                         num_attention_heads=int(vc.get("num_heads", base.num_attention_heads)),
                         ffn_hidden_size=int(vc.get("intermediate_size", base.ffn_hidden_size)),
                         patch_size=int(vc.get("patch_size", vc.get("spatial_patch_size", base.patch_size))),
                         spatial_merge=int(vc.get("spatial_merge_size", base.spatial_merge)))
    return Architecture(name or "hf_config", language, vision, source="Hugging Face config.json")
