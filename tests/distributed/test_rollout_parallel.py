"""The Megatron rollout engine at TP=2 generates exactly what it generates at TP=1.

One spawned run of 2 ranks: the tiny GPT (same full weights for any tp) first at TP=2, then
rebuilt at TP=1 in the same processes; greedy and sampled decoding, same seed.
"""

import pytest
import torch

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow

VOCAB, PADDED, EOS, PAD = 61, 64, 60, 0  # 3 padded vocabulary columns, on TP rank 1's shard
PROMPTS = [[3, 5, 7, 11, 13, 2, 40], [4], [9, 9, 1, 58]]


def _tiny_gpt(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            use_cpu_initialization=True, tensor_model_parallel_size=tp,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(42)  # CPU init draws the full weight, then keeps this rank's shard
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=PADDED,
                    max_sequence_length=32, position_embedding_type="rope")


def _generate_all(tp: int, rank: int) -> dict:
    from megatron_papo.distributed import init_distributed
    from megatron_papo.rollout import MegatronRolloutEngine, RolloutRequest, SamplingParams, gpt_forward_fn

    pg = init_distributed(tp=tp)
    model = _tiny_gpt(tp)
    engine = MegatronRolloutEngine(gpt_forward_fn(model), tp_group=pg.tp, vocab_size=VOCAB, eos_id=EOS,
                                   pad_id=PAD, model=model, debug=True)
    request = RolloutRequest(PROMPTS)
    out = {}
    for name, params in (("greedy", SamplingParams(n=2, temperature=0.0, max_new_tokens=8)),
                         ("sampled", SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=8,
                                                    seed=7))):
        res = engine.generate(request, params)
        out[name] = (res.response_ids, res.policy_log_probs, res.response_log_probs, res.finish_reason)
    if tp > 1:  # ranks that disagree are caught: a different seed per TP rank
        try:
            engine.generate(request, SamplingParams(n=2, max_new_tokens=3, seed=100 + rank))
            out["mismatch"] = "not detected"
        except RuntimeError as err:
            out["mismatch"] = str(err)
    return out


def _tp2_then_tp1(rank: int, world: int) -> dict:
    return {"tp2": _generate_all(2, rank), "tp1": _generate_all(1, rank)}


def test_tp2_generates_the_tp1_tokens():
    res = run_distributed(_tp2_then_tp1, 2)
    for out in res:
        assert "different tokens" in out["tp2"]["mismatch"]
        for name in ("greedy", "sampled"):
            ids2, lp2, slp2, why2 = out["tp2"][name]
            ids1, lp1, slp1, why1 = out["tp1"][name]
            assert ids2 == ids1 and why2 == why1, name
            assert all(max(t) < VOCAB for t in ids2 if t)
            for a, b in zip(lp2 + slp2, lp1 + slp1):
                assert a == pytest.approx(b, abs=1e-5), name
    same = lambda out: {k: v for k, v in out["tp2"].items() if k != "mismatch"}
    assert same(res[0]) == same(res[1])  # both TP ranks return the same result
    sampled = res[0]["tp2"]["sampled"][0]
    assert len({tuple(r) for r in sampled[:3]}) > 1  # one prompt's group: independent samples
