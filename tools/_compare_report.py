"""The results half of tools/compare_algorithms.py: what each run folder holds and the report.

Reading a finished (or failed) run folder into a :class:`RunResult` (its run.json, metrics.jsonl
and config.yaml), the statistics over seeds, the markdown report's tables and sections, the
machine description, and the plots. No argument parsing and no subprocesses: the CLI
(tools/compare_algorithms.py) launches the runs and calls these. It re-exports every name of this
module (``compare_algorithms.final_reward`` etc.); like tools/_launch.py for the conversion CLIs,
it is a sibling module that the CLI imports by name (it puts the repository root and tools/ on
sys.path first).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_papo.plotting import (
    MetricsFileError,
    eval_metrics,
    load_rows,
    mean_std,
    plot_comparison,
    plot_training,
    rl_rows,
    series,
)

__all__ = [
    "FINAL_REWARD_WINDOW",
    "METRIC_COLUMNS",
    "PER_RUN_KEYS",
    "RunResult",
    "accelerator",
    "budget_section",
    "by_algo",
    "code_check",
    "collect_run",
    "config_differences",
    "cpu_model",
    "distinct_ints",
    "eval_description",
    "final_reward",
    "flatten",
    "fmt",
    "fmt_mean_std",
    "machine_info",
    "machine_section",
    "noise_note",
    "paired_table",
    "per_seed_table",
    "plot_runs",
    "read_record",
    "render_markdown",
    "shared_settings",
    "summary_table",
    "versions",
    "warm_start_check",
    "warm_start_nll",
]

FINAL_REWARD_WINDOW = 5
# Keys every run sets itself (they differ by design); the config check ignores them.
PER_RUN_KEYS = ("train.seed", "logging.dir", "logging.progress_bar")


@dataclass
class RunResult:
    """The numbers of one finished (or failed) run."""

    algo: str
    seed: int
    ok: bool
    status: str
    wall_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    code: str = ""


# ----------------------------------------------------------------------------- reading results


def final_reward(rows: Sequence[Mapping[str, Any]], window: int = FINAL_REWARD_WINDOW) -> float:
    """Mean of "reward/mean" over the last `window` RL steps (NaN without RL steps)."""
    _, values = series(rl_rows(rows), "reward/mean")
    tail = values[-window:]
    return sum(tail) / len(tail) if tail else float("nan")


def warm_start_nll(rows: Sequence[Mapping[str, Any]]) -> float:
    """The last logged warm-start NLL (NaN without a warm start)."""
    _, values = series(rows, "sft_nll")
    return values[-1] if values else float("nan")


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_run(algo: str, seed: int, run_dir: Path) -> RunResult:
    """The numbers of one run folder; a failed or unfinished run gets ok=False and why."""
    rec = read_record(run_dir)
    wall, code = rec.get("wall_s"), rec.get("code", "")
    if rec.get("returncode") not in (0, None) or rec.get("error"):
        status = rec.get("error") or f"exit code {rec['returncode']}"
        return RunResult(algo, seed, False, status, wall, code=code)
    try:
        rows = load_rows(run_dir)
    except MetricsFileError as e:
        return RunResult(algo, seed, False, str(e), wall, code=code)
    ev = eval_metrics(rows)
    if "accuracy" not in ev:
        return RunResult(algo, seed, False, "no final evaluation in metrics.jsonl", wall, code=code)
    metrics = {"accuracy": ev["accuracy"], "accuracy_masked": ev.get("accuracy_masked", float("nan")),
               "masked_gap": ev.get("masked_gap", float("nan")), "format": ev.get("format", float("nan")),
               "k": ev.get("k", float("nan")), "prompts": ev.get("prompts", float("nan")),
               "final_reward": final_reward(rows), "warm_start_nll": warm_start_nll(rows)}
    return RunResult(algo, seed, True, "ok", wall, metrics, code)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(run_dirs: Sequence[Path]) -> dict[str, list[str]]:
    """Dotted config keys whose resolved values differ between runs (per-run keys ignored), each
    with its values as `algo/seed: value`."""
    import yaml

    flat = {}
    for d in run_dirs:
        path = d / "config.yaml"
        if path.is_file():
            flat[f"{d.parent.name}/{d.name}"] = flatten(yaml.safe_load(path.read_text()) or {})
    keys = sorted({k for f in flat.values() for k in f} - set(PER_RUN_KEYS))
    diffs = {}
    for k in keys:
        values = {name: f.get(k) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            diffs[k] = sorted({f"{name.split('/')[0]}: {v}" for name, v in values.items()})
    return diffs


# ----------------------------------------------------------------------------- report


METRIC_COLUMNS = (
    ("accuracy", "eval accuracy (original)"),
    ("accuracy_masked", "eval accuracy (masked)"),
    ("masked_gap", "masked gap"),
    ("final_reward", f"final train reward (last {FINAL_REWARD_WINDOW})"),
    ("format", "eval format"),
)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "n/a"
    m, s = mean_std(finite)
    if len(finite) == 1:
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def by_algo(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.algo, []).append(r)
    return out


def summary_table(results: Sequence[RunResult]) -> list[str]:
    head = ["algorithm", "runs ok", *(label for _, label in METRIC_COLUMNS), "wall time / run (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, runs in by_algo(results).items():
        ok = [r for r in runs if r.ok]
        cells = [algo, f"{len(ok)}/{len(runs)}"]
        cells += [fmt_mean_std([r.metrics[key] for r in ok]) for key, _ in METRIC_COLUMNS]
        walls = [r.wall_s for r in ok if r.wall_s is not None]
        cells.append(fmt_mean_std(walls, 0))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_table(results: Sequence[RunResult]) -> list[str]:
    """Per-seed differences of each algorithm against the first one (same seed = same warm start)."""
    groups = by_algo(results)
    if len(groups) < 2:
        return []
    base_algo, *others = groups
    base = {r.seed: r for r in groups[base_algo] if r.ok}
    keys = (("accuracy", "Δ eval accuracy"), ("accuracy_masked", "Δ masked accuracy"),
            ("masked_gap", "Δ masked gap"), ("final_reward", "Δ final train reward"))
    head = ["algorithm", "seeds paired", *(f"{label} vs {base_algo}" for _, label in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo in others:
        pairs = [(r, base[r.seed]) for r in groups[algo] if r.ok and r.seed in base]
        cells = [algo, str(len(pairs))]
        cells += [fmt_mean_std([a.metrics[k] - b.metrics[k] for a, b in pairs]) for k, _ in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def per_seed_table(results: Sequence[RunResult]) -> list[str]:
    head = ["algorithm", "seed", "status", *(label for _, label in METRIC_COLUMNS),
            "warm-start NLL (last step)", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r.metrics
        cells = [r.algo, str(r.seed), r.status.replace("|", "/")]
        cells += [fmt(m.get(key)) for key, _ in METRIC_COLUMNS]
        cells += [fmt(m.get("warm_start_nll"), 4), fmt(r.wall_s, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "megatron-core", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def accelerator() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def machine_info() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu_model(),
            "accelerator": accelerator(),
            "platform": platform.platform(), "loadavg_1m": round(os.getloadavg()[0], 2), **versions()}


def distinct_ints(results: Sequence[RunResult], key: str, default: str) -> str:
    """The distinct integer values of metrics[key] over finished runs, "a/b" (or `default`)."""
    vals = {int(r.metrics[key]) for r in results if r.ok and r.metrics.get(key) == r.metrics.get(key)}
    return "/".join(str(v) for v in sorted(vals)) or default


def eval_description(results: Sequence[RunResult], info: Mapping[str, Any]) -> str:
    """How the eval numbers are computed, with the settings read from the runs' configs."""
    k, n = distinct_ints(results, "k", "k"), distinct_ints(results, "prompts", "N")
    cfg = info.get("shared_settings", {})
    get = lambda key: cfg.get(key, "?")
    return (f"Eval: the first {n} prompts of the easy-VQA **test** split, k={k} responses per prompt "
            f"sampled at temperature {get('evaluation.temperature')}, top_p {get('evaluation.top_p')}, "
            f"at most {get('rollout.max_new_tokens')} new tokens. accuracy avg@{k} = mean over all "
            f"prompts × {k} responses of [answer in the last \\boxed{{}} == ground truth], i.e. the "
            f"mean over prompts of (correct responses / {k}); it is not pass@k. masked = the same "
            f"prompts with the image patch-masked ({get('masking.cell_size')}-px cells blacked out with "
            f"probability {get('masking.ratio')}); masked gap = original − masked. Final train reward = "
            f"mean of the rollouts' reward (0.9·accuracy + 0.1·format) over the last "
            f"{FINAL_REWARD_WINDOW} RL steps. ± = sample standard deviation (n−1) over seeds.")


