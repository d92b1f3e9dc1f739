"""What an RL step runs: GRPO builds no masked images (its objective never reads them);
PAPO-G builds one masked image per prompt, from a mask seeded by the run's train.seed; DAPO
dynamic sampling refills the batch."""

import pytest
import torch

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


def test_dapo_refill_trains_a_constant_batch(pg, tmp_path, monkeypatch):
    """PAPO-D with dynamic sampling: when only every third prompt's group survives the filter,
    the step runs several rounds and still trains on exactly rollout.prompts_per_step groups; the
    sampler advanced by every round's prompts;
    with max_sampling_rounds=1 the same step trains on the survivors of one round only."""
    from megatron_papo.rewards import RewardResult

    def score(result, samples, tokenizer, reward):  # a group survives iff its prompt index % 3 == 0
        acc = torch.tensor([float(s.index % 3 == 0 and k % 2 == 0) for s in samples
                            for k in range(result.group_size)])
        return RewardResult(reward=acc, accuracy=acc, format=torch.ones_like(acc), num_parse_failures=0)

    monkeypatch.setattr(steps, "score", score)
    rows = {}
    for rounds in (20, 1):
        cfg = load_config(str(ROOT / "examples/tiny_papo_d.yaml"),
                          [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run{rounds}",
                           "data.shuffle=false", f"algorithm.max_sampling_rounds={rounds}"])
        parts = build_parts(cfg, pg)
        before = parts.sampler.state_dict()
        rows[rounds] = m = trainer.rl_step(parts, cfg, pg, 0)
        after = parts.sampler.state_dict()
        drawn = after["position"] - before["position"]
        assert drawn == m["filter/sampling_rounds"] * cfg.rollout.prompts_per_step
    target = cfg.rollout.prompts_per_step
    assert rows[20]["filter/trained_groups"] == target and rows[20]["filter/sampling_rounds"] > 1
    assert rows[1]["filter/sampling_rounds"] == 1 and rows[1]["filter/trained_groups"] < target


