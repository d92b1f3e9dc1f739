"""Entry point: `python -m megatron_papo.train --config examples/<name>.yaml [key=value ...] [--resume]`.

Works as one process on a CPU and under torchrun for several ranks
(`torchrun --nproc-per-node 2 -m megatron_papo.train --config ... parallel.tp=2`).

`--save-init DIR` writes the freshly initialised model as a distributed checkpoint and exits;
runs started with `checkpoint.init_weights=DIR` then share those weights under any TP/PP layout.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from megatron_papo.cli import Command, Flag, parse_cli
from megatron_papo.compat.runtime_checks import check_runtime
from megatron_papo.distributed import destroy_distributed, init_distributed_from_config, is_rank_zero
from megatron_papo.errors import exit_on_user_error, report_user_error

COMMAND = Command(
    prog="python -m megatron_papo.train",
    summary=("Train a vision-language policy with GRPO / DAPO / PAPO-G / PAPO-D: an optional supervised\n"
             "warm start, then RL steps (rollout, rewards, group advantages, patch masking, no-grad\n"
             "passes, the PAPO update), checkpoints, and held-out evaluation with original and masked\n"
             "images. One process on a CPU, or several ranks under torchrun (tensor, pipeline, context\n"
             "parallel). Writes metrics.jsonl, TensorBoard events, training.png, config.yaml and\n"
             "megatron-core distributed checkpoints."),
    flags=(Flag("--resume", "continue from the newest checkpoint under checkpoint.dir (none there: error)"),
           Flag("--resume-or-start", "like --resume, but start fresh when checkpoint.dir has no checkpoint"),
           Flag("--resume-allow-changes", "like --resume, and continue although loss / model / data / "
                "algorithm / seed fields differ from the checkpoint's config (each is logged)"),
           Flag("--save-init", "write the freshly initialised model as a checkpoint to DIR and exit "
                "(runs with checkpoint.init_weights=DIR then share it under any layout)", "DIR")))


@exit_on_user_error  # a config / data / checkpoint mistake: "error: <message>", exit 2 (errors.py)
def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check the runtime, initialise the process groups, train, print the summary."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_cli(sys.argv[1:] if argv is None else argv, COMMAND)
    cfg = args.config
    try:  # TE / FP8 / vLLM asked for but missing: stop before any process group or model exists
        check_runtime(cfg)
    except (ImportError, RuntimeError, ValueError) as e:
        return report_user_error(e)
    from megatron_papo.plotting import plot_training  # heavy (megatron-core): after the CLI
    from megatron_papo.training.checkpointing import save_checkpoint  # heavy (megatron-core): after the CLI
    from megatron_papo.training.metrics import read_metrics, summarize  # heavy (megatron-core): after the CLI
    from megatron_papo.training.optim import NonFiniteTrainingError  # heavy (megatron-core): after the CLI
    from megatron_papo.training.parts import build_parts  # heavy (megatron-core): after the CLI
    from megatron_papo.training.trainer import train  # heavy (megatron-core): after the CLI

    pg = init_distributed_from_config(cfg.parallel, seed=cfg.train.seed)
    if args.flags.get("--save-init"):
        parts = build_parts(cfg, pg)
        path = save_checkpoint(str(args.flags["--save-init"]), 0, parts.model_chunks, None,
                               {"step": 0, "phase": "init"}, pg, keep_last=1)
        if is_rank_zero():
            print(f"initial weights: {path}")
        destroy_distributed()
        return 0
    try:
        result = train(cfg, pg)
    except NonFiniteTrainingError as e:  # the run's own verdict, not a crash: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        destroy_distributed()
        return 1
    if is_rank_zero():
        rows = read_metrics(result.metrics_path) if result.metrics_path.exists() else []
        rl_rows = [r for r in rows if "reward/mean" in r]
        print("\n== run summary ==")
        print(summarize(rl_rows, ["reward/mean", "reward/accuracy", "reward/format", "kl_prcp",
                                  "entropy_orig", "entropy_mask", "pg_clipfrac", "step_time"]))
        for k, v in result.eval_metrics.items():
            print(f"{k:28s} {v:.4f}")
        plot = plot_training(result.metrics_path, result.run_dir / "training.png") if rows else None
        print(f"metrics:    {result.metrics_path}")
        print(f"plot:       {plot or '(no metrics)'}")
        print(f"tensorboard: {result.run_dir / 'tensorboard'}")
        print(f"checkpoint: {result.checkpoint or '(none: set checkpoint.dir)'}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
