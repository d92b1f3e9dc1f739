"""Distributed bootstrap: the torch.distributed world, megatron-core's parallel state, and a
:class:`ProcessGroups` bundle that the rest of the code receives explicitly.

    pg = init_distributed(tp=2, pp=1, cp=1)       # under torchrun (or any initialised world)
    log_probs = vocab_parallel_log_probs(logits, target, pg.tp)   # megatron_papo.ops
    destroy_distributed()

Backends: nccl when CUDA is available, else gloo (then megatron-core's CPU patches are applied,
see mcore_compat.apply_cpu_patches). Launch with torchrun; a plain ``python -m ...`` without
torchrun also works for tp=pp=cp=1: a single-process gloo world is created on the spot.

Rank layout is megatron-core's (order "tp-cp-ep-dp-pp"): tensor-parallel ranks are adjacent,
then context, data, and pipeline outermost.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_papo.compat import mcore_compat
from megatron_papo.config import ConfigError

__all__ = [
    "ProcessGroups",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "init_distributed",
    "init_distributed_from_config",
    "is_rank_zero",
]

_OWNS_DEFAULT_GROUP = False  # init_distributed created the default group (destroy_distributed ends it)


@dataclass(frozen=True)
class ProcessGroups:
    """The process groups of one rank and its coordinates in the parallel layout.

    A group is None in a single-process run (``ProcessGroups.single_process()``); collectives
    on a None group are skipped by callers (every size is 1 there).
    """

    world: dist.ProcessGroup | None = field(repr=False)
    """All ranks (the default group)."""
    tp: dist.ProcessGroup | None = field(repr=False)
    """Tensor parallel: ranks holding shards of the same layers (vocab-parallel logits)."""
    pp: dist.ProcessGroup | None = field(repr=False)
    """Pipeline parallel: the stages of one model replica."""
    cp: dist.ProcessGroup | None = field(repr=False)
    """Context parallel: ranks holding shards of the same sequences."""
    dp: dist.ProcessGroup | None = field(repr=False)
    """Data parallel (without context parallel): replicas seeing different samples."""
    dp_cp: dist.ProcessGroup | None = field(repr=False)
    """Data x context parallel: reduce over it for global means over tokens."""
    mp: dist.ProcessGroup | None = field(repr=False)
    """Model parallel (tensor x pipeline): ranks of one model replica."""
    embd: dist.ProcessGroup | None = field(repr=False)
    """First and last pipeline stages (tied embeddings); None on ranks outside it."""
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_cp_rank: int = 0
    dp_cp_size: int = 1
    vpp_size: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule), None without interleaving."""
    is_first_pp_stage: bool = True
    is_last_pp_stage: bool = True

    @classmethod
    def single_process(cls) -> ProcessGroups:
        """No torch.distributed at all: every group None, every size 1, every rank 0."""
        return cls(world=None, tp=None, pp=None, cp=None, dp=None, dp_cp=None, mp=None, embd=None)

    @classmethod
    def from_parallel_state(cls) -> ProcessGroups:
        """Read megatron-core's (initialised) parallel_state for the calling rank."""
        from megatron.core import parallel_state as ps

        embd = ps.get_embedding_group(check_initialized=False)
        if embd is not None and dist.get_rank() not in dist.get_process_group_ranks(embd):
            embd = None
        return cls(
            world=dist.group.WORLD,
            tp=ps.get_tensor_model_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            cp=ps.get_context_parallel_group(),
            dp=ps.get_data_parallel_group(with_context_parallel=False),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
            mp=ps.get_model_parallel_group(),
            embd=embd,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=False),
            dp_size=ps.get_data_parallel_world_size(with_context_parallel=False),
            dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            dp_cp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
            vpp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
            is_first_pp_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
            is_last_pp_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _init_default_group(backend: str, timeout: datetime.timedelta, model_parallel: int) -> None:
    """Create the default process group from torchrun's environment, or a single-process one."""
    global _OWNS_DEFAULT_GROUP
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # torchrun (or any launcher exporting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1))
    elif model_parallel == 1:
        # No launcher: one rank, gloo, an in-memory store (no port to pick or collide on).
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        raise RuntimeError(
            f"tp*pp*cp = {model_parallel} needs at least {model_parallel} processes, but no "
            "torch.distributed world exists and RANK/WORLD_SIZE are unset: launch with "
            f"`torchrun --nproc-per-node {model_parallel} ...`")
    _OWNS_DEFAULT_GROUP = True


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, *, vpp: int | None = None,
                     backend: str | None = None, timeout_s: float = 1800,
                     seed: int | None = 1234) -> ProcessGroups:
    """Initialise torch.distributed and megatron-core's parallel state; return this rank's groups.

    Args:
        tp, pp, cp: tensor-, pipeline- and context-parallel sizes; the data-parallel size is
            ``world_size // (tp * pp * cp)``.
        vpp: virtual pipeline stages per rank (interleaved 1F1B), None for none.
        backend: "nccl" or "gloo"; None picks nccl when CUDA is available, else gloo.
        timeout_s: collective timeout in seconds, of the default group (when created here) and of
            every megatron-core group (its ``distributed_timeout_minutes``, fractional).
        seed: seeds python, numpy and torch, then megatron-core's model-parallel RNG tracker
            (``model_parallel_cuda_manual_seed``); None leaves every RNG alone.

    The default group is reused if one exists (e.g. created by a test harness); otherwise it is
    created from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or,
    with no such environment and tp=pp=cp=1, as a single-process gloo world. On GPU the device
    is set from LOCAL_RANK. On CPU megatron-core's CPU patches are applied. An existing
    megatron-core parallel state is torn down and rebuilt with the new sizes.

    Raises:
        ValueError: non-positive sizes, or world size not divisible by tp*pp*cp.
    """
    for name, size in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(f"vpp={vpp} needs vpp >= 1 and pp >= 2 (got pp={pp})")
    model_parallel = tp * pp * cp
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    else:
        mcore_compat.apply_cpu_patches()
    if not dist.is_initialized():
        _init_default_group(backend, datetime.timedelta(seconds=timeout_s), model_parallel)

    world_size = dist.get_world_size()
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = "
            f"{model_parallel}; choose sizes whose product divides the number of ranks")

    mcore_compat.import_megatron_core()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_s / 60,  # megatron-core: timedelta(minutes=...)
    )
    if seed is not None:
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed)
        except ImportError:
            pass
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroups.from_parallel_state()


