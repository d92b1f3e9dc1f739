"""The README's main command: torchrun with 2 ranks runs the self-check and it passes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def test_readme_commands():
    readme = (ROOT / "README.md").read_text()
    assert "torchrun --nproc-per-node 2 -m megatron_papo.selfcheck" in readme
    main = "pip install -e . && python -m megatron_papo.train --config examples/quickstart_papo_g.yaml"
    assert main in readme
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r'pip install -e "\.\[dev\]" && (python -m pytest -q)', readme)
    assert test_cmd and test_cmd.group(1) in ci.splitlines()


def test_selfcheck_under_torchrun_two_ranks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "megatron_papo.selfcheck"]
    proc = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "self-check PASSED" in proc.stdout
    assert "GPT PAPO loss, tp=2 vs tp=1" in proc.stdout
