#!/usr/bin/env python
"""Held-out accuracy against supervised warm-start steps: the curve that sizes the quickstart's
warm start (docs/WARMSTART.md).

    python tools/warmstart_curve.py --config examples/quickstart_papo_g.yaml --steps 600 --every 50
    python tools/warmstart_curve.py --config examples/quickstart_papo_g.yaml --steps 600 --every 50 \\
        --seeds 1 2 3 --results docs/WARMSTART.md --plot docs/warmstart_curve.png
    python tools/warmstart_curve.py --config ... --steps 200 --every 50 model.hidden_size=96  # any override

What it does. For each seed, in this process (one rank), it builds the run of the config exactly
as ``python -m megatron_papo.train`` would (same model init, same warm-start slice of the training
data, same ``train.sft_*`` settings), runs ``--steps`` warm-start steps (the trainer's own
``sft_step``) and, at step 0 and every ``--every`` steps, runs the trainer's held-out evaluation
(``evaluation.*`` of the config: the first ``num_prompts`` test prompts, ``k`` samples each at
``evaluation.temperature``, original and patch-masked images). No RL step is run.

Reference lines: the text-only floor, the accuracy of answering each test question with the most
frequent training answer of its question text (``megatron_papo.data.easy_vqa.text_only_accuracy``,
measured on the same prompts and on the whole test split; it needs ``data.eval`` = easy_vqa:test).

Outputs: ``<out>/curve.json`` (every point, the command, the machine), and with ``--results`` /
``--plot`` a markdown table and a PNG (the floor drawn as a dashed line). Exit 0, or 2 for a bad
config (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_papo.config import load_config  # noqa: E402
from megatron_papo.errors import exit_on_user_error  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True,
                   help="the run's YAML (its train.sft_* and evaluation.* are used)")
    p.add_argument("--steps", type=int, default=600, help="warm-start steps to run (default 600)")
    p.add_argument("--every", type=int, default=50, help="evaluate every N steps (and at step 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="train.seed values, one curve each")
    p.add_argument("--out", default="runs/warmstart_curve", help="folder for curve.json")
    p.add_argument("--results", default=None, help="write the markdown table here")
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be >= 1")
    return args


def curve_for_seed(config: str, overrides: list[str], seed: int, steps: int,
                   every: int) -> list[dict[str, Any]]:
    """Warm-start ``steps`` steps of the config at ``train.seed=seed``; an eval row at step 0 and
    every ``every`` steps: {step, seconds (warm-start time so far), eval/...}."""
    from megatron_papo.distributed import destroy_distributed, init_distributed_from_config
    from megatron_papo.training.evaluation import evaluate
    from megatron_papo.training.parts import build_parts
    from megatron_papo.training.trainer import sft_step

    cfg = load_config(config, [*overrides, f"train.seed={seed}", f"train.sft_warmup_steps={steps}",
                               "logging.progress_bar=false"])
    pg = init_distributed_from_config(cfg.parallel, seed=cfg.train.seed)
    try:
        parts = build_parts(cfg, pg)
        rows, spent, nll = [], 0.0, float("nan")
        for step in range(steps + 1):
            if step % every == 0 or step == steps:
                t0 = time.perf_counter()
                ev = evaluate(parts, cfg, pg)
                rows.append({"seed": seed, "step": step, "sft_seconds": spent, "sft_nll": nll,
                             "eval_seconds": time.perf_counter() - t0, **ev})
                print(json.dumps(rows[-1]), flush=True)
            if step < steps:
                t0 = time.perf_counter()
                nll = float(sft_step(parts, cfg, pg, step).get("sft_nll", float("nan")))
                spent += time.perf_counter() - t0
        return rows
    finally:
        destroy_distributed()


def floors(config: str, overrides: list[str]) -> dict[str, float]:
    """The text-only floor on the evaluated prompts and on the whole eval split (easy-VQA only)."""
    from megatron_papo.data.easy_vqa import text_only_accuracy

    cfg = load_config(config, overrides)
    out: dict[str, Any] = {"num_prompts": cfg.evaluation.num_prompts, "k": cfg.evaluation.k}
    if not (cfg.data.eval.startswith("easy_vqa") and cfg.data.train.startswith("easy_vqa")):
        return out
    ev, tr = cfg.data.eval, cfg.data.train
    on_prompts = text_only_accuracy(ev, cfg.evaluation.num_prompts, prior_source=tr)
    return {**out, "text_only_eval_prompts": on_prompts,
            "text_only_split": text_only_accuracy(ev, 0, prior_source=tr)}


def markdown(result: dict[str, Any]) -> str:
    """The curve as a table: mean (min-max) over seeds at each step."""
    rows = result["rows"]
    k = result["floors"].get("k", 4)
    acc, msk = f"eval/accuracy@{k}", f"eval/accuracy_masked@{k}"
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Seeds: {', '.join(map(str, seeds))}. "
             f"Eval: the first {result['floors'].get('num_prompts')} test prompts, avg@{k} at the "
             "config's evaluation temperature; masked = the same prompts with patch-masked images.", "",
             f"Text-only floor (majority training answer per question text): "
             f"{result['floors'].get('text_only_eval_prompts', float('nan')):.3f} on these prompts, "
             f"{result['floors'].get('text_only_split', float('nan')):.3f} on the whole test split.", "",
             "| warm-start steps | accuracy (original) | accuracy (masked) | masked gap | last SFT NLL | "
             "warm-start seconds |", "|---|---|---|---|---|---|"]

    def cell(vals: list[float], fmt: str = ".3f") -> str:
        mean = sum(vals) / len(vals)
        return f"{mean:{fmt}}" if len(vals) == 1 else f"{mean:{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

    for step in sorted({r["step"] for r in rows}):
        at = [r for r in rows if r["step"] == step]
        gap = [r[acc] - r.get(msk, float("nan")) for r in at]
        masked = cell([r.get(msk, float("nan")) for r in at])
        lines.append(f"| {step} | {cell([r[acc] for r in at])} | {masked} "
                     f"| {cell(gap)} | {cell([r['sft_nll'] for r in at], '.4f')} | "
                     f"{cell([r['sft_seconds'] for r in at], '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy (original, masked) per seed against warm-start steps; the text-only floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["floors"].get("k", 4)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for seed in sorted({r["seed"] for r in result["rows"]}):
        at = [r for r in result["rows"] if r["seed"] == seed]
        steps = [r["step"] for r in at]
        ax.plot(steps, [r[f"eval/accuracy@{k}"] for r in at], "-o", ms=3, color="C0",
                label="original images" if seed == result["seeds"][0] else None)
        if f"eval/accuracy_masked@{k}" in at[0]:
            ax.plot(steps, [r[f"eval/accuracy_masked@{k}"] for r in at], "--s", ms=3, color="C1",
                    label="masked images" if seed == result["seeds"][0] else None)
    if "text_only_eval_prompts" in result["floors"]:
        ax.axhline(result["floors"]["text_only_eval_prompts"], color="k", ls=":",
                   label=f"text-only floor ({result['floors']['text_only_eval_prompts']:.3f})")
    ax.set_xlabel("warm-start steps")
    ax.set_ylabel(f"held-out accuracy avg@{k}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_config(args.config, args.overrides)  # a bad config: one error line before any work
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows += curve_for_seed(args.config, args.overrides, seed, args.steps, args.every)
    result = {"command": shlex.join(["python", "tools/warmstart_curve.py", *(argv or sys.argv[1:])]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"Python {platform.python_version()}",
              "seeds": args.seeds, "floors": floors(args.config, args.overrides), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=1))
    if args.results:
        Path(args.results).write_text(markdown(result))
    if args.plot:
        plot(result, args.plot)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