def noise_note(results: Sequence[RunResult]) -> str:
    """The sampling noise of one avg@k estimate, to read the differences against."""
    ok = [r for r in results if r.ok]
    if not ok:
        return ""
    p = sum(r.metrics["accuracy"] for r in ok) / len(ok)
    draws = ok[0].metrics.get("prompts", float("nan")) * ok[0].metrics.get("k", float("nan"))
    se = (p * (1 - p) / draws) ** 0.5 if draws == draws and draws > 0 else float("nan")
    return (f"Noise: one avg@k estimate from {draws:.0f} sampled answers has a sampling standard error of at "
            f"least sqrt(p(1−p)/{draws:.0f}) ≈ {fmt(se)} at p ≈ {p:.2f} (more, since the k answers to one "
            f"prompt are correlated). With {max(len(v) for v in by_algo(ok).values())} seeds per algorithm, "
            f"differences of the order of the seed-to-seed std are not evidence of a difference.")


def warm_start_check(results: Sequence[RunResult]) -> str:
    """Whether the warm start really was identical across algorithms (its last NLL, per seed)."""
    per_seed: dict[int, set[float]] = {}
    for r in results:
        nll = r.metrics.get("warm_start_nll")
        if r.ok and nll is not None and nll == nll:
            per_seed.setdefault(r.seed, set()).add(round(nll, 6))
    if not per_seed:
        return "(No warm-start NLL was logged.)"
    if all(len(v) == 1 for v in per_seed.values()):
        return "Checked: the last warm-start NLL is identical across algorithms at every seed."
    return "Note: the last warm-start NLL differs across algorithms at some seed (see the per-seed table)."


