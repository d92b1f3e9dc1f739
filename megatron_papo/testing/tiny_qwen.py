"""A tiny random Qwen2.5-VL saved as a Hugging Face folder (tests, docs examples; no download).

    python -m megatron_papo.testing.tiny_qwen --out /tmp/tiny_qwen25vl [--tied] [--vocab-size 320]
    python -m megatron_papo.testing.tiny_qwen --out /tmp/tiny_qwen25vl --bpe-tokenizer

Defaults: 4 text layers (hidden 96, 6 heads / 2 KV heads, SwiGLU 192, mrope [2, 3, 3]), vision
depth 4 (hidden 64, 4 heads, patch 14, merge 2, window 56, full attention in blocks 1 and 3);
about 0.6 M parameters. ``--easy-vqa`` sizes the vocabulary and special ids for the project's
easy-VQA word tokenizer (so the trainer can run it on easy-VQA). ``--bpe-tokenizer`` also writes a
Hugging Face tokenizer (byte-level BPE trained here on the easy-VQA texts, with Qwen2.5-VL's special
tokens ``<|im_start|>``, ``<|image_pad|>``, ...), so the folder behaves like a real Qwen2.5-VL
checkpoint: ``model.tokenizer: auto`` and the ``qwen_chat_think_boxed`` template work on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from megatron_papo.data.easy_vqa import easy_vqa_corpus, easy_vqa_tokenizer
from megatron_papo.data.templates import TEMPLATES
from megatron_papo.models.tiny_vlm import mrope_section

__all__ = ["QWEN_SPECIAL_TOKENS", "bpe_special_ids", "bpe_tokenizer_overrides", "easy_vqa_overrides",
           "make_tiny_bpe_tokenizer", "make_tiny_qwen2_5_vl", "make_tiny_qwen2_5_vl_with_tokenizer",
           "tiny_qwen_config"]

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
"""Qwen2.5-VL's special tokens the project uses (pad, chat turns, image wrapping), ids 0-6 here."""


def tiny_qwen_config(*, vocab_size: int = 320, tied: bool = False, image_token_id: int | None = None,
                     special_ids: dict[str, int] | None = None,
                     num_layers: int = 4, hidden_size: int = 96, num_heads: int = 6, num_kv_heads: int = 2,
                     ffn_hidden_size: int = 192, vision_depth: int = 4, dtype: str = "float32") -> Any:
    """The transformers ``Qwen2_5_VLConfig`` of a tiny random model."""
    from transformers import Qwen2_5_VLConfig

    image = vocab_size - 20 if image_token_id is None else image_token_id
    specials = [i for i in range(vocab_size - 19, vocab_size) if i != image][:3]
    ids = {"video": specials[0], "vision_start": specials[1], "vision_end": specials[2], "bos": 1, "eos": 2,
           "pad": 0, **(special_ids or {})}
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn_hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": mrope_section(hidden_size // num_heads)},
                         tie_word_embeddings=tied, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"]),
        vision_config=dict(depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=4,
                           out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[i for i in range(vision_depth) if i % 2 == 1]),
        image_token_id=image, video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=tied, dtype=dtype)


def make_tiny_bpe_tokenizer(out: str | Path, vocab_size: int = 480) -> Any:
    """A byte-level BPE tokenizer trained on the easy-VQA texts (questions in every template,
    answers, the Qwen chat template), with :data:`QWEN_SPECIAL_TOKENS` first; saved in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast


    corpus = list(easy_vqa_corpus())
    corpus += [t.render(q, 1) for t in TEMPLATES.values() for q in corpus[:50]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tok.save_pretrained(str(out))
    return tok


def bpe_tokenizer_overrides(tok: Any) -> dict[str, int]:
    """vocab_size and image_token_id of a tiny model that goes with :func:`make_tiny_bpe_tokenizer`
    (the vocabulary rounded up past the tokenizer's, as real Qwen2.5-VL checkpoints have spare rows)."""
    return {"vocab_size": len(tok) + 16, "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>")}


def bpe_special_ids(tok: Any) -> dict[str, int]:
    """The model config's special ids for :func:`make_tiny_bpe_tokenizer`'s tokenizer."""
    names = {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>",
             "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "video": "<|video_pad|>"}
    return {name: tok.convert_tokens_to_ids(t) for name, t in names.items()}


def easy_vqa_overrides() -> dict[str, int]:
    """vocab_size and image_token_id matching the project's easy-VQA word tokenizer."""
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


def make_tiny_qwen2_5_vl_with_tokenizer(out: str | Path, *, seed: int = 0, **config_kwargs: Any) -> Path:
    """:func:`make_tiny_qwen2_5_vl` plus a BPE tokenizer with Qwen's special tokens in the folder."""
    tok = make_tiny_bpe_tokenizer(out)
    return make_tiny_qwen2_5_vl(out, seed=seed, special_ids=bpe_special_ids(tok),
                                **{**bpe_tokenizer_overrides(tok), **config_kwargs})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--tied", action="store_true", help="tie the word embeddings (like Qwen2.5-VL-3B)")
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--easy-vqa", action="store_true", help="vocabulary of the easy-VQA word tokenizer")
    p.add_argument("--bpe-tokenizer", action="store_true",
                   help="also write a Hugging Face BPE tokenizer with Qwen's special tokens "
                        "(model.tokenizer=auto)")
    p.add_argument("--bf16", action="store_true", help="save bf16 weights")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    kw: dict[str, Any] = easy_vqa_overrides() if a.easy_vqa else {"vocab_size": a.vocab_size}
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    if a.bpe_tokenizer:
        path = make_tiny_qwen2_5_vl_with_tokenizer(a.out, seed=a.seed, dtype=dtype, tied=a.tied)
    else:
        path = make_tiny_qwen2_5_vl(a.out, seed=a.seed, dtype=dtype, tied=a.tied, **kw)
    print(f"wrote a tiny random Qwen2.5-VL to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
