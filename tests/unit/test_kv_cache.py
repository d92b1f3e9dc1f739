"""KV-cache generation (rollout/kv_cache.py, MegatronRolloutEngine(kv_cache=True)) against the
recompute engine, the reference: identical tokens for greedy and seeded sampling on the tiny VLM
and the tiny Qwen2.5-VL (images of several sizes, left padding, rows finishing at different
steps, a group split across decoding batches), the vision tower run once per prompt, and the
cache budget.

Log-prob tolerance: both paths compute the same fp32 logits except for the order of the
attention and matmul reductions (a cached key is the same number; the softmax over S keys and
the output projections sum in another order). Each logit then differs by at most
~n eps32 |logit|_max with n ~ hidden size (64-128 here) and |logit| < 10: 128 * 1.2e-7 * 10 =
1.5e-4, and a log-softmax moves by at most twice its inputs' error: 3e-4.
"""

import pytest
import torch
from PIL import Image

from megatron_papo.config import load_config
from megatron_papo.rollout import MegatronRolloutEngine, RolloutRequest, SamplingParams
from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl_with_tokenizer
from megatron_papo.training import steps
from megatron_papo.training.parts import build_parts, never_generate_ids, pipeline_forward_fn
from tests.unit.test_launch_lint import ROOT

LP_TOL = 3e-4


def _engine(parts, pg, *, kv_cache, **kwargs):
    tok = parts.tokenizer
    return MegatronRolloutEngine(pipeline_forward_fn(parts.model_chunks, pg, never_generate_ids(tok)),
                                 tp_group=pg.tp, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, model=parts.model_chunks, kv_cache=kv_cache, **kwargs)


def _assert_same(a, b):
    assert a.response_ids == b.response_ids
    assert a.finish_reason == b.finish_reason
    for x, y in ((a.policy_log_probs, b.policy_log_probs), (a.response_log_probs, b.response_log_probs)):
        diff = max((abs(p - q) for rx, ry in zip(x, y) for p, q in zip(rx, ry)), default=0.0)
        assert diff <= LP_TOL, diff


def _stops(parts):
    """A third of the vocabulary stops a row: rows end at different steps."""
    return list(range(0, parts.tokenizer.vocab_size, 3))


@pytest.fixture(scope="module")
def tiny_vlm(pg):
    cfg = load_config(str(ROOT / "examples/tiny_papo_g.yaml"), ["data.limit=32", "train.sft_warmup_steps=0"])
    parts = build_parts(cfg, pg)
    samples = [parts.dataset[i] for i in range(3)]
    return parts, samples, steps.prompt_pixels(parts.model_chunks[0], samples)


@pytest.mark.parametrize("temperature,stop", [(0.0, False), (1.0, False), (1.0, True)])
def test_tiny_vlm_cached_equals_recompute(tiny_vlm, pg, temperature, stop):
    parts, samples, pixels = tiny_vlm
    assert len({len(s.prompt_ids) for s in samples}) > 1  # left padding is exercised
    params = SamplingParams(n=3, temperature=temperature, top_p=0.9 if temperature else 1.0,
                            max_new_tokens=10, seed=7, stop_token_ids=_stops(parts) if stop else [])
    for max_batch_size in (None, 4):  # 4: the 9 rows in batches of 4, 4, 1 (groups split)
        ref = steps.rollout(_engine(parts, pg, kv_cache=False, max_batch_size=max_batch_size),
                            samples, pixels, params)
        got = steps.rollout(_engine(parts, pg, kv_cache=True, max_batch_size=max_batch_size),
                            samples, pixels, params)
        _assert_same(got, ref)
        if stop:
            assert len({len(r) for r in got.response_ids}) > 1  # rows finished at different steps


