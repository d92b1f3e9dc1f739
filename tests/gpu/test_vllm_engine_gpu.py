"""vLLM on a GPU (skipped without CUDA / vLLM): a tiny random Qwen2.5-VL folder (with a matching
word-level tokenizer and processor), vLLM started with dummy weights, the Megatron model's weights
synced in (timed, printed), images + expanded placeholders generated from, and vLLM's sampled-token
log-probs (temperature 1, no top-k / top-p) equal to the trainer's recomputed ones within bf16
tolerance. Run: pytest -m gpu tests/gpu/test_vllm_engine_gpu.py -s"""

import os

import numpy as np
import pytest
import torch

from megatron_papo.compat import mcore_compat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not mcore_compat.have_vllm(), reason="needs vLLM"),
]

LOGPROB_MAX_ABS = 0.15  # nats; bf16 weights and activations on both sides, different kernels
LOGPROB_MEAN_ABS = 0.02


def _tiny_folder(path):
    """Tiny Qwen2.5-VL (bf16) + a tokenizer whose special ids match its config + a processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl, tiny_qwen_config

    cfg = tiny_qwen_config()
    names = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", cfg.image_token_id: "<|image_pad|>",
             cfg.video_token_id: "<|video_pad|>", cfg.vision_start_token_id: "<|vision_start|>",
             cfg.vision_end_token_id: "<|vision_end|>"}
    vocab = {names.get(i, f"w{i}"): i for i in range(cfg.text_config.vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=[n for i, n in sorted(names.items()) if i > 2])
    make_tiny_qwen2_5_vl(path, seed=0, dtype=torch.bfloat16)
    tok.save_pretrained(str(path))  # vLLM's processor = this tokenizer + preprocessor_config.json
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(str(path))
    return path, cfg


@pytest.fixture(scope="module")
def world():
    from megatron_papo.distributed import destroy_distributed, init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    pg = init_distributed(seed=0)
    yield pg
    destroy_distributed()


def test_vllm_generates_with_synced_weights_and_matching_log_probs(world, tmp_path):
    from PIL import Image

    from megatron_papo.convert import build_for_conversion
    from megatron_papo.models.hf_qwen2_5_vl import SafetensorsReader, load_hf_weights
    from megatron_papo.rollout import RolloutRequest, SamplingParams
    from megatron_papo.rollout.vllm_engine import PatchLayout, VLLMBackend, VLLMRolloutEngine

    pg = world
    hf, cfg = _tiny_folder(tmp_path / "hf")
    model = build_for_conversion(hf, pg, precision="bf16", image_size=56)
    load_hf_weights(model, SafetensorsReader(hf))
    model = model.cuda().eval()
    backend = VLLMBackend(str(hf), tensor_parallel_size=1, gpu_memory_utilization=0.3,
                          image_pixels=(model.min_pixels, model.max_pixels),
                          max_model_len=256, seed=0, dtype="bfloat16", enforce_eager=True,
                          logprobs_mode="raw_logprobs")
    engine = VLLMRolloutEngine(backend, eos_id=2, layout=PatchLayout.of(model))
    engine.release()  # as between training steps: the sync wakes the weights only
    stats = engine.sync_weights([model], pg, bucket_bytes=1 << 20)
    print(f"\nvLLM weight sync: {stats['tensors']:.0f} tensors, {stats['bytes'] / 2**20:.2f} MiB in "
          f"{stats['buckets']:.0f} buckets, {stats['sync_seconds'] * 1e3:.1f} ms")
    engine.resume()

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)) for _ in range(2)]
    one, two = model.preprocess_images(images[:1]), model.preprocess_images(images[1:])
    img = [cfg.vision_start_token_id, *[cfg.image_token_id] * 4, cfg.vision_end_token_id]
    prompts = [[1, *img, 10, 11, 12], [1, 13, *img, 14]]
    params = SamplingParams(n=3, temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=12, seed=5)
    result = engine.generate(RolloutRequest(prompts, images=[[one], [two]]), params)
    assert len(result) == 6 and all(len(r) >= 1 for r in result.response_ids)

    # the trainer's log-probs of the same tokens (one forward over prompt + response)
    pad = result.padded(pad_id=0, device="cuda")
    p = pad.prompt_ids.shape[1]
    from megatron_papo.models.base import concat_pixels

    row_pixels = concat_pixels([(one, two)[i // 3] for i in range(6)])
    with torch.no_grad():
        logits = model(pad.input_ids, pad.position_ids, pad.attention_mask, row_pixels)
    lp = torch.log_softmax(logits.float()[..., :cfg.text_config.vocab_size], dim=-1)
    resp = pad.response_ids
    ours = lp[:, p - 1:-1].gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    mask = pad.response_mask
    diff = (ours - pad.policy_log_probs).abs()[mask]  # raw = temperature-1 policy (any vLLM)
    print(f"log-prob |vLLM - trainer|: max {diff.max().item():.4f}, mean {diff.mean().item():.4f} "
          f"over {int(mask.sum())} tokens")
    assert diff.max().item() <= LOGPROB_MAX_ABS and diff.mean().item() <= LOGPROB_MEAN_ABS
    engine.release()
