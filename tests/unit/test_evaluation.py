"""Held-out evaluation (training.evaluation.evaluate): eval rows that carry a subset
(easy_vqa_shortcut:test: follows / contradicts the training shortcut) are scored per subset, and
the subsets add up to the overall accuracy exactly (same responses, counts not means)."""

import pytest

from megatron_papo.config import load_config
from megatron_papo.training.evaluation import evaluate
from megatron_papo.training.parts import build_parts
from megatron_papo.training.trainer import sft_step
from tests.unit.test_launch_lint import ROOT


def test_accuracy_per_subset_adds_up_to_the_overall(pg, tmp_path):
    cfg = load_config(str(ROOT / "examples/tiny_grpo.yaml"), [
        "data.train=easy_vqa_shortcut:train", "data.eval=easy_vqa_shortcut:test", "data.limit=400",
        "train.sft_warmup_steps=40", "train.sft_batch_size=16", "train.sft_lr=3e-3",
        "evaluation.num_prompts=24", "evaluation.k=3", "rollout.max_new_tokens=8", "model.num_layers=1",
        "logging.tensorboard=false", f"logging.dir={tmp_path}/run", "checkpoint.dir="])
    parts = build_parts(cfg, pg)
    for step in range(40):  # enough to answer in format, so the accuracies are not all 0
        sft_step(parts, cfg, pg, step)
    out = evaluate(parts, cfg, pg)
    assert out["eval/accuracy@3"] > 0
    names = ("follows_shortcut", "contradicts_shortcut")
    counts = [out[f"eval/prompts/{n}"] for n in names]
    assert sum(counts) == 24 and min(counts) > 0
    for key in ("eval/accuracy@3", "eval/accuracy_masked@3"):
        parts_sum = sum(out[f"{key}/{n}"] * c for n, c in zip(names, counts))
        assert parts_sum / 24 == pytest.approx(out[key], abs=1e-12)  # float64 sums of 0/1 rewards
    plain = load_config(str(ROOT / "examples/tiny_grpo.yaml"), ["data.limit=64", "evaluation.num_prompts=4",
                                                                "evaluation.k=2", "checkpoint.dir="])
    assert not [k for k in evaluate(build_parts(plain, pg), plain, pg) if k.count("/") > 1]
