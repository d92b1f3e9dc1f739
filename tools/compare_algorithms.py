#!/usr/bin/env python
"""Compare GRPO, PAPO-G and PAPO-D on easy-VQA: same model, same seeds, same budget.

    python tools/compare_algorithms.py                    # 3 algorithms x 3 seeds, default budget
    python tools/compare_algorithms.py --quick --seeds 1 --out /tmp/cmp \\
        --results /tmp/cmp/RESULTS.md --plot /tmp/cmp/cmp.png      # smoke test (about a minute)
    python tools/compare_algorithms.py --skip-train       # re-aggregate runs/compare/ into docs/
    python tools/compare_algorithms.py --budget train.steps=120 evaluation.k=8   # change the budget

What it does. For every algorithm A and seed S it runs, as its own subprocess (a crash is reported
in the table, it does not stop the comparison), one after the other by default (`--jobs 2` runs two
at a time):

    python -m megatron_papo.train --config examples/tiny_<A>.yaml train.seed=S \\
        logging.dir=<out>/<A>/seed<S> logging.progress_bar=false <budget overrides>

The budget overrides are the same list for every run; only the config file (the algorithm preset:
`algorithm.name` and the `loss:` coefficients / DAPO filter it implies) differs. The tool checks
this on the resolved `config.yaml` of every run and writes the keys that differ into the results.
Each run is: the tiny CLIP-ViT + GPT VLM built from seed S, `train.sft_warmup_steps` supervised
warm-start steps (identical for every algorithm at a given seed: it gives a policy that sometimes
answers right, so RL has a signal), then `train.steps` RL steps of the algorithm, then one
evaluation on the first `evaluation.num_prompts` prompts of the easy-VQA **test** split.

What it measures (read from each run's metrics.jsonl):
- eval accuracy avg@k, original images: for each test prompt, k responses are sampled
  (evaluation.temperature, default 1.0; top_p 1.0; the sampling seed depends on the run's seed only);
  a response scores 1 if the answer in its last \\boxed{} equals the ground truth (the training
  reward's accuracy check), else 0. avg@k = the mean over all prompts x k responses, i.e. the
  mean over prompts of (correct responses / k). It is not pass@k.
- eval accuracy avg@k, masked images: the same prompts and k with the image patch-masked
  (14x14-pixel cells blacked out with probability 0.6, as in training; one fixed mask per prompt).
- masked gap = accuracy(original) - accuracy(masked): how much the answers depend on the image.
- final training reward: the mean of "reward/mean" (0.9 accuracy + 0.1 format, over the step's
  rollouts) over the last 5 RL steps.
- eval format: the share of eval responses in the <think>...</think> \\boxed{} format.
- wall time of each run (the subprocess, start-up and evaluation included).
Per algorithm: mean +- sample standard deviation (n-1) over the seeds whose run finished, and the
per-seed values; "vs <first algorithm>" columns give the paired per-seed differences (same seed =
same initial model, warm start and eval prompts).

Outputs: `<out>/<A>/seed<S>/` (train.log, run.json, metrics.jsonl, config.yaml, training.png),
`<out>/compare.json` (how the runs were made), the markdown report (--results) and the PNG
(--plot). Numbers are written as they come out: every seed is reported, failed runs included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_papo.plotting import (  # noqa: E402
    MetricsFileError,
    eval_metrics,
    load_rows,
    mean_std,
    plot_comparison,
    plot_training,
    rl_rows,
    series,
)

DEFAULT_ALGOS = ("grpo", "papo_g", "papo_d")
FINAL_REWARD_WINDOW = 5
# Chosen so that 3 algorithms x 3 seeds take about 20 minutes on 2 CPU cores (docs/RESULTS.md).
DEFAULT_BUDGET = (
    "train.sft_warmup_steps=80", "train.sft_batch_size=32", "train.sft_lr=1e-3",
    "train.steps=80", "train.lr=2e-4",
    "rollout.prompts_per_step=8", "train.update_prompts=8", "rollout.n=4", "train.micro_batch_size=8",
    "rollout.max_new_tokens=8",
    "evaluation.num_prompts=256", "evaluation.k=4",
    "data.limit=6000", "logging.tensorboard=false",
)
QUICK_BUDGET = (
    "train.sft_warmup_steps=4", "train.sft_batch_size=8", "train.steps=3", "train.lr=2e-4",
    "rollout.prompts_per_step=4", "train.update_prompts=4", "rollout.n=2", "train.micro_batch_size=4",
    "rollout.max_new_tokens=8", "evaluation.num_prompts=8", "evaluation.k=2",
    "data.limit=400", "logging.tensorboard=false",
)
# Keys every run sets itself (they differ by design); the config check ignores them.
PER_RUN_KEYS = ("train.seed", "logging.dir", "logging.progress_bar")


# ----------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One training run of the comparison."""

    algo: str
    seed: int
    run_dir: Path
    command: list[str]


