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

The run folders are read and the report is written by tools/_compare_report.py (re-exported here);
this file launches the runs and holds the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TOOLS = Path(__file__).resolve().parent  # the sibling _compare_report, also when loaded by file path
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

# Reading run folders and writing the report live in tools/_compare_report.py; every name of it is
# re-exported here (the star import), the ones this file calls are also imported by name.
from _compare_report import *  # noqa: E402, F403
from _compare_report import (  # noqa: E402
    PER_RUN_KEYS,
    collect_run,
    config_differences,
    machine_info,
    plot_runs,
    render_markdown,
    shared_settings,
    summary_table,
)

from megatron_papo.errors import UserError, exit_on_user_error  # noqa: E402  (floor 0: imports nothing)

DEFAULT_ALGOS = ("grpo", "papo_g", "papo_d")
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
    "data.limit=400", "logging.tensorboard=false", "algorithm.max_sampling_rounds=2",
)


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


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """key=value lists merged in order (a later key wins, first position kept)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise UserError(f"--budget: expected key=value, got {item!r}")
            merged[key.strip()] = value
    return [f"{k}={v}" for k, v in merged.items()]


def budget_overrides(quick: bool, extra: Sequence[str]) -> list[str]:
    """The overrides every run gets: the default (or quick) budget, then --budget."""
    budget = merge_overrides(QUICK_BUDGET if quick else DEFAULT_BUDGET, extra)
    clash = [b for b in budget if b.partition("=")[0] in (*PER_RUN_KEYS, "algorithm.name")]
    if clash:
        raise UserError(f"--budget may not set {clash}: the tool sets them per run")
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


def relative_link(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


@exit_on_user_error  # a wrong flag value: "error: <message>", exit 2 (megatron_papo/errors.py)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    argv_text = shlex.join(["python", "tools/compare_algorithms.py", *elide_note(given)])
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    for a in algos:
        if not (ROOT / "examples" / f"tiny_{a}.yaml").is_file():
            raise UserError(f"--algos: no examples/tiny_{a}.yaml")
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
