"""tools/compare_algorithms.py: commands, budget, and aggregation of fake run folders (no training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from megatron_papo.errors import UserError

pytest.importorskip("matplotlib")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "compare_algorithms.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_algorithms", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_algorithms"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fake_run(run_dir: Path, algo: str, seed: int, acc: float, *, rewards=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8),
             code: str = "abc (git 123)"):
    run_dir.mkdir(parents=True)
    rows = [{"step": 1, "sft_nll": 0.5, "phase_sft": 1.0}]
    rows += [{"step": 2 + i, "reward/mean": r, "reward/accuracy": r - 0.05, "reward/format": 1.0}
             for i, r in enumerate(rewards)]
    rows.append({"step": 1 + len(rewards), "eval/accuracy@4": acc, "eval/accuracy_masked@4": acc - 0.2,
                 "eval/masked_gap": 0.2, "eval/format": 0.9, "eval/prompts": 16.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"algorithm": {"name": algo}, "train": {"seed": seed, "lr": 2e-4},
           "logging": {"dir": str(run_dir)}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "run.json").write_text(json.dumps({"algo": algo, "seed": seed, "command": "x",
                                                  "returncode": 0, "wall_s": 100.0 + seed, "code": code}))


def test_budget_and_commands_are_identical_across_algorithms(tool, tmp_path):
    budget = tool.budget_overrides(False, ["train.steps=7", "evaluation.k=8"])
    assert "train.steps=7" in budget and "train.steps=80" not in budget and "evaluation.k=8" in budget
    specs = [tool.run_spec(a, 2, tmp_path, budget) for a in ("grpo", "papo_g")]
    tails = [s.command[s.command.index("--config") + 2:] for s in specs]
    assert [t[0] for t in tails] == ["train.seed=2", "train.seed=2"]
    assert tails[0][2:] == tails[1][2:]  # everything after logging.dir is the same
    assert specs[1].command[specs[1].command.index("--config") + 1] == "examples/tiny_papo_g.yaml"
    with pytest.raises(UserError, match="--budget may not set"):
        tool.budget_overrides(False, ["train.seed=3"])
    with pytest.raises(UserError, match="expected key=value"):
        tool.budget_overrides(False, ["no_equals_sign"])


def test_skip_train_aggregates_fake_runs(tool, tmp_path):
    out = tmp_path / "runs"
    for algo, base in (("grpo", 0.5), ("papo_g", 0.6)):
        for seed in (1, 2):
            code = "other (git 456)" if (algo, seed) == ("papo_g", 2) else "abc (git 123)"
            fake_run(out / algo / f"seed{seed}", algo, seed, base + 0.1 * (seed - 1), code=code)
    (out / "papo_g" / "seed3").mkdir(parents=True)  # a crashed run: log + run.json, no metrics
    (out / "papo_g" / "seed3" / "run.json").write_text(json.dumps(
        {"algo": "papo_g", "seed": 3, "command": "x", "returncode": 1, "wall_s": 3.0,
         "error": "exit code 1: RuntimeError: boom"}))
    results, plot = tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "cmp.png"
    rc = tool.main(["--skip-train", "--out", str(out), "--algos", "grpo,papo_g", "--seeds", "3",
                    "--results", str(results), "--plot", str(plot), "--note", "hand-written remark"])
    assert rc == 0
    text = results.read_text()
    assert ("| grpo | 2/3 | 0.550 ± 0.071 | 0.350 ± 0.071 | 0.200 ± 0.000 | 0.600 ± 0.000 | 0.900 ± 0.000 "
            "| 102 ± 1 |") in text
    assert "| papo_g | 2/3 | 0.650 ± 0.071 |" in text
    assert "RuntimeError: boom" in text  # the failed seed is reported, not hidden
    assert "| grpo | 3 | metrics file not found" in text  # so is a missing one
    assert "| papo_g | 2 | 0.100 ± 0.000 |" in text  # paired difference vs grpo
    assert "`algorithm.name`" in text and "`train.lr`" not in text  # config check
    assert "avg@4" in text and "not pass@k" in text
    assert "different source versions" in text and "other (git 456): papo_g/seed2" in text
    assert "## Note from the person who ran the tool\n\nhand-written remark" in text
    assert "--note ..." in text  # the note is not repeated inside the command line
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert (out / "grpo" / "seed1" / "training.png").is_file()


def test_final_reward_is_mean_of_last_five_rl_steps(tool):
    rows = [{"step": i, "reward/mean": float(i)} for i in range(1, 9)] + [{"step": 9, "eval/accuracy@2": 0.1}]
    assert tool.final_reward(rows) == pytest.approx((4 + 5 + 6 + 7 + 8) / 5)
