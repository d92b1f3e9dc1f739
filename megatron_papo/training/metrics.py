"""Step metrics: reduction across micro-batches and ranks, JSONL + TensorBoard output, progress bar.

The losses return detached 0-dim tensors (no host sync inside the maths). The trainer collects
them per micro-batch and calls `reduce_step_metrics` once per step: one stacked all-reduce over
the data-parallel group and one host transfer.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.ops.groups import collective_device

# Metrics that are maxima / minima across micro-batches and ranks; everything else is a
# token-weighted mean (weight = the micro-batch's "num_tokens" entry when present).
_MAX_KEYS = ("ratio_max", "rollout/logprob_diff_max")
_MIN_KEYS = ("ratio_min",)
# Constants of the step (the same in every micro-batch): reported as they are.
_CONST_KEYS = ("gamma",)
# Counts of a step (groups kept / dropped, unparsable answers, skipped updates): summed over
# micro-batches, ranks and updates, never averaged.
_COUNT_KEYS = ("filter/kept_groups", "filter/dropped_all_correct", "filter/dropped_all_wrong",
               "filter/generated_prompts", "reward/parse_failures", "update_skipped",
               "data/read_failures_total")


def _is_summed(key: str, mode: str) -> bool:
    return key == "num_tokens" or key in _COUNT_KEYS or mode == "sum"


def reduce_step_metrics(per_micro_batch: Sequence[Mapping[str, Tensor]],
                        group: dist.ProcessGroup | None = None, *,
                        mode: str = "weighted") -> dict[str, float]:
    """Combine metrics over micro-batches and over the ranks of `group`.

    Args:
        per_micro_batch: one dict of 0-dim tensors per micro-batch (same keys in each);
            a "num_tokens" entry, if present, weights the means and is summed; counts
            (``_COUNT_KEYS``) are summed too.
        group: data-parallel group (None = this process only).
        mode: "weighted": each value is a per-micro-batch mean, combined token-weighted;
            "sum": each value is already this micro-batch's share of a global mean (the loss
            was normalised by the global token count), so shares are summed.
    Returns:
        plain floats; "num_tokens" is the global token count.
    """
    if mode not in ("weighted", "sum"):
        raise ValueError(f"reduce_step_metrics: mode must be 'weighted' or 'sum', got {mode!r}")
    if not per_micro_batch:
        return {}
    keys = sorted(per_micro_batch[0])
    const = {k: float(per_micro_batch[0][k]) for k in keys if k in _CONST_KEYS}
    keys = [k for k in keys if k not in _CONST_KEYS]
    device = collective_device(group)  # one host->device (or device->host) move, then one reduction
    weights = torch.stack([m["num_tokens"].float().to(device) if "num_tokens" in m
                           else torch.ones((), device=device) for m in per_micro_batch])
    sums, maxes, mins = [], [], []
    for k in keys:
        vals = torch.stack([m[k].float().reshape(()).to(device) for m in per_micro_batch])
        if k in _MAX_KEYS:
            maxes.append(vals.max())
        elif k in _MIN_KEYS:
            mins.append(vals.min())
        elif _is_summed(k, mode):
            sums.append(vals.sum())
        else:
            sums.append((vals * weights).sum())
    sum_vec = torch.stack([*sums, weights.sum()])
    max_vec = torch.stack([*maxes, *(-v for v in mins)]) if (maxes or mins) else None
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sum_vec, group=group)
        if max_vec is not None:
            dist.all_reduce(max_vec, op=dist.ReduceOp.MAX, group=group)
    sum_list = sum_vec.tolist()
    max_list = [] if max_vec is None else max_vec.tolist()
    total_weight = sum_list[-1]
    out: dict[str, float] = {}
    si = mi = 0
    for k in keys:
        if k in _MAX_KEYS:
            out[k] = max_list[mi]
            mi += 1
        elif k in _MIN_KEYS:
            out[k] = -max_list[mi]
            mi += 1
        elif _is_summed(k, mode):
            out[k] = sum_list[si]
            si += 1
        else:
            out[k] = sum_list[si] / total_weight if total_weight > 0 else math.nan
            si += 1
    out.update(const)
    return out


def combine_update_metrics(per_update: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Metrics of a step's optimizer updates (each already reduced over ranks) as one dict.

    ``ratio_max``-like keys take the maximum over updates, ``ratio_min`` the minimum,
    ``num_tokens`` and counts the sum, constants the first value, everything else the plain mean
    (every update trains on the same number of prompts). A key missing from some updates is
    combined over the updates that have it.
    """
    out: dict[str, float] = {}
    keys = dict.fromkeys(k for m in per_update for k in m)
    for k in keys:
        vals = [float(m[k]) for m in per_update if k in m]
        if k in _MAX_KEYS:
            out[k] = max(vals)
        elif k in _MIN_KEYS:
            out[k] = min(vals)
        elif k in _CONST_KEYS:
            out[k] = vals[0]
        elif _is_summed(k, "weighted"):
            out[k] = sum(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


RUN_FILES: tuple[str, ...] = ("metrics.jsonl", "config.yaml", "training.png", "tensorboard")
"""What a run writes into ``logging.dir``; a fresh run moves an earlier run's aside."""


def move_earlier_run_aside(run_dir: str | Path) -> list[Path]:
    """Rename each of :data:`RUN_FILES` present in ``run_dir`` to ``<name>.prev-<n>``, one ``n`` for
    all (the smallest that names none of them yet), printing each move; returns the new paths.
    Nothing of an earlier run is deleted or overwritten by a fresh run into the same folder."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return []
    n = 1
    while any((run_dir / f"{name}.prev-{n}").exists() for name in RUN_FILES):
        n += 1
    moved = []
    for path in present:
        new = path.with_name(f"{path.name}.prev-{n}")
        path.rename(new)
        moved.append(new)
        print(f"[megatron_papo] {path} is an earlier run's: moved to {new}")
    return moved


class MetricsLogger:
    """Writes one JSON line per logged step to `<dir>/metrics.jsonl` and TensorBoard events.

    Only the rank given `enabled=True` (rank 0) writes. TensorBoard is optional: if
    `torch.utils.tensorboard` cannot import, the JSONL file is still written and a note is
    printed once.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume: bool = False, resume_step: int | None = None) -> None:
        """``resume``: append to the file; with ``resume_step`` (the checkpoint's step) its rows past
        that step (a killed run's steps after its last checkpoint) are dropped first, so each
        step appears once. A fresh run never deletes an earlier run's files: they are moved
        aside (:func:`move_earlier_run_aside`, ``metrics.jsonl.prev-<n>``) and each move printed."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._start = time.time()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            move_earlier_run_aside(self.run_dir)
        elif resume_step is not None and self.path.exists():
            self._drop_rows_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError as e:
                print(f"[megatron_papo] TensorBoard disabled ({e}); metrics still go to {self.path}")

    def _drop_rows_after(self, step: int) -> None:
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a killed writer
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, self.path)
            print(f"[megatron_papo] {self.path}: dropped {dropped} row(s) past step {step} (logged "
                  "after the checkpoint this run resumes from)")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append `metrics` for `step` (floats; non-finite values are written as null)."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": step, "time_s": round(time.time() - self._start, 3)}
        for k, v in metrics.items():
            row[k] = float(v) if math.isfinite(float(v)) else None
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ProgressBar:
    """tqdm bar with ETA on rank 0 (a no-op elsewhere or when disabled)."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train") -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, smoothing=0.3)

    def update(self, metrics: Mapping[str, float],
               keys: Sequence[str] = ("reward", "accuracy", "kl_prcp")) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix({k: f"{metrics[k]:.3f}" for k in keys if k in metrics}, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def summarize(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, window: int = 5) -> str:
    """A short end-of-run table: first-window mean, last-window mean of each key."""
    lines = [f"{'metric':24s} {'first ' + str(window):>12s} {'last ' + str(window):>12s}"]
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if not vals:
            continue
        first = sum(vals[:window]) / len(vals[:window])
        last = sum(vals[-window:]) / len(vals[-window:])
        lines.append(f"{k:24s} {first:12.4f} {last:12.4f}")
    return "\n".join(lines)
