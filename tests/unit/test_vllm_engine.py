"""The vLLM rollout engine on CPU, with a fake backend in place of vLLM: request conversion (image
placeholders collapsed, patches turned back into the exact images), SamplingParams mapped field by
field, vLLM-shaped outputs -> RolloutResult (finish reasons, log-prob semantics, errors), the
sleep / wake sequence, and the weight sync on the tiny Qwen2.5-VL (names and bits equal to the HF
file and to the converter's export, at most one bucket alive at a time)."""

import itertools
import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from megatron_papo.compat import mcore_compat
from megatron_papo.rollout import RolloutRequest, SamplingParams
from megatron_papo.rollout.vllm_engine import (
    PatchLayout,
    VLLMBackend,
    VLLMRolloutEngine,
    check_consecutive_tp,
    collapse_image_placeholders,
    cp_slice,
    outputs_to_result,
    patches_to_images,
    request_slice,
    request_to_prompts,
    sampling_kwargs,
    version_tuple,
)
from megatron_papo.rollout.vllm_io import BAN_BIAS

IMG = 300  # the tiny Qwen's image token id
EOS = 2


# --- fakes ----------------------------------------------------------------------------------------
def completion(index, ids, lps, reason):
    """A vLLM CompletionOutput look-alike (logprobs=0: one {token: Logprob} dict per token)."""
    return SimpleNamespace(index=index, token_ids=list(ids), finish_reason=reason,
                           logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(ids, lps)])


class FakeBackend:
    """Records every call; generates from a script or from a function of (prompt, kwargs)."""

    def __init__(self, reply=None):
        self.calls = []
        self.reply = reply
        self.loaded = {}  # the latest tensor of each name
        self.load_counts = {}
        self.alive_refs = []  # weakrefs to the tensors of earlier buckets
        self.max_alive_bytes = 0

    def generate(self, prompts, sampling):
        self.calls.append(("generate", len(prompts)))
        self.prompts, self.sampling = prompts, sampling
        return [self.reply(p, kw) for p, kw in zip(prompts, sampling)]

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def load_weights(self, weights):
        # what the exporter still holds from earlier buckets must be gone by now
        alive = [r() for r in self.alive_refs if r() is not None]
        now = sum(t.numel() * t.element_size() for _, t in weights)
        held = now + sum(t.numel() * t.element_size() for t in alive)
        self.max_alive_bytes = max(self.max_alive_bytes, held)
        self.calls.append(("load_weights", len(weights), now, len(alive)))
        for name, t in weights:
            self.load_counts[name] = self.load_counts.get(name, 0) + 1
            self.loaded[name] = t.clone()
            self.alive_refs.append(weakref.ref(t))


def scripted(responses):
    """reply(prompt, kwargs) -> RequestOutput with n completions from `responses` (popped in order)."""
    queue = list(responses)

    def reply(prompt, kw):
        return SimpleNamespace(outputs=[completion(k, *queue.pop(0)) for k in reversed(range(kw["n"]))])

    return reply


# --- prompts --------------------------------------------------------------------------------------
def test_collapse_image_placeholders():
    ids = [5, 7, IMG, IMG, IMG, IMG, 8, 9, IMG, IMG, 8]
    assert collapse_image_placeholders(ids, IMG, [4, 2]) == [5, 7, IMG, 8, 9, IMG, 8]
    back_to_back = [1, *[IMG] * 9, 2]  # images of 4 and 5 tokens with nothing between them
    assert collapse_image_placeholders(back_to_back, IMG, [4, 5]) == [1, IMG, IMG, 2]
    assert collapse_image_placeholders([1, 2], IMG, []) == [1, 2]
    with pytest.raises(ValueError, match=r"placeholders for 2 image.*but 3"):
        collapse_image_placeholders(ids, IMG, [4, 2, 1])
    with pytest.raises(ValueError, match=r"do not match the images' token counts \[4\]"):
        collapse_image_placeholders([1, IMG, IMG, IMG], IMG, [4])


@pytest.fixture(scope="module")
def model(hf_dir, pg, tmp_path_factory):
    """The tiny Qwen converted HF -> Megatron and loaded back from the Megatron checkpoint."""
    from megatron_papo.convert import build_for_conversion, convert_hf_to_megatron
    from megatron_papo.training.checkpointing import load_checkpoint

    out = tmp_path_factory.mktemp("meg") / "ckpt"
    convert_hf_to_megatron(hf_dir, out, pg)
    m = build_for_conversion(hf_dir, pg)  # dynamic resolution
    load_checkpoint(out, [m], None, pg, load_optimizer=False, load_rng=False)
    return m


