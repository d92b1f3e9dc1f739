"""tools/warmstart_curve.py end to end at a tiny budget: an eval row at step 0 and every --every
steps, the text-only floor of the evaluated prompts (recomputed here from the package), the
markdown table and the plot; a bad override is one error line, exit 2."""

import json
import os
import subprocess
import sys

import pytest

from megatron_papo.data.easy_vqa import text_only_accuracy
from tests.unit.test_launch_lint import ROOT


def test_curve_rows_floor_table_and_plot(tmp_path):
    cmd = [sys.executable, "tools/warmstart_curve.py", "--config", "examples/quickstart_papo_g.yaml",
           "--steps", "4", "--every", "2", "--out", str(tmp_path), "--results", str(tmp_path / "W.md"),
           "--plot", str(tmp_path / "w.png"), "data.limit=200", "train.sft_batch_size=8",
           "evaluation.num_prompts=6", "evaluation.k=2", "model.num_layers=1", "logging.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "curve.json").read_text())
    assert [r["step"] for r in result["rows"]] == [0, 2, 4]
    assert result["rows"][-1]["sft_seconds"] > result["rows"][1]["sft_seconds"] > 0
    assert result["floors"]["text_only_eval_prompts"] == pytest.approx(text_only_accuracy(num_prompts=6))
    table = (tmp_path / "W.md").read_text()
    assert "| 4 |" in table and "Text-only floor" in table
    assert (tmp_path / "w.png").stat().st_size > 5_000


def test_bad_override_is_one_error_line(tmp_path):
    cmd = [sys.executable, "tools/warmstart_curve.py", "--config", "examples/quickstart_papo_g.yaml",
           "--out", str(tmp_path), "train.sft_lr=-1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.sft_lr" in proc.stderr and "Traceback" not in proc.stderr
