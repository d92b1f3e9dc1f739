"""Distributed checkpoints of model + optimizer + trainer state, written atomically and resumable
exactly.

Layout of one checkpoint root::

    root/
      latest                      # name of the newest complete checkpoint ("step_00000040")
      step_00000020/
      step_00000040/
        metadata.json, .metadata, __*.distcp, common.pt   # megatron-core dist_checkpointing (torch_dist)
        checkpoint.json           # step, parallel layout, megatron-core version, format
        trainer_state.json        # the trainer's own JSON state (step, samples, sampler, config)
        rng/rank_{r}.pt           # per-rank python/numpy/torch/CUDA + megatron RNG-tracker states
        manifest.json             # size and sha256 of every file above, written last
      .tmp_step_00000060/         # a save in progress (or a crashed one): never loaded

Atomicity: every rank writes into ``root/.tmp_step_<step>``; after a barrier rank 0 renames it to
``root/step_<step>`` and then replaces ``root/latest`` (temp file + ``os.replace``). A crash at
any point leaves ``latest`` on the previous complete checkpoint.

Sharded state: ``{"model": chunk.sharded_state_dict()}`` (``"model0"``, ``"model1"``, ... for
several chunks, as Megatron-LM) and ``"optimizer": optimizer.sharded_state_dict(model_sd, ...)``
with the ``fully_reshardable`` distributed-optimizer format, so the model (and optimizer) can be
loaded under another TP/PP/DP layout. The RNG states are restored only under the same layout.

Integrity: after every rank has written, the files are hashed (sha256, each rank a share of
them) and rank 0 writes ``manifest.json`` before the rename. :func:`verify_checkpoint` re-reads
them the same way; :func:`load_checkpoint` verifies before it reads (a bit flip, a truncated or a
missing file is a CheckpointError naming the file), and the trainer's resume moves on to the
newest intact checkpoint that ``keep_last`` kept. A checkpoint without a manifest (written
before this format) loads with a warning.

The paths must be on a filesystem that every rank sees.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_papo.compat import mcore_compat
from megatron_papo.distributed import ProcessGroups, barrier
from megatron_papo.errors import UserError
from megatron_papo.ops.groups import collective_device

__all__ = [
    "CheckpointError",
    "checkpoint_path",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
LATEST_FILE = "latest"
META_FILE = "checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
MANIFEST_FILE = "manifest.json"
MCORE_METADATA_FILE = "metadata.json"  # written by megatron-core's dist_checkpointing
TMP_PREFIX = ".tmp_"
OPTIMIZER_METADATA = {
    # gathers DistributedOptimizer state into per-parameter tensors: loadable under any layout
    "distrib_optim_sharding_type": "fully_reshardable",
    # as Megatron-LM: no "chained_{i}." key prefix for several chained optimizers
    "chained_optim_avoid_prefix": True,
}
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_REQUIRED_FILES = (META_FILE, TRAINER_STATE_FILE, MCORE_METADATA_FILE)


class CheckpointError(RuntimeError, UserError):
    """A checkpoint is missing, unfinished or cannot be loaded into this run."""


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------
def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    """``root/step_{step:08d}``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(root) / f"step_{step:08d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _missing_files(ckpt: Path) -> list[str]:
    return [name for name in _REQUIRED_FILES if not (ckpt / name).is_file()]


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest step first (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir()
             if p.is_dir() and (step := _step_of(p)) is not None and not _missing_files(p)]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint that ``root/latest`` names; without a ``latest`` file the complete
    ``step_*`` directory with the highest step; None when there is neither.

    The path returned for ``latest`` is not validated here (:func:`load_checkpoint` does that and
    reports a dangling or partial one).
    """
    root = Path(root)
    latest = root / LATEST_FILE
    if latest.is_file():
        name = latest.read_text().strip()
        if not name:
            raise CheckpointError(f"{latest} is empty")
        return root / name
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def _validate(ckpt: Path, named_by: str) -> Path:
    """Raise CheckpointError unless ``ckpt`` is a complete, published checkpoint directory."""
    if ckpt.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"{ckpt} ({named_by}) is an unfinished checkpoint write "
                              "(a crashed or running save); it is never loaded")
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} ({named_by}) does not exist")
    missing = _missing_files(ckpt)
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} ({named_by}) is partial: missing {', '.join(missing)}")
    return ckpt


def resolve_checkpoint(root_or_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory to load from a root (via ``latest``) or a checkpoint directory.

    Returns None for a root holding no checkpoint. Raises CheckpointError for a missing path, a
    ``latest`` naming a missing/partial checkpoint, or a temporary (``.tmp_*``) directory.
    """
    path = Path(root_or_dir)
    if path.name.startswith(TMP_PREFIX):
        return _validate(path, "given directly")
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if _step_of(path) is not None or (path / META_FILE).exists():
        return _validate(path, "given directly")
    ckpt = find_latest_checkpoint(path)
    if ckpt is None:
        return None
    named_by = f"named by {path / LATEST_FILE}" if (path / LATEST_FILE).is_file() else "newest step_*"
    return _validate(ckpt, named_by)


