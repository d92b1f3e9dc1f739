"""init_distributed on several gloo ranks: group layout; CPU patches proven by TP=2 == TP=1;
the dist-checkpoint adapters by a TP=2 save loaded at TP=1.

Few tests on purpose (each spawn costs seconds): every one checks several things in one run.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow

_VOCAB, _SEQ = 64, 8  # tiny GPT
_GROUPS = ("world", "tp", "pp", "cp", "dp", "dp_cp", "mp")
_SIZES = ("rank", "world_size", "tp_rank", "tp_size", "pp_rank", "pp_size", "cp_rank", "cp_size",
          "dp_rank", "dp_size", "dp_cp_rank", "dp_cp_size", "is_first_pp_stage", "is_last_pp_stage")


def _layout(rank: int, world: int) -> dict:
    """For two layouts: sizes/ranks and the all-reduced sum of (rank + 1) over each group."""
    from megatron_papo.distributed import (
        barrier,
        broadcast_object,
        destroy_distributed,
        init_distributed,
        is_rank_zero,
    )

    out = {}
    for tp, pp, cp in ((2, 2, 1), (2, 1, 2)):
        pg = init_distributed(tp=tp, pp=pp, cp=cp)
        info = {name: getattr(pg, name) for name in _SIZES}
        for name in _GROUPS:
            x = torch.tensor([float(rank + 1)])
            dist.all_reduce(x, group=getattr(pg, name))
            info[f"sum_{name}"] = x.item()
        out[(tp, pp, cp)] = info
    from megatron_papo.config import ConfigError, ParallelConfig
    from megatron_papo.distributed import init_distributed_from_config

    pg = init_distributed_from_config(ParallelConfig(tp=1, pp=2, cp=1))  # sizes from the config tree
    out["from_config"] = (pg.tp_size, pg.pp_size, pg.dp_size)
    try:
        init_distributed_from_config(ParallelConfig(tp=3))
    except ConfigError as e:
        out["bad_config"] = str(e)
    # parallel.collective_timeout_s reaches megatron-core's groups: rank 3 never joins this
    # all-reduce (a hung rank), the others fail after ~2 s instead of the 1800 s default
    pg = init_distributed_from_config(ParallelConfig(collective_timeout_s=2.0))
    if rank != 3:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=pg.dp)
            out["hung_rank"] = "no timeout"
        except RuntimeError:
            out["hung_rank"] = time.monotonic() - t0
    out["bcast"] = broadcast_object({"from": rank}, src=0)
    out["rank_zero"] = is_rank_zero()
    barrier()
    destroy_distributed()
    out["default_group_kept"] = dist.is_initialized()  # the harness made it, so it stays
    return out


def test_layouts_world4():
    res = run_distributed(_layout, 4)
    # megatron-core order tp-cp-ep-dp-pp: tp ranks adjacent, pp outermost.
    # tp=2, pp=2: tp {0,1},{2,3}; pp {0,2},{1,3}; dp=cp=1; mp = all four.
    for out in res[:3]:  # 2 s timeout: failed after >= 2 s and well before 1800 s
        assert isinstance(out["hung_rank"], float) and 1.9 <= out["hung_rank"] < 30, out["hung_rank"]
    for r, out in enumerate(res):
        a = out[(2, 2, 1)]
        assert (a["rank"], a["world_size"]) == (r, 4)
        assert (a["tp_rank"], a["tp_size"], a["pp_rank"], a["pp_size"]) == (r % 2, 2, r // 2, 2)
        assert (a["cp_size"], a["dp_size"], a["dp_cp_size"]) == (1, 1, 1)
        assert (a["is_first_pp_stage"], a["is_last_pp_stage"]) == (r < 2, r >= 2)
        assert a["sum_tp"] == (3.0 if r < 2 else 7.0)
        assert a["sum_pp"] == (4.0 if r % 2 == 0 else 6.0)
        assert (a["sum_world"], a["sum_mp"], a["sum_dp"], a["sum_cp"]) == (10.0, 10.0, r + 1, r + 1)
        # tp=2, cp=2: tp {0,1},{2,3}; cp {0,2},{1,3}; dp=1, so dp_cp == cp; pp=1: first and last.
        b = out[(2, 1, 2)]
        assert (b["tp_rank"], b["cp_rank"], b["cp_size"], b["pp_size"]) == (r % 2, r // 2, 2, 1)
        assert (b["dp_size"], b["dp_cp_size"], b["dp_cp_rank"]) == (1, 2, r // 2)
        assert b["is_first_pp_stage"] and b["is_last_pp_stage"]
        assert b["sum_tp"] == (3.0 if r < 2 else 7.0)
        assert b["sum_cp"] == b["sum_dp_cp"] == (4.0 if r % 2 == 0 else 6.0)
        assert (b["sum_dp"], b["sum_pp"], b["sum_mp"]) == (r + 1, r + 1, 3.0 if r < 2 else 7.0)
        assert out["bcast"] == {"from": 0} and out["rank_zero"] == (r == 0)
        assert out["default_group_kept"]
        assert out["from_config"] == (1, 2, 2)
        assert "world size 4 is not divisible by parallel.tp*pp*cp = 3*1*1 = 3" in out["bad_config"]


def _tiny_gpt(tp: int, seed: int = 42):
    """A tiny GPTModel (local spec) whose full weights depend on ``seed`` only, not on tp."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    hidden = 32
    cfg = TransformerConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4,
                            ffn_hidden_size=2 * hidden, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, params_dtype=torch.float32,
                            hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)  # CPU init draws the full weight, then keeps this rank's shard
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=_VOCAB,
                    max_sequence_length=_SEQ, position_embedding_type="rope")


