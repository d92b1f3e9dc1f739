"""PNG plots of training runs: one run (`plot_training`) and an algorithm comparison (`plot_comparison`).

    from megatron_papo.plotting import plot_training
    plot_training(Path("runs/tiny_papo_g/metrics.jsonl"), Path("runs/tiny_papo_g/training.png"))

Input is the trainer's `metrics.jsonl` (one JSON object per logged step, see `metrics.MetricsLogger`):
RL rows carry "reward/mean", warm-start rows "sft_nll", and the final row the "eval/..." numbers.
matplotlib is imported lazily and only through its Agg canvas (no pyplot, no global backend
switch), so plotting works on headless machines and inside other programs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_papo.errors import UserError
from megatron_papo.training.metrics import read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Row = dict[str, Any]
Series = tuple[list[float], list[float]]

RL_XLABEL = "RL step (after the warm start)"
SMOOTH_WINDOW = 5
"""Trailing moving-average window drawn over the noisy per-step curves."""
EVAL_KEYS = ("accuracy", "accuracy_masked")
"""Keys of `plot_comparison`'s eval_table entries: per-seed eval accuracy, original and masked."""


class MetricsFileError(ValueError, UserError):
    """A metrics.jsonl file is missing, empty or not JSON lines."""


# ----------------------------------------------------------------------------- reading


def metrics_file(path: Path) -> Path:
    """`path` itself, or `path/metrics.jsonl` when `path` is a run folder."""
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def load_rows(path: Path) -> list[Row]:
    """The rows of a metrics.jsonl (or of a run folder's), with a clear error when there are none."""
    file = metrics_file(path)
    if not file.is_file():
        raise MetricsFileError(f"metrics file not found: {file} (did the run start? is the path a run folder "
                               f"or its metrics.jsonl?)")
    try:
        rows = read_metrics(file)
    except ValueError as e:
        raise MetricsFileError(f"{file}: not JSON lines ({e})") from e
    if not rows:
        raise MetricsFileError(f"{file}: empty, no metrics were logged (did the run crash before step 1?)")
    return rows


def series(rows: Sequence[Row], key: str) -> Series:
    """(steps, values) of `key` over the rows that carry a finite value of it."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            steps.append(float(r.get("step", len(steps) + 1)))
            values.append(float(v))
    return steps, values


def rl_rows(rows: Sequence[Row]) -> list[Row]:
    """Rows of RL steps (they carry the rollout reward)."""
    return [r for r in rows if "reward/mean" in r]


def warm_start_steps(metrics_jsonl: Path, rows: Sequence[Row]) -> int:
    """Warm-start steps before RL: train.sft_warmup_steps from the run's config.yaml (written next
    to metrics.jsonl by the trainer), else the last logged warm-start step, else 0."""
    config = metrics_file(metrics_jsonl).with_name("config.yaml")
    if config.is_file():
        import yaml

        try:
            steps = (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("sft_warmup_steps")
        except (yaml.YAMLError, AttributeError):
            steps = None
        if isinstance(steps, int):
            return steps
    sft = series(rows, "sft_nll")[0]
    return int(sft[-1]) if sft else 0


def rl_step_rows(metrics_jsonl: Path, rows: Sequence[Row]) -> list[Row]:
    """The RL rows with "step" renumbered as the RL step (1 = the first step after the warm start)."""
    offset = warm_start_steps(metrics_jsonl, rows)
    return [{**r, "step": r["step"] - offset} for r in rl_rows(rows) if isinstance(r.get("step"), int)]


def eval_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """The last logged evaluation, keys without the "eval/" prefix and "@k" suffix (+ "k")."""
    for r in reversed(rows):
        found = {k: v for k, v in r.items() if k.startswith("eval/") and v is not None}
        if found:
            return _strip_eval_keys(found)
    return {}


def _strip_eval_keys(found: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in found.items():
        name, _, k_suffix = k.removeprefix("eval/").partition("@")
        out[name] = float(v)
        if k_suffix.isdigit():
            out["k"] = float(k_suffix)
    return out


def moving_average(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ----------------------------------------------------------------------------- matplotlib


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A Figure on an Agg canvas (no pyplot) and its axes in reading order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def _style(ax: Axes, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _empty(ax: Axes, text: str) -> None:
    """A gray note instead of a curve (and no meaningless ticks)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _raw_and_smooth(ax: Axes, data: Series, label: str, color: str) -> None:
    """The raw per-step values (thin) and their moving average (thick)."""
    steps, values = data
    ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
    ax.plot(steps, moving_average(values), color=color, linewidth=2,
            label=f"{label} ({SMOOTH_WINDOW}-step avg)")


