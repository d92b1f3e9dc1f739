"""checkpointing: exact resume of model + optimizer + RNG on 2 gloo ranks (dp=2, distributed
optimizer), crash leftovers and pruning, TP=2 -> TP=1 resharding of model and optimizer; path
resolution and error messages in-process.

One spawned run does all multi-process checks (a spawn costs ~10 s, a save ~3-5 s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_papo.distributed import ProcessGroups
from megatron_papo.testing import run_distributed
from megatron_papo.training.checkpointing import (
    TRAINER_STATE_FILE,
    CheckpointError,
    _prune,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)

_TRAIN = dict(lr=1e-2, weight_decay=0.1, grad_clip=0.5, warmup_steps=3)


# ---------------------------------------------------------------------------------------------
# multi-process
# ---------------------------------------------------------------------------------------------
def _seed_data_streams(rank: int) -> None:
    """Per-rank python/torch streams and megatron's tracker (dropout), as a trainer would seed."""
    import random

    from megatron.core import tensor_parallel

    random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    tensor_parallel.model_parallel_cuda_manual_seed(200 + rank)


def _setup(tp: int, seed: int, dropout: float = 0.0):
    from megatron_papo.config import ParallelConfig, TrainConfig
    from megatron_papo.training.optim import LrSchedule, build_optimizer
    from tests.optim_ckpt_models import tiny_gpt

    train = TrainConfig(**_TRAIN)
    ddp, opt = build_optimizer([tiny_gpt(tp=tp, seed=seed, dropout=dropout)], train,
                               ParallelConfig(tp=tp, use_distributed_optimizer=True))
    return ddp, opt, LrSchedule.from_config(train)


def _train(ddp, opt, schedule, steps: int, tokens: torch.Tensor | None = None) -> list[float]:
    """``steps`` updates; batches drawn from torch's global RNG unless ``tokens`` is given."""
    from tests.optim_ckpt_models import random_tokens, train_step

    return [train_step(ddp, opt, schedule, random_tokens(2) if tokens is None else tokens)[0]
            for _ in range(steps)]


def _params(ddp) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ddp[0].parameters()]


def _resume_exactly(rank: int, root: Path) -> dict:
    """dp=2: 4 uninterrupted steps vs 2 steps + save + fresh (other init) model + load + 2 steps."""
    from megatron_papo.distributed import init_distributed
    from megatron_papo.training.checkpointing import save_checkpoint

    out: dict = {}
    pg = init_distributed(tp=1)
    ddp, opt, sched = _setup(1, seed=42, dropout=0.1)
    _seed_data_streams(rank)
    out["full"] = _train(ddp, opt, sched, 4)
    out["full_params"] = _params(ddp)

    ddp, opt, sched = _setup(1, seed=42, dropout=0.1)
    _seed_data_streams(rank)
    first = _train(ddp, opt, sched, 2)
    t = time.perf_counter()
    save_checkpoint(root, 2, ddp, opt, {"step": 2, "schedule": sched.state_dict(), "losses": first}, pg,
                    keep_last=1)
    out["save_s"] = time.perf_counter() - t
    if rank == 0:  # a crashed save of step 3: never loaded, latest unchanged
        (root / ".tmp_step_00000003" / "rng").mkdir(parents=True)
    torch.manual_seed(999)  # a fresh process would not have this RNG state

    ddp, opt, sched = _setup(1, seed=7, dropout=0.1)
    out["latest_with_leftover"] = str(find_latest_checkpoint(root))
    t = time.perf_counter()
    state = load_checkpoint(root, ddp, opt, pg)
    out["load_s"] = time.perf_counter() - t
    sched.load_state_dict(state["schedule"])
    out["state"] = state
    out["resumed"] = _train(ddp, opt, sched, 2)
    out["resumed_params"] = _params(ddp)
    save_checkpoint(root, 4, ddp, opt, {"step": 4}, pg, keep_last=1)  # prunes step 2 and the leftover
    out["after_prune"] = sorted(p.name for p in root.iterdir())
    return out


def _reshard_tp2_to_tp1(rank: int, root: Path) -> dict:
    """Save at TP=2 (dp=1) after one step; load at TP=1 (dp=2) into other weights: same logits,
    and the next step (optimizer state resharded) gives the same model as at TP=2."""
    from megatron_papo.distributed import init_distributed
    from megatron_papo.training.checkpointing import save_checkpoint
    from tests.optim_ckpt_models import lm_loss, logits, random_tokens

    tokens = random_tokens(2, torch.Generator().manual_seed(5))  # same batch on every rank
    out: dict = {}
    pg = init_distributed(tp=2)
    ddp, opt, sched = _setup(2, seed=42)
    _train(ddp, opt, sched, 1, tokens)
    save_checkpoint(root, 1, ddp, opt, {"step": 1, "schedule": sched.state_dict()}, pg, keep_last=2)
    out["tp2_logits"] = logits(ddp[0], tokens)
    _train(ddp, opt, sched, 1, tokens)
    with torch.no_grad():
        out["tp2_next_loss"] = lm_loss(ddp[0], tokens).item()

    pg = init_distributed(tp=1)
    ddp, opt, sched = _setup(1, seed=7)
    out["other_logits"] = logits(ddp[0], tokens)
    load_checkpoint(root, ddp, opt, pg, load_optimizer=False, load_rng=False)
    out["tp1_model_only_logits"] = logits(ddp[0], tokens)
    ddp, opt, sched = _setup(1, seed=7)
    with pytest.warns(UserWarning, match="RNG states are not restored"):
        state = load_checkpoint(root, ddp, opt, pg)
    sched.load_state_dict(state["schedule"])
    _train(ddp, opt, sched, 1, tokens)
    with torch.no_grad():
        out["tp1_next_loss"] = lm_loss(ddp[0], tokens).item()
    return out


