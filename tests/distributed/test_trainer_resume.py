"""Save at step k, kill the process, resume: the metrics of the steps after k equal the
uninterrupted run's. Runs the real CLI (`python -m megatron_papo.train`) in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
TOTAL = 6  # 2 warm-start steps + 4 RL steps
OVERRIDES = ["train.sft_warmup_steps=2", "train.sft_batch_size=8", "train.steps=4",
             "rollout.prompts_per_step=4", "train.update_prompts=4", "rollout.n=4",
             "rollout.max_new_tokens=6",
             "train.micro_batch_size=8", "data.limit=300", "evaluation.interval=-1",
             "logging.progress_bar=false", "logging.tensorboard=false", "train.lr=3e-4",
             "checkpoint.save_interval=3", "checkpoint.keep_last=5"]


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_papo.train", "--config", "examples/tiny_papo_g.yaml", *OVERRIDES,
            f"logging.dir={run / 'logs'}", f"checkpoint.dir={run / 'ckpt'}", *extra]


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _latest_step(ckpt: Path) -> int:
    latest = ckpt / "latest"
    if not latest.exists():
        return 0
    return int(latest.read_text().strip().rsplit("_", 1)[-1])


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_cmd(full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    crashed = tmp_path / "crashed"
    # started with --resume-or-start on an empty checkpoint dir: a first run simply starts fresh
    proc = subprocess.Popen(_cmd(crashed, "--resume-or-start"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_step(crashed / "ckpt") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a hard crash somewhere after the step-3 checkpoint
    proc.wait()
    killed_at = _latest_step(crashed / "ckpt")
    assert 3 <= killed_at < TOTAL, f"the run was not interrupted mid-way (latest checkpoint {killed_at})"

    subprocess.run(_cmd(crashed, "--resume"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    a, b = _rows(full), _rows(crashed)
    keys = ["sft_nll", "reward/mean", "reward/accuracy", "pg_loss", "kl_prcp", "entropy_orig", "entropy_mask",
            "loss", "response_length", "grad_norm"]
    for step in range(1, TOTAL + 1):  # before the kill (fresh start) and after it (resumed)
        present = [k for k in keys if k in a[step]]
        assert len(present) >= (1 if step <= 2 else 9), (step, sorted(a[step]))
        for k in present:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-7), (step, k)
    assert _latest_step(crashed / "ckpt") == TOTAL
    # each step once: the rows the killed run logged after its checkpoint were dropped on resume
    steps = [json.loads(x)["step"] for x in (crashed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == sorted(set(steps)), steps
