"""The training batch of one RL step: rollout rows as aligned tensors, and their micro-batches.

Layout (R rows, S = P + L positions): each row is its prompt (left-padded to P) followed by its
response (right-padded to L), one contiguous sequence. Logits at position t predict the token at
t + 1, so every per-token tensor of the loss is "shifted":

    target[r, t]    = input_ids[r, t + 1]                 (pad at t = S - 1)
    loss_mask[r, t] = t + 1 is a response token of row r   (prompt and padding never count)

The device boundary: a batch is built on the host (rollout results, pixels) and crosses to the
model's device in one place, :meth:`TrainBatch.to` (called by the trainer right after the batch
is built, ``to(model_device(chunks))``); everything derived from it (mini-batches, micro-batch
dicts, loss fields, token counts) then stays there.

Images travel per row: `pixel_values[r]` is that row's [n_img, C, H, W] tensor (the same object
for the n rows of a group), `masked_pixel_values[r]` its patch-masked twin. Token ids, positions
and image-token placeholders are identical in both branches (PAPO_SPEC.md "Masking").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from megatron_papo.models.base import concat_pixels
from megatron_papo.ops.context_parallel import zigzag_split
from megatron_papo.rollout.base import position_ids_from_mask


@dataclass
class TrainBatch:
    """Every per-row input of the update; tensors [R, S] unless noted."""

    input_ids: Tensor
    """int64 prompt + response tokens."""
    attention_mask: Tensor
    """bool, True at real (non-pad) tokens."""
    position_ids: Tensor
    """int64 positions counted from each row's first real token."""
    target: Tensor
    """int64 next-token ids (module docstring)."""
    loss_mask: Tensor
    """bool, True where the target is a response token."""
    advantages: Tensor
    """[R] float32 group-normalised advantages."""
    pixel_values: list[Tensor | None]
    """[R] per row: [n_img, C, H, W] of the original image(s), or None (text only)."""
    masked_pixel_values: list[Tensor | None]
    """[R] per row: the patch-masked image(s) (shared by the rows of a group)."""
    old_log_probs: Tensor | None = None
    """float32 log-probs under the rollout weights (no-grad pass)."""
    masked_log_probs: Tensor | None = None
    """float32 log-probs with the masked image (no-grad pass)."""
    ref_log_probs: Tensor | None = None
    """float32 log-probs under the reference model (no-grad pass), when beta > 0."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Anything else per row ([R, ...]) the caller wants sliced along with the batch."""

    def to(self, device: torch.device | str) -> TrainBatch:
        """Every tensor of the batch (per-row images included) on ``device``: the one place a
        training batch crosses from the host to the model's device."""
        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(device, non_blocking=True)
            return v.to(device) if hasattr(v, "to") else v  # a model's image container

        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                out[f.name] = [None if x is None else move(x) for x in v]
            elif isinstance(v, dict):
                out[f.name] = {k: move(t) for k, t in v.items()}
            else:
                out[f.name] = None if v is None else move(v)
        return TrainBatch(**out)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, index: Sequence[int] | Tensor) -> TrainBatch:
        """The sub-batch of the given row indices (tensors indexed, lists picked)."""
        pick = index.tolist() if isinstance(index, Tensor) else list(index)
        idx = torch.as_tensor(pick, dtype=torch.long, device=self.device)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in pick]
            elif isinstance(v, dict):
                out[f.name] = {k: t[idx] for k, t in v.items()}
            else:
                out[f.name] = v
        return TrainBatch(**out)


def model_device(model_chunks: Sequence[torch.nn.Module]) -> torch.device:
    """The device of a model's (first chunk's) parameters; CPU for a model without any."""
    for param in model_chunks[0].parameters():
        return param.device
    return torch.device("cpu")


