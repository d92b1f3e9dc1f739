"""Shared bootstrap of the conversion / parity CLIs: process groups for --tp/--pp, one line of
output per rank 0, exit codes (0 ok, 1 check failed, 2 bad input)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def init(tp: int, pp: int):
    """Process groups for a tp x pp layout. Without torchrun (one process) only tp = pp = 1 works."""
    from megatron_papo.distributed import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise SystemExit(f"error: --tp {tp} x --pp {pp} = {tp * pp} does not divide the {world} processes; "
                         f"run under torchrun --nproc-per-node {tp * pp}")
    return init_distributed(tp, pp, 1, seed=1234)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
