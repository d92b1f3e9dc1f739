"""Non-finite updates are never applied: a NaN gradient skips the update (grads zeroed, weights and
Adam moments untouched, lr schedule not advanced), is counted, stops the run after
train.max_consecutive_nonfinite steps in a row, and no checkpoint is ever written from NaN weights."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_papo.config import load_config
from megatron_papo.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from megatron_papo.training.optim import NonFiniteTrainingError
from megatron_papo.training.parts import build_parts
from megatron_papo.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, **over):
    args = {"train.steps": 6, "train.sft_warmup_steps": 0, "train.lr": 1e-3, "train.update_prompts": 2,
            "train.micro_batch_size": 4, "rollout.prompts_per_step": 2, "rollout.n": 2,
            "rollout.max_new_tokens": 4, "model.num_layers": 1, "data.limit": 64,
            "evaluation.interval": -1, "checkpoint.dir": str(tmp_path / "ckpt"),
            "checkpoint.save_interval": 1, "checkpoint.keep_last": 0, "logging.dir": str(tmp_path / "run"),
            "logging.tensorboard": False,
            "logging.progress_bar": False, "train.max_consecutive_nonfinite": 3, **over}
    return load_config(str(ROOT / "examples/tiny_papo_g.yaml"), [f"{k}={v}" for k, v in args.items()])


class _PoisonGradients:
    """A gradient hook on one parameter: NaN during the RL steps in ``steps`` (1-based, counted by
    the trainer's own optimizer updates), the true gradient otherwise."""

    def __init__(self, parts, steps):
        self.steps, self.step = set(steps), 0
        self.param = next(p for p in parts.model_chunks[0].parameters() if p.requires_grad)
        self.param.register_hook(lambda g: g * math.nan if self.step in self.steps else g)

    def wrap(self, fn):
        def rl_step(*a, **k):
            self.step += 1
            return fn(*a, **k)
        return rl_step


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_gradient_skips_the_update_counts_it_and_stops_after_the_limit(pg, tmp_path, monkeypatch):
    from megatron_papo.training import trainer

    cfg = _cfg(tmp_path)
    parts = build_parts(cfg, pg)
    poison = _PoisonGradients(parts, steps={2, 4, 5, 6})
    seen = {}
    real_rl_step = trainer.rl_step

    def observed_rl_step(parts_, cfg_, pg_, step):
        before = [p.detach().clone() for p in parts_.model_chunks[0].parameters()]
        lr_steps = parts_.lr_schedule.num_steps
        out = real_rl_step(parts_, cfg_, pg_, step)
        after = list(parts_.model_chunks[0].parameters())
        seen[step + 1] = (all(torch.equal(a, b) for a, b in zip(before, after)),
                          parts_.lr_schedule.num_steps - lr_steps, out["update_skipped"])
        return out

    monkeypatch.setattr(trainer, "rl_step", poison.wrap(observed_rl_step))
    with pytest.raises(NonFiniteTrainingError, match=r"step 6: 3 steps in a row .*nonfinite=3\)"):
        train(cfg, pg, parts)
    # step 2 (isolated) and 4-6: weights untouched, no lr advance, counted; 1, 3: normal updates
    assert seen[2] == (True, 0, 1.0) and seen[4] == (True, 0, 1.0) and seen[6] == (True, 0, 1.0)
    assert seen[1][0] is False and seen[1][1:] == (1, 0.0) and seen[3][1:] == (1, 0.0)
    rows = {r["step"]: r for r in _rows(cfg.logging.dir)}
    assert [rows[s]["nonfinite_grad_steps"] for s in (1, 2, 3, 4, 5, 6)] == [0, 1, 1, 2, 3, 4]
    assert rows[2]["grad_norm"] is None and math.isfinite(rows[3]["grad_norm"])  # NaN is logged as null
    # the Adam moments saw no NaN either, and every checkpoint on disk is finite; none for step 6
    moments = [t for opt in getattr(parts.optimizer, "chained_optimizers", [parts.optimizer])
               for state in opt.optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor)]
    assert moments and all(torch.isfinite(t).all() for t in moments)
    steps_on_disk = sorted(int(d.name.split("_")[1]) for d in Path(cfg.checkpoint.dir).glob("step_*"))
    assert steps_on_disk == [1, 2, 3, 4, 5]
    fresh = build_parts(cfg, pg)
    assert load_checkpoint(cfg.checkpoint.dir, fresh.ddp_chunks, None, pg, load_optimizer=False,
                           load_rng=False) is not None
    assert all(torch.isfinite(p).all() for p in fresh.model_chunks[0].parameters())


def test_no_checkpoint_is_written_from_non_finite_parameters(pg, tmp_path):
    cfg = _cfg(tmp_path)
    parts = build_parts(cfg, pg)
    with torch.no_grad():
        next(parts.model_chunks[0].parameters()).view(-1)[0] = math.inf
    with pytest.raises(CheckpointError, match="non-finite parameters; no checkpoint is written"):
        save_checkpoint(tmp_path / "ck", 1, parts.ddp_chunks, parts.optimizer, {"step": 1}, pg, keep_last=1)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
