"""Rollout layer at TP=1: sampling functions on hand cases, the result/params types, and the
Megatron engine on a pure-torch stand-in LM (fast) and on a tiny megatron-core GPTModel."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatron_papo.rollout import (
    MegatronRolloutEngine,
    RolloutEngine,
    RolloutRequest,
    RolloutResult,
    SamplingParams,
    gpt_forward_fn,
)
from megatron_papo.rollout.sampling import (
    apply_top_k,
    apply_top_p,
    policy_log_probs,
    process_logits,
    sample,
    sampling_log_probs,
)

NEG = float("-inf")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# SamplingParams / RolloutRequest / RolloutResult
# ---------------------------------------------------------------------------------------------
def test_sampling_params_validation_and_from_config():
    for bad in (dict(n=0), dict(temperature=-1.0), dict(temperature=math.inf), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=0), dict(max_new_tokens=0), dict(stop_token_ids=[-2])):
        with pytest.raises(ValueError, match="invalid SamplingParams"):
            SamplingParams(**bad)
    cfg = SimpleNamespace(n=5, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=33)
    p = SamplingParams.from_config(cfg, [7, 9], seed=11)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.stop_token_ids, p.seed) == \
        (5, 0.7, 0.9, 20, 33, (7, 9), 11)
    assert SamplingParams.from_config(cfg, n=1).n == 1
    assert not p.greedy and SamplingParams(temperature=0).greedy
    from megatron_papo.config import RolloutConfig

    assert SamplingParams.from_config(RolloutConfig()).n == RolloutConfig().n


def test_request_defaults_and_result_padding():
    req = RolloutRequest([[1, 2, 3], [4]])
    assert req.images == [[], []] and req.prompt_indices == [0, 1] and not req.has_images
    with pytest.raises(ValueError):
        RolloutRequest([[1], []])
    with pytest.raises(ValueError):
        RolloutRequest([[1]], prompt_indices=[0, 1])
    res = RolloutResult(group_size=2, prompt_indices=[5, 5, 8, 8],
                        prompt_ids=[[1, 2, 3], [1, 2, 3], [4], [4]],
                        response_ids=[[9], [9, 10, 0], [], [11, 12]],
                        response_log_probs=[[-0.1], [-0.2, -0.3, -0.4], [], [-0.5, -0.6]],
                        policy_log_probs=[[-1.0], [-2.0, -3.0, -4.0], [], [-5.0, -6.0]],
                        finish_reason=["length", "stop", "length", "length"])
    assert res.num_prompts == 2 and res.group(1) == slice(2, 4) and len(res) == 4
    b = res.padded(pad_id=0)
    assert b.prompt_ids.tolist() == [[1, 2, 3], [1, 2, 3], [0, 0, 4], [0, 0, 4]]
    assert b.prompt_mask.tolist()[2] == [False, False, True]
    assert b.response_ids.tolist() == [[9, 0, 0], [9, 10, 0], [0, 0, 0], [11, 12, 0]]
    assert b.response_mask.sum(1).tolist() == [1, 3, 0, 2]
    assert b.response_log_probs[1].tolist() == pytest.approx([-0.2, -0.3, -0.4])
    assert b.policy_log_probs[3].tolist() == [-5.0, -6.0, 0.0]
    assert b.input_ids.shape == (4, 6) and b.position_ids[3].tolist() == [0, 0, 0, 1, 2, 2]
    assert res.response_lengths().tolist() == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="whole number of groups"):
        RolloutResult(2, [0], [[1]], [[2]], [[0.0]], [[0.0]], ["stop"])


# ---------------------------------------------------------------------------------------------
# sampling functions
# ---------------------------------------------------------------------------------------------
def test_top_k_keeps_k_largest_and_ties():
    z = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.5], [1.0, 1.0, 1.0, 0.0, 5.0]])
    kept = torch.isfinite(apply_top_k(z, 2))
    assert kept.tolist() == [[False, True, False, False, True], [True, True, True, False, True]]
    assert torch.equal(apply_top_k(z, -1), z) and torch.equal(apply_top_k(z, 5), z)


def test_top_p_nucleus_sets():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    z = probs.log().unsqueeze(0)
    kept = lambda p: set(torch.isfinite(apply_top_p(z, p))[0].nonzero().flatten().tolist())
    assert kept(0.01) == {1}  # the top token always stays
    assert kept(0.5) == {1}  # its mass alone reaches 0.5
    assert kept(0.75) == {1, 3}
    assert kept(0.85) == {1, 3, 0}
    assert kept(0.99) == {0, 1, 2, 3} == kept(1.0)
    # renormalised sampling distribution on the nucleus, after temperature
    lp = sampling_log_probs(z, SamplingParams(top_p=0.75))[0]
    assert lp.exp()[[1, 3]].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8], abs=1e-6)
    assert torch.isinf(lp[[0, 2]]).all()


def test_temperature_to_zero_is_greedy():
    z = torch.randn(64, 50, generator=_gen(1)) * 3
    for t in (1e-3, 1e-2):
        tok, lp = sample(z, SamplingParams(temperature=t), _gen(2))
        assert torch.equal(tok, z.argmax(-1)) and lp.max() > -1e-3
    tok, lp = sample(z, SamplingParams(temperature=0.0), _gen(2))
    assert torch.equal(tok, z.argmax(-1)) and torch.equal(lp, torch.zeros(64))
    tok, lp = sample(z, SamplingParams(top_k=1), _gen(3))
    assert torch.equal(tok, z.argmax(-1)) and torch.equal(lp, torch.zeros(64))
    # higher temperature flattens: the argmax's probability drops
    p_cold = process_logits(z, SamplingParams(temperature=0.5)).softmax(-1).max(-1).values
    p_hot = process_logits(z, SamplingParams(temperature=2.0)).softmax(-1).max(-1).values
    assert (p_hot < p_cold).all()


def test_padded_columns_never_sampled():
    vocab = 6
    z = torch.zeros(4000, 8)
    z[:, vocab] = 1e4
    z[:, vocab + 1] = float("nan")
    for params in (SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)):
        tok, lp = sample(z, params, _gen(4), vocab_size=vocab)
        assert int(tok.max()) < vocab and torch.isfinite(lp).all()
    tok, _ = sample(z, SamplingParams(), _gen(4), vocab_size=vocab)
    assert torch.bincount(tok, minlength=vocab).min() > 500  # uniform over the 6 real tokens
    assert policy_log_probs(z, tok, vocab).tolist() == pytest.approx([-math.log(6)] * 4000)
    assert torch.equal(z[:, vocab], torch.full((4000,), 1e4))  # input untouched


def _check_frequencies(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """Counts within 5 binomial standard deviations (plus 1) of N * p, zero where p = 0."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    mean = n * expected.double()
    sd = (n * expected.double() * (1 - expected.double())).sqrt()
    assert ((counts - mean).abs() <= 5 * sd + 1).all(), (counts.tolist(), mean.tolist())
    assert (counts[expected == 0] == 0).all()


