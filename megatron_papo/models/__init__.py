"""Vision-language models: the shared interface, the registry and the built-in builders.

    from megatron_papo.models import build_model
    model = build_model(cfg.model, vocab_size=..., image_token_id=..., pre_process=..., post_process=...)
    pixel_values = model.preprocess_images(images)            # [N, 3, H, W]
    logits = model(input_ids, position_ids, attention_mask, pixel_values)   # [B, S, V_pad / tp]

Importing this package imports megatron-core (after mcore_compat's import shims).
"""

from megatron_papo.compat import mcore_compat  # noqa: F401  (registers megatron-core import shims first)
from megatron_papo.models.base import (
    VisionLanguageModel,
    build_attention_mask,
    images_to_tensor,
    mrope_position_ids,
    pad_vocab_size,
    scatter_image_features,
)
from megatron_papo.models.registry import (
    ModelBuilder,
    ModelSpec,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)
from megatron_papo.models.tiny_vlm import TinyVLM, TinyVLMConfig, build_tiny_vlm

__all__ = [
    "ModelBuilder",
    "ModelSpec",
    "TinyVLM",
    "TinyVLMConfig",
    "VisionLanguageModel",
    "build_attention_mask",
    "build_model",
    "build_tiny_vlm",
    "get_model_spec",
    "images_to_tensor",
    "list_models",
    "mrope_position_ids",
    "pad_vocab_size",
    "register_model",
    "scatter_image_features",
]