@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_rows_sampled_tokens_do_not_depend_on_the_split(tiny_vlm, pg, kv_cache):
    """Three prompts answered in one request, and as a request of one prompt plus a request of two
    with batch_offset 1 (a data-parallel split), and in decoding batches of 2: the same tokens,
    row for row (each row's uniforms are keyed by its place in the global batch). A request with
    another offset draws differently."""
    parts, samples, pixels = tiny_vlm
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=11)
    whole = steps.rollout(_engine(parts, pg, kv_cache=kv_cache), samples, pixels, params)
    head = steps.rollout(_engine(parts, pg, kv_cache=kv_cache), samples[:1], pixels[:1], params)
    tail = steps.rollout(_engine(parts, pg, kv_cache=kv_cache, max_batch_size=2), samples[1:], pixels[1:],
                         params, batch_offset=1)
    assert head.response_ids + tail.response_ids == whole.response_ids
    moved = steps.rollout(_engine(parts, pg, kv_cache=kv_cache), samples[1:], pixels[1:], params)
    assert moved.response_ids != tail.response_ids


def _count_images(module, counter):
    def hook(_mod, args, _out):
        counter.append(int(args[0].shape[0]))
    return module.register_forward_hook(hook)


def test_the_vision_tower_runs_once_per_prompt(tiny_vlm, pg):
    parts, samples, pixels = tiny_vlm
    model = parts.model_chunks[0]
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
    seen, results = {}, {}
    for kv_cache in (True, False):
        calls = []
        handle = _count_images(model.vision_model, calls)
        try:
            results[kv_cache] = steps.rollout(_engine(parts, pg, kv_cache=kv_cache), samples, pixels, params)
        finally:
            handle.remove()
        seen[kv_cache] = calls
    assert seen[True] == [len(samples)]  # one call, one image per distinct prompt
    # recomputing: every live row's image at every step, i.e. once per generated token
    lengths = [len(r) for r in results[False].response_ids]
    assert sum(seen[False]) == sum(lengths) and max(lengths) > 1


def test_engines_that_cannot_cache_recompute(tiny_vlm, pg):
    parts = tiny_vlm[0]
    tok = parts.tokenizer
    plain = pipeline_forward_fn(parts.model_chunks, pg)

    def no_cache_forward(*args, **kwargs):  # a forward without supports_kv_cache
        return plain(*args, **kwargs)

    engine = MegatronRolloutEngine(no_cache_forward, tp_group=pg.tp, vocab_size=tok.vocab_size,
                                   eos_id=tok.eos_id, pad_id=tok.pad_id, model=parts.model_chunks)
    assert engine.kv_cache is False and _engine(parts, pg, kv_cache=True).kv_cache is True


