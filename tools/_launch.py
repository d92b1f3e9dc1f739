"""Shared bootstrap of the conversion / parity CLIs: process groups for --tp/--pp (and --cp for the
parity check), one line of output per rank 0, exit codes (0 ok, 1 check failed, 2 bad input)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def init(tp: int, pp: int, cp: int = 1):
    """Process groups for a tp x pp x cp layout. Without torchrun (one process) only 1 x 1 x 1 works."""
    from megatron_papo.distributed import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    size = tp * pp * cp
    if world % size:
        raise ValueError(f"--tp {tp} x --pp {pp} x --cp {cp} = {size} does not divide the {world} "
                         f"processes; run under torchrun --nproc-per-node {size}")
    return init_distributed(tp, pp, cp, seed=1234)


def fail(message: str, code: int = 2) -> int:
    """``error: <message>`` once per job (megatron_papo.errors.report_user_error); returns ``code``."""
    from megatron_papo.errors import report_user_error

    report_user_error(message)
    return code


if __name__ == "__main__":
    from megatron_papo.cli import helper_module_main

    sys.exit(helper_module_main(__doc__))
