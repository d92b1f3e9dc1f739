"""loss.token_mean_scope: "micro_batch" is the reference's arithmetic (the mean over micro-batches
of each micro-batch's masked mean); "global" divides every token by the whole batch's count.

On a batch of two micro-batches with very uneven token counts (the first one's rows cut to a
single loss token each): the micro-batch-scope gradient of one update equals the mean of the gradients of the
two micro-batches updated alone (each then its own whole batch), and differs from the global
scope's. Gradients are read in place of the optimizer step (Adam's first step would hide a
gradient scale). Tolerance: fp32 sums of ~1e2 terms of O(1e-2) each, the same maths in another
grouping: 1e-5 relative to the largest gradient entry.
"""

import dataclasses

import torch

from megatron_papo.config import load_config
from megatron_papo.training import passes, steps, trainer
from megatron_papo.training.parts import build_parts
from tests.unit.test_fused_linear_trainer import STEPS
from tests.unit.test_launch_lint import ROOT


def _grads_of_update(parts, batch, loss_cfg, pg, monkeypatch) -> torch.Tensor:
    seen = {}

    def fake_step(optimizer, *, loss_finite=True):
        seen["g"] = torch.cat([p.main_grad.detach().reshape(-1).clone()
                               for p in parts.ddp_chunks[0].parameters() if p.requires_grad])
        return True, 0.0, None

    monkeypatch.setattr(passes, "optimizer_step", fake_step)
    passes.papo_update(parts.ddp_chunks, parts.optimizer, batch, loss_cfg, micro_batch_size=2, pg=pg,
                       vocab_size=parts.tokenizer.vocab_size, step=0)
    return seen["g"]


def test_micro_batch_scope_is_the_mean_of_micro_batch_means(pg, tmp_path, monkeypatch):
    cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"),
                      [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run",
                       "rollout.max_new_tokens=8",
                       "rollout.prompts_per_step=2", "rollout.n=2", "train.micro_batch_size=2"])
    parts = build_parts(cfg, pg)
    rnd = trainer._sampling_round(parts, cfg, pg, 0, 0)
    adv = steps.group_advantages(rnd.rewards, cfg.rollout.n, cfg.algorithm)
    adv.advantages = torch.tensor([1.0, -0.5, 0.75, -1.25])  # non-zero policy gradients
    masked = steps.masked_prompt_pixels(parts.model_chunks[0], rnd.samples, cfg.masking, 0)
    batch = steps.update_batch(rnd.result, adv, rnd.pixels, masked, pad_id=parts.tokenizer.pad_id,
                               micro_batch_size=2, device="cpu")
    trainer.fill_log_probs(parts, batch, cfg, pg)
    for row in (0, 1):  # micro-batch 0: one loss token per row; micro-batch 1 keeps its responses
        first = int(batch.loss_mask[row].nonzero()[0])
        batch.loss_mask[row, first + 1:] = False
    counts = [int(batch.loss_mask[i:i + 2].sum()) for i in (0, 2)]
    assert counts[0] < counts[1]

    micro = dataclasses.replace(cfg.loss, token_mean_scope="micro_batch")
    g_micro = _grads_of_update(parts, batch, micro, pg, monkeypatch)
    g_global = _grads_of_update(parts, batch, cfg.loss, pg, monkeypatch)
    alone = [_grads_of_update(parts, batch.rows([i, i + 1]), cfg.loss, pg, monkeypatch) for i in (0, 2)]
    reference = (alone[0] + alone[1]) / 2
    tol = 1e-5 * reference.abs().max()
    assert (g_micro - reference).abs().max() <= tol
    assert (g_global - reference).abs().max() > 100 * tol  # the scopes differ on uneven micro-batches
    # global scope = token-weighted mean of the micro-batches alone
    weighted = (counts[0] * alone[0] + counts[1] * alone[1]) / sum(counts)
    assert (g_global - weighted).abs().max() <= tol
