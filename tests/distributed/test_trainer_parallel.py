"""The same first steps (1 warm-start step + 2 RL steps) at TP=2 (with and without sequence
parallelism), PP=2 (uneven, 1 + 3 layers, and with virtual stages: 4 layers, 2 chunks per
rank) and CP=2 give the
TP=1 run's
losses and metrics, through the real CLI under torchrun, from one shared initial checkpoint.

CP=2 covers the whole context-parallel path: zigzag-sharded sequences in the model (all-gather
attention), sharded loss terms with global normalisers, log-probs gathered over cp, and rollouts
through the sharded forward."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
OVERRIDES = [
    "train.sft_warmup_steps=1", "train.sft_batch_size=8", "train.steps=2", "rollout.prompts_per_step=4",
    "train.update_prompts=4", "rollout.n=2", "rollout.max_new_tokens=5", "train.micro_batch_size=4",
    "data.limit=200", "evaluation.interval=-1", "logging.progress_bar=false", "logging.tensorboard=false",
    "train.lr=3e-4", "loss.kl_prcp_mode=full", "loss.entropy_mode=full", "loss.masked_grad=true",
    "algorithm.name=papo_g", "model.num_layers=4",
]
KEYS = ["sft_nll", "reward/mean", "pg_loss", "kl_prcp", "entropy_orig", "entropy_mask", "ref_kl", "loss",
        "grad_norm", "response_length"]


def _run(tmp: Path, name: str, nproc: int, *extra: str) -> dict[int, dict]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "megatron_papo.train", "--config", "examples/tiny_papo_g.yaml", *OVERRIDES,
           f"logging.dir={tmp / name}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    if extra and extra[0] == "--save-init":
        return {}
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def test_tp2_sp_pp2_vpp_and_cp2_match_tp1(tmp_path):
    init = tmp_path / "init"
    _run(tmp_path, "init", 1, "--save-init", str(init))
    shared = f"checkpoint.init_weights={init}"
    ref = _run(tmp_path, "tp1", 1, shared)
    tp2 = _run(tmp_path, "tp2", 2, shared, "parallel.tp=2")
    # PP=2 with uneven stages: 1 layer on the first stage (with the embedding and the vision
    # tower), 3 on the last (the even split runs in the fused-linear test below and with vpp here)
    pp2 = _run(tmp_path, "pp2_uneven", 2, shared, "parallel.pp=2", "parallel.first_stage_layers=1")
    cp2 = _run(tmp_path, "cp2", 2, shared, "parallel.cp=2")
    sp2 = _run(tmp_path, "sp2", 2, shared, "parallel.tp=2", "parallel.sequence_parallel=true")
    # one micro-batch of 8 rows per pass: fewer than pp, so the interleaved schedule is filled with
    # loss-free repeats (schedule._fit_interleaved_schedule); the token means must not change
    vpp = _run(tmp_path, "vpp", 2, shared, "parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=8")
    assert sorted(ref) == [1, 2, 3]
    checked = 0
    for name, run in (("tp2", tp2), ("pp2_1+3", pp2), ("cp2", cp2), ("tp2_sp", sp2), ("pp2_vpp2", vpp)):
        for step, row in ref.items():
            for k in KEYS:
                if k in row:
                    # fp32 with different reduction orders (vocab shards, stages): 1e-4 relative
                    assert run[step][k] == pytest.approx(row[k], rel=1e-4, abs=1e-5), (name, step, k)
                    checked += 1
    assert checked >= 5 * (1 + 2 * 8)  # every step's metrics were compared


def test_dapo_data_parallel_completes(tmp_path):
    """DAPO's filter leaves replicas with different row counts; updates are collective, so every
    replica must take the same number (inert rows pad the short ones): the run must finish. With
    dynamic sampling the replicas run their rounds in lockstep and train on at most
    rollout.prompts_per_step groups together (per-rank quotas), generating 8 prompts a round."""
    rows = _run(tmp_path, "dapo_dp2", 2, "algorithm.name=dapo", "train.steps=3", "rollout.prompts_per_step=8",
                "train.update_prompts=2", "train.sft_warmup_steps=6", "train.sft_batch_size=16",
                "algorithm.max_sampling_rounds=2")
    rl = [r for r in rows.values() if "reward/mean" in r]
    assert len(rl) == 3 and all("filter/kept_groups" in r for r in rl)
    for r in rl:
        assert 1 <= r["filter/sampling_rounds"] <= 2
        assert r["filter/generated_prompts"] == 8 * r["filter/sampling_rounds"]  # summed over both ranks
        assert r["filter/trained_groups"] == min(8, r["filter/kept_groups"])


def test_fused_linear_at_tp2_sp_pp2_and_cp2_matches_the_tp1_logits_path(tmp_path):
    """``loss.fused_linear: true`` (hidden states out of the model, ops.fused_linear in every pass)
    at TP=2 (the hidden-state gradient summed over TP by the output layer's region), with sequence
    parallelism (all-gathered hidden states, reduce-scattered gradient), at PP=2 (the weight on
    the last stage) and CP=2 (per-shard statistics) gives the TP=1 logits run's metrics (same
    tolerance as above: fp32 with other reduction orders), and at TP=2 the TP=2 logits run's
    within 1e-5: the same layout, the logits of a tile are the same fp32 dot products, only the
    sums over the vocabulary run in another order: with V_local ~ 100 here, at worst
    V_local eps32 = 1.2e-5 of a sum's magnitude, typically sqrt(V_local) eps32 ~ 1.2e-6 (random
    rounding), carried through 3 steps at lr 3e-4."""
    init = tmp_path / "init"
    _run(tmp_path, "init", 1, "--save-init", str(init))
    shared = f"checkpoint.init_weights={init}"
    ref = _run(tmp_path, "tp1", 1, shared)
    tp2_logits = _run(tmp_path, "tp2_logits", 2, shared, "parallel.tp=2")
    fused = "loss.fused_linear=true"
    runs = {"tp2": _run(tmp_path, "tp2", 2, shared, fused, "parallel.tp=2"),
            "tp2_sp": _run(tmp_path, "sp2", 2, shared, fused, "parallel.tp=2",
                           "parallel.sequence_parallel=true"),
            "pp2": _run(tmp_path, "pp2", 2, shared, fused, "parallel.pp=2"),
            "cp2": _run(tmp_path, "cp2", 2, shared, fused, "parallel.cp=2")}
    checked = 0
    for name, run in runs.items():
        for step, row in ref.items():
            for k in KEYS:
                if k in row:
                    assert run[step][k] == pytest.approx(row[k], rel=1e-4, abs=1e-5), (name, step, k)
                    checked += 1
    assert checked >= 4 * (1 + 2 * 8)
    for step, row in tp2_logits.items():
        for k in KEYS:
            if k in row:
                assert runs["tp2"][step][k] == pytest.approx(row[k], rel=1e-5, abs=1e-6), ("tp2", step, k)