@pytest.mark.parametrize(("params", "expected"), [
    (SamplingParams(), [0.1, 0.2, 0.3, 0.4, 0.0]),
    (SamplingParams(temperature=0.5), [1 / 30, 4 / 30, 9 / 30, 16 / 30, 0.0]),  # p^2 renormalised
    (SamplingParams(top_k=2), [0.0, 0.0, 3 / 7, 4 / 7, 0.0]),
    (SamplingParams(top_p=0.65), [0.0, 0.0, 3 / 7, 4 / 7, 0.0]),
])
def test_empirical_frequencies(params, expected):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    z = torch.cat([probs.log(), torch.tensor([50.0])])  # last column is vocab padding
    tok, lp = sample(z.expand(20000, 5), params, _gen(5), vocab_size=4)
    expected_t = torch.tensor(expected)
    _check_frequencies(tok, expected_t)
    assert lp.tolist() == pytest.approx(expected_t[tok].log().tolist(), abs=1e-5)


def test_sample_is_deterministic_per_generator():
    z = torch.randn(16, 30, generator=_gen(6))
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a, b, c = (sample(z, params, _gen(s))[0] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = _gen(7)
    first, second = sample(z, params, g)[0], sample(z, params, g)[0]
    assert torch.equal(first, a) and not torch.equal(first, second)  # one stream advances


# ---------------------------------------------------------------------------------------------
# engine on a pure-torch stand-in LM
# ---------------------------------------------------------------------------------------------
VOCAB, PADDED, EOS, PAD = 29, 32, 28, 0


class TinyLM(nn.Module):
    """Two causal attention blocks; honours position_ids and the padding mask (a padded query
    attends to itself only). Padded vocabulary columns carry +50 (sampled if not cut off);
    eos gets -1e4 so only an explicit stop token ends a response unless a test lifts it."""

    def __init__(self, hidden: int = 24, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(PADDED, hidden)
        self.pos = nn.Embedding(64, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, 3 * hidden) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                               nn.Linear(2 * hidden, hidden)) for _ in range(2))
        self.drop = nn.Dropout(0.5)  # would break greedy == reference if eval mode were not set
        self.head = nn.Linear(hidden, PADDED)
        self.bias = torch.zeros(PADDED)
        self.bias[VOCAB:] = 50.0
        self.bias[EOS] = -1e4

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        h = self.tok(ids) + self.pos(pos)
        eye = torch.eye(s, dtype=torch.bool)
        allowed = torch.ones(s, s, dtype=torch.bool).tril() & (mask[:, None, :] | eye)  # [B, S, S]
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(h).chunk(3, dim=-1)
            att = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, NEG)
            h = h + self.drop(att.softmax(-1) @ v)
            h = h + mlp(h)
        return self.head(h) + self.bias