@dataclass
class RunRecord:
    """What happened when a run was launched (written to <run_dir>/run.json)."""

    algo: str
    seed: int
    command: str
    returncode: int | None = None
    wall_s: float | None = None
    started: str = ""
    error: str = ""
    code: str = ""
    """Fingerprint of the source the run used (`code_fingerprint`), taken when it started."""


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


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """key=value lists merged in order (a later key wins, first position kept)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise SystemExit(f"--budget: expected key=value, got {item!r}")
            merged[key.strip()] = value
    return [f"{k}={v}" for k, v in merged.items()]


def budget_overrides(quick: bool, extra: Sequence[str]) -> list[str]:
    """The overrides every run gets: the default (or quick) budget, then --budget."""
    budget = merge_overrides(QUICK_BUDGET if quick else DEFAULT_BUDGET, extra)
    clash = [b for b in budget if b.partition("=")[0] in (*PER_RUN_KEYS, "algorithm.name")]
    if clash:
        raise SystemExit(f"--budget may not set {clash}: the tool sets them per run")
    return budget


def shown_path(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (the runs' working directory)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_spec(algo: str, seed: int, out: Path, budget: Sequence[str]) -> RunSpec:
    run_dir = out / algo / f"seed{seed}"
    command = [sys.executable, "-m", "megatron_papo.train", "--config", f"examples/tiny_{algo}.yaml",
               f"train.seed={seed}", f"logging.dir={shown_path(run_dir)}", "logging.progress_bar=false",
               *budget]
    return RunSpec(algo=algo, seed=seed, run_dir=run_dir, command=command)


def display_command(command: Sequence[str]) -> str:
    """The command as a shell line, with `python` for the interpreter."""
    return shlex.join(["python", *command[1:]])


def child_env(jobs: int) -> dict[str, str]:
    """Environment of a run: with several jobs at once, the cores are split between them."""
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def launch(spec: RunSpec, jobs: int, timeout_s: float | None) -> RunRecord:
    """Run one training subprocess (output to <run_dir>/train.log); never raises for a failed run."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    rec = RunRecord(algo=spec.algo, seed=spec.seed, command=display_command(spec.command),
                    started=datetime.now(UTC).isoformat(timespec="seconds"), code=code_fingerprint())
    t0 = time.perf_counter()
    with (spec.run_dir / "train.log").open("w") as log:
        try:
            proc = subprocess.run(spec.command, cwd=ROOT, env=child_env(jobs), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            rec.returncode = proc.returncode
        except subprocess.TimeoutExpired:
            rec.error = f"timed out after {timeout_s:.0f} s"
        except OSError as e:
            rec.error = f"could not start: {e}"
    rec.wall_s = round(time.perf_counter() - t0, 1)
    if rec.returncode not in (0, None) and not rec.error:
        rec.error = f"exit code {rec.returncode}: {last_error_line(spec.run_dir / 'train.log')}"
    (spec.run_dir / "run.json").write_text(json.dumps(asdict(rec), indent=1))
    return rec


def code_fingerprint() -> str:
    """sha256 (12 hex) of megatron_papo/**/*.py and examples/*.yaml as they are on disk now, plus
    the git commit: runs started while someone edits the trainer show up as different versions."""
    import hashlib

    h = hashlib.sha256()
    files = sorted([*(ROOT / "megatron_papo").rglob("*.py"), *(ROOT / "examples").glob("*.yaml")])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return f"{h.hexdigest()[:12]} (git {git_commit()})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def last_error_line(log: Path) -> str:
    """The last line of a log that looks like an error (else its last non-empty line)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["(empty log)"])[-1][:300]


def run_all(specs: Sequence[RunSpec], jobs: int, timeout_s: float | None) -> list[RunRecord]:
    """Launch every run (`jobs` at a time), printing one line per finished run."""
    done: list[RunRecord] = []

    def one(spec: RunSpec) -> RunRecord:
        rec = launch(spec, jobs, timeout_s)
        done.append(rec)
        state = "ok" if rec.returncode == 0 else f"FAILED ({rec.error})"
        print(f"[{len(done)}/{len(specs)}] {spec.algo} seed {spec.seed}: {state}, {rec.wall_s:.0f} s",
              flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, specs))


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


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N per algorithm (default 3)")
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="comma list (default grpo,papo_g,papo_d)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="run folders (default runs/compare)")
    p.add_argument("--quick", action="store_true", help="tiny budget: a smoke test of the whole pipeline")
    p.add_argument("--budget", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for every run, on top of the default (or --quick) budget")
    p.add_argument("--results", type=Path, default=Path("docs/RESULTS.md"), help="markdown report")
    p.add_argument("--plot", type=Path, default=Path("docs/results_comparison.png"), help="comparison PNG")
    p.add_argument("--skip-train", action="store_true", help="only re-aggregate the runs under --out")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; 2 splits the cores)")
    p.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before a run is killed")
    p.add_argument("--note", default=None,
                   help="text added to the report under a heading that says a person wrote it (kept in "
                        "<out>/compare.json, so --skip-train keeps it)")
    return p.parse_args(argv)


def resolve(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


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


def relative_link(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    argv_text = shlex.join(["python", "tools/compare_algorithms.py", *elide_note(given)])
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    for a in algos:
        if not (ROOT / "examples" / f"tiny_{a}.yaml").is_file():
            raise SystemExit(f"--algos: no examples/tiny_{a}.yaml")
    out, results_md, plot = resolve(args.out), resolve(args.results), resolve(args.plot)
    specs = [run_spec(a, s, out, budget_overrides(args.quick, args.budget))
             for a in algos for s in range(1, args.seeds + 1)]
    info = prepare_info(args, argv_text, specs, out)
    if not args.skip_train:
        t0 = time.perf_counter()
        run_all(specs, args.jobs, args.run_timeout)
        info["total_wall_s"] = round(time.perf_counter() - t0, 1)
        (out / "compare.json").write_text(json.dumps(info, indent=1))
    results = [collect_run(s.algo, s.seed, s.run_dir) for s in specs]
    info["config_differences"] = config_differences([s.run_dir for s in specs])
    info["shared_settings"] = shared_settings([s.run_dir for s in specs])
    plotted = plot_runs(results, out, plot)
    plot_rel = relative_link(plot, results_md.parent) if plotted else None
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(render_markdown(results, info, plot_rel))
    print("\n".join(summary_table(results)))
    print(f"report: {results_md}\nplot:   {plot if plotted else '(none: no run finished)'}")
    return 0 if any(r.ok for r in results) else 1


def elide_note(argv: Sequence[str]) -> list[str]:
    """argv with the --note text replaced by "..." (the note is printed in its own section)."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("...")
            skip = False
        elif a == "--note":
            out.append(a)
            skip = True
        else:
            out.append("--note=..." if a.startswith("--note=") else a)
    return out


def prepare_info(args: argparse.Namespace, argv_text: str, specs: Sequence[RunSpec],
                 out: Path) -> dict[str, Any]:
    """How the runs are (or were) made: from <out>/compare.json with --skip-train, else fresh."""
    fresh = {"tool_command": argv_text, "budget": budget_overrides(args.quick, args.budget),
             "commands": [display_command(s.command) for s in specs], "jobs": args.jobs,
             "machine": machine_info(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
             "note": args.note}
    saved = out / "compare.json"
    if args.skip_train and saved.is_file():
        info = json.loads(saved.read_text())
        info["aggregate_command"] = argv_text
        if args.note is not None:
            info["note"] = args.note
            saved.write_text(json.dumps(info, indent=1))
        return info
    if args.skip_train:
        fresh["aggregate_command"] = argv_text
        fresh["tool_command"] = f"(runs under {out} made without compare.json; budget below is assumed)"
    out.mkdir(parents=True, exist_ok=True)
    return fresh


if __name__ == "__main__":
    sys.exit(main())
