"""plot_training / plot_comparison on small synthetic metrics.jsonl files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from megatron_papo.plotting import (
    MetricsFileError,
    eval_metrics,
    load_rows,
    mean_std,
    moving_average,
    plot_comparison,
    plot_training,
    rl_step_rows,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, *, sft_steps: int = 3, rl_steps: int = 8, acc: float = 0.5,
              papo: bool = True) -> Path:
    """A metrics.jsonl shaped like the trainer's: warm-start rows, RL rows, one eval row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s + 1, "sft_nll": 2.0 / (s + 1), "phase_sft": 1.0} for s in range(sft_steps)]
    for i in range(rl_steps):
        row = {"step": sft_steps + i + 1, "reward/mean": 0.4 + 0.01 * i, "reward/accuracy": 0.35 + 0.01 * i,
               "reward/format": 1.0, "entropy_orig": 0.3, "entropy_mask": 0.35, "step_time": 1.0}
        if papo:
            row.update({"kl_prcp": 0.01 * i, "kl_prcp_clipfrac": 0.0})
        rows.append(row)
    rows.append({"step": sft_steps + rl_steps, "eval/accuracy@4": acc, "eval/accuracy_masked@4": acc - 0.1,
                 "eval/masked_gap": 0.1, "eval/format": 0.98, "eval/prompts": 16.0})
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_training_writes_png(tmp_path):
    metrics = write_run(tmp_path / "run")
    out = plot_training(metrics, tmp_path / "plots" / "training.png")
    assert_png(out)


def test_plot_training_without_warm_start_or_kl(tmp_path):
    metrics = write_run(tmp_path / "grpo", sft_steps=0, papo=False)
    assert_png(plot_training(metrics.parent, tmp_path / "t.png"))  # a run folder works too


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_metrics_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl"):
        plot_training(path, tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_plot_comparison_writes_png(tmp_path):
    runs = {algo: [write_run(tmp_path / algo / f"seed{s}", acc=0.5 + 0.02 * s) for s in range(3)]
            for algo in ("grpo", "papo_g", "papo_d")}
    assert_png(plot_comparison(runs, tmp_path / "cmp.png"))
    table = {algo: {"accuracy": [0.5, 0.6, 0.55], "accuracy_masked": [0.4, 0.5, 0.45]} for algo in runs}
    assert_png(plot_comparison(runs, tmp_path / "cmp2.png", table, title="synthetic"))


def test_plot_comparison_missing_run_is_a_clear_error(tmp_path):
    runs = {"grpo": [write_run(tmp_path / "a"), tmp_path / "absent"]}
    with pytest.raises(MetricsFileError, match="not found"):
        plot_comparison(runs, tmp_path / "cmp.png")


def test_helpers():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert math.isnan(mean_std([])[0])
    ev = eval_metrics([{"step": 1, "reward/mean": 0.1},
                       {"step": 2, "eval/accuracy@8": 0.7, "eval/accuracy_masked@8": 0.6}])
    assert ev == {"accuracy": 0.7, "accuracy_masked": 0.6, "k": 8.0}


def test_rl_steps_count_from_the_end_of_the_warm_start(tmp_path):
    metrics = write_run(tmp_path / "run", sft_steps=3, rl_steps=4)
    rows = load_rows(metrics)
    assert [r["step"] for r in rl_step_rows(metrics, rows)] == [1, 2, 3, 4]  # from the last sft row
    (tmp_path / "run" / "config.yaml").write_text("train:\n  sft_warmup_steps: 2\n")
    assert [r["step"] for r in rl_step_rows(metrics, rows)] == [2, 3, 4, 5]  # config.yaml wins