def _all_checks(rank: int, world: int, root: str) -> dict:
    return {"resume": _resume_exactly(rank, Path(root) / "resume"),
            "reshard": _reshard_tp2_to_tp1(rank, Path(root) / "reshard")}


@pytest.mark.slow
def test_checkpoint_resume_atomicity_and_resharding(tmp_path):
    results = run_distributed(_all_checks, 2, args=(str(tmp_path),))
    for rank, out in enumerate(results):
        res = out["resume"]
        # exact resume: steps 3-4 and the final weights equal the uninterrupted run
        assert res["state"] == results[0]["resume"]["state"]  # written by rank 0
        assert res["state"]["step"] == 2 and res["state"]["losses"] == results[0]["resume"]["full"][:2]
        assert max(abs(a - b) for a, b in zip(res["resumed"], res["full"][2:])) < 1e-6, (res, rank)
        diff = max((p - q).abs().max().item() for p, q in zip(res["resumed_params"], res["full_params"]))
        assert diff < 1e-6, diff
        assert res["latest_with_leftover"].endswith("step_00000002")
        assert res["after_prune"] == ["latest", "step_00000004"]

        rs = out["reshard"]
        tp2 = torch.cat([results[0]["reshard"]["tp2_logits"], results[1]["reshard"]["tp2_logits"]], -1)
        assert (rs["other_logits"] - tp2).abs().max() > 1e-2  # the fresh model really differed
        assert (rs["tp1_model_only_logits"] - tp2).abs().max() < 1e-5
        assert abs(rs["tp1_next_loss"] - rs["tp2_next_loss"]) < 1e-5
    # dp ranks saw different data, so the RNG restore was per rank
    assert results[0]["resume"]["full"] != results[1]["resume"]["full"]
    print({k: round(results[0]["resume"][k], 2) for k in ("save_s", "load_s")})


# ---------------------------------------------------------------------------------------------
# in-process: paths, resolution, errors, pruning (no collectives reached)
# ---------------------------------------------------------------------------------------------
def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    ckpt = checkpoint_path(root, step)
    ckpt.mkdir(parents=True)
    for name in ("checkpoint.json", TRAINER_STATE_FILE) + (("metadata.json",) if complete else ()):
        (ckpt / name).write_text(json.dumps({"step": step}))
    return ckpt


def test_resolution_and_clear_errors(tmp_path):
    pg = ProcessGroups.single_process()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", [], None, pg)
    assert load_checkpoint(tmp_path, [], None, pg) is None  # an empty root: nothing to resume
    assert find_latest_checkpoint(tmp_path / "nope") is None

    one, two = _fake_checkpoint(tmp_path, 1), _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 3, complete=False)
    (tmp_path / ".tmp_step_00000004").mkdir()
    assert list_checkpoints(tmp_path) == [one, two]
    assert find_latest_checkpoint(tmp_path) == two  # no `latest`: newest complete step_*
    assert resolve_checkpoint(one) == one  # a checkpoint directory given directly

    (tmp_path / "latest").write_text("step_00000001\n")
    assert resolve_checkpoint(tmp_path) == one
    (tmp_path / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointError, match=r"step_00000009 \(named by .*latest\) does not exist"):
        load_checkpoint(tmp_path, [], None, pg)
    (tmp_path / "latest").write_text("step_00000003")
    with pytest.raises(CheckpointError, match=r"partial: missing metadata\.json"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text(".tmp_step_00000004")
    with pytest.raises(CheckpointError, match="unfinished checkpoint write"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="unfinished"):
        resolve_checkpoint(tmp_path / ".tmp_step_00000004")


def test_prune_keeps_newest_and_the_one_just_written(tmp_path):
    ckpts = [_fake_checkpoint(tmp_path, s) for s in (1, 2, 3, 4)]
    (tmp_path / ".tmp_step_00000005").mkdir()
    _prune(tmp_path, keep_last=2, keep=ckpts[0])  # e.g. step 1 re-saved after resuming from it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000003", "step_00000004"]
    _prune(tmp_path, keep_last=0, keep=ckpts[3])  # 0 keeps all
    assert len(list_checkpoints(tmp_path)) == 3
