"""A real learning check: on a trivially learnable subset (easy-VQA rows whose answer is "yes"),
PAPO-G after a short warm start raises the training reward. Bad rows mixed into the same file
are skipped and counted, and the run still learns. Also: a bad config stops before any step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_papo.testing.rows import easy_vqa_rows_answered

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def _write_data(tmp: Path) -> Path:
    rows = easy_vqa_rows_answered("yes", 400)
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    rows[10:10] = [
        {"image": str(tmp / "missing.png"), "problem": "is it red?", "answer": "yes"},
        {"image": str(corrupt), "problem": "is it red?", "answer": "yes"},
        {"image": rows[0]["image"], "problem": "is it red?", "answer": ""},
        {"image": rows[0]["image"], "problem": "is it red? " * 200, "answer": "yes"},
    ]
    path = tmp / "yes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_rises_on_trivially_learnable_subset(tmp_path):
    data = _write_data(tmp_path)
    cmd = [sys.executable, "-m", "megatron_papo.train", "--config", "examples/tiny_papo_g.yaml",
           f"data.train={data}", f"data.eval={data}", "train.sft_warmup_steps=20", "train.sft_batch_size=32",
           "train.sft_prompts=100", "train.steps=20", "rollout.prompts_per_step=8", "train.update_prompts=8",
           "rollout.n=4", "rollout.max_new_tokens=8", "train.micro_batch_size=8", "train.lr=3e-4",
           "evaluation.interval=-1", f"logging.dir={tmp_path / 'run'}", "logging.progress_bar=false",
           "logging.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # the four bad rows: skipped, counted by reason, named in the log
    assert "kept 400 of 404 rows; skipped 4" in out, out[-3000:]
    for reason in ("image_not_found", "corrupt_image", "missing_answer", "prompt_too_long"):
        assert reason in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(reward) == 20
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    # measured on the 2-core CI machine: 0.09 -> 0.34; demand a clear rise, not noise
    assert last > first + 0.1, (first, last, reward)
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000


def test_bad_config_stops_before_any_step(tmp_path):
    cmd = [sys.executable, "-m", "megatron_papo.train", "--config", "examples/tiny_grpo.yaml",
           "parallel.tpp=2", f"logging.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'parallel.tpp'; did you mean 'tp'?" in proc.stderr
    assert "examples/tiny_grpo.yaml" in proc.stderr
    assert not (tmp_path / "run").exists()