def _forward(model: nn.Module):
    return lambda ids, pos, mask, pixels: model(ids, pos, mask)


def _engine(model: nn.Module, **kw) -> MegatronRolloutEngine:
    kw = dict(tp_group=None, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, model=model) | kw
    return MegatronRolloutEngine(_forward(model), **kw)


def _reference_greedy(model: nn.Module, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """One prompt, no padding, full recompute, argmax over the real vocabulary."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            s = len(ids)
            logits = model(torch.tensor([ids]), torch.arange(s)[None], torch.ones(1, s, dtype=torch.bool))
            ids.append(int(logits[0, -1, :VOCAB].argmax()))
            if ids[-1] in stops:
                break
    return ids[len(prompt):]


def _full_forward_log_probs(model: nn.Module, res: RolloutResult, params: SamplingParams,
                            pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separate forward over prompt + response: (policy, sampling) log-probs at the response
    positions [R, L], and the response mask."""
    from megatron_papo.rollout.sampling import sampling_log_probs as slp

    b = res.padded(pad_id)
    with torch.no_grad():
        logits = model(b.input_ids, b.position_ids, b.attention_mask)  # [R, P + L, V_pad]
    p = b.prompt_ids.shape[1]
    pred = logits[:, p - 1:-1]  # position t predicts token t + 1
    flat, tgt = pred.reshape(-1, pred.shape[-1]), b.response_ids.reshape(-1, 1)
    policy = torch.log_softmax(flat[:, :VOCAB], -1).gather(-1, tgt).view_as(b.response_ids)
    sampled = slp(flat, params, VOCAB).gather(-1, tgt).view_as(b.response_ids)
    return policy, sampled, b.response_mask


PROMPTS = [[3, 5, 7, 11, 13, 2], [4], [9, 9, 1]]


def test_engine_greedy_matches_reference_and_left_padding():
    model = TinyLM()
    model.train()
    engine = _engine(model)
    assert isinstance(engine, RolloutEngine)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=7)
    res = engine.generate(RolloutRequest(PROMPTS, prompt_indices=[10, 11, 12]), params)
    assert model.training, "train mode not restored"
    assert res.prompt_indices == [10, 10, 11, 11, 12, 12] and res.group_size == 2
    model.eval()
    for i, prompt in enumerate(PROMPTS):
        ref = _reference_greedy(model, prompt, 7, {EOS})
        single = engine.generate(RolloutRequest([prompt]), params)  # no padding at all
        for row in range(2 * i, 2 * i + 2):
            assert res.prompt_ids[row] == prompt
            assert res.response_ids[row] == ref == single.response_ids[0]
            assert res.finish_reason[row] == "length"
            assert res.response_log_probs[row] == [0.0] * 7
        assert single.policy_log_probs[0] == pytest.approx(res.policy_log_probs[2 * i], abs=1e-5)