def _plot_keys(ax: Axes, rows: Sequence[Row], keys: Sequence[tuple[str, str]], missing: str) -> bool:
    """Curves of each (key, label) present in rows; a gray note when none is. True if any drawn."""
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    drawn = False
    for (key, label), color in zip(keys, colors):
        data = series(rows, key)
        if data[0]:
            _raw_and_smooth(ax, data, label, color)
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        _empty(ax, missing)
    return drawn


# ----------------------------------------------------------------------------- one run


def _eval_caption(ev: Mapping[str, float]) -> str:
    if "accuracy" not in ev:
        return "no final evaluation logged"
    k = int(ev.get("k", 1))
    parts = [f"eval avg@{k}: accuracy {ev['accuracy']:.3f}"]
    if "accuracy_masked" in ev:
        parts.append(f"masked-image accuracy {ev['accuracy_masked']:.3f}")
    if "masked_gap" in ev:
        parts.append(f"gap {ev['masked_gap']:+.3f}")
    if "format" in ev:
        parts.append(f"format {ev['format']:.3f}")
    return ", ".join(parts)


def _sft_panel(ax: Axes, rows: Sequence[Row]) -> None:
    data = series(rows, "sft_nll")
    if data[0]:
        ax.plot(*data, color="tab:purple", linewidth=1.5)
    else:
        _empty(ax, "no warm start (train.sft_warmup_steps=0)")
    _style(ax, "Warm start (SFT): answer NLL", "NLL per token", "warm-start step")


def _training_panels(axes: Sequence[Axes], rows: Sequence[Row], rl: Sequence[Row]) -> None:
    _sft_panel(axes[0], rows)
    _plot_keys(axes[1], rl, [("reward/mean", "reward"), ("reward/accuracy", "accuracy"),
                             ("reward/format", "format")], "no RL steps logged")
    _style(axes[1], "RL rollouts: reward and accuracy", "mean over responses", RL_XLABEL)
    _plot_keys(axes[2], rl, [("kl_prcp", "KL_prcp (orig || masked)")],
               "kl_prcp not logged (no masked branch, e.g. GRPO/DAPO)")
    _style(axes[2], "Implicit perception loss KL_prcp", "KL per token", RL_XLABEL)
    _plot_keys(axes[3], rl, [("entropy_orig", "original image"), ("entropy_mask", "masked image")],
               "entropies not logged")
    _style(axes[3], "Entropy of sampled tokens", "nats per token", RL_XLABEL)


def plot_training(metrics_jsonl: Path, out_png: Path) -> Path:
    """PNG of one run: warm-start NLL, RL reward/accuracy/format, KL_prcp and both entropies per step,
    with the final evaluation in the title. Raises MetricsFileError on a missing or empty file."""
    rows = load_rows(metrics_jsonl)
    fig, axes = _figure(2, 2, (12, 8))
    _training_panels(axes, rows, rl_step_rows(metrics_jsonl, rows))
    run_dir = metrics_file(metrics_jsonl).resolve().parent
    name = f"{run_dir.parent.name}/{run_dir.name}"
    fig.suptitle(f"{name}: {_eval_caption(eval_metrics(rows))}", fontsize=12)
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- comparison


def _aligned(runs: Sequence[Sequence[Row]], key: str) -> tuple[list[float], list[list[float]]]:
    """Steps present in every run for `key`, and each run's smoothed values at those steps."""
    per_run = [dict(zip(*_smoothed(rows, key))) for rows in runs]
    common = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    return common, [[d[s] for s in common] for d in per_run]