def init_distributed_from_config(parallel: Any, *, seed: int | None = 1234,
                                 backend: str | None = None) -> ProcessGroups:
    """`init_distributed` with the sizes and the collective timeout of a `config.ParallelConfig`
    (parallel.tp/pp/cp/vpp, parallel.collective_timeout_s).

    Also runs the config's cross-section check against the actual world size first, so a
    layout that does not fit the launched ranks stops with the config's own message.
    """
    world = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    mp = parallel.tp * parallel.pp * parallel.cp
    if world % mp:
        raise ConfigError(f"world size {world} is not divisible by parallel.tp*pp*cp = "
                          f"{parallel.tp}*{parallel.pp}*{parallel.cp} = {mp}")
    return init_distributed(parallel.tp, parallel.pp, parallel.cp, vpp=parallel.vpp, backend=backend,
                            timeout_s=parallel.collective_timeout_s, seed=seed)


def destroy_distributed() -> None:
    """Tear down megatron-core's parallel state, and the default group if init_distributed made it."""
    global _OWNS_DEFAULT_GROUP
    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if _OWNS_DEFAULT_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_DEFAULT_GROUP = False


def is_rank_zero() -> bool:
    """True on global rank 0, and when torch.distributed is not initialised."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Barrier over ``group`` (default: all ranks); a no-op without torch.distributed."""
    if dist.is_initialized():
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Return ``obj`` from rank ``src`` (a global rank) on every rank of ``group`` (picklable objects).

    Without torch.distributed, or on a one-rank group, returns ``obj`` unchanged.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
