"""The same first steps (1 warm-start step + 2 RL steps) at TP=2 (with and without sequence
parallelism), PP=2 (uneven, 1 + 3 layers, and with virtual stages: 4 layers, 2 chunks per rank),
CP=2, their pairings with PP (TP=2 + SP x PP=2, PP=2 x CP=2) and dp=2 give the TP=1 run's losses
and metrics, through the real CLI under torchrun, from one shared initial checkpoint; both the
full-logits path (full KL and entropies, masked gradient) and the default path (k3, sampled
entropies, precomputed masked log-probs, detached masked branch).

CP=2 covers the whole context-parallel path: zigzag-sharded sequences in the model (all-gather
attention), sharded loss terms with global normalisers, log-probs gathered over cp, and rollouts
through the sharded forward."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_papo.testing.rows import easy_vqa_rows_answered

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


def _compare(runs: dict[str, dict[int, dict]], ref: dict[int, dict], keys: list[str] = KEYS, *,
             rel: float = 1e-4, abs_: float = 1e-5) -> int:
    """Every step's ``keys`` of each run against ``ref``; returns how many values were compared.
    Default tolerance: fp32 with other reduction orders (vocab shards, stages, replicas) carried
    through 3 steps at lr 3e-4, 1e-4 relative (module tests' derivation)."""
    checked = 0
    for name, run in runs.items():
        assert sorted(run) == sorted(ref), name
        for step, row in ref.items():
            for k in keys:
                if k in row:
                    assert run[step][k] == pytest.approx(row[k], rel=rel, abs=abs_), (name, step, k)
                    checked += 1
    return checked


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


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(dir, init-weights override, the TP=1 full-mode run's rows by step): one initial checkpoint
    that every run of this module starts from, and the reference the full-mode tests compare to."""
    tmp = tmp_path_factory.mktemp("shared")
    _run(tmp, "init", 1, "--save-init", str(tmp / "init"))
    init = f"checkpoint.init_weights={tmp / 'init'}"
    return tmp, init, _run(tmp, "tp1", 1, init)


@pytest.fixture(scope="module")
def tp2_logits(shared):
    """The TP=2 full-mode run (logits path): compared with TP=1, and with the fused-linear TP=2 run."""
    tmp, init, _ = shared
    return _run(tmp, "tp2", 2, init, "parallel.tp=2")


def test_tp2_sp_pp2_vpp_and_cp2_match_tp1(shared, tp2_logits, tmp_path):
    _, init, ref = shared
    # PP=2 with uneven stages: 1 layer on the first stage (with the embedding and the vision
    # tower), 3 on the last (the even split runs in the fused-linear test below and with vpp here)
    pp2 = _run(tmp_path, "pp2_uneven", 2, init, "parallel.pp=2", "parallel.first_stage_layers=1")
    cp2 = _run(tmp_path, "cp2", 2, init, "parallel.cp=2")
    sp2 = _run(tmp_path, "sp2", 2, init, "parallel.tp=2", "parallel.sequence_parallel=true")
    # one micro-batch of 8 rows per pass: fewer than pp, so the interleaved schedule is filled with
    # loss-free repeats (schedule._fit_interleaved_schedule); the token means must not change
    vpp = _run(tmp_path, "vpp", 2, init, "parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=8")
    assert sorted(ref) == [1, 2, 3]
    runs = {"tp2": tp2_logits, "pp2_1+3": pp2, "cp2": cp2, "tp2_sp": sp2, "pp2_vpp2": vpp}
    assert _compare(runs, ref) >= 5 * (1 + 2 * 8)  # every step's metrics were compared


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


def test_fused_linear_at_tp2_sp_pp2_and_cp2_matches_the_tp1_logits_path(shared, tp2_logits, tmp_path):
    """``loss.fused_linear: true`` (hidden states out of the model, ops.fused_linear in every pass)
    at TP=2 (the hidden-state gradient summed over TP by the output layer's region), with sequence
    parallelism (all-gathered hidden states, reduce-scattered gradient), at PP=2 (the weight on
    the last stage) and CP=2 (per-shard statistics) gives the TP=1 logits run's metrics (same
    tolerance as above: fp32 with other reduction orders), and at TP=2 the TP=2 logits run's
    within 1e-5: the same layout, the logits of a tile are the same fp32 dot products, only the
    sums over the vocabulary run in another order: with V_local ~ 100 here, at worst
    V_local eps32 = 1.2e-5 of a sum's magnitude, typically sqrt(V_local) eps32 ~ 1.2e-6 (random
    rounding), carried through 3 steps at lr 3e-4."""
    _, init, ref = shared
    fused = "loss.fused_linear=true"
    runs = {"tp2": _run(tmp_path, "tp2", 2, init, fused, "parallel.tp=2"),
            "tp2_sp": _run(tmp_path, "sp2", 2, init, fused, "parallel.tp=2",
                           "parallel.sequence_parallel=true"),
            "pp2": _run(tmp_path, "pp2", 2, init, fused, "parallel.pp=2"),
            "cp2": _run(tmp_path, "cp2", 2, init, fused, "parallel.cp=2")}
    assert _compare(runs, ref) >= 4 * (1 + 2 * 8)
    assert _compare({"tp2": runs["tp2"]}, tp2_logits, rel=1e-5, abs_=1e-6) >= 1 + 2 * 8


# The default PAPO path: k3 KL_prcp on the sampled tokens, sampled entropies, the masked log-probs
# from a no-grad pass before the update (loss.masked_in_update is false), the masked branch detached.
DEFAULT_PATH = ["loss.kl_prcp_mode=k3", "loss.entropy_mode=sampled", "loss.masked_grad=false"]


def test_default_path_at_tp2_sp_with_pp2_and_cp2_with_pp2_matches_tp1(shared, tmp_path):
    """Two 4-rank layouts cover TP=2, SP, PP=2 and CP=2 and their pairings with PP: TP=2 + SP x
    PP=2 and PP=2 x CP=2, each against the TP=1 run of the same default path."""
    _, init, _ = shared
    ref = _run(tmp_path, "tp1_default", 1, init, *DEFAULT_PATH)
    runs = {"tp2_sp_pp2": _run(tmp_path, "tp2_sp_pp2", 4, init, *DEFAULT_PATH, "parallel.tp=2",
                               "parallel.sequence_parallel=true", "parallel.pp=2"),
            "pp2_cp2": _run(tmp_path, "pp2_cp2", 4, init, *DEFAULT_PATH, "parallel.pp=2", "parallel.cp=2")}
    assert all(ref[s]["kl_prcp"] != 0 for s in (2, 3))  # the PAPO terms are live in the RL steps
    assert _compare(runs, ref) >= 2 * (1 + 2 * 8)


def _yes_rows(tmp: Path) -> Path:
    """200 easy-VQA rows answered "yes": a short warm start gets some groups right and some wrong."""
    path = tmp / "yes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in easy_vqa_rows_answered("yes", 200)))
    return path


def test_data_parallel_gives_the_single_replica_loss_and_grad_norm(shared, tmp_path):
    """dp=2 trains on the same global batch as dp=1 (the sampler's global batch, split into two
    contiguous halves) and must give its loss and grad norm: the same rollouts (each row's sampling
    stream is keyed by its place in the global batch, RolloutRequest.batch_offset), token means
    over both replicas, the gradient all-reduce, the sharded optimizer. PAPO-D on the default
    path with the DAPO filter alone (one sampling round, one update per step): the filter drops
    different groups on each replica, the short one pads with inert rows, and the sums must
    still be the single replica's; the sampled entropies and the k3 KL_prcp are means over the
    sampled tokens, so other draws on either replica would show in them."""
    _, init, _ = shared
    run = [*DEFAULT_PATH, "algorithm.name=papo_d", "algorithm.max_sampling_rounds=1",
           f"data.train={_yes_rows(tmp_path)}", "train.sft_warmup_steps=20", "train.sft_batch_size=32",
           "rollout.prompts_per_step=8", "train.update_prompts=8", "rollout.n=4", "rollout.max_new_tokens=8"]
    ref = _run(tmp_path, "dp1", 1, init, *run)
    dp2 = _run(tmp_path, "dp2", 2, init, *run)
    rl = [r for r in ref.values() if "filter/kept_groups" in r]
    assert len(rl) == 2 and all(0 < r["filter/kept_groups"] < 8 for r in rl)  # some dropped, some kept
    assert any(r["pg_loss"] != 0 for r in rl)  # advantages are live
    assert _compare({"dp2": dp2}, ref, [*KEYS, "num_tokens", "filter/kept_groups"]) >= 20 + 2 * 10
