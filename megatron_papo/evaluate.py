"""Entry point: held-out accuracy (avg@k) of a checkpoint with original and with patch-masked images.

    python -m megatron_papo.evaluate --config examples/tiny_papo_g.yaml [--checkpoint DIR] [key=value ...]

The numbers come from :func:`megatron_papo.training.evaluation.evaluate` (what the trainer calls
at its evaluation interval); this module is only the command line around it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from megatron_papo.cli import Command, Flag, parse_cli
from megatron_papo.distributed import destroy_distributed, init_distributed_from_config, is_rank_zero
from megatron_papo.errors import exit_on_user_error

COMMAND = Command(
    prog="python -m megatron_papo.evaluate",
    summary=("Evaluate a policy on the held-out split (data.eval): accuracy avg@k (evaluation.k samples\n"
             "per prompt) with the original images and with patch-masked images, their gap (how much\n"
             "the policy relies on the image) and the format reward. Prompts are split over\n"
             "data-parallel ranks. Without --checkpoint, checkpoint.dir is read."),
    flags=(Flag("--checkpoint", "checkpoint root or step folder to evaluate (default: checkpoint.dir)",
                "DIR"),
           Flag("--random-init", "evaluate the freshly initialised model (no checkpoint: a baseline)")))


@exit_on_user_error  # a config / data / checkpoint mistake: "error: <message>", exit 2 (errors.py)
def main(argv: Sequence[str] | None = None) -> int:
    """Build the model, load a checkpoint (optional), evaluate, print the numbers."""
    args = parse_cli(sys.argv[1:] if argv is None else argv, COMMAND)
    cfg = args.config
    from megatron_papo.training.checkpointing import (  # heavy (megatron-core): after the CLI
        CheckpointError,
        load_checkpoint,
    )
    from megatron_papo.training.evaluation import evaluate  # heavy (megatron-core): after the CLI
    from megatron_papo.training.parts import build_parts  # heavy (megatron-core): after the CLI

    pg = init_distributed_from_config(cfg.parallel, seed=cfg.train.seed)
    parts = build_parts(cfg, pg)
    ckpt = args.flags.get("--checkpoint") or cfg.checkpoint.dir
    if not ckpt and not args.flags.get("--random-init"):
        raise CheckpointError("nothing to evaluate: pass --checkpoint DIR or set checkpoint.dir (or "
                              "--random-init to score the untrained model on purpose)")
    if ckpt:
        if load_checkpoint(ckpt, parts.ddp_chunks, None, pg, load_optimizer=False, load_rng=False) is None:
            raise CheckpointError(f"no checkpoint found under {ckpt}")
    out = evaluate(parts, cfg, pg)
    if is_rank_zero():
        for k, v in out.items():
            print(f"{k:28s} {v:.4f}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
