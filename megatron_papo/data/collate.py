"""Padding helpers for rollout and training batches.

Masks are True on real tokens and False on padding (the convention of the project's
``response_mask``; Hugging Face calls it ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Padded(NamedTuple):
    """A padded batch; unpacks as ``ids, mask = left_pad(...)``."""

    ids: torch.Tensor
    """[B, S] int64 token ids (pad_id on padding)."""
    mask: torch.Tensor
    """[B, S] bool, True on real tokens."""


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool, length: int | None) -> Padded:
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty batch")
    longest = max(len(s) for s in seqs)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        n = len(seq)
        cols = slice(length - n, length) if left else slice(0, n)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = True
    return Padded(ids, mask)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> Padded:
    """Pad on the left (prompts for generation: every prompt ends at the last column)."""
    return _pad(seqs, pad_id, left=True, length=length)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> Padded:
    """Pad on the right (responses, training sequences)."""
    return _pad(seqs, pad_id, left=False, length=length)


def build_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] positions counting real tokens only (0 at each row's first real token); 0 on padding.

    Works for left, right or mixed padding, e.g. mask [0 0 1 1 0] -> [0 0 0 1 0].
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, S], got shape {tuple(mask.shape)}")
    mask = mask.bool()
    positions = mask.long().cumsum(dim=1) - 1
    return positions.clamp_min(0).masked_fill(~mask, 0)


__all__ = ["Padded", "build_position_ids", "left_pad", "right_pad"]
