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

from megatron_papo.cli import parse_cli
from megatron_papo.config import ConfigError, save_config
from megatron_papo.distributed import destroy_distributed, init_distributed_from_config, is_rank_zero
from megatron_papo.metrics import read_metrics, summarize
from megatron_papo.runtime_checks import check_runtime


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_papo.trainer import train

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        args = parse_cli(sys.argv[1:] if argv is None else argv, extra_flags=("--save-init",))
    except ConfigError as e:  # stop before anything starts, with the config's own message
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cfg = args.config
    try:  # TE / FP8 / vLLM asked for but missing: stop before any process group or model exists
        check_runtime(cfg)
    except (ImportError, RuntimeError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    pg = init_distributed_from_config(cfg.parallel, seed=cfg.train.seed)
    if args.flags.get("--save-init"):
        from megatron_papo.checkpointing import save_checkpoint
        from megatron_papo.trainer import build_parts

        parts = build_parts(cfg, pg)
        path = save_checkpoint(str(args.flags["--save-init"]), 0, parts.model_chunks, None,
                               {"step": 0, "phase": "init"}, pg, keep_last=1)
        if is_rank_zero():
            print(f"initial weights: {path}")
        destroy_distributed()
        return 0
    if is_rank_zero():
        from pathlib import Path

        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.logging.dir) / "config.yaml")
    result = train(cfg, pg)
    if is_rank_zero():
        rows = read_metrics(result.metrics_path) if result.metrics_path.exists() else []
        rl_rows = [r for r in rows if "reward/mean" in r]
        print("\n== run summary ==")
        print(summarize(rl_rows, ["reward/mean", "reward/accuracy", "reward/format", "kl_prcp",
                                  "entropy_orig", "entropy_mask", "pg_clipfrac", "step_time"]))
        for k, v in result.eval_metrics.items():
            print(f"{k:28s} {v:.4f}")
        from megatron_papo.plotting import plot_training

        plot = plot_training(result.metrics_path, result.run_dir / "training.png") if rows else None
        print(f"metrics:    {result.metrics_path}")
        print(f"plot:       {plot or '(no metrics)'}")
        print(f"tensorboard: {result.run_dir / 'tensorboard'}")
        print(f"checkpoint: {result.checkpoint or '(none: set checkpoint.dir)'}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