def _smoothed(rows: Sequence[Row], key: str) -> Series:
    steps, values = series(rows, key)
    return steps, moving_average(values)


def _band_panel(ax: Axes, runs: Mapping[str, Sequence[Sequence[Row]]], key: str, title: str) -> None:
    """Mean over seeds (line) and the min-max range over seeds (band) per algorithm."""
    drawn = False
    for i, (algo, rows) in enumerate(runs.items()):
        steps, vals = _aligned(rows, key)
        if not steps:
            continue
        cols = list(zip(*vals))
        mean = [sum(c) / len(c) for c in cols]
        color = f"C{i}"
        ax.plot(steps, mean, color=color, linewidth=2, label=f"{algo} (n={len(vals)})")
        ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.12)
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        _empty(ax, f"{key} not logged")
    _style(ax, title, f"{SMOOTH_WINDOW}-step moving average", RL_XLABEL)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for a single value); NaN mean when empty."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _bar_panel(ax: Axes, eval_table: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
    """Final eval accuracy, original vs masked image: bars = mean, error bars = std, dots = seeds."""
    width = 0.38
    labels = [("accuracy", "original image", "tab:blue"), ("accuracy_masked", "masked image", "tab:gray")]
    algos = list(eval_table)
    for j, (key, label, color) in enumerate(labels):
        xs = [i + (j - 0.5) * width for i in range(len(algos))]
        stats = [mean_std(eval_table[a].get(key, [])) for a in algos]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=4,
               color=color, alpha=0.8, label=label)
        for x, a in zip(xs, algos):
            seeds = eval_table[a].get(key, [])
            ax.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
        for x, (m, _) in zip(xs, stats):
            if math.isfinite(m):  # inside the bar, clear of the error bar and the seed dots
                ax.text(x, m / 2, f"{m:.3f}", ha="center", va="center", rotation=90, fontsize=9,
                        color="white", fontweight="bold")
    ax.set_xticks(range(len(algos)), algos)
    ax.legend(fontsize=8, loc="lower right")
    _style(ax, "Final eval accuracy (mean ± std over seeds; dots = seeds)", "accuracy", xlabel="algorithm")


def eval_table_from_runs(runs: Mapping[str, Sequence[Sequence[Row]]]) -> dict[str, dict[str, list[float]]]:
    """algo -> {"accuracy": [per seed], "accuracy_masked": [per seed]} from the runs' eval rows."""
    table: dict[str, dict[str, list[float]]] = {}
    for algo, runs_rows in runs.items():
        evs = [eval_metrics(rows) for rows in runs_rows]
        table[algo] = {key: [e[key] for e in evs if key in e] for key in EVAL_KEYS}
    return table


def plot_comparison(runs: dict[str, list[Path]], out_png: Path,
                    eval_table: Mapping[str, Mapping[str, Sequence[float]]] | None = None, *,
                    title: str = "") -> Path:
    """PNG comparing algorithms: training reward and accuracy per step (mean over seeds, min-max
    band) and a bar chart of the final eval accuracy, original vs masked image (mean ± std).

    Args:
        runs: algorithm -> its runs (metrics.jsonl files or run folders), one per seed.
        out_png: where the PNG goes (folders are created).
        eval_table: algorithm -> {"accuracy": [...], "accuracy_masked": [...]} per seed; None =
            read from the runs' final eval rows.
        title: figure title.
    """
    if not runs:
        raise ValueError("plot_comparison: no runs given")
    rows = {algo: [load_rows(p) for p in paths] for algo, paths in runs.items()}
    table = eval_table if eval_table is not None else eval_table_from_runs(rows)
    rl = {algo: [rl_step_rows(p, r) for p, r in zip(runs[algo], rs)] for algo, rs in rows.items()}
    fig, axes = _figure(1, 3, (17, 5))
    _band_panel(axes[0], rl, "reward/mean", "Training reward (rollouts)")
    _band_panel(axes[1], rl, "reward/accuracy", "Training accuracy (rollouts)")
    _bar_panel(axes[2], table)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, out_png)