# ---------------------------------------------------------------------------------------------
# Sharded state dicts
# ---------------------------------------------------------------------------------------------
def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The module under data-parallel wrappers (megatron-core DDP/FSDP, torch DDP), whose generic
    sharded_state_dict would prefix every key with "module." (Float16Module forwards, it stays)."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    while isinstance(chunk, (_BaseDataParallel, torch.nn.parallel.DistributedDataParallel)):
        chunk = chunk.module
    if not hasattr(chunk, "sharded_state_dict"):
        raise TypeError(f"{type(chunk).__name__} has no sharded_state_dict(): pass megatron-core modules")
    return chunk


def _model_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... for several."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    keys = _model_keys(len(model_chunks))
    return {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(keys, model_chunks)}


def _sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Materialise a fresh DistributedOptimizer's state before building its loading state dict.

    With the torch AdamW fallback (no TE/apex) ``DistributedOptimizer.state_dict()`` asserts on an
    optimizer that never stepped (no per-param ``step``), so megatron-core's own dummy-state
    initialiser runs first. It takes a zero-gradient step, which may change the parameters
    (weight decay); they are overwritten by the load. (The matching load patch
    ``distopt_load_torch_adamw`` is applied by ``mcore_compat.apply_cpu_patches``.)
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in _sub_optimizers(optimizer):
        if isinstance(sub, DistributedOptimizer) and sub.optimizer is not None and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def _sharded_state_dict(model_chunks: list[torch.nn.Module], optimizer: Any | None, *,
                        is_loading: bool) -> dict[str, Any]:
    model_sd = _model_sharded_state_dict(model_chunks)
    state = dict(model_sd)
    if optimizer is not None:
        if is_loading:
            _prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=dict(OPTIMIZER_METADATA))
    return state


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------
def _rng_tracker() -> Any:
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU, CUDA and megatron RNG-tracker states."""
    import numpy as np

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in _rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    _rng_tracker().set_states(dict(state["tracker"]))


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RNG_DIR / f"rank_{rank}.pt"


# ---------------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + os.replace."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _layout(pg: ProcessGroups) -> dict[str, int]:
    return {"world_size": pg.world_size, "tp": pg.tp_size, "pp": pg.pp_size, "cp": pg.cp_size,
            "dp": pg.dp_size, "vpp": pg.vpp_size or 1}


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final`` (an older ``final`` is replaced)."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _storage_error(e: OSError) -> bool:
    """A fault of the storage the user can fix (full disk or quota, no permission, read-only)."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _latest_name(root: Path) -> str:
    try:
        latest = find_latest_checkpoint(root)
    except CheckpointError:
        latest = None
    return f"the newest checkpoint is still {latest}" if latest is not None else "no checkpoint was written"


