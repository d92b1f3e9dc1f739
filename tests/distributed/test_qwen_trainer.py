"""The trainer on the tiny random Qwen2.5-VL, through the CLI exactly as examples/ documents it:
init from a Hugging Face folder, a few PAPO-G steps, a checkpoint, and that checkpoint converted
back to a Hugging Face folder that transformers loads (weights changed by training)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _train_then_export(hf: Path, tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """Run the tiny Qwen example from the HF folder ``hf``, then export its last checkpoint to HF.
    Returns (run dir, exported HF folder)."""
    run, back = tmp_path / "run", tmp_path / "back"
    cmd = [sys.executable, "-m", "megatron_papo.train", "--config", "examples/tiny_qwen2_5_vl_papo_g.yaml",
           f"model.hf_path={hf}", f"checkpoint.init_weights={hf}", f"checkpoint.dir={run}/ckpt",
           f"logging.dir={run}", "logging.progress_bar=false", "logging.tensorboard=false", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    conv = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron", str(run / "ckpt"),
                           "--out", str(back)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    return run, back


def test_papo_steps_on_tiny_qwen_then_export(tmp_path):
    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl_with_tokenizer

    hf = make_tiny_qwen2_5_vl_with_tokenizer(tmp_path / "hf", seed=11)
    run, back = _train_then_export(hf, tmp_path, "train.steps=3", "evaluation.num_prompts=4",
                                   "evaluation.k=1")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "kl_prcp" in r]
    assert len(steps) == 3
    for r in steps:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("kl_prcp", "entropy_orig", "entropy_mask",
                                                                 "grad_norm"))
        assert r["kl_prcp"] > 0 and r["grad_norm"] > 0  # the masked branch differs; gradients flow

    before, after = load_file(str(hf / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(before) == sorted(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("visual.") for k in changed)
    assert any(k.startswith("model.layers.") for k in changed)
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(back))


def test_frozen_vision_tower_keeps_its_weights(tmp_path):
    """model.freeze_vision_tower=true: one PAPO step changes the language model, not the vision tower."""
    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl_with_tokenizer

    hf = make_tiny_qwen2_5_vl_with_tokenizer(tmp_path / "hf", seed=12)
    _, back = _train_then_export(hf, tmp_path, "train.steps=1", "evaluation.interval=-1",
                                 "model.freeze_vision_tower=true")
    before, after = load_file(str(hf / "model.safetensors")), load_file(str(back / "model.safetensors"))
    vision = [k for k in before if k.startswith("visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers."))