def _masked_pass_count(pg, tmp_path, monkeypatch, loss: list[str]) -> tuple[int, dict]:
    from megatron_papo.training import passes

    cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"),
                      [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run", *loss])
    parts = build_parts(cfg, pg)
    calls = []
    real = passes.compute_log_probs

    def spy(chunks, batch, *, masked_branch=False, **kw):
        calls.append(masked_branch)
        return real(chunks, batch, masked_branch=masked_branch, **kw)

    monkeypatch.setattr(trainer, "compute_log_probs", spy)
    metrics = trainer.rl_step(parts, cfg, pg, 0)
    return sum(calls), metrics


def test_no_grad_masked_pass_runs_only_when_the_update_does_not_run_the_masked_branch(pg, tmp_path,
                                                                                       monkeypatch):
    """Sampled forms (k3, sampled entropies, masked_grad off): one no-grad masked pass feeds the
    update. Full KL / entropies: the update runs both branches in one pass, so the no-grad masked
    pass would be thrown away: it does not run, and the step still reports kl_prcp."""
    sampled, m1 = _masked_pass_count(pg, tmp_path, monkeypatch, ["loss.kl_prcp_mode=k3",
                                                                 "loss.entropy_mode=sampled"])
    full, m2 = _masked_pass_count(pg, tmp_path, monkeypatch, ["loss.kl_prcp_mode=full",
                                                              "loss.entropy_mode=full"])
    assert (sampled, full) == (1, 0)
    assert "kl_prcp" in m1 and "kl_prcp" in m2


def test_full_h_orig_alone_keeps_the_precomputed_masked_pass_and_current_weights_skip_it(pg, tmp_path,
                                                                                         monkeypatch):
    """Full entropies with no weight on H_mask and a k3 KL: only H_orig needs logits, the masked
    branch stays a precomputed no-grad pass (it used to run inside the update, with a graph).
    ``loss.kl_target_weights: current`` moves the masked branch into the update on the sampled
    path: no no-grad masked pass, the KL still reported."""
    h_orig, m1 = _masked_pass_count(pg, tmp_path, monkeypatch, ["loss.kl_prcp_mode=k3",
                                                                "loss.entropy_mode=full",
                                                                "loss.entropy_coef_mask=0"])
    current, m2 = _masked_pass_count(pg, tmp_path, monkeypatch, ["loss.kl_prcp_mode=k3",
                                                                 "loss.entropy_mode=sampled",
                                                                 "loss.kl_target_weights=current"])
    assert (h_orig, current) == (1, 0)
    assert "kl_prcp" in m1 and "entropy_orig" in m1 and "kl_prcp" in m2 and "entropy_mask" in m2


def test_log_prob_passes_divide_the_logits_by_the_sampling_temperature():
    """with_temperature + output_log_probs = log_softmax(logits / T) gathered, on the logits path
    and on the fused path (hidden states and weight / T); T = 1 is the identity. fp32, |logits|
    ~ sqrt(H) = 3, V = 11: the logits path differs from the reference only in the log-sum-exp's
    order (at worst ~V eps32 |logit| = 4e-6), the fused path also in the tiled matmul of H = 8
    terms and the division of W instead of the logits (a few eps32 |logit| more): 1e-5 for both."""
    from megatron_papo.training.passes import output_log_probs, with_temperature

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    target = torch.randint(0, 11, (2, 5), generator=g)
    logits = hidden @ weight.T
    for temp in (1.0, 0.7, 2.0):
        want = torch.log_softmax(logits / temp, dim=-1).gather(-1, target[..., None])[..., 0]
        out, w = with_temperature(logits, None, temp)
        assert torch.allclose(output_log_probs(out, target, None, 11, w), want, atol=1e-5)
        out, w = with_temperature(hidden, weight, temp)
        assert torch.allclose(output_log_probs(out, target, None, 11, w), want, atol=1e-5)
    assert with_temperature(logits, None, 1.0)[0] is logits


def test_fill_log_probs_uses_the_rollout_temperature(pg, tmp_path, monkeypatch):
    """rollout.temperature = 2: the old log-probs are those of the policy at T = 2 unless
    loss.divide_logits_by_temperature is false."""
    from megatron_papo.training import passes

    seen = []
    real = passes.compute_log_probs

    def spy(chunks, batch, **kw):
        seen.append(kw["temperature"])
        return real(chunks, batch, **kw)

    monkeypatch.setattr(trainer, "compute_log_probs", spy)
    for divide, want in (("true", 2.0), ("false", 1.0)):
        cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"),
                          [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run",
                           "rollout.temperature=2.0", f"loss.divide_logits_by_temperature={divide}"])
        parts = build_parts(cfg, pg)
        seen.clear()
        trainer.rl_step(parts, cfg, pg, 0)
        assert seen and set(seen) == {want}


class _Drawn(Exception):
    """Stops a warm-start step once its rows are known."""


def test_answer_balanced_warm_start_draws_rare_answers_more_often(pg, tmp_path, monkeypatch):
    """train.sft_answer_balance=1: the warm start's rows follow answer_balanced_weights (each
    distinct answer about equally often); 0: rows uniformly. Counted over the rows of 30 steps of
    8 prompts (240 draws): on easy-VQA, yes/no make up ~74% of the rows but 2 of its 13 answers,
    so balanced draws give them ~2/13 = 15% (binomial s.d. 2.3 points at n = 240)."""
    answers: list[str] = []

    def record(samples, *args, **kwargs):
        answers.extend(s.answer for s in samples)
        raise _Drawn

    monkeypatch.setattr(steps, "sft_update_batch", record)
    drawn = {}
    for alpha in (0.0, 1.0):
        cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"),
                          [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run", "data.limit=2000",
                           "train.sft_batch_size=8", f"train.sft_answer_balance={alpha}"])
        parts = build_parts(cfg, pg)
        answers.clear()
        for step in range(30):
            with pytest.raises(_Drawn):
                trainer.sft_step(parts, cfg, pg, step)
        drawn[alpha] = sum(a in ("yes", "no") for a in answers) / len(answers)
    assert drawn[0.0] > 0.6 and drawn[1.0] < 0.3