def shift_for_next_token(input_ids: Tensor, response_start: int, response_mask: Tensor,
                         pad_id: int) -> tuple[Tensor, Tensor]:
    """(target, loss_mask) [R, S] for rows = prompt (P = response_start columns) + response.

    response_mask: [R, L] True at generated tokens; S = P + L.
    """
    rows, seq = input_ids.shape
    target = torch.full_like(input_ids, pad_id)
    target[:, :-1] = input_ids[:, 1:]
    loss_mask = torch.zeros(rows, seq, dtype=torch.bool, device=input_ids.device)
    length = response_mask.shape[1]
    loss_mask[:, response_start - 1:response_start - 1 + length] = response_mask
    return target, loss_mask


def build_train_batch(input_ids: Tensor, attention_mask: Tensor, response_start: int,
                      response_mask: Tensor, advantages: Tensor, pixel_values: Sequence[Tensor | None],
                      masked_pixel_values: Sequence[Tensor | None], *, pad_id: int) -> TrainBatch:
    """Assemble a TrainBatch from padded rollout tensors (see `rollout.RolloutResult.padded`).

    Args:
        input_ids, attention_mask: [R, S] prompt (left-padded, P columns) + response.
        response_start: P, the first response column.
        response_mask: [R, L] True at generated tokens (L = S - P).
        advantages: [R]; pixel_values / masked_pixel_values: per row (module docstring).
    """
    rows = input_ids.shape[0]
    if response_start < 1:
        raise ValueError("build_train_batch: every row needs at least one prompt token (response_start >= 1)")
    if response_mask.shape != (rows, input_ids.shape[1] - response_start):
        raise ValueError(f"build_train_batch: response_mask {tuple(response_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)} with response_start={response_start}")
    if advantages.shape != (rows,) or len(pixel_values) != rows or len(masked_pixel_values) != rows:
        raise ValueError(f"build_train_batch: advantages {tuple(advantages.shape)}, {len(pixel_values)} "
                         f"pixel rows and {len(masked_pixel_values)} masked rows must all have {rows} rows")
    target, loss_mask = shift_for_next_token(input_ids, response_start, response_mask, pad_id)
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), target=target,
                      loss_mask=loss_mask, advantages=advantages.float(), pixel_values=list(pixel_values),
                      masked_pixel_values=list(masked_pixel_values))


def stack_pixels(per_row: Sequence[Any]) -> Any:
    """Concatenate the rows' images in row order ([sum n_img, C, H, W] tensors, or the model's
    own container, see ``models.base.concat_pixels``), or None if no image."""
    return concat_pixels(per_row)


PER_TOKEN_FIELDS = ("input_ids", "attention_mask", "position_ids", "target", "loss_mask", "old_log_probs",
                    "masked_log_probs", "ref_log_probs")
"""The TrainBatch fields that are [R, S] (one value per position)."""
LOSS_TOKEN_FIELDS = ("target", "loss_mask", "old_log_probs", "masked_log_probs", "ref_log_probs")
"""The per-position fields only the loss reads (sharded under context parallelism)."""


def pad_columns(batch: TrainBatch, multiple: int) -> TrainBatch:
    """The batch with S right-padded to a multiple of `multiple` (itself when already aligned).

    Context parallelism needs S to be a multiple of 2 * cp (zigzag shards; times tp under
    sequence parallelism). New columns are padding: attention_mask and loss_mask False, the other
    per-position fields repeat their last column (never read: masked keys, no loss).
    """
    extra = (-batch.seq_length) % multiple
    if extra == 0:
        return batch
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if f.name in PER_TOKEN_FIELDS and isinstance(v, Tensor):
            tail = (torch.zeros_like(v[:, -1:]) if v.dtype == torch.bool else v[:, -1:]).expand(-1, extra)
            v = torch.cat([v, tail], dim=1)
        out[f.name] = v
    return TrainBatch(**out)


