"""``loss.fused_linear: true`` in the trainer (the model returns hidden states, every pass uses
ops.fused_linear) gives the logits path's metrics: one warm-start step and two RL steps from the
same initial weights, tiny VLM (untied) in the full-vocabulary and the sampled loss modes, and
the tiny Qwen2.5-VL with tied embeddings (the gradient reaches the shared embedding).

Tolerance 1e-5 relative (the issue's figure for fp32): both paths compute the same fp32 logits
up to the matmul's summation order (H <= 128 terms, ~H * 6e-8 = 8e-6 of |h| |W|, and a tile's
product is the same dot product as the full one), then the same fp32 reductions; the weights
after two Adam steps move by lr * (relative gradient difference), far below that at lr 1e-3.
"""

import pytest
import torch

from megatron_papo.config import load_config
from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl_with_tokenizer
from megatron_papo.training import trainer
from megatron_papo.training.parts import build_parts
from tests.unit.test_launch_lint import ROOT

STEPS = ["train.steps=2", "train.sft_warmup_steps=1", "train.sft_batch_size=4", "train.update_prompts=2",
         "train.micro_batch_size=4", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4",
         "data.limit=64", "evaluation.interval=-1", "logging.tensorboard=false", "logging.progress_bar=false",
         "train.lr=1e-3", "checkpoint.dir="]
KEYS = ("sft_nll", "pg_loss", "kl_prcp", "entropy_orig", "entropy_mask", "loss", "grad_norm", "reward/mean")


def _run(pg, yaml: str, over: list[str], fused: bool) -> list[dict]:
    cfg = load_config(str(ROOT / yaml), [*STEPS, *over, f"loss.fused_linear={str(fused).lower()}"])
    torch.manual_seed(0)
    parts = build_parts(cfg, pg)
    rows = [trainer.sft_step(parts, cfg, pg, 0)]
    rows += [trainer.rl_step(parts, cfg, pg, step) for step in (1, 2)]
    weights = torch.cat([p.detach().reshape(-1) for p in parts.model_chunks[0].parameters()])
    return rows, weights


def _compare(a, b):
    (rows_a, w_a), (rows_b, w_b) = a, b
    checked = 0
    for ra, rb in zip(rows_a, rows_b):
        for k in KEYS:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), k
                checked += 1
    assert (w_a - w_b).abs().max() <= 1e-5 * w_a.abs().max()
    return checked


FULL = ["loss.kl_prcp_mode=full", "loss.entropy_mode=full", "loss.masked_grad=true"]
SAMPLED = ["loss.kl_prcp_mode=k3", "loss.entropy_mode=sampled"]


@pytest.mark.parametrize("loss", [FULL, SAMPLED])
def test_tiny_vlm_fused_linear_equals_the_logits_path(pg, tmp_path, loss):
    over = [*loss, "model.num_layers=1", f"logging.dir={tmp_path}/run"]
    checked = _compare(_run(pg, "examples/tiny_papo_g.yaml", over, False),
                       _run(pg, "examples/tiny_papo_g.yaml", over, True))
    assert checked >= 1 + 2 * 5


def test_tiny_qwen_tied_fused_linear_equals_the_logits_path(pg, tmp_path):
    hf = make_tiny_qwen2_5_vl_with_tokenizer(tmp_path / "hf", seed=5, tied=True)
    over = [f"model.hf_path={hf}", f"checkpoint.init_weights={hf}", "model.max_pixels=12544",
            "loss.kl_prcp_mode=full", "loss.entropy_mode=full", "loss.masked_grad=false",
            f"logging.dir={tmp_path}/run"]
    yaml = "examples/tiny_qwen2_5_vl_papo_g.yaml"
    plain, fused = _run(pg, yaml, over, False), _run(pg, yaml, over, True)
    assert _compare(plain, fused) >= 1 + 2 * 5
