"""tools/gpu_acceptance.sh --dry-run: the GPU acceptance script's own logic on CPU (every stage at
toy sizes in fp32: RL steps + checkpoint + resume of both tiny models, the op benchmark, the update
step benchmark, the planner), its table, and its exit codes."""

import subprocess

import pytest

from tests.unit.test_launch_lint import ROOT

pytestmark = pytest.mark.slow


def test_dry_run_prints_a_full_passing_table(tmp_path):
    out = subprocess.run(["bash", "tools/gpu_acceptance.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "acceptance.md").read_text()
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and line.endswith(("PASS |", "FAIL |"))]
    stages = [r.split("|")[1].strip() for r in rows]
    assert stages.count("a") == 2 and stages.count("c") == 3 and stages.count("d") == 2 and "b" in stages
    assert all(r.endswith("PASS |") for r in rows), table
    assert "tiny_vlm: steps [1, 2]" in table and "tiny_qwen: steps [1, 2]" in table  # run + resumed step
    assert "| algorithm | step s | tokens/s |" in table and "| variant | tp | T | H | V_local |" in table
    assert "from hidden states, linear: fwd+bwd" in table


def test_wrong_arguments_exit_2():
    out = subprocess.run(["bash", "tools/gpu_acceptance.sh", "--bogus"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
    out = subprocess.run(["bash", "tools/gpu_acceptance.sh"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # a real run on a machine without CUDA: refused before any stage
    assert out.returncode == 2 and "no CUDA device visible" in out.stderr