def _prune(root: Path, keep_last: int, keep: Path) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (never ``keep``) and leftover
    temporary directories of crashed saves. ``keep_last <= 0`` keeps every checkpoint."""
    removed = []
    for leftover in root.glob(f"{TMP_PREFIX}step_*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    return removed


def _check_finite_parameters(model_chunks: list[torch.nn.Module], pg: ProcessGroups, step: int) -> None:
    """CheckpointError on every rank if any rank holds a non-finite parameter (one all-reduce)."""
    flags = [torch.isfinite(p.detach()).all() for chunk in model_chunks for p in chunk.parameters()]
    ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
    ok = ok.to(device=collective_device(pg.world), dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size(pg.world) > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=pg.world)
    if not bool(ok):
        raise CheckpointError(f"step {step}: the model holds non-finite parameters; no checkpoint is written "
                              "(the newest checkpoint on disk is the last finite one)")


def _sha256(path: Path, block: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _shared_work(items: list[Any], fn: Any, pg: ProcessGroups) -> dict[str, Any]:
    """``{key: value}`` of ``fn(item) -> (key, value)`` over ``items``, each rank doing every
    world_size-th item, merged on every rank (one all_gather_object over ``pg.world``)."""
    world = dist.get_world_size(pg.world) if dist.is_initialized() else 1
    rank = dist.get_rank(pg.world) if dist.is_initialized() else 0
    mine = dict(fn(item) for item in items[rank::world])
    if world == 1:
        return mine
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=pg.world)
    return {k: v for part in gathered for k, v in part.items()}


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _write_manifest(ckpt: Path, pg: ProcessGroups) -> None:
    """Hash every file of ``ckpt`` (collective: each rank a share) and write the manifest (rank 0)."""
    digests = _shared_work(_files(ckpt),
                           lambda p: (p.relative_to(ckpt).as_posix(), [p.stat().st_size, _sha256(p)]), pg)
    if pg.rank == 0:
        (ckpt / MANIFEST_FILE).write_text(json.dumps({"sha256": dict(sorted(digests.items()))}, indent=1))


def verify_checkpoint(ckpt: str | os.PathLike, pg: ProcessGroups) -> str | None:
    """Collective over ``pg.world``: None when every file the manifest lists is there with its
    size and sha256; else the first problem ("<file>: missing" / "size ..." / "sha256 differs" /
    "manifest unreadable"). A checkpoint without a manifest (an older format) passes with a warning."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST_FILE
    if not manifest.is_file():
        warnings.warn(f"checkpoint {ckpt} has no {MANIFEST_FILE} (written before integrity manifests): "
                      "loaded unverified", stacklevel=2)
        return None
    try:
        listed = json.loads(manifest.read_text())["sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"{manifest}: unreadable ({e})"

    def check(item: tuple[str, list[Any]]) -> tuple[str, str | None]:
        name, (size, digest) = item
        path = ckpt / name
        if not path.is_file():
            return name, f"{path}: missing"
        if path.stat().st_size != size:
            return name, f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
        return name, None if _sha256(path) == digest else f"{path}: sha256 differs from the manifest"

    problems = _shared_work(sorted(listed.items()), check, pg)
    bad = [problems[name] for name in sorted(problems) if problems[name] is not None]
    return bad[0] if bad else None


def save_checkpoint(root: str | os.PathLike, step: int, model_chunks: list[torch.nn.Module],
                    optimizer: Any | None, trainer_state: dict[str, Any], pg: ProcessGroups, *,
                    keep_last: int) -> Path:
    """Save a checkpoint of ``step`` under ``root``; collective over all ranks. Returns its path.

    Args:
        root: checkpoint root (``CheckpointConfig.dir``), on a filesystem shared by all ranks.
        step: training step the checkpoint is taken after; the directory is ``step_{step:08d}``.
        model_chunks: this rank's model chunks (megatron-core modules, DDP-wrapped or not).
        optimizer: megatron-core optimizer from ``optim.build_optimizer``, or None (model only).
        trainer_state: JSON-serialisable dict (step, consumed samples, sampler state, config);
            rank 0's copy is written.
        pg: this rank's process groups (``pg.world`` for the barriers; the layout is recorded).
        keep_last: keep the newest ``keep_last`` checkpoints (the one just written always
            stays); ``<= 0`` keeps all.
    """
    _check_finite_parameters(model_chunks, pg, step)
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    trainer_json = json.dumps(trainer_state, indent=2)  # fails on every rank alike, before any collective
    meta_json = json.dumps({"format_version": FORMAT_VERSION, "step": step, "layout": _layout(pg),
                            "megatron_core": str(mcore_compat.MCORE_VERSION),
                            "optimizer": None if optimizer is None else dict(OPTIMIZER_METADATA)}, indent=2)
    try:
        if pg.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # empty: megatron-core warns about a non-empty target
        barrier(pg.world)
        state = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
        with mcore_compat.sync_save_in_process():  # no Manager process to orphan on SIGKILL
            mcore_compat.dist_ckpt_save(state, tmp, content_metadata=dict(OPTIMIZER_METADATA))
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), _rng_file(tmp, pg.rank))
        if pg.rank == 0:
            (tmp / TRAINER_STATE_FILE).write_text(trainer_json)
            (tmp / META_FILE).write_text(meta_json)
        barrier(pg.world)  # every rank has finished writing into tmp
        _write_manifest(tmp, pg)  # last: it covers every file above
    except BaseException as e:  # nothing half-written stays behind; `latest` still names the last good one
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and _storage_error(e):
            raise CheckpointError(f"could not write checkpoint {final.name} under {root} ({e}); its partial "
                                  f"files were removed, {_latest_name(root)}") from e
        raise

    if pg.rank == 0:
        _publish(tmp, final)
        _write_atomic(root / LATEST_FILE, final.name + "\n")
        _prune(root, keep_last, keep=final)
    barrier(pg.world)
    return final


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def _load_rng(ckpt: Path, meta: dict[str, Any], pg: ProcessGroups) -> bool:
    """Restore this rank's RNG states if the checkpoint was written under the same layout."""
    if meta.get("layout") != _layout(pg):
        warnings.warn(f"checkpoint {ckpt} was saved with layout {meta.get('layout')}, this run has "
                      f"{_layout(pg)}: RNG states are not restored", stacklevel=3)
        return False
    path = _rng_file(ckpt, pg.rank)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no RNG state for rank {pg.rank} ({path})")
    set_rng_state(torch.load(path, weights_only=False))  # our own file: python/numpy states are pickled
    return True


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (step, phase, sampler, config) saved in one ``step_*`` directory
    (read as is: :func:`verify_checkpoint` first when the checkpoint may be damaged)."""
    path = Path(ckpt) / TRAINER_STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({e})") from e


def _load_mismatch(e: BaseException) -> str | None:
    """The first reason of a checkpoint/model mismatch raised by a distributed load (megatron-core's
    CheckpointingException, possibly wrapped per rank in torch's CheckpointException); None for
    any other exception (it keeps its traceback)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return _load_mismatch(inner) or str(inner).strip().splitlines()[-1]
        return str(e).strip().splitlines()[-1]
    if isinstance(e, CheckpointingException):
        return str(e).strip().splitlines()[-1]
    return None


def load_checkpoint(root_or_dir: str | os.PathLike, model_chunks: list[torch.nn.Module],
                    optimizer: Any | None, pg: ProcessGroups, *, load_optimizer: bool = True,
                    load_rng: bool = True, verify: bool = True) -> dict[str, Any] | None:
    """Load a checkpoint into ``model_chunks`` (and ``optimizer``); collective over all ranks.

    Args:
        root_or_dir: a checkpoint root (its ``latest`` is followed) or one ``step_*`` directory.
        model_chunks: this rank's model chunks; the TP/PP layout may differ from the saved one
            (megatron-core reshards).
        optimizer: megatron-core optimizer, or None.
        load_optimizer: restore the optimizer state (else only the model; the optimizer's main
            parameters are refreshed from the loaded model).
        load_rng: restore this rank's RNG states (skipped with a warning under another layout).
        verify: check every file against the manifest first (:func:`verify_checkpoint`); False
            when the caller has just done so.

    Returns:
        The saved trainer state, or None when ``root_or_dir`` holds no checkpoint.

    Raises:
        CheckpointError: missing path, ``latest`` naming a missing or partial checkpoint, a
            temporary (``.tmp_*``) directory, a file that fails the integrity check, or a
            checkpoint without optimizer state when ``load_optimizer`` is requested.
    """
    ckpt = resolve_checkpoint(root_or_dir)
    if ckpt is None:
        return None
    problem = verify_checkpoint(ckpt, pg) if verify else None
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")
    meta = json.loads((ckpt / META_FILE).read_text())
    with_optimizer = optimizer is not None and load_optimizer
    if with_optimizer and meta.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {ckpt} holds no optimizer state; pass load_optimizer=False")

    state = _sharded_state_dict(model_chunks, optimizer if with_optimizer else None, is_loading=True)
    try:
        loaded = mcore_compat.dist_ckpt_load(state, ckpt)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        reason = _load_mismatch(e)
        if reason is None:
            raise
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: {reason} (was it saved from "
                              "another model.* config? the layout may differ, the shapes may not)") from e
    with torch.no_grad():  # DistributedOptimizer's fp32 main params are views of the leaf params
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
            _unwrap(chunk).load_state_dict(loaded[key])
        if with_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
        elif optimizer is not None:
            optimizer.reload_model_params()  # bf16: copy the loaded weights into the fp32 main params
    if load_rng:
        _load_rng(ckpt, meta, pg)
    trainer_state = read_trainer_state(ckpt)
    barrier(pg.world)
    return trainer_state
