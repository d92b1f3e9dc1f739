"""A tiny random Qwen2.5-VL saved as a Hugging Face folder (tests, docs examples; no download).

    python -m megatron_papo.testing.tiny_qwen --out /tmp/tiny_qwen25vl [--tied] [--vocab-size 320]

Defaults: 4 text layers (hidden 96, 6 heads / 2 KV heads, SwiGLU 192, mrope [2, 3, 3]), vision
depth 4 (hidden 64, 4 heads, patch 14, merge 2, window 56, full attention in blocks 1 and 3);
about 0.6 M parameters. ``--easy-vqa`` sizes the vocabulary and special ids for the project's
easy-VQA word tokenizer (so the trainer can run it on easy-VQA).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

__all__ = ["easy_vqa_overrides", "make_tiny_qwen2_5_vl", "tiny_qwen_config"]


def tiny_qwen_config(*, vocab_size: int = 320, tied: bool = False, image_token_id: int | None = None,
                     num_layers: int = 4, hidden_size: int = 96, num_heads: int = 6, num_kv_heads: int = 2,
                     ffn_hidden_size: int = 192, vision_depth: int = 4, dtype: str = "float32") -> Any:
    """The transformers ``Qwen2_5_VLConfig`` of a tiny random model."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    image = vocab_size - 20 if image_token_id is None else image_token_id
    specials = [i for i in range(vocab_size - 19, vocab_size) if i != image][:3]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn_hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [t, h, half - t - h]},
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=4,
                           out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[i for i in range(vision_depth) if i % 2 == 1]),
        image_token_id=image, video_token_id=specials[0], vision_start_token_id=specials[1],
        vision_end_token_id=specials[2], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=tied, dtype=dtype)


def easy_vqa_overrides() -> dict[str, int]:
    """vocab_size and image_token_id matching the project's easy-VQA word tokenizer."""
    from megatron_papo.tokenizer import easy_vqa_tokenizer

    tok = easy_vqa_tokenizer()
    return {"vocab_size": max(tok.vocab_size + 24, 64), "image_token_id": tok.image_token_id}


def make_tiny_qwen2_5_vl(out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                         **config_kwargs: Any) -> Path:
    """Build a random tiny Qwen2.5-VL with transformers and save it (safetensors) under ``out``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    config = tiny_qwen_config(dtype=name, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
        # random (not zero) biases and norm weights, so a mis-mapped one changes the logits
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(torch.randn_like(p) * 0.1)
    out = Path(out)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--tied", action="store_true", help="tie the word embeddings (like Qwen2.5-VL-3B)")
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--easy-vqa", action="store_true", help="vocabulary of the easy-VQA word tokenizer")
    p.add_argument("--bf16", action="store_true", help="save bf16 weights")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    kw: dict[str, Any] = easy_vqa_overrides() if a.easy_vqa else {"vocab_size": a.vocab_size}
    path = make_tiny_qwen2_5_vl(a.out, seed=a.seed, dtype=torch.bfloat16 if a.bf16 else torch.float32,
                                tied=a.tied, **kw)
    print(f"wrote a tiny random Qwen2.5-VL to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