def _loss(model, backward: bool = True) -> tuple[float, bool]:
    """Mean LM loss on a fixed batch, and whether backward reached every parameter."""
    seq, batch = _SEQ, 2
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, _VOCAB, (batch, seq), generator=g)
    position_ids = torch.arange(seq).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    loss = model(tokens, position_ids, mask, labels=torch.roll(tokens, -1, dims=1)).mean()
    if not backward:
        return loss.item(), False
    loss.backward()
    return loss.item(), all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _gpt_tp2_vs_tp1(rank: int, world: int, ckpt_dir: str) -> dict:
    from megatron_papo.compat import mcore_compat
    from megatron_papo.distributed import barrier, init_distributed

    out = {}
    try:
        init_distributed(tp=4)
    except ValueError as err:
        out["bad_sizes"] = str(err)
    init_distributed(tp=2)
    out["patches"] = mcore_compat.applied_patches()
    model = _tiny_gpt(2)
    out["tp2"] = _loss(model)
    mcore_compat.dist_ckpt_save(model.sharded_state_dict(), ckpt_dir)  # torch_dist, TP=2 shards
    barrier()
    pg = init_distributed(tp=1)  # rebuilds the parallel state in the same processes: dp=2
    out["dp_size"] = pg.dp_size
    out["tp1"] = _loss(_tiny_gpt(1))
    other = _tiny_gpt(1, seed=999)  # different weights, then resharded TP=2 -> TP=1 from the checkpoint
    out["tp1_other_seed"] = _loss(other, backward=False)[0]
    other.load_state_dict(mcore_compat.dist_ckpt_load(other.sharded_state_dict(), ckpt_dir))
    out["tp1_from_ckpt"] = _loss(other, backward=False)[0]
    return out


def test_gpt_tp2_equals_tp1_on_cpu_and_bad_sizes(tmp_path):
    res = run_distributed(_gpt_tp2_vs_tp1, 2, args=(str(tmp_path),))
    for out in res:
        assert "world size 2" in out["bad_sizes"] and "4*1*1 = 4" in out["bad_sizes"]
        assert "cuda_to_cpu_function_mode" in out["patches"]
        (loss2, grads2), (loss1, grads1) = out["tp2"], out["tp1"]
        assert grads2 and grads1 and out["dp_size"] == 2
        assert abs(loss2 - loss1) < 1e-5, (loss2, loss1)
        assert abs(out["tp1_from_ckpt"] - loss2) < 1e-5 < abs(out["tp1_other_seed"] - loss2)
    assert res[0]["tp2"][0] == res[1]["tp2"][0]


def test_single_process_without_torchrun():
    """`python -m ...` without torchrun: a one-rank gloo world is created and torn down."""
    code = textwrap.dedent("""
        import torch.distributed as dist
        from megatron_papo.distributed import destroy_distributed, init_distributed
        pg = init_distributed()
        print("OK", pg.world_size, pg.tp_size, pg.dp_size, dist.get_backend())
        destroy_distributed()
        print("DESTROYED", dist.is_initialized())
        try:
            init_distributed(tp=2)
        except RuntimeError as err:
            print("NEEDS", "torchrun --nproc-per-node 2" in str(err))
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 1 1 1 gloo" in proc.stdout
    assert "DESTROYED False" in proc.stdout and "NEEDS True" in proc.stdout