def test_the_cache_budget_caps_the_rows_decoded_together(tiny_vlm, pg):
    parts, _, _ = tiny_vlm
    per_token = 100_000
    engine = _engine(parts, pg, kv_cache=True, kv_cache_bytes_per_token=per_token, kv_cache_gb=1.0)
    prompts = [[1] * 90, [1] * 100]  # longest 100 + 24 new tokens = 124 tokens per row
    assert engine._rows_per_batch(prompts * 1000, 24) == int(2**30 // (per_token * 124))
    assert _engine(parts, pg, kv_cache=True)._rows_per_batch(prompts, 24) == 2  # no budget: all rows
    assert _engine(parts, pg, kv_cache=False, kv_cache_bytes_per_token=per_token, kv_cache_gb=1e-9,
                   max_batch_size=3)._rows_per_batch(prompts * 3, 24) == 3  # no cache: no cap


def test_tiny_qwen_cached_equals_recompute_with_images_of_several_sizes(pg, tmp_path):
    hf = make_tiny_qwen2_5_vl_with_tokenizer(tmp_path / "hf", seed=5)
    cfg = load_config(str(ROOT / "examples/tiny_qwen2_5_vl_papo_g.yaml"), [
        f"model.hf_path={hf}", f"checkpoint.init_weights={hf}", "checkpoint.dir=", "data.limit=8",
        "model.max_pixels=12544", f"logging.dir={tmp_path}/run"])
    parts = build_parts(cfg, pg)
    model, tok = parts.model_chunks[0], parts.tokenizer
    sizes = [(56, 56), (84, 56), (56, 112)]  # different grids -> different image-token counts
    prompt_ids, images = [], []
    for k, (h, w) in enumerate(sizes):
        pix = model.preprocess_images([Image.new("RGB", (w, h), (40 * k, 90, 200 - 50 * k))])
        text = tok.encode("what shape is in the image?" + " please" * k)  # prompts of different lengths
        prompt_ids.append([*text[:2], *[tok.image_token_id] * model.num_image_tokens((h, w)), *text[2:]])
        images.append([pix])
    assert len({len(p) for p in prompt_ids}) == len(sizes)
    request = RolloutRequest(prompt_ids=prompt_ids, images=images)
    for temperature, stop in ((0.0, False), (1.0, True)):
        params = SamplingParams(n=2, temperature=temperature, top_p=1.0, max_new_tokens=8, seed=11,
                                stop_token_ids=list(range(0, tok.vocab_size, 4)) if stop else [])
        ref = _engine(parts, pg, kv_cache=False).generate(request, params)
        got = _engine(parts, pg, kv_cache=True).generate(request, params)
        _assert_same(got, ref)


def test_rollout_log_probs_match_the_training_pass(tiny_vlm, pg):
    """The engine's log-probs of its sampled tokens against the trainer's no-grad pass on the same
    weights (what the rollout/training mismatch metric reports): they differ exactly by the
    renormalisation over the ids the engine never samples (pad, image, bos, unk), -log(1 - p_banned)
    at each position, computed here from the model's own logits."""
    from megatron_papo.training.batch import stack_pixels
    from megatron_papo.training.passes import compute_log_probs

    parts, samples, pixels = tiny_vlm
    tok, model = parts.tokenizer, parts.model_chunks[0]
    banned = never_generate_ids(tok)
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=2)
    res = steps.rollout(_engine(parts, pg, kv_cache=True), samples, pixels, params)
    adv = steps.Advantages(advantages=torch.zeros(len(res)), kept_rows=torch.arange(len(res)), metrics={})
    batch = steps.update_batch(res, adv, pixels, pixels, pad_id=tok.pad_id, micro_batch_size=2, device="cpu")
    batch.old_log_probs = compute_log_probs(parts.model_chunks, batch, micro_batch_size=2, tp_group=pg.tp,
                                            vocab_size=tok.vocab_size, cp_group=pg.cp)
    metric = steps.rollout_logprob_mismatch(batch)
    with torch.no_grad():
        model.eval()
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask,
                       stack_pixels(batch.pixel_values))[..., :tok.vocab_size].float()
    banned_mass = logits.softmax(-1)[..., banned].sum(-1)  # [R, S]
    expected = -torch.log1p(-banned_mass)[batch.loss_mask]
    got = (batch.extras["rollout_log_probs"] - batch.old_log_probs)[batch.loss_mask]
    assert (got - expected).abs().max() <= LP_TOL
    assert metric["rollout/logprob_diff_mean"] == pytest.approx(float(expected.mean()), abs=LP_TOL)
    assert metric["rollout/logprob_diff_max"] == pytest.approx(float(expected.max()), abs=LP_TOL)


def test_whole_sequences_unshards_and_restores_even_on_error(tiny_vlm):
    """`whole_sequences` takes the cp group off the model, its attention and its rope tables for
    the call and puts back exactly what was there (here a sentinel, as a cp=1 model holds None)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
        RotaryEmbedding,
    )

    from megatron_papo.models.base import whole_sequences

    chunks = tiny_vlm[0].model_chunks
    rope = (RotaryEmbedding, MultimodalRotaryEmbedding)
    holders = [m for m in chunks[0].modules() if isinstance(m, rope) or m is chunks[0]]
    assert any(isinstance(m, rope) for m in holders) and chunks[0] in holders
    sentinel = object()
    saved = [m.cp_group for m in holders]
    try:
        for m in holders:
            m.cp_group = sentinel
        with pytest.raises(RuntimeError, match="inside"):
            with whole_sequences(chunks):
                assert all(m.cp_group is None for m in holders)
                raise RuntimeError("inside")
        assert all(m.cp_group is sentinel for m in holders)
    finally:
        for m, group in zip(holders, saved):
            m.cp_group = group