def test_engine_stop_tokens_and_max_length():
    model = TinyLM()
    free = _engine(model).generate(RolloutRequest(PROMPTS), SamplingParams(temperature=0.0, max_new_tokens=6))
    stop = free.response_ids[0][2]  # prompt 0 produces it at step 3
    params = SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[stop])
    res = _engine(model).generate(RolloutRequest(PROMPTS), params)
    for free_ids, ids, reason in zip(free.response_ids, res.response_ids, res.finish_reason):
        if stop in free_ids:
            cut = free_ids.index(stop) + 1
            assert ids == free_ids[:cut] and reason == "stop"
        else:
            assert ids == free_ids and len(ids) == 6 and reason == "length"
    assert res.response_ids[0] == free.response_ids[0][:3]
    model.bias[EOS] = 100.0  # eos now wins everywhere: eos_id stops like a stop token
    res = _engine(model).generate(RolloutRequest(PROMPTS), SamplingParams(n=2, max_new_tokens=6, seed=1))
    assert res.response_ids == [[EOS]] * 6 and res.finish_reason == ["stop"] * 6
    assert res.response_log_probs[0][0] == pytest.approx(0.0, abs=1e-6)
    model.bias[EOS] = -1e4
    res = _engine(model).generate(RolloutRequest(PROMPTS), SamplingParams(n=3, max_new_tokens=6, seed=1,
                                                                           stop_token_ids=[stop]))
    lengths = res.response_lengths()
    assert (lengths >= 1).all() and (lengths <= 6).all()
    assert all(r == "stop" or n == 6 for r, n in zip(res.finish_reason, lengths.tolist()))
    b = res.padded(PAD)
    assert (b.response_ids[~b.response_mask] == PAD).all()


def test_engine_sampling_deterministic_groups_differ_and_log_probs_match_full_forward():
    model = TinyLM(seed=3)
    params = SamplingParams(n=4, temperature=0.8, top_p=0.9, top_k=12, max_new_tokens=10, seed=42)
    req = RolloutRequest(PROMPTS)
    a = _engine(model).generate(req, params)
    b = _engine(model).generate(req, params)
    assert a.response_ids == b.response_ids and a.response_log_probs == b.response_log_probs
    c = _engine(model).generate(req, dataclasses.replace(params, seed=43))
    assert c.response_ids != a.response_ids
    for i in range(len(PROMPTS)):
        group = a.response_ids[a.group(i)]
        assert len({tuple(g) for g in group}) > 1, f"prompt {i}: all {params.n} samples identical"
    model.eval()
    policy, sampled, mask = _full_forward_log_probs(model, a, params)
    got = a.padded(PAD)
    assert (policy - got.policy_log_probs)[mask].abs().max() < 1e-5
    assert (sampled - got.response_log_probs)[mask].abs().max() < 1e-5
    chunked = _engine(model, max_batch_size=5).generate(req, params)  # batches of 5 rows
    assert [len(r) for r in chunked.response_ids] == [len(r) for r in chunked.response_log_probs]
    policy, _, mask = _full_forward_log_probs(model, chunked, params)
    assert (policy - chunked.padded(PAD).policy_log_probs)[mask].abs().max() < 1e-5


def test_engine_rejects_bad_forward_and_images_for_text_gpt():
    model = TinyLM()
    bad = MegatronRolloutEngine(lambda ids, pos, mask, px: model(ids, pos, mask)[:, -1], tp_group=None,
                                vocab_size=VOCAB, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="expected"):
        bad.generate(RolloutRequest([[1, 2]]), SamplingParams(max_new_tokens=2))
    seen = []
    spy = MegatronRolloutEngine(lambda ids, pos, mask, px: seen.append(px) or model(ids, pos, mask),
                                tp_group=None, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD)
    img = torch.zeros(3, 4, 4)
    spy.generate(RolloutRequest([[1, 2], [3]], images=[[img], None]), SamplingParams(n=2, max_new_tokens=1))
    assert seen[0] == [[img], [img], [], []]  # per row, group-major
    with pytest.raises(ValueError, match="text-only"):
        gpt_forward_fn(model)(torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                              torch.ones(1, 1, dtype=torch.bool), [[img]])
    with pytest.raises(ValueError):
        _engine(model, eos_id=VOCAB)


