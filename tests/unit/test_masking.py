"""Patch masking (megatron_papo.masking): determinism, statistics, edges, types, groups."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.masking import (
    MaskingConfig,
    derive_seed,
    expand_cell_mask,
    mask_group_images,
    mask_image,
    prompt_generator,
    sample_cell_mask,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # values in [1, 255] so that a black (0) pixel is always a masked one
    return rng.integers(1, 256, size=(height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- determinism


def test_same_triple_same_mask_and_different_step_differs():
    a = sample_cell_mask(140, 140, 14, 0.6, prompt_generator(3, 7, 11))
    b = sample_cell_mask(140, 140, 14, 0.6, prompt_generator(3, 7, 11))
    c = sample_cell_mask(140, 140, 14, 0.6, prompt_generator(3, 8, 11))
    d = sample_cell_mask(140, 140, 14, 0.6, prompt_generator(3, 7, 12))
    e = sample_cell_mask(140, 140, 14, 0.6, prompt_generator(4, 7, 11))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    assert not torch.equal(a, e)


def test_derived_seed_is_63_bit_and_order_sensitive():
    seeds = {derive_seed(0, s, p) for s in range(20) for p in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1, 2) != derive_seed(0, 2, 1)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("ratio", [0.1, 0.6, 0.9])
def test_masked_fraction_within_binomial_tolerance(ratio):
    cells = sample_cell_mask(14 * 200, 14 * 200, 14, ratio, _gen(1))
    n = cells.numel()
    frac = cells.float().mean().item()
    sigma = math.sqrt(ratio * (1 - ratio) / n)
    assert abs(frac - ratio) < 4 * sigma


def test_masked_pixel_fraction_of_image():
    img = _random_rgb(14 * 40, 14 * 40)
    out = mask_image(img, MaskingConfig(ratio=0.6), _gen(2))
    black = (out == 0).all(axis=-1).mean()
    sigma = math.sqrt(0.6 * 0.4 / 1600)
    assert abs(black - 0.6) < 4 * sigma


# ---------------------------------------------------------------- geometry


def test_partial_edge_cells():
    cells = sample_cell_mask(30, 45, 14, 0.5, _gen(0))
    assert cells.shape == (3, 4)
    only_corner = torch.zeros(3, 4, dtype=torch.bool)
    only_corner[2, 3] = True
    pixels = expand_cell_mask(only_corner, 30, 45, 14)
    assert pixels.shape == (30, 45)
    # the last row of cells covers rows 28..29 (2 pixels), the last column cols 42..44 (3 pixels)
    assert pixels.sum().item() == 2 * 3
    assert pixels[28:, 42:].all()


def test_expand_cell_mask_blocks():
    cells = torch.tensor([[True, False], [False, True]])
    pixels = expand_cell_mask(cells, 4, 3, 2)
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(pixels, expected)


def test_expand_cell_mask_shape_mismatch():
    with pytest.raises(ValueError, match="cell_mask has shape"):
        expand_cell_mask(torch.zeros(2, 2, dtype=torch.bool), 30, 45, 14)


def test_masked_cells_are_whole_cells():
    img = _random_rgb(30, 45)
    out = mask_image(img, MaskingConfig(cell_size=14, ratio=0.5), _gen(5))
    cells = sample_cell_mask(30, 45, 14, 0.5, _gen(5))
    expected = expand_cell_mask(cells, 30, 45, 14).numpy()
    assert np.array_equal((out == 0).all(axis=-1), expected)
    assert np.array_equal(out[~expected], img[~expected])


# ---------------------------------------------------------------- ratio extremes, fills


def test_ratio_zero_is_identity():
    img = _random_rgb(30, 45)
    out = mask_image(img, MaskingConfig(ratio=0.0), _gen())
    assert np.array_equal(out, img)


def test_ratio_one_blackens_everything():
    with pytest.warns(UserWarning, match="collapse"):
        cfg = MaskingConfig(ratio=1.0)
    out = mask_image(_random_rgb(30, 45), cfg, _gen())
    assert (out == 0).all()


def test_mean_fill_uses_per_channel_mean():
    img = np.zeros((28, 28, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 100, 200
    img[0, 0] = (20, 110, 210)
    with pytest.warns(UserWarning):
        cfg = MaskingConfig(ratio=1.0, fill="mean")
    out = mask_image(img, cfg, _gen())
    means = np.round(img.reshape(-1, 3).astype(np.float64).mean(0)).astype(np.uint8)
    assert list(means) == [10, 100, 200]
    assert (out == means).all()
    out_f = mask_image(torch.from_numpy(img.transpose(2, 0, 1).copy()).double(), cfg, _gen())
    expected = torch.from_numpy(img.reshape(-1, 3).astype(np.float64).mean(0))
    assert torch.allclose(out_f[:, 5, 7], expected)


def test_noise_fill_is_deterministic_and_in_range():
    img = torch.rand(3, 30, 45)
    cfg = MaskingConfig(ratio=0.5, fill="noise")
    a = mask_image(img, cfg, prompt_generator(0, 1, 2))
    b = mask_image(img, cfg, prompt_generator(0, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, img)
    assert a.min() >= 0 and a.max() < 1


# ---------------------------------------------------------------- types


def test_input_is_not_modified():
    arr = _random_rgb(30, 45)
    ten = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    pil = Image.fromarray(arr)
    arr0, ten0, pil0 = arr.copy(), ten.clone(), np.array(pil).copy()
    cfg = MaskingConfig(ratio=0.6)
    mask_image(arr, cfg, _gen())
    mask_image(ten, cfg, _gen())
    mask_image(pil, cfg, _gen())
    assert np.array_equal(arr, arr0)
    assert torch.equal(ten, ten0)
    assert np.array_equal(np.array(pil), pil0)


def test_types_round_trip_and_agree():
    arr = _random_rgb(30, 45)
    cfg = MaskingConfig(ratio=0.6)
    out_np = mask_image(arr, cfg, _gen(9))
    out_t = mask_image(torch.from_numpy(arr.transpose(2, 0, 1).copy()), cfg, _gen(9))
    out_f = mask_image(torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 255, cfg, _gen(9))
    out_pil = mask_image(Image.fromarray(arr), cfg, _gen(9))

    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.uint8 and out_np.shape == arr.shape
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8 and out_t.shape == (3, 30, 45)
    assert out_f.dtype == torch.float32 and out_f.shape == (3, 30, 45)
    assert isinstance(out_pil, Image.Image) and out_pil.mode == "RGB" and out_pil.size == (45, 30)
    # the same generator gives the same mask whatever the container
    assert np.array_equal(out_t.numpy().transpose(1, 2, 0), out_np)
    assert np.array_equal(np.array(out_pil), out_np)
    assert torch.equal(out_f == 0, out_t == 0)


@pytest.mark.parametrize(
    ("mode", "expected_mode"),
    [
        ("RGB", "RGB"),
        ("L", "L"),
        ("RGBA", "RGBA"),
        ("LA", "LA"),
        ("P", "RGB"),
        ("PA", "RGBA"),
        ("1", "L"),
        ("I", "I"),
        ("F", "F"),
        ("CMYK", "RGB"),
    ],
)
def test_pil_modes(mode, expected_mode):
    img = Image.fromarray(_random_rgb(30, 45)).convert(mode)
    out = mask_image(img, MaskingConfig(ratio=0.5), _gen(3))
    assert out.mode == expected_mode
    assert out.size == img.size


def test_pil_alpha_made_opaque_in_hidden_cells():
    rgba = np.concatenate([_random_rgb(28, 28), np.zeros((28, 28, 1), np.uint8)], axis=-1)
    out = np.array(mask_image(Image.fromarray(rgba), MaskingConfig(ratio=0.5), _gen(4)))
    hidden = (out[..., :3] == 0).all(-1)
    assert hidden.any() and (~hidden).any()
    assert (out[hidden, 3] == 255).all()
    assert (out[~hidden, 3] == 0).all()


def test_grayscale_2d_inputs():
    arr = _random_rgb(30, 45)[..., 0]
    out = mask_image(arr, MaskingConfig(), _gen())
    assert out.shape == (30, 45)
    out_t = mask_image(torch.from_numpy(arr), MaskingConfig(), _gen())
    assert out_t.shape == (30, 45)


def test_unsupported_inputs():
    with pytest.raises(TypeError, match="unsupported image type"):
        mask_image([[1, 2]], MaskingConfig())
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        mask_image(torch.zeros(1, 3, 4, 4), MaskingConfig())


# ---------------------------------------------------------------- groups


def test_group_sharing_and_prompt_independence():
    imgs = [Image.fromarray(_random_rgb(56, 56, seed=p)) for p in range(3)]
    group = 4
    flat = [imgs[p] for p in range(3) for _ in range(group)]
    out = mask_group_images(flat, group, MaskingConfig(), step=5)
    assert len(out) == len(flat)
    arrays = [np.array(o) for o in out]
    for p in range(3):
        for r in range(1, group):
            assert np.array_equal(arrays[p * group], arrays[p * group + r])
    # different prompts -> different masks (same-image check isolates the mask)
    same = [Image.fromarray(_random_rgb(56, 56, seed=0))] * 2
    a, b = mask_group_images(same, 1, MaskingConfig(), step=5)
    assert not np.array_equal(np.array(a), np.array(b))


def test_group_equal_copies_get_equal_masks():
    arr = _random_rgb(30, 45)
    flat = [arr.copy() for _ in range(3)]
    out = mask_group_images(flat, 3, MaskingConfig(fill="noise"), step=0)
    assert out[0] is not out[1]
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_group_masks_independent_of_batch_composition():
    imgs = [_random_rgb(28, 28, seed=p) for p in range(4)]
    full = mask_group_images([im for im in imgs for _ in range(2)], 2, MaskingConfig(), step=3)
    # a "rank" that only holds prompts 2 and 3 passes their global indices
    part = mask_group_images(
        [im for im in imgs[2:] for _ in range(2)], 2, MaskingConfig(), step=3, prompt_indices=[2, 3]
    )
    for i in range(4):
        assert np.array_equal(full[4 + i], part[i])
    # the group's mask is what prompt_generator gives
    ref = mask_image(imgs[1], MaskingConfig(), prompt_generator(0, 3, 1))
    assert np.array_equal(full[2], ref)


def test_group_multi_image_prompts():
    a, b = _random_rgb(28, 28, seed=1), _random_rgb(28, 28, seed=1)
    sample = [a, b]  # two identical images in one prompt
    out = mask_group_images([sample, sample, [a.copy(), b.copy()]], 3, MaskingConfig(), step=1)
    assert all(isinstance(o, list) and len(o) == 2 for o in out)
    # each image of the prompt gets its own mask ...
    assert not np.array_equal(out[0][0], out[0][1])
    # ... shared across the group
    for r in (1, 2):
        for k in (0, 1):
            assert np.array_equal(out[0][k], out[r][k])
    assert np.array_equal(sample[0], _random_rgb(28, 28, seed=1))


def test_group_none_images_and_errors():
    assert mask_group_images([None, None], 2, MaskingConfig(), step=0) == [None, None]
    with pytest.raises(ValueError, match="multiple of group_size"):
        mask_group_images([None] * 3, 2, MaskingConfig(), step=0)
    with pytest.raises(ValueError, match="prompt_indices"):
        mask_group_images([None] * 4, 2, MaskingConfig(), step=0, prompt_indices=[0])


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"cell_size": 0}, "cell_size"),
        ({"cell_size": 2.5}, "cell_size"),
        ({"fill": "white"}, "fill"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=f"MaskingConfig.{field}"):
        MaskingConfig(**kwargs)


def test_training_masks_follow_the_run_seed():
    """Two runs that differ only in train.seed draw different training masks; one run's masks
    are reproducible; masking.seed still matters."""
    from megatron_papo.training.steps import training_masking

    base = MaskingConfig(ratio=0.6, cell_size=14, seed=0)
    a, b = training_masking(base, 1), training_masking(base, 2)
    assert a.seed != b.seed and a.seed == training_masking(base, 1).seed
    assert training_masking(MaskingConfig(ratio=0.6, cell_size=14, seed=5), 1).seed != a.seed
    img = torch.full((3, 56, 56), 200, dtype=torch.uint8)
    ma = mask_group_images([[img]], 1, a, step=0, prompt_indices=[7])[0][0]
    mb = mask_group_images([[img]], 1, b, step=0, prompt_indices=[7])[0][0]
    assert not torch.equal(ma, mb)


class _HalvingModel:
    """Stands in for a model whose preprocessing halves each side (as Qwen's processor brings a
    large image into its pixel bounds); preprocess_images returns the images as they come."""

    def resized_hw(self, hw):
        return hw[0] // 2, hw[1] // 2

    def preprocess_images(self, images):
        return torch.stack([torch.as_tensor(np.array(im)).permute(2, 0, 1) for im in images])


@pytest.mark.parametrize("space,side,cells", [("model_input", 56, 4), ("raw", 112, 8)])
def test_masks_are_drawn_in_model_input_pixels_by_default(space, side, cells):
    """A 112 px image for a model that halves it: in model_input space the image is resized to
    56 px first and a 14-px cell is one 14-px block of the model input (4 x 4 cells); in raw
    space the cells are 14 raw pixels (8 x 8 cells, 7 model-input pixels after the halving)."""
    from megatron_papo.data.dataset import Sample
    from megatron_papo.training.steps import masked_prompt_pixels

    img = Image.new("RGB", (112, 112), (200, 200, 200))
    sample = Sample(prompt_ids=[1], images=[img], answer="a", question="q", source="x:0", index=3)
    cfg = MaskingConfig(ratio=0.5, cell_size=14, seed=1, space=space)
    px = masked_prompt_pixels(_HalvingModel(), [sample], cfg, step=0)[0][0]  # [3, side, side]
    assert tuple(px.shape) == (3, side, side)
    blocks = px[0].reshape(cells, 14, cells, 14).permute(0, 2, 1, 3).reshape(cells, cells, -1)
    assert bool((blocks == blocks[..., :1]).all())  # every cell is all hidden or all kept
    hidden = (blocks[..., 0] == 0).float().mean()
    assert 0 < hidden < 1
    assert MaskingConfig().space == "model_input"
    with pytest.raises(ValueError, match="space"):
        MaskingConfig(space="pixels")
