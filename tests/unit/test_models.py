"""models: the tiny VLM at tp=1 in one process (shapes, image-token merge, padding, gradients),
the registry, and the shared helpers."""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.compat import mcore_compat
from megatron_papo.config import ModelConfig
from megatron_papo.distributed import destroy_distributed, init_distributed

VOCAB, IMAGE_TOKEN, SEQ = 100, 99, 48
TOKENS_PER_IMAGE = 16  # 64x64 images, patch 16


@pytest.fixture(scope="module")
def models():
    """One-rank world + the tiny VLM (built once for the module); patches undone if applied here."""
    patched_before = bool(mcore_compat.applied_patches())
    init_distributed(seed=0)
    from megatron_papo.models import build_model

    model = build_model(ModelConfig(seq_length=64), vocab_size=VOCAB, image_token_id=IMAGE_TOKEN, seed=5)
    yield model
    destroy_distributed()
    if not patched_before:
        mcore_compat.revert_cpu_patches()


def _batch(batch=2, seq=SEQ, starts=(3, 10), seed=0):
    """[B, S] ids with one 16-token image block per sample at ``starts[b]``, and [B, S] positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN - 1, (batch, seq), generator=g)
    for b, start in enumerate(starts[:batch]):
        if start is not None:
            ids[b, start:start + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    return ids, torch.arange(seq).expand(batch, seq)


def _pixels(n, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# --- forward ----------------------------------------------------------------------------------
def test_forward_shapes_and_sizes(models):
    ids, pos = _batch()
    with torch.no_grad():
        logits = models(ids, pos, None, _pixels(2))
    assert logits.shape == (2, SEQ, 128) and logits.is_contiguous()  # sequence length unchanged
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (models.vocab_size, models.padded_vocab_size, models.image_size) == (VOCAB, 128, (64, 64))
    assert models.num_image_tokens((480, 640)) == models.num_image_tokens((64, 64)) == TOKENS_PER_IMAGE
    with pytest.raises(ValueError, match="image_hw"):
        models.num_image_tokens((0, 5))


def test_image_changes_logits_from_its_tokens_on(models):
    ids, pos = _batch()
    pixels = _pixels(2)
    other = pixels.clone()
    other[1] = torch.randn(3, 64, 64)  # change sample 1's image only
    with torch.no_grad():
        a, b = models(ids, pos, None, pixels), models(ids, pos, None, other)
    assert torch.equal(a[0], b[0])  # sample 0 does not see sample 1's image
    assert torch.equal(a[1, :10], b[1, :10])  # causal: tokens before the image are unchanged
    assert (a[1, 10:26] - b[1, 10:26]).abs().amax(-1).min() > 1e-4  # every image-token position moved
    assert (a[1, 26:] - b[1, 26:]).abs().max() > 1e-4  # and the text after it


def test_text_only_ignores_pixel_values(models):
    ids, pos = _batch(starts=(None, None))
    with torch.no_grad():
        plain = models(ids, pos)
        with_pixels = models(ids, pos, None, _pixels(2))
    assert torch.equal(plain, with_pixels)


def test_image_token_count_mismatch_names_both_counts(models):
    ids, pos = _batch(starts=(3, None))  # 16 positions
    with pytest.raises(ValueError, match=r"16 image-token positions.*32 image features"):
        models(ids, pos, None, _pixels(2))
    with pytest.raises(ValueError, match=r"16 image-token positions.*pixel_values is None"):
        models(ids, pos)
    with pytest.raises(ValueError, match="pixel_values must be"):
        models(ids, pos, None, torch.randn(1, 3, 32, 32))


def test_padding_left_and_right_match_unpadded(models):
    """A padded sample with a [B, S] padding mask and positions counted from its first token
    gives the logits of the same sample alone."""
    ids, _ = _batch(batch=1, seq=30, starts=(4,))
    pixels = _pixels(1)
    with torch.no_grad():
        alone = models(ids, torch.arange(30)[None], None, pixels)[0]
        pad = torch.zeros(1, 6, dtype=ids.dtype)
        left_ids, right_ids = torch.cat([pad, ids], 1), torch.cat([ids, pad], 1)
        keep = torch.cat([torch.zeros(1, 6), torch.ones(1, 30)], 1).long()
        left_pos = (keep.cumsum(1) - 1).clamp(min=0)
        left = models(left_ids, left_pos, keep, pixels)[0, 6:]
        right = models(right_ids, torch.arange(36)[None], keep.flip(1), pixels)[0, :30]
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)


def test_gradient_reaches_vision_encoder_and_projector(models):
    ids, pos = _batch()
    models.zero_grad(set_to_none=True)
    logits = models(ids, pos, None, _pixels(2))
    logits[:, -5:].logsumexp(-1).mean().backward()
    for prefix in ("vision_model", "vision_projection"):
        grads = [(n, p.grad) for n, p in models.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for _, g in grads), prefix
    models.zero_grad(set_to_none=True)


def test_recompute_activations_gives_the_same_logits_and_grads(models):
    from megatron_papo.models import build_model

    recompute = build_model(ModelConfig(seq_length=64, recompute_activations=True), vocab_size=VOCAB,
                            image_token_id=IMAGE_TOKEN, seed=5)
    assert recompute.config.recompute_granularity == "full"
    ids, pos = _batch()
    results = []
    for model in (models, recompute):
        model.zero_grad(set_to_none=True)
        logits = model(ids, pos, None, _pixels(2))
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), model.vision_model.conv1.weight.grad.clone()))
    models.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


def test_vision_encoder_is_bidirectional(models):
    pixels = _pixels(1)
    changed = pixels.clone()
    changed[..., -16:, -16:] = 0.0  # last patch only
    with torch.no_grad():
        a, b = models.encode_images(pixels), models.encode_images(changed)
    assert a.shape == (TOKENS_PER_IMAGE, 128)
    assert (a[0] - b[0]).abs().max() > 1e-5  # the first patch sees the last one


def test_sharded_state_dict_keys(models):
    keys = models.sharded_state_dict().keys()
    assert "vision_model.conv1.weight" in keys and "vision_projection.encoder.linear_fc1.weight" in keys
    assert "language_model.embedding.word_embeddings.weight" in keys
    assert "language_model.output_layer.weight" in keys


# --- builder / registry -----------------------------------------------------------------------
def test_model_config_sizes_override_defaults(models):
    from megatron_papo.models import build_model

    small = build_model(ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=2, ffn_hidden_size=96,
                                    vocab_size=300, make_vocab_size_divisible_by=64),
                        vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)
    assert small.config.num_layers == 1 and small.config.hidden_size == 64
    assert (small.vocab_size, small.padded_vocab_size) == (300, 320)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_model(ModelConfig(vocab_size=50), vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_model(ModelConfig(), vocab_size=VOCAB, image_token_id=VOCAB)


def test_bf16_parameters(models):
    from megatron_papo.models import build_model

    cfg = ModelConfig(num_layers=1, precision="bf16")
    model = build_model(cfg, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, pos = _batch(batch=1)
    with torch.no_grad():
        assert model(ids, pos, None, _pixels(1)).dtype == torch.bfloat16


def test_registry(models, monkeypatch):
    from megatron_papo.models import build_model, get_model_spec, list_models, register_model, registry

    assert "tiny_vlm" in list_models()
    assert get_model_spec("tiny_vlm").description.startswith("Tiny")
    with pytest.raises(ValueError, match=r"unknown model 'nope'; registered models: .*tiny_vlm"):
        build_model(ModelConfig(name="nope"), vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    @register_model("fake")
    def fake(cfg, **kwargs):
        """A fake builder."""
        seen.update(kwargs)
        return "built"

    built = build_model(ModelConfig(name="fake"), vocab_size=7, image_token_id=3, post_process=False)
    assert built == "built"
    assert seen == dict(vocab_size=7, image_token_id=3, pre_process=True, post_process=False, vp_stage=None,
                        seed=1234)
    with pytest.raises(ValueError, match="already registered"):
        register_model("fake")(lambda cfg, **kw: None)


def test_build_needs_parallel_state(models, monkeypatch):
    from megatron.core import parallel_state

    from megatron_papo.models import build_model

    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_distributed"):
        build_model(ModelConfig(), vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)


# --- helpers ----------------------------------------------------------------------------------
def test_pad_vocab_size():
    from megatron_papo.models import pad_vocab_size

    assert pad_vocab_size(100, 128, 1) == 128 and pad_vocab_size(100, 128, 2) == 256
    assert pad_vocab_size(256, 128, 2) == 256 and pad_vocab_size(151665, 128, 4) == 152064
    with pytest.raises(ValueError):
        pad_vocab_size(0, 128, 1)


def test_build_attention_mask():
    from megatron_papo.models import build_attention_mask

    assert build_attention_mask(None, 4) is None
    mask = build_attention_mask(torch.tensor([[0, 1, 1, 1]]), 4)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    expected = torch.ones(4, 4, dtype=torch.bool).triu(1)
    expected[:, 0] = True  # the padding key is hidden from every query
    assert torch.equal(mask[0, 0], expected)
    full = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    assert build_attention_mask(full, 4) is full
    with pytest.raises(TypeError):
        build_attention_mask(torch.ones(1, 4), 4)
    with pytest.raises(TypeError):
        build_attention_mask(torch.zeros(1, 1, 4, 4), 4)
    with pytest.raises(ValueError):
        build_attention_mask(torch.ones(1, 5, dtype=torch.bool), 4)


def test_mrope_position_ids():
    from megatron_papo.models import mrope_position_ids

    pos = torch.arange(6).view(2, 3)
    pos3 = mrope_position_ids(pos)
    assert pos3.shape == (3, 2, 3) and all(torch.equal(p, pos) for p in pos3)
    assert mrope_position_ids(pos3) is pos3
    with pytest.raises(ValueError):
        mrope_position_ids(torch.zeros(2, 2, 3))


def test_scatter_image_features_order():
    from megatron_papo.models import scatter_image_features

    ids = torch.tensor([[5, 9, 9], [9, 5, 5]])  # image tokens: (0,1), (0,2), (1,0)
    text = torch.zeros(3, 2, 1)  # [S, B, H]
    merged = scatter_image_features(text, ids, 9, torch.tensor([[1.0], [2.0], [3.0]]))
    assert merged[:, :, 0].T.tolist() == [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]


def test_images_to_tensor():
    from megatron_papo.models import base, images_to_tensor

    rgb = Image.fromarray(np.full((80, 100, 3), 255, dtype=np.uint8))
    gray = Image.fromarray(np.zeros((30, 30), dtype=np.uint8))
    chw = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    out = images_to_tensor([rgb, gray, chw], (64, 64))
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    white = (1 - torch.tensor(base.CLIP_IMAGE_MEAN)) / torch.tensor(base.CLIP_IMAGE_STD)
    torch.testing.assert_close(out[0].mean((1, 2)), white)
    torch.testing.assert_close(out[2].mean((1, 2)), white)
    torch.testing.assert_close(out[1].mean((1, 2)), -torch.tensor(base.CLIP_IMAGE_MEAN) / torch.tensor(
        base.CLIP_IMAGE_STD))
    with pytest.raises(TypeError):
        images_to_tensor(["not an image"], (64, 64))