def test_several_updates_reuse_the_pre_update_log_probs(pg, tmp_path, monkeypatch):
    """Two mini-batches per step and epochs_per_step=2 (4 updates): the old and masked log-probs
    come from one no-grad pass each, before the first update (the pre-update weights), and every
    update reads those same tensors (a recomputation after an update would differ: the weights
    moved)."""
    from megatron_papo.training import passes

    cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"),
                      [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run",
                       "rollout.prompts_per_step=4", "train.update_prompts=2", "train.epochs_per_step=2",
                       "train.micro_batch_size=4"])
    parts = build_parts(cfg, pg)
    passes_run, seen_old = [], []
    real_lp, real_update = passes.compute_log_probs, passes.papo_update

    def spy_lp(chunks, batch, *, masked_branch=False, **kw):
        passes_run.append("ref" if chunks is parts.ref_chunks else "masked" if masked_branch else "old")
        return real_lp(chunks, batch, masked_branch=masked_branch, **kw)

    def spy_update(ddp, opt, mini, loss_cfg, **kw):
        seen_old.append(mini.old_log_probs.clone())
        return real_update(ddp, opt, mini, loss_cfg, **kw)

    monkeypatch.setattr(trainer, "compute_log_probs", spy_lp)
    monkeypatch.setattr(trainer, "papo_update", spy_update)
    metrics = trainer.rl_step(parts, cfg, pg, 0)
    assert metrics["updates"] == 4 and sorted(passes_run) == ["masked", "old", "ref"]
    # epoch 2 reads the tensors of epoch 1
    assert torch.equal(seen_old[0], seen_old[2]) and torch.equal(seen_old[1], seen_old[3])


def _seeded_parts(cfg, pg):
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return build_parts(cfg, pg)


def test_a_detached_masked_branch_runs_without_a_graph_and_changes_nothing(pg, tmp_path, monkeypatch):
    """Full KL and entropies with masked_grad off: the update's micro-batches carry both branches,
    and on one pipeline stage the masked half now runs under no_grad (passes.two_branch_forward):
    the forwards that build a graph see micro_batch_size rows, not twice that, and the step's
    loss terms and grad norm equal those of the single [2B] pass. Tolerance: the same fp32 sums,
    computed in GEMMs of B instead of 2B rows (blocking may reorder a K <= 128 reduction: ~K eps32
    = 1.5e-5 of a logit, twice that through a log-softmax); 1e-4 relative, as the layout tests."""
    from megatron_papo.training import passes

    over = [*STEPS, "model.num_layers=1", f"logging.dir={tmp_path}/run", "loss.kl_prcp_mode=full",
            "loss.entropy_mode=full", "loss.masked_grad=false"]
    cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"), over)
    runs = {}
    for name in ("split", "one_pass"):
        if name == "one_pass":
            monkeypatch.setattr(passes, "two_branch_forward", passes.model_forward)
        parts = _seeded_parts(cfg, pg)
        graph_rows: list[int] = []

        def record(mod, args, out, seen=graph_rows):
            if torch.is_grad_enabled():
                seen.append(args[0].shape[0])

        hook = parts.model_chunks[0].register_forward_hook(record)
        try:
            runs[name] = trainer.rl_step(parts, cfg, pg, 0)
        finally:
            hook.remove()
        runs[name]["graph_rows"] = max(graph_rows)
    micro = cfg.train.micro_batch_size
    assert (runs["split"]["graph_rows"], runs["one_pass"]["graph_rows"]) == (micro, 2 * micro)
    for key in ("loss", "pg_loss", "kl_prcp", "entropy_orig", "entropy_mask", "grad_norm"):
        assert runs["split"][key] == pytest.approx(runs["one_pass"][key], rel=1e-4, abs=1e-6), key
