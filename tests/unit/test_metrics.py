"""Step-metric reduction and the JSONL/TensorBoard logger."""

import math

import pytest
import torch

from megatron_papo.training.metrics import (
    MetricsLogger,
    combine_update_metrics,
    read_metrics,
    reduce_step_metrics,
    summarize,
)


def test_token_weighted_means_and_extremes():
    mbs = [
        {"kl_prcp": torch.tensor(1.0), "ratio_max": torch.tensor(1.5), "ratio_min": torch.tensor(0.9),
         "num_tokens": torch.tensor(10.0)},
        {"kl_prcp": torch.tensor(4.0), "ratio_max": torch.tensor(1.2), "ratio_min": torch.tensor(0.7),
         "num_tokens": torch.tensor(30.0)},
    ]
    out = reduce_step_metrics(mbs)
    assert out["kl_prcp"] == pytest.approx((10 * 1 + 30 * 4) / 40)
    assert out["ratio_max"] == pytest.approx(1.5) and out["ratio_min"] == pytest.approx(0.7)
    assert out["num_tokens"] == 40
    assert reduce_step_metrics([]) == {}


def test_unweighted_without_token_counts():
    out = reduce_step_metrics([{"reward": torch.tensor(1.0)}, {"reward": torch.tensor(0.0)}])
    assert out["reward"] == pytest.approx(0.5)


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path / "run", tensorboard=True)
    log.log(1, {"reward": 0.5, "kl_prcp": float("nan")})
    log.log(2, {"reward": 0.75})
    log.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl_prcp"] is None and rows[1]["reward"] == 0.75
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    text = summarize(rows, ["reward"], window=1)
    assert "reward" in text and "0.5000" in text and "0.7500" in text


def test_resume_appends_and_disabled_writes_nothing(tmp_path):
    MetricsLogger(tmp_path, tensorboard=False).log(1, {"a": 1.0})
    MetricsLogger(tmp_path, tensorboard=False, resume=True).log(2, {"a": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    MetricsLogger(tmp_path / "other", enabled=False).log(1, {"a": 1.0})
    assert not (tmp_path / "other").exists()
    assert math.isnan(reduce_step_metrics([{"x": torch.tensor(1.0), "num_tokens": torch.tensor(0.0)}])["x"])


def test_sum_mode_adds_shares_and_keeps_constants():
    mbs = [{"kl_prcp": torch.tensor(0.25), "gamma": torch.tensor(0.02), "num_tokens": torch.tensor(5.0)},
           {"kl_prcp": torch.tensor(0.5), "gamma": torch.tensor(0.02), "num_tokens": torch.tensor(15.0)}]
    out = reduce_step_metrics(mbs, mode="sum")
    assert out["kl_prcp"] == pytest.approx(0.75) and out["num_tokens"] == 20
    assert out["gamma"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="mode"):
        reduce_step_metrics(mbs, mode="mean")


def test_a_fresh_run_moves_an_earlier_metrics_file_aside_never_deletes_it(tmp_path, capsys):
    MetricsLogger(tmp_path, tensorboard=False).log(1, {"a": 1.0})
    MetricsLogger(tmp_path, tensorboard=False).log(1, {"a": 2.0})
    MetricsLogger(tmp_path, tensorboard=False).log(1, {"a": 3.0})
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl.prev-1")] == [1.0]
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl.prev-2")] == [2.0]
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3.0]
    assert f"moved to {tmp_path / 'metrics.jsonl.prev-2'}" in capsys.readouterr().out


def test_a_fresh_run_moves_every_file_of_an_earlier_run_aside_under_one_number(tmp_path, capsys):
    from megatron_papo.training.metrics import move_earlier_run_aside

    for name in ("metrics.jsonl", "config.yaml", "training.png"):
        (tmp_path / name).write_text(name)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "config.yaml.prev-1").write_text("older still")  # n=1 is taken by one of them
    moved = move_earlier_run_aside(tmp_path)
    assert sorted(p.name for p in moved) == ["config.yaml.prev-2", "metrics.jsonl.prev-2",
                                             "tensorboard.prev-2", "training.png.prev-2"]
    assert (tmp_path / "config.yaml.prev-1").read_text() == "older still"
    assert (tmp_path / "training.png.prev-2").read_text() == "training.png"
    assert not (tmp_path / "config.yaml").exists() and move_earlier_run_aside(tmp_path) == []
    assert f"moved to {tmp_path / 'tensorboard.prev-2'}" in capsys.readouterr().out


def test_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path, capsys):
    """A run killed after logging steps 3 and 4 (and half a line) but checkpointed at step 2:
    resuming from step 2 keeps rows 1-2, so each step appears once."""
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4):
        log.log(step, {"a": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "a"')
    MetricsLogger(tmp_path, tensorboard=False, resume=True, resume_step=2).log(3, {"a": 30.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["a"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert "dropped 3 row(s) past step 2" in capsys.readouterr().out


def test_counts_are_summed_not_averaged():
    """Kept / dropped groups and parse failures are counts: two micro-batches (or ranks) of 3 and
    1 kept groups make 4, whatever the token weights; a mean beside them stays token-weighted."""
    mbs = [{"filter/kept_groups": torch.tensor(3.0), "reward/parse_failures": torch.tensor(1.0),
            "loss": torch.tensor(1.0), "num_tokens": torch.tensor(10)},
           {"filter/kept_groups": torch.tensor(1.0), "reward/parse_failures": torch.tensor(0.0),
            "loss": torch.tensor(4.0), "num_tokens": torch.tensor(30)}]
    out = reduce_step_metrics(mbs)
    assert out["filter/kept_groups"] == 4.0 and out["reward/parse_failures"] == 1.0
    assert out["loss"] == pytest.approx((10 * 1.0 + 30 * 4.0) / 40)


def test_update_metrics_take_max_min_sum_and_mean():
    """Over a step's updates: ratio_max the max, ratio_min the min, num_tokens and skipped
    updates the sum, constants the first value, the rest the mean."""
    ups = [{"ratio_max": 1.5, "ratio_min": 0.9, "num_tokens": 100.0, "update_skipped": 0.0, "loss": 1.0,
            "gamma": 0.02},
           {"ratio_max": 1.2, "ratio_min": 0.7, "num_tokens": 50.0, "update_skipped": 1.0, "loss": 3.0,
            "gamma": 0.02}]
    out = combine_update_metrics(ups)
    assert out == {"ratio_max": 1.5, "ratio_min": 0.7, "num_tokens": 150.0, "update_skipped": 1.0,
                   "loss": 2.0, "gamma": 0.02}
    assert combine_update_metrics([]) == {}
