"""Run a function on N gloo ranks, each a real process, and collect what each returns.

    results = run_distributed(fn, world_size=2, args=(x,))   # results[r] = fn(r, 2, x) on rank r

Ranks are non-daemonic (like torchrun's), so they may start processes of their own, as
megatron-core's checkpoint writer does; they are killed on every exit path of `run_distributed`.
`fn` must be importable by name (a module-level function) because ranks are started with the
"spawn" method. Each rank joins a real `torch.distributed` gloo group over loopback before `fn`
runs and leaves it afterwards. An exception on any rank is re-raised here with that rank's
traceback; a rank that hangs is killed after `timeout` seconds.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out; the message carries each failing rank's traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, threads: int,
            out: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        out.put((rank, True, _to_bytes(result)))
    except BaseException:  # report everything, including assertion failures
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()


def _to_bytes(obj: Any) -> bytes:
    """A result as bytes (torch.save): tensors then travel by value, not through shared memory
    that disappears when the rank exits before the parent has read them."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
                    timeout: float = 300.0, threads_per_rank: int = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; return per-rank results.

    Results travel back by pickling, so return CPU tensors or plain Python values.
    Raises DistributedTestError if any rank raises, exits early or exceeds `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), threads_per_rank, out),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) + len(errors) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise DistributedTestError(f"timed out after {timeout:.0f}s; finished ranks: "
                                           f"{sorted(results)}, failed: {sorted(errors)}")
            try:
                rank, ok, payload = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None) and r not in results
                        and r not in errors]
                for r in dead:
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} before reporting"
                if errors and not any(p.is_alive() for p in procs):
                    break
                continue
            (results if ok else errors)[rank] = _from_bytes(payload) if ok else payload
            if errors:  # peers of a failed rank usually block in a collective: stop waiting
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise DistributedTestError(f"{len(errors)} of {world_size} ranks failed:\n{msg}")
    return [results[r] for r in range(world_size)]