def micro_batch_dicts(batch: TrainBatch, micro_batch_size: int, *, masked_branch: bool = False,
                      both_branches: bool = False, cp_rank: int = 0,
                      cp_size: int = 1) -> list[dict[str, Tensor | None]]:
    """Split `batch` into micro-batches of `micro_batch_size` rows, as dicts for the schedule.

    masked_branch: the images are the masked ones (the no-grad masked pass).
    both_branches: each micro-batch holds its rows twice, original then masked images
        (2 * micro_batch_size rows: one pipeline pass computes both branches' logits).
    cp_rank, cp_size: context parallelism. The model inputs stay whole (the model embeds the
        whole sequence, merges the images, then keeps its zigzag shard); the fields only the loss
        reads (LOSS_TOKEN_FIELDS) become this rank's zigzag shard [mbs, S / cp], matching the
        logits. S must be a multiple of 2 * cp (``pad_columns``).
    Each dict has input_ids, position_ids, attention_mask, pixel_values, target, loss_mask,
    advantages and whichever log-prob tensors the batch carries, plus "rows" (row indices) and
    "row_tokens" ([mbs] loss tokens of each whole row, the per-sequence divisor under cp); with
    both_branches also "branch_pixel_values" (the original and the masked halves' images apart).
    """
    if batch.num_rows % micro_batch_size:
        raise ValueError(f"micro_batch_dicts: {batch.num_rows} rows are not a multiple of "
                         f"micro_batch_size={micro_batch_size}")
    out = []
    for start in range(0, batch.num_rows, micro_batch_size):
        idx = list(range(start, start + micro_batch_size))
        mb = batch.rows(idx)
        d: dict[str, Tensor | None] = {
            "rows": torch.tensor(idx, device=batch.device), "input_ids": mb.input_ids,
            "position_ids": mb.position_ids,
            "attention_mask": mb.attention_mask, "target": mb.target, "loss_mask": mb.loss_mask,
            "advantages": mb.advantages, "old_log_probs": mb.old_log_probs,
            "masked_log_probs": mb.masked_log_probs, "ref_log_probs": mb.ref_log_probs,
        }
        d["row_tokens"] = mb.loss_mask.sum(dim=1)
        if cp_size > 1:
            for k in LOSS_TOKEN_FIELDS:
                if d[k] is not None:
                    d[k] = zigzag_split(d[k], cp_rank, cp_size, dim=1)
        images = mb.masked_pixel_values if masked_branch else mb.pixel_values
        d["pixel_values"] = stack_pixels(images)
        if both_branches:
            for k in ("input_ids", "position_ids", "attention_mask"):
                d[k] = torch.cat([d[k], d[k]], dim=0)
            masked = stack_pixels(mb.masked_pixel_values)
            d["branch_pixel_values"] = (d["pixel_values"], masked)  # apart: passes.two_branch_forward
            d["pixel_values"] = stack_pixels([d["pixel_values"], masked])
        out.append(d)
    return out


def inert_rows(batch: TrainBatch, count: int) -> TrainBatch:
    """`count` copies of the batch's rows (cycled) that carry no loss: loss_mask all False and
    advantage 0. They let a rank take part in collectives (micro-batches, updates) without
    contributing to the loss or the gradient."""
    rows = batch.rows([i % batch.num_rows for i in range(count)])
    rows.loss_mask = torch.zeros_like(rows.loss_mask)
    rows.advantages = torch.zeros_like(rows.advantages)
    return rows


def concat_batches(a: TrainBatch, b: TrainBatch) -> TrainBatch:
    """Rows of `a` then rows of `b` (same fields present in both)."""
    out = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, Tensor):
            out[f.name] = torch.cat([x, y])
        elif isinstance(x, list):
            out[f.name] = x + y
        elif isinstance(x, dict):
            out[f.name] = {k: torch.cat([x[k], y[k]]) for k in x}
        else:
            out[f.name] = x
    return TrainBatch(**out)


def pad_rows_to_multiple(batch: TrainBatch, multiple: int) -> TrainBatch:
    """Repeat rows (with loss_mask all False, advantage 0) until num_rows is a multiple of `multiple`.

    Used after the DAPO filter, which keeps whole groups and can leave a row count that does
    not divide into micro-batches; the padding rows contribute nothing to loss or gradient.
    """
    extra = (-batch.num_rows) % multiple
    return batch if extra == 0 else concat_batches(batch, inert_rows(batch, extra))