def _images(seed, count, size=(70, 90)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def test_patches_turn_back_into_the_same_images(model, hf_dir, pg):
    """Dynamic resolution (three sizes, three grids) and fixed resolution: the rebuilt images have
    the processor's resized size, re-cut to the same patches, and one already at that size comes
    back bit-exact."""
    from megatron_papo.convert import build_for_conversion
    from megatron_papo.models.qwen2_5_vl import QwenImages

    layout = PatchLayout.of(model)
    assert (layout.min_pixels, layout.max_pixels, layout.image_token_id) == (56 * 56, 28 * 28 * 1280, IMG)
    images = _images(0, 1) + _images(1, 1, size=(56, 56)) + _images(2, 1, size=(30, 120))
    pixels = model.preprocess_images(images)
    assert pixels.grid_thw.tolist() == [[1, 4, 6], [1, 4, 4], [1, 2, 8]]
    back = patches_to_images(pixels, layout)
    assert [im.size for im in back] == [(84, 56), (56, 56), (112, 28)]  # PIL (w, h)
    assert np.array_equal(np.asarray(back[1]), np.asarray(images[1]))
    again = model.preprocess_images(back)
    assert torch.equal(again.pixel_values, pixels.pixel_values)
    assert torch.equal(again.grid_thw, pixels.grid_thw)
    fixed = build_for_conversion(hf_dir, pg, image_size=56)
    square = fixed.preprocess_images(images)
    rebuilt = patches_to_images(square, PatchLayout.of(fixed))
    assert [im.size for im in rebuilt] == [(56, 56)] * 3
    assert torch.equal(fixed.preprocess_images(rebuilt).pixel_values, square.pixel_values)
    with pytest.raises(ValueError, match=r"give 24 patches but there are 8"):
        patches_to_images(QwenImages(pixels.pixel_values[:8], pixels.grid_thw[:1]), layout)


def test_request_to_prompts_collapses_placeholders_and_passes_images(model):
    layout = PatchLayout.of(model)
    small, wide = _images(2, 1, size=(56, 56)), _images(3, 1, size=(30, 120))
    first = model.preprocess_images(small)  # 4 image tokens
    pixels = model.preprocess_images(small + wide)  # 4 + 4 image tokens (grids 4x4 and 2x8)
    vs, ve = 297, 298
    one = [1, vs, *[IMG] * 4, ve, 10]
    two = [1, vs, *[IMG] * 4, ve, vs, *[IMG] * 4, ve, 11]
    req = RolloutRequest([one, two, [1, 12]], images=[[first], [pixels], []])
    prompts = request_to_prompts(req, layout)
    assert prompts[0]["prompt_token_ids"] == [1, vs, IMG, ve, 10]
    assert prompts[1]["prompt_token_ids"] == [1, vs, IMG, ve, vs, IMG, ve, 11]
    assert prompts[2] == {"prompt_token_ids": [1, 12]}
    assert [len(p["multi_modal_data"]["image"]) for p in prompts[:2]] == [1, 2]
    again = model.preprocess_images(prompts[1]["multi_modal_data"]["image"])
    assert torch.equal(again.pixel_values, pixels.pixel_values)
    assert torch.equal(again.grid_thw, pixels.grid_thw)
    # a mismatch between images and placeholders is named; raw PIL images are refused
    with pytest.raises(ValueError, match=r"placeholders for 1 image.*but 2"):
        request_to_prompts(RolloutRequest([one], images=[[pixels]]), layout)
    with pytest.raises(TypeError, match="must be QwenImages"):
        request_to_prompts(RolloutRequest([one], images=[small]), layout)
    with pytest.raises(ValueError, match="without a PatchLayout"):
        request_to_prompts(RolloutRequest([one], images=[[first]]), None)


# --- sampling params ------------------------------------------------------------------------------
def test_sampling_kwargs_map_every_field():
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=33, stop_token_ids=(9, 4),
                       seed=1000)
    kws = sampling_kwargs(p, num_prompts=2, eos_id=EOS, banned_token_ids=[0, IMG])
    assert kws[0] == dict(n=3, temperature=0.7, top_p=0.9, top_k=20, max_tokens=33, stop_token_ids=[2, 4, 9],
                          logprobs=0, detokenize=False, logit_bias={0: BAN_BIAS, IMG: BAN_BIAS}, seed=1000)
    assert kws[1]["seed"] == 1003  # row r = i * n + k draws with seed + r (vLLM adds k)
    # every field of our SamplingParams is mapped (a new field must be added here too)
    mapped = {"n", "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "seed"}
    assert set(SamplingParams.__dataclass_fields__) == mapped
    plain = sampling_kwargs(SamplingParams(), num_prompts=1, eos_id=EOS)[0]
    assert plain["top_k"] == -1 and plain["top_p"] == 1.0 and "logit_bias" not in plain
    with pytest.raises(ValueError, match=r"banned_token_ids \[2\] are also stop tokens"):
        sampling_kwargs(p, num_prompts=1, eos_id=EOS, banned_token_ids=[EOS])
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        sampling_kwargs(p, num_prompts=0, eos_id=EOS)
    # a slice of a request keeps each row's seed
    tail = sampling_kwargs(p, num_prompts=1, eos_id=EOS, first_prompt=1)
    assert tail[0]["seed"] == kws[1]["seed"]


@pytest.mark.parametrize("num,size", [(5, 2), (4, 2), (1, 2), (7, 3), (2, 4)])
def test_cp_slices_cover_the_request_in_order(num, size):
    slices = [cp_slice(num, r, size) for r in range(size)]
    assert slices[0][0] == 0 and slices[-1][1] == num
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))  # contiguous, in rank order
    lengths = [stop - start for start, stop in slices]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_slices_of_a_request_concatenate_back():
    from megatron_papo.rollout import RolloutResult

    req = RolloutRequest([[1, 5], [1, 6, 7], [1, 8]], prompt_indices=[40, 41, 42])
    part = request_slice(req, 1, 3)
    assert part.prompt_ids == [[1, 6, 7], [1, 8]] and part.prompt_indices == [41, 42]

    def result(prompts, indices, tok, seconds):
        rows = len(prompts)
        return RolloutResult(group_size=1, prompt_indices=indices, prompt_ids=prompts,
                             response_ids=[[tok, EOS]] * rows, response_log_probs=[[-1.0, -0.5]] * rows,
                             policy_log_probs=[[-1.0, -0.5]] * rows, finish_reason=["stop"] * rows,
                             metrics={"seconds": seconds, "generated_tokens": 2.0 * rows})

    first = result([[1, 5]], [40], 7, 3.0)
    whole = RolloutResult.concat([first, result(part.prompt_ids, part.prompt_indices, 8, 1.0)])
    assert whole.prompt_indices == [40, 41, 42] and whole.response_ids == [[7, EOS], [8, EOS], [8, EOS]]
    assert whole.metrics == {"seconds": 3.0, "generated_tokens": 6.0}
    with pytest.raises(ValueError, match="at least one part"):
        RolloutResult.concat([])