def code_check(results: Sequence[RunResult]) -> str:
    """Whether every run used the same source version (fingerprints recorded at launch)."""
    versions: dict[str, list[str]] = {}
    for r in results:
        versions.setdefault(r.code or "not recorded", []).append(f"{r.algo}/seed{r.seed}")
    if len(versions) == 1:
        (code,) = versions
        if code == "not recorded":
            return "Source version per run: not recorded (runs made before the tool recorded it)."
        return f"Source version: every run used the same megatron_papo/ + examples/ (fingerprint {code})."
    groups = "; ".join(f"{code}: {', '.join(runs)}" for code, runs in versions.items())
    return f"**Warning: the runs used different source versions** (edits during the comparison): {groups}."


def shared_settings(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """Eval / sampling / masking settings from the first run's resolved config.yaml."""
    import yaml

    keys = ("evaluation.temperature", "evaluation.top_p", "rollout.max_new_tokens", "masking.cell_size",
            "masking.ratio")
    for d in run_dirs:
        if (d / "config.yaml").is_file():
            flat = flatten(yaml.safe_load((d / "config.yaml").read_text()) or {})
            return {k: flat.get(k, "?") for k in keys}
    return {}


def render_markdown(results: Sequence[RunResult], info: Mapping[str, Any], plot_rel: str | None) -> str:
    """The report: how it was made, the tables, the config check, the commands."""
    lines = ["# Results: GRPO vs PAPO-G vs PAPO-D on easy-VQA (tiny VLM, CPU)", "",
             "Generated by `tools/compare_algorithms.py`; do not edit by hand, re-run the tool. "
             "Every seed is reported, failed runs included.", "",
             "```bash", info["tool_command"], "```", ""]
    if info.get("aggregate_command") and info["aggregate_command"] != info["tool_command"]:
        lines += [f"Tables re-aggregated from the existing run folders with "
                  f"`{info['aggregate_command']}`.", ""]
    lines += ["## Summary (mean ± std over seeds)", "", *summary_table(results), ""]
    lines += [eval_description(results, info), "", noise_note(results), ""]
    paired = paired_table(results)
    if paired:
        lines += ["## Paired differences (per seed, then mean ± std)", "",
                  "A seed fixes the initial model, the warm-start data, the RL data order and the eval "
                  "prompts and sampling seed, so per-seed differences remove that shared variation. "
                  + warm_start_check(results),
                  "", *paired, ""]
    if plot_rel:
        lines += [f"![comparison]({plot_rel})", "",
                  "Left/middle: rollout reward and accuracy per RL step (5-step moving average per seed; "
                  "line = mean over seeds, band = min–max over seeds). Right: final eval accuracy, "
                  "bars = mean, error bars = std, dots = seeds.", ""]
    lines += ["## Per seed", "", *per_seed_table(results), ""]
    lines += budget_section(info)
    lines += [code_check(results), ""]
    if info.get("note"):
        lines += ["## Note from the person who ran the tool", "", info["note"], ""]
    lines += machine_section(info)
    return "\n".join(lines)


def budget_section(info: Mapping[str, Any]) -> list[str]:
    lines = ["## Budget and configuration", "",
             "The same overrides for every run (on top of `examples/tiny_<algorithm>.yaml`):", "",
             "```", *info["budget"], "```", ""]
    diffs = info.get("config_differences", {})
    lines.append("Resolved configs (`<run>/config.yaml`) differ only in these keys "
                 f"(besides {', '.join(PER_RUN_KEYS)}):")
    lines.append("")
    lines += [f"- `{key}`: {'; '.join(vals)}" for key, vals in diffs.items()] or ["- none"]
    lines += ["", f"Runs: {info['jobs']} at a time. Per-run commands (run from the repository root):",
              "", "```bash", *info["commands"], "```", ""]
    return lines


def machine_section(info: Mapping[str, Any]) -> list[str]:
    m = info["machine"]
    return ["## Machine", "",
            f"- CPU: {m['cpu_model']}, nproc {m['nproc']} ({m['cpus_usable']} usable); "
            f"{m.get('accelerator', '?')} (runs use the CPU config: fp32, gloo)",
            f"- {m['platform']}; python {m['python']}, torch {m['torch']}, megatron-core "
            f"{m['megatron-core']}, matplotlib {m['matplotlib']}",
            f"- 1-minute load average when the comparison started: {m['loadavg_1m']} "
            "(the machine may be shared; wall times include any contention)",
            f"- Started {info.get('started', '?')}, total wall time {fmt(info.get('total_wall_s'), 0)} s", ""]


# ----------------------------------------------------------------------------- plots


def plot_runs(results: Sequence[RunResult], out: Path, plot: Path) -> bool:
    """training.png per finished run, and the comparison PNG; False when nothing could be plotted."""
    runs: dict[str, list[Path]] = {}
    for r in results:
        if r.ok:
            metrics = out / r.algo / f"seed{r.seed}" / "metrics.jsonl"
            png = metrics.with_name("training.png")
            if not png.is_file() or png.stat().st_mtime < metrics.stat().st_mtime:
                plot_training(metrics, png)
            runs.setdefault(r.algo, []).append(metrics)
    if not runs:
        return False
    table = {a: {key: [r.metrics[key] for r in rs if r.ok] for key in ("accuracy", "accuracy_masked")}
             for a, rs in by_algo(results).items() if a in runs}
    plot_comparison(runs, plot, table, title=f"easy-VQA, tiny VLM: {', '.join(runs)} "
                                             f"({max(len(v) for v in runs.values())} seeds)")
    return True


if __name__ == "__main__":
    from megatron_papo.cli import helper_module_main

    sys.exit(helper_module_main(__doc__))
