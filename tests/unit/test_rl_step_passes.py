"""Which passes an RL step runs: GRPO builds no masked images (its objective never reads them);
PAPO-G builds one masked image per prompt, from a mask seeded by the run's train.seed."""

from megatron_papo.config import load_config
from megatron_papo.training import steps, trainer
from megatron_papo.training.parts import build_parts
from tests.unit.test_fused_linear_trainer import STEPS
from tests.unit.test_launch_lint import ROOT


def _rl_step_mask_calls(pg, tmp_path, monkeypatch, yaml: str) -> list:
    cfg = load_config(str(ROOT / yaml), [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run"])
    parts = build_parts(cfg, pg)
    calls = []
    real = steps.masked_prompt_pixels

    def spy(model, samples, masking, step):
        calls.append(masking.seed)
        return real(model, samples, masking, step)

    monkeypatch.setattr(steps, "masked_prompt_pixels", spy)
    metrics = trainer.rl_step(parts, cfg, pg, 0)
    assert metrics["updates"] >= 1  # the update ran (else the check below says nothing)
    return calls, cfg


def test_grpo_builds_no_masked_images(pg, tmp_path, monkeypatch):
    calls, _ = _rl_step_mask_calls(pg, tmp_path, monkeypatch, "examples/tiny_grpo.yaml")
    assert calls == []


def test_papo_masks_are_seeded_by_the_run(pg, tmp_path, monkeypatch):
    calls, cfg = _rl_step_mask_calls(pg, tmp_path, monkeypatch, "examples/tiny_papo_g.yaml")
    assert calls == [steps.training_masking(cfg.masking, cfg.train.seed).seed]
    assert calls[0] != cfg.masking.seed