def test_llm_kwargs_for_colocated_spmd():
    kw = VLLMBackend.llm_kwargs("/m", tensor_parallel_size=2, gpu_memory_utilization=0.4,
                                image_pixels=(448 * 448, 448 * 448),
                                max_images_per_prompt=1, max_model_len=2048, seed=5, dtype="bfloat16",
                                enforce_eager=False, logprobs_mode="processed_logprobs")
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["load_format"] == "dummy" and kw["enable_sleep_mode"] is True
    assert kw["mm_processor_kwargs"] == {"min_pixels": 448 * 448, "max_pixels": 448 * 448}
    assert kw["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert (kw["tensor_parallel_size"], kw["max_model_len"], kw["generation_config"]) == (2, 2048, "vllm")
    assert kw["logprobs_mode"] == "processed_logprobs"
    old = dict(tensor_parallel_size=1, gpu_memory_utilization=0.5, image_pixels=None, max_images_per_prompt=1,
               max_model_len=None, seed=0, dtype="bfloat16", enforce_eager=True)
    # vLLM 0.9.x (the pinned image) has no logprobs_mode: raw log-probs, the argument left out
    assert "logprobs_mode" not in VLLMBackend.llm_kwargs("/m", **old, logprobs_mode="raw_logprobs",
                                                         vllm_version=version_tuple("0.9.2"))
    with pytest.raises(ValueError, match=r"processed_logprobs needs vLLM >= 0.11.0, this is 0.10.1"):
        VLLMBackend.llm_kwargs("/m", **old, logprobs_mode="processed_logprobs", vllm_version=(0, 10, 1))
    assert version_tuple("0.11.0rc2.dev5+gabc") == (0, 11, 0)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        VLLMBackend.llm_kwargs("/m", tensor_parallel_size=1, gpu_memory_utilization=1.5, image_pixels=None,
                               max_images_per_prompt=1, max_model_len=None, seed=0, dtype="bfloat16",
                               enforce_eager=False, logprobs_mode="raw_logprobs")


@pytest.mark.skipif(mcore_compat.have_vllm(), reason="vLLM is installed")
def test_backend_without_vllm_names_the_fix():
    with pytest.raises(mcore_compat.MissingDependencyError, match="vLLM is needed"):
        VLLMBackend("/m", tensor_parallel_size=1, gpu_memory_utilization=0.5, image_pixels=None)


def test_check_consecutive_tp():
    check_consecutive_tp([2, 3])
    check_consecutive_tp([5])
    with pytest.raises(ValueError, match=r"consecutive global ranks.*got \[0, 2\]"):
        check_consecutive_tp([0, 2])
    with pytest.raises(ValueError, match=r"got \[1, 2\]"):
        check_consecutive_tp([1, 2])


# --- outputs --------------------------------------------------------------------------------------
def _req():
    return RolloutRequest([[1, 5], [1, 6, 7]], prompt_indices=[40, 41])


def test_outputs_to_result_group_major_and_padded():
    params = SamplingParams(n=2, max_new_tokens=3, stop_token_ids=(9,))
    outs = [SimpleNamespace(outputs=[completion(1, [4, 9], [-0.5, -0.25], "stop"),
                                     completion(0, [3, 3, 3], [-1.0, -2.0, -3.0], "length")]),
            SimpleNamespace(outputs=[completion(0, [EOS], [-0.125], "stop"),
                                     completion(1, [6, EOS], [-1.5, -0.5], "stop")])]
    res = outputs_to_result(_req(), params, outs, stop_ids=[EOS, 9], logprobs_mode="processed_logprobs")
    assert res.prompt_indices == [40, 40, 41, 41] and res.prompt_ids[2] == [1, 6, 7]
    assert res.response_ids == [[3, 3, 3], [4, 9], [EOS], [6, EOS]]  # sorted by completion index
    assert res.finish_reason == ["length", "stop", "stop", "stop"]
    assert res.response_log_probs[0] == [-1.0, -2.0, -3.0]
    assert res.policy_log_probs == res.response_log_probs  # plain sampling: the two coincide
    pad = res.padded(pad_id=0)
    assert pad.response_ids.tolist() == [[3, 3, 3], [4, 9, 0], [EOS, 0, 0], [6, EOS, 0]]
    assert pad.prompt_ids.tolist()[0] == [0, 1, 5]
    assert pad.response_log_probs[2].tolist() == [-0.125, 0.0, 0.0]


def test_log_prob_semantics_per_mode():
    outs = [SimpleNamespace(outputs=[completion(0, [EOS], [-0.5], "stop")])]
    req = RolloutRequest([[1]])
    hot = SamplingParams(temperature=0.7, top_p=0.9)
    proc = outputs_to_result(req, hot, outs, stop_ids=[EOS], logprobs_mode="processed_logprobs")
    assert proc.response_log_probs == [[-0.5]] and math.isnan(proc.policy_log_probs[0][0])
    raw = outputs_to_result(req, hot, outs, stop_ids=[EOS], logprobs_mode="raw_logprobs")
    assert raw.policy_log_probs == [[-0.5]] and math.isnan(raw.response_log_probs[0][0])
    greedy = outputs_to_result(req, SamplingParams(temperature=0), outs, stop_ids=[EOS],
                               logprobs_mode="raw_logprobs")
    assert greedy.response_log_probs == [[0.0]] and greedy.policy_log_probs == [[-0.5]]


def test_outputs_errors_are_named():
    p = SamplingParams(n=1, max_new_tokens=4)
    req = RolloutRequest([[1]])

    def conv(*completions):
        return outputs_to_result(req, p, [SimpleNamespace(outputs=list(completions))], stop_ids=[EOS],
                                 logprobs_mode="processed_logprobs")

    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        conv(completion(0, [3], [-1.0], "abort"))
    with pytest.raises(ValueError, match=r"stopped on \[3\], not one of the stop tokens \[2\]"):
        conv(completion(0, [3], [-1.0], "stop"))
    with pytest.raises(ValueError, match="'length' after 2 tokens, max_new_tokens=4"):
        conv(completion(0, [3, 3], [-1.0, -1.0], "length"))
    with pytest.raises(ValueError, match="2 completions, expected n=1"):
        conv(completion(0, [EOS], [-1.0], "stop"), completion(1, [EOS], [-1.0], "stop"))
    no_lp = SimpleNamespace(index=0, token_ids=[EOS], finish_reason="stop", logprobs=None)
    with pytest.raises(ValueError, match="no logprobs"):
        conv(no_lp)
    with pytest.raises(ValueError, match="2 outputs for 1 prompts"):
        outputs_to_result(req, p, [None, None], stop_ids=[EOS], logprobs_mode="processed_logprobs")


# --- engine: sleep / wake around generation and training ------------------------------------------
def test_engine_sleep_wake_sequence():
    backend = FakeBackend(scripted([([EOS], [-0.5], "stop")] * 8))
    engine = VLLMRolloutEngine(backend, eos_id=EOS, banned_token_ids=[0, EOS], sleep_level=2)
    assert engine.banned_token_ids == [0]  # eos is never banned
    req, params = RolloutRequest([[1, 2], [3]]), SamplingParams(n=2, seed=7)
    with pytest.raises(RuntimeError, match="dummy weights"):
        engine.generate(req, params)
    engine.load_buckets([[("w", torch.ones(2))]])  # the first sync, awake
    res = engine.generate(req, params)
    assert len(res) == 4 and res.metrics["generated_tokens"] == 4.0
    assert backend.sampling[1]["seed"] == 9 and backend.sampling[0]["logit_bias"] == {0: BAN_BIAS}
    engine.release()
    engine.release()  # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(req, params)
    with pytest.raises(RuntimeError, match="sleep level 2: call sync_weights before resume"):
        engine.resume()
    backend.calls.clear()
    backend.loaded.clear()
    engine.load_buckets([[("w", torch.ones(2))]])  # next step: weights first, then the KV cache
    engine.resume()
    engine.generate(req, params)
    engine.release()
    assert backend.calls == [("wake_up", ("weights",)), ("load_weights", 1, 8, 0), ("reset_prefix_cache",),
                             ("wake_up", ("kv_cache",)), ("reset_prefix_cache",), ("generate", 2),
                             ("sleep", 2)]


def test_engine_level1_resume_restores_weights():
    backend = FakeBackend(scripted([([EOS], [-0.5], "stop")]))
    engine = VLLMRolloutEngine(backend, eos_id=EOS, sleep_level=1)
    engine.load_buckets([])
    engine.release()
    backend.calls.clear()
    engine.resume()
    assert backend.calls == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert len(engine.generate(RolloutRequest([[1]]), SamplingParams())) == 1
    with pytest.raises(ValueError, match="sleep_level must be 1 or 2"):
        VLLMRolloutEngine(backend, eos_id=EOS, sleep_level=3)


# --- weight sync ----------------------------------------------------------------------------------
def _group_key(name):
    """HF tensors made from one megatron parameter share a key (q/k/v, gate/up)."""
    for part in ("q_proj", "k_proj", "v_proj"):
        name = name.replace(part, "qkv_proj")
    return name.replace("gate_proj", "fc1").replace("up_proj", "fc1")


def test_sync_weights_equals_hf_file_and_converter_with_bounded_buckets(model, hf_dir, pg, tmp_path,
                                                                       monkeypatch):
    from megatron_papo.models import hf_qwen2_5_vl
    from megatron_papo.models.hf_qwen2_5_vl import export_hf_checkpoint

    # every tensor the exporter makes is watched: at each new one, sum the bytes still alive
    exported_refs, peak = [], [0]
    inner = hf_qwen2_5_vl.iter_hf_tensors

    def watched(*args, **kwargs):
        for name, t in inner(*args, **kwargs):
            exported_refs.append((weakref.ref(t), t.numel() * t.element_size()))
            peak[0] = max(peak[0], sum(b for r, b in exported_refs if r() is not None))
            del t
            yield name, exported_refs[-1][0]()

    monkeypatch.setattr(hf_qwen2_5_vl, "iter_hf_tensors", watched)
    backend = FakeBackend()
    engine = VLLMRolloutEngine(backend, eos_id=EOS)
    engine.release()  # asleep, as between training steps
    limit = 512 * 1024  # > the largest tensor (patch_embed, 294 KiB), ~1/5 of the model
    stats = engine.sync_weights([model], pg, bucket_bytes=limit)
    monkeypatch.undo()
    ref = load_file(str(hf_dir / "model.safetensors"))
    assert sorted(backend.loaded) == sorted(ref) and set(backend.load_counts.values()) == {1}
    for name, t in ref.items():
        got = backend.loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name
    export_hf_checkpoint([model], pg, tmp_path / "export", hf_dir)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(backend.loaded)
    assert all(torch.equal(exported[k], backend.loaded[k]) for k in exported)
    # bounded: every bucket <= limit (or one tensor); no tensor of a loaded bucket is alive when the
    # next arrives; at no time more than one bucket + one megatron parameter's tensors exist
    loads = [c for c in backend.calls if c[0] == "load_weights"]
    assert len(loads) >= 4 and stats["buckets"] == len(loads) and stats["tensors"] == len(ref)
    assert all(nbytes <= limit or count == 1 for _, count, nbytes, _ in loads)
    assert all(alive == 0 for *_, alive in loads)
    groups: dict = {}
    for name, t in ref.items():
        groups[_group_key(name)] = groups.get(_group_key(name), 0) + t.numel() * t.element_size()
    print(f"peak {peak[0]} B, bucket limit {limit} B, buckets {len(loads)}")
    assert 0 < peak[0] <= limit + max(groups.values()) < 2 * limit, (peak[0], limit, max(groups.values()))
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert backend.calls[:2] == [("sleep", 2), ("wake_up", ("weights",))]  # KV cache stays asleep
    assert engine.asleep == {"kv_cache"} and engine.weights_synced


# --- the trainer with a fake vLLM -----------------------------------------------------------------
class DelegatingBackend(FakeBackend):
    """Answers vLLM-shaped requests by running the Megatron engine: placeholders re-expanded, PIL
    images re-cut into patches, vLLM kwargs turned back into SamplingParams (so the conversions run
    both ways and rewards / log-probs are real)."""

    def __init__(self):
        super().__init__()
        self.delegate = None
        self.model = None

    def generate(self, prompts, sampling):
        self.calls.append(("generate", len(prompts)))
        layout = PatchLayout.of(self.model)
        outs = []
        for prompt, kw in zip(prompts, sampling):
            ids, images = [], prompt.get("multi_modal_data", {}).get("image", [])
            counts = iter([self.model.num_image_tokens((im.height, im.width)) for im in images])
            for t in prompt["prompt_token_ids"]:
                ids.extend([t] * (next(counts) if t == layout.image_token_id else 1))
            pixels = [[self.model.preprocess_images(images)]] if images else None
            params = SamplingParams(n=kw["n"], temperature=kw["temperature"], top_p=kw["top_p"],
                                    top_k=kw["top_k"], max_new_tokens=kw["max_tokens"],
                                    stop_token_ids=tuple(kw["stop_token_ids"]), seed=kw["seed"])
            res = self.delegate.generate(RolloutRequest([ids], images=pixels), params)
            outs.append(SimpleNamespace(outputs=[
                completion(k, res.response_ids[k], res.response_log_probs[k], res.finish_reason[k])
                for k in range(len(res))]))
        return outs


def test_trainer_rl_step_with_a_fake_vllm(hf_dir, pg, tmp_path, monkeypatch):
    from megatron_papo.config import load_config
    from megatron_papo.rollout import MegatronRolloutEngine
    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl_with_tokenizer
    from megatron_papo.training import parts as parts_mod
    from megatron_papo.training import trainer

    hf = make_tiny_qwen2_5_vl_with_tokenizer(tmp_path / "hf", seed=11)
    fake = DelegatingBackend()
    seen = {}

    def factory(hf_path, **kwargs):
        seen.update(kwargs, hf_path=hf_path)
        return fake

    monkeypatch.setattr(parts_mod, "vllm_backend_factory", factory)
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / "examples/tiny_qwen2_5_vl_papo_g.yaml"), [
        "rollout.engine=vllm", f"model.hf_path={hf}", f"checkpoint.init_weights={hf}", "checkpoint.dir=",
        f"logging.dir={tmp_path}/run", "rollout.prompts_per_step=2", "train.update_prompts=2",
        "rollout.vllm_sync_bucket_mb=1"])
    parts = parts_mod.build_parts(cfg, pg)
    parts_mod.init_weights(parts, cfg, pg)
    assert seen["hf_path"] == str(hf) and seen["tensor_parallel_size"] == 1
    assert seen["image_pixels"] == (56 * 56, 56 * 56) and seen["max_images_per_prompt"] == 1
    extra_rows = set(range(parts.tokenizer.vocab_size, parts.model_chunks[0].vocab_size))
    assert extra_rows and extra_rows <= set(parts.engine.banned_token_ids)  # never sampled
    assert seen["max_model_len"] == cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    fake.model = parts.model_chunks[0]
    fake.delegate = MegatronRolloutEngine(
        parts_mod.pipeline_forward_fn(parts.model_chunks, pg, parts_mod.never_generate_ids(parts.tokenizer)),
        tp_group=pg.tp, vocab_size=parts.tokenizer.vocab_size, eos_id=parts.tokenizer.eos_id,
        pad_id=parts.tokenizer.pad_id, model=parts.model_chunks)
    before = {k: v.clone() for k, v in parts.model_chunks[0].state_dict().items() if "visual.blocks.0" in k}
    key = "visual.blocks.0.attn.qkv.weight"
    synced_then = []
    for step in range(2):
        m = trainer.rl_step(parts, cfg, pg, step)
        assert m["updates"] >= 1 and math.isfinite(m["kl_prcp"]) and m["weight_sync_time"] > 0
        synced_then.append(parts.model_chunks[0].state_dict()[key].clone())  # what the next sync sends
    kinds = [c[0] for c in fake.calls if c[0] != "reset_prefix_cache"]
    n_loads = kinds.count("load_weights")
    assert n_loads >= 2 and n_loads % 2 == 0  # both steps synced every tensor, in buckets
    per_step = ["wake_up"] + ["load_weights"] * (n_loads // 2) + ["wake_up", "generate", "sleep"]
    # step 0 starts awake with dummy weights (nothing to wake); step 1 starts asleep
    assert kinds == ["load_weights"] * (n_loads // 2) + ["generate", "sleep"] + per_step
    after = parts.model_chunks[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update happened
    # the second sync carried the weights after step 0's update (step 1's update came later)
    assert torch.equal(fake.loaded[key], synced_then[0]) and not torch.equal(fake.loaded[key], after[key])


@pytest.mark.parametrize("override, message", [
    # plain ranges come from config.NUMERIC_BOUNDS (checked for every engine)
    ("rollout.gpu_memory_utilization=0",
     r"rollout.gpu_memory_utilization: expected a finite value in \(0.0, 1.0\], got 0"),
    ("rollout.vllm_sleep_level=3", r"rollout.vllm_sleep_level: expected a finite value in \[1, 2\], got 3"),
    ("rollout.vllm_sync_bucket_mb=0", r"rollout.vllm_sync_bucket_mb: expected a finite value in \[1, inf\)"),
    ("rollout.vllm_max_model_len=64", r"vllm_max_model_len=64 is below .* = 168"),
])
def test_vllm_config_errors_name_the_field(override, message):
    from pathlib import Path

    from megatron_papo.config import ConfigError, load_config

    path = str(Path(__file__).resolve().parents[2] / "examples/tiny_qwen2_5_vl_papo_g.yaml")
    load_config(path, ["rollout.engine=vllm"])  # valid without vLLM installed
    with pytest.raises(ConfigError, match=message):
        load_config(path, ["rollout.engine=vllm", override])


def test_rebuilt_images_that_vllm_would_resize_again_are_refused(model):
    from dataclasses import replace

    layout = PatchLayout.of(model)
    pixels = model.preprocess_images(_images(0, 1, size=(56, 84)))  # 56 x 84 -> 2 x 3 tokens
    tight = replace(layout, min_pixels=56 * 84 + 1, max_pixels=56 * 84 + 100)
    with pytest.raises(ValueError, match=r"would be resized again .*widen model.min_pixels"):
        patches_to_images(pixels, tight)
