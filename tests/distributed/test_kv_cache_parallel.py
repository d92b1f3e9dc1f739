"""KV-cache generation at TP=2, PP=2 and CP=2 (the tiny VLM, 2 gloo ranks): the cached engine gives
the recompute engine's tokens and log-probs (the recompute engine at TP=2 / PP=2 equals TP=1:
tests/distributed/test_rollout_parallel.py, test_models_parallel.py; at CP=2 it runs the sharded
forward and gathers the logits over cp, while the cached one runs whole sequences on each cp rank:
models.base.whole_sequences). Tolerance: as in
tests/unit/test_kv_cache.py (3e-4 on log-probs, from fp32 reduction order)."""

import pytest

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow


def _cached_and_recomputed(rank: int, world: int, tp: int, pp: int, cp: int) -> dict:
    from megatron_papo.config import load_config
    from megatron_papo.distributed import destroy_distributed, init_distributed
    from megatron_papo.rollout import MegatronRolloutEngine, SamplingParams
    from megatron_papo.training import steps
    from megatron_papo.training.parts import build_parts, never_generate_ids, pipeline_forward_fn
    from tests.unit.test_launch_lint import ROOT

    pg = init_distributed(tp=tp, pp=pp, cp=cp, seed=0)
    cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"),
                      ["data.limit=32", "train.sft_warmup_steps=0", f"parallel.tp={tp}", f"parallel.pp={pp}",
                       f"parallel.cp={cp}"])
    parts = build_parts(cfg, pg)
    tok = parts.tokenizer
    samples = [parts.dataset[i] for i in range(3)]
    pixels = steps.prompt_pixels(parts.model_chunks[0], samples)
    forward = pipeline_forward_fn(parts.model_chunks, pg, never_generate_ids(tok))
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=4,
                            stop_token_ids=list(range(0, tok.vocab_size, 3)))
    out = {"supports": forward.supports_kv_cache}
    for kv_cache in (False, True):
        engine = MegatronRolloutEngine(forward, tp_group=pg.tp, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, model=parts.model_chunks, kv_cache=kv_cache)
        res = steps.rollout(engine, samples, pixels, params)
        out[kv_cache] = (res.response_ids, res.policy_log_probs, res.finish_reason)
    destroy_distributed()
    return out


@pytest.mark.parametrize("tp,pp,cp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 2, 2)])
def test_cached_generation_equals_recompute(tp, pp, cp):
    for out in run_distributed(_cached_and_recomputed, tp * pp * cp, args=(tp, pp, cp)):
        assert out["supports"] is True
        (ids_r, lp_r, why_r), (ids_c, lp_c, why_c) = out[False], out[True]
        assert ids_c == ids_r and why_c == why_r
        assert len({len(r) for r in ids_c}) > 1  # rows finished at different steps
        for a, b in zip(lp_c, lp_r):
            assert a == pytest.approx(b, abs=3e-4)