# ---------------------------------------------------------------------------------------------
# engine on a tiny megatron-core GPTModel (one-rank gloo world, TP=1)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def one_rank_world():
    from megatron_papo.compat import mcore_compat
    from megatron_papo.distributed import destroy_distributed, init_distributed

    pg = init_distributed()
    yield pg
    destroy_distributed()
    mcore_compat.revert_cpu_patches()


def test_engine_on_megatron_gpt(one_rank_world):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            use_cpu_initialization=True, params_dtype=torch.float32,
                            hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=PADDED,
                     max_sequence_length=32, position_embedding_type="rope")
    fwd = gpt_forward_fn(model)
    engine = MegatronRolloutEngine(fwd, tp_group=one_rank_world.tp, vocab_size=VOCAB, eos_id=EOS,
                                   pad_id=PAD, model=model)
    model.eval()
    greedy = engine.generate(RolloutRequest(PROMPTS), SamplingParams(temperature=0.0, max_new_tokens=6))
    for prompt, ids in zip(PROMPTS, greedy.response_ids):
        ref = list(prompt)
        with torch.no_grad():
            while len(ref) < len(prompt) + len(ids):
                s = len(ref)
                ones = torch.ones(1, s, dtype=torch.bool)
                out = fwd(torch.tensor([ref]), torch.arange(s)[None], ones, None)
                ref.append(int(out[0, -1, :VOCAB].argmax()))
        assert ids == ref[len(prompt):]
        assert len(ids) == 6 or ids[-1] == EOS
    params = SamplingParams(n=3, temperature=1.2, top_p=0.95, max_new_tokens=6, seed=5)
    res = engine.generate(RolloutRequest(PROMPTS), params)
    gpt_like = lambda ids, pos, mask: fwd(ids, pos, mask, None)
    policy, sampled, mask = _full_forward_log_probs(gpt_like, res, params)
    got = res.padded(PAD)
    assert (policy - got.policy_log_probs)[mask].abs().max() < 1e-5
    assert (sampled - got.response_log_probs)[mask].abs().max() < 1e-5


def test_counter_uniforms_are_uniform_per_row_and_draw_the_categorical():
    """(0, 1) strictly (the largest 23-bit value stays below 1: finite Gumbel noise), mean 1/2 and
    variance 1/12, a row's numbers independent of the other rows in the batch, and Gumbel-max
    with them reproduces a categorical's frequencies. Tolerances: N draws of a frequency p have
    sd sqrt(p (1 - p) / N); 5 sd (a false alarm under 1e-6 per check)."""
    from megatron_papo.rollout.sampling import counter_uniform, row_keys, sample

    keys = row_keys(123, torch.arange(2000))
    u = counter_uniform(keys, 5, 500)
    assert u.dtype == torch.float32 and 0 < u.min() and u.max() < 1
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # var of (u - 1/2)^2 is 1/180
    assert torch.equal(counter_uniform(keys[7:9], 5, 500), u[7:9])  # rows alone
    assert not torch.equal(counter_uniform(keys, 6, 500), u)  # another decode step
    assert not torch.equal(counter_uniform(row_keys(124, torch.arange(2000)), 5, 500), u)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = 200_000
    tok, _ = sample(probs.log().repeat(draws, 1), SamplingParams(), None,
                    uniform=counter_uniform(row_keys(7, torch.arange(draws)), 0, 4))
    freq = torch.bincount(tok, minlength=4).double() / draws
    sd = (probs.double() * (1 - probs.double()) / draws).sqrt()
    assert ((freq - probs.double()).abs() < 5 * sd).all(), freq
    with pytest.raises(ValueError, match="exactly one of generator and uniform"):
        sample(probs.log()[None], SamplingParams(), None)
