"""Patch masking: the corrupted image I_mask of PAPO's Implicit Perception Loss.

PAPO (arXiv 2507.06448) compares the policy on the original image I with the policy on a
copy whose pixels are partly hidden. The copy is built in pixel space, before the
processor resizes or normalises anything, so the image size, the image tokens, the image
grid and the (m)RoPE positions of the masked branch are exactly those of the original:

1. cut the H x W image into ``cell x cell`` pixel cells (default 14); the cells on the right
   and bottom edges may be partial, giving ``ceil(H / cell) x ceil(W / cell)`` cells;
2. hide each cell independently with probability ``ratio`` (default 0.6);
3. paint the hidden cells with the fill value (black by default).

One mask is drawn per prompt per step and shared by all ``n`` rollouts of that prompt's
group. The random stream is derived from ``(seed, step, prompt_index)`` alone
(:func:`prompt_generator`), so a mask does not depend on how the batch was split across
ranks or micro-batches.

Image types accepted by :func:`mask_image` (the result has the input's type, dtype and shape,
and the input is never modified):

- ``PIL.Image.Image``: modes L, LA, RGB, RGBA, I, I;16 and F are kept. Other modes are
  converted first and returned in the converted mode: modes with an alpha band (PA, RGBa,
  ...) and images with a ``transparency`` entry become RGBA, 1 becomes L, the rest (P,
  CMYK, YCbCr, ...) become RGB. The alpha
  channel of hidden cells is set to fully opaque, so a "black" cell stays black however
  the image is later flattened.
- ``torch.Tensor`` in CHW layout ``[C, H, W]`` (or ``[H, W]``), uint8 or floating point.
- ``numpy.ndarray`` in HWC layout ``[H, W, C]`` (or ``[H, W]``), the PIL convention.

Pixel value ranges used for the "noise" fill: uint8 -> [0, 255], other integer types ->
[0, 65535] (16-bit images, PIL's I and I;16 modes), floating point -> [0, 1).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

FILL_MODES = ("black", "mean", "noise")
MASK_SPACES = ("model_input", "raw")

ImageT = TypeVar("ImageT")

# PIL modes that are masked as they are; everything else is converted (see module docstring).
_NATIVE_PIL_MODES = ("L", "LA", "RGB", "RGBA", "I", "I;16", "F")
_ALPHA_PIL_MODES = ("LA", "RGBA")


@dataclass
class MaskingConfig:
    """How the masked image I_mask is built from the original image."""

    cell_size: int = 14
    """Side of a square masking cell, in pixels of the image the mask is drawn on (``space``)."""

    space: str = "model_input"
    """Where the mask is drawn: "model_input" = on the image resized as the model's preprocessing
    resizes it (the reference: it masks after its resize to the [min, max] pixel bounds, so a
    14-px cell is one Qwen ViT patch), or "raw" = on the image as loaded (a cell then covers
    cell_size / scale model-input pixels)."""

    ratio: float = 0.6
    """Probability that a cell is hidden, in [0, 1]. 1.0 hides the whole image and is known
    to make the perception loss collapse (the paper's "loss hacking")."""

    fill: str = "black"
    """What hidden cells are painted with: "black" (zeros), "mean" (the per-channel mean of
    the image) or "noise" (uniform random pixels from the mask's own generator)."""

    seed: int = 0
    """Base seed; the mask of a prompt is a function of (seed, step, prompt_index) only."""

    def __post_init__(self) -> None:
        if isinstance(self.cell_size, bool) or not isinstance(self.cell_size, int):
            raise ValueError(f"MaskingConfig.cell_size must be an int, got {self.cell_size!r}")
        if self.cell_size < 1:
            raise ValueError(f"MaskingConfig.cell_size must be >= 1, got {self.cell_size}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
            raise ValueError(f"MaskingConfig.ratio must be a number, got {self.ratio!r}")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ValueError(f"MaskingConfig.ratio must lie in [0, 1], got {self.ratio}")
        if self.space not in MASK_SPACES:
            raise ValueError(f"MaskingConfig.space must be one of {MASK_SPACES}, got {self.space!r}")
        if self.fill not in FILL_MODES:
            raise ValueError(f"MaskingConfig.fill must be one of {FILL_MODES}, got {self.fill!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"MaskingConfig.seed must be an int, got {self.seed!r}")
        if self.ratio == 1.0:
            warnings.warn(
                "MaskingConfig.ratio=1.0 hides the whole image; PAPO reports that this makes the "
                "perception loss collapse (loss hacking). Use a ratio below 1 (paper: 0.6).",
                UserWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------


def derive_seed(seed: int, step: int, prompt_index: int) -> int:
    """Hash ``(seed, step, prompt_index)`` into a non-negative 63-bit integer seed."""
    payload = f"papo-mask:{int(seed)}:{int(step)}:{int(prompt_index)}".encode()
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def prompt_generator(seed: int, step: int, prompt_index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, prompt_index)`` only.

    Any rank, in any batch layout, gets the same stream for the same prompt at the same step.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, step, prompt_index))
    return generator


# --------------------------------------------------------------------------------------
# Cell masks
# --------------------------------------------------------------------------------------


def cell_grid_shape(height: int, width: int, cell_size: int) -> tuple[int, int]:
    """Number of cells ``(ceil(H / c), ceil(W / c))``, partial edge cells included."""
    return math.ceil(height / cell_size), math.ceil(width / cell_size)


def sample_cell_mask(
    height: int, width: int, cell_size: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw which cells are hidden.

    Returns:
        BoolTensor ``[ceil(H / c), ceil(W / c)]``; True marks a hidden cell. Each cell is
        True independently with probability ``ratio`` (0 -> none, 1 -> all).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be non-empty, got height={height}, width={width}")
    grid = cell_grid_shape(height, width, cell_size)
    # torch.rand draws from [0, 1): ratio 0 hides nothing and ratio 1 hides everything.
    return torch.rand(grid, generator=generator) < ratio


def expand_cell_mask(cell_mask: torch.Tensor, height: int, width: int, cell_size: int) -> torch.Tensor:
    """Blow a cell mask ``[gh, gw]`` up to pixels ``[H, W]`` (edge cells cropped)."""
    expected = cell_grid_shape(height, width, cell_size)
    if tuple(cell_mask.shape) != expected:
        raise ValueError(
            f"cell_mask has shape {tuple(cell_mask.shape)}, expected {expected} for a "
            f"{height}x{width} image with cell_size={cell_size}"
        )
    pixels = cell_mask.repeat_interleave(cell_size, dim=0).repeat_interleave(cell_size, dim=1)
    return pixels[:height, :width]


# --------------------------------------------------------------------------------------
# Masking a CHW tensor (every other image type goes through this)
# --------------------------------------------------------------------------------------


def _noise_like(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform random pixels with the shape and dtype of ``image`` [C, H, W] (on the CPU)."""
    shape = tuple(image.shape)
    if image.dtype.is_floating_point:
        return torch.rand(shape, generator=generator, dtype=torch.float32).to(image.dtype)
    high = 256 if image.dtype == torch.uint8 else 65536
    return torch.randint(0, high, shape, generator=generator, dtype=torch.int64).to(image.dtype)


def _fill_values(image: torch.Tensor, fill: str, generator: torch.Generator | None) -> torch.Tensor:
    """Values painted into hidden cells; broadcastable to ``image`` [C, H, W]."""
    channels = image.shape[0]
    if fill == "black":
        return torch.zeros((channels, 1, 1), dtype=image.dtype)
    if fill == "mean":
        mean = image.to(torch.float64).mean(dim=(1, 2)).reshape(channels, 1, 1)
        if not image.dtype.is_floating_point:
            mean = mean.round()
        return mean.to(image.dtype)
    return _noise_like(image, generator)


def _mask_chw(
    image: torch.Tensor,
    config: MaskingConfig,
    generator: torch.Generator | None,
    opaque_channel: int | None = None,
    opaque_value: float | None = None,
) -> torch.Tensor:
    """Mask a ``[C, H, W]`` tensor; returns a new tensor of the same shape/dtype/device.

    ``opaque_channel``: an alpha channel set to ``opaque_value`` in hidden cells instead of
    the fill (PIL images with transparency).
    """
    _, height, width = image.shape
    cells = sample_cell_mask(height, width, config.cell_size, config.ratio, generator)
    hidden = expand_cell_mask(cells, height, width, config.cell_size)
    cpu_image = image.detach().cpu()
    fill = _fill_values(cpu_image, config.fill, generator)
    fill = fill.expand_as(cpu_image).clone()
    if opaque_channel is not None:
        fill[opaque_channel] = opaque_value
    out = torch.where(hidden.unsqueeze(0), fill, cpu_image)
    return out.to(image.device)


# --------------------------------------------------------------------------------------
# Type adapters
# --------------------------------------------------------------------------------------


def _pil_working_mode(image: Any) -> str:
    """The mode a PIL image is masked in (its own mode when that is supported)."""
    mode = image.mode
    if mode in _NATIVE_PIL_MODES:
        return mode
    if mode.endswith(("A", "a")) or "transparency" in image.info:
        return "RGBA"
    if mode == "1":
        return "L"
    return "RGB"


def _mask_pil(image: Any, config: MaskingConfig, generator: torch.Generator | None) -> Any:
    from PIL import Image

    mode = _pil_working_mode(image)
    source = image if mode == image.mode else image.convert(mode)
    array = np.array(source)  # copy: [H, W] or [H, W, C]
    if mode in _ALPHA_PIL_MODES:
        masked = _mask_numpy(array, config, generator, opaque_channel=array.shape[-1] - 1, opaque_value=255)
    else:
        masked = _mask_numpy(array, config, generator)
    result = Image.fromarray(masked)  # the mode follows from dtype and channels
    if result.mode != mode:  # pragma: no cover - guards a Pillow behaviour change
        result = result.convert(mode)
    return result


def _mask_numpy(
    array: np.ndarray,
    config: MaskingConfig,
    generator: torch.Generator | None,
    opaque_channel: int | None = None,
    opaque_value: float | None = None,
) -> np.ndarray:
    if array.ndim not in (2, 3):
        raise ValueError(f"numpy images must be [H, W] or [H, W, C], got shape {array.shape}")
    hwc = array[:, :, None] if array.ndim == 2 else array
    chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)).copy())
    masked = _mask_chw(chw, config, generator, opaque_channel, opaque_value)
    out = masked.numpy().transpose(1, 2, 0)
    out = out[:, :, 0] if array.ndim == 2 else out
    return np.ascontiguousarray(out).astype(array.dtype, copy=False)


def _mask_tensor(
    image: torch.Tensor, config: MaskingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    if image.dim() == 2:
        return _mask_chw(image.unsqueeze(0), config, generator).squeeze(0)
    if image.dim() == 3:
        return _mask_chw(image, config, generator)
    raise ValueError(f"torch images must be [C, H, W] or [H, W], got shape {tuple(image.shape)}")


def mask_image(image: ImageT, config: MaskingConfig, generator: torch.Generator | None = None) -> ImageT:
    """Patch-mask one image; the input is left untouched.

    Args:
        image: ``PIL.Image.Image``, ``torch.Tensor`` ``[C, H, W]``/``[H, W]`` or
            ``numpy.ndarray`` ``[H, W, C]``/``[H, W]``.
        config: cell size, ratio and fill.
        generator: random stream; draws the cell mask first, then (fill="noise") the noise.
            None -> a fresh generator seeded with ``config.seed``.

    Returns:
        A new image of the input's type, dtype, shape (and PIL mode, see module docstring).
    """
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(config.seed)
    if isinstance(image, torch.Tensor):
        return _mask_tensor(image, config, generator)
    if isinstance(image, np.ndarray):
        return _mask_numpy(image, config, generator)
    if _is_pil_image(image):
        return _mask_pil(image, config, generator)
    raise TypeError(
        f"unsupported image type {type(image).__name__}; expected PIL.Image, torch.Tensor or ndarray"
    )


def _is_pil_image(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


# --------------------------------------------------------------------------------------
# Groups of rollouts
# --------------------------------------------------------------------------------------


def _mask_sample(sample: Any, config: MaskingConfig, generator: torch.Generator) -> Any:
    """Mask what one rollout carries: None, one image, or a list/tuple of images (in order)."""
    if sample is None:
        return None
    if isinstance(sample, list | tuple):
        return type(sample)(None if im is None else mask_image(im, config, generator) for im in sample)
    return mask_image(sample, config, generator)


def _sample_key(sample: Any) -> tuple[int, ...]:
    """Identity of the image objects a rollout carries (to reuse a group's masked copy)."""
    if isinstance(sample, list | tuple):
        return (id(sample), *(id(im) for im in sample))
    return (id(sample),)


def mask_group_images(
    images: Sequence[Any],
    group_size: int,
    config: MaskingConfig,
    step: int,
    prompt_indices: Sequence[int] | None = None,
) -> list[Any]:
    """One mask per prompt, shared by the ``group_size`` rollouts of that prompt.

    Args:
        images: ``B = n_prompts * group_size`` entries in group-major order (all rollouts of
            prompt 0 first). An entry is an image, a list/tuple of images (a prompt with
            several images; image k gets its own mask, the same across the group) or None.
        group_size: rollouts per prompt (n).
        config: masking config; ``config.seed`` seeds the stream.
        step: training step, part of the seed.
        prompt_indices: ``[n_prompts]`` global prompt ids (e.g. the prompt's position in the
            global rollout batch). They make masks independent of how prompts are spread over
            ranks; default ``range(n_prompts)``.

    Returns:
        ``[B]`` masked entries aligned with ``images``. Rollouts of a group that carry the very
        same image objects get the very same masked object; rollouts carrying equal copies get
        equal masked copies (the mask is a function of the prompt, not of the rollout).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if len(images) % group_size != 0:
        raise ValueError(f"len(images)={len(images)} is not a multiple of group_size={group_size}")
    n_prompts = len(images) // group_size
    if prompt_indices is None:
        prompt_indices = range(n_prompts)
    if len(prompt_indices) != n_prompts:
        raise ValueError(f"got {len(prompt_indices)} prompt_indices for {n_prompts} prompts")

    masked: list[Any] = []
    for group, prompt_index in enumerate(prompt_indices):
        done: dict[tuple[int, ...], Any] = {}
        for sample in images[group * group_size : (group + 1) * group_size]:
            key = _sample_key(sample)
            if key not in done:
                # A fresh generator per distinct rollout object replays the same stream,
                # hence the same mask, for every rollout of the prompt.
                generator = prompt_generator(config.seed, step, prompt_index)
                done[key] = _mask_sample(sample, config, generator)
            masked.append(done[key])
    return masked


__all__ = [
    "FILL_MODES",
    "MaskingConfig",
    "cell_grid_shape",
    "derive_seed",
    "expand_cell_mask",
    "mask_group_images",
    "mask_image",
    "prompt_generator",
    "sample_cell_mask",
]
