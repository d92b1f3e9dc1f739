"""Qwen2.5-VL at TP = PP = 1 in one process, against transformers on a tiny random model:
3-D rope positions, image preprocessing, logit parity (and that a mis-mapped weight fails it),
HF -> Megatron -> HF bit-identical round trips (untied, tied, bf16), the exporter's buckets,
and the error messages (unknown architecture, TP not dividing heads, missing shards)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FP32_PARITY_ABS = 1e-4  # measured ~4e-7 (max |logit| ~0.8): same maths, different summation order
FP32_PARITY_KL = 1e-9  # measured ~1e-15


@pytest.fixture(scope="module")
def converted(hf_dir, pg, tmp_path_factory):
    from megatron_papo.convert import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("meg") / "ckpt"
    convert_hf_to_megatron(hf_dir, out, pg)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _assert_bit_identical(a_dir: Path, b_dir: Path) -> int:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), f"{name} differs"
    return len(a)


# --- positions and images ---------------------------------------------------------------------
@pytest.mark.parametrize("grids", [[(4, 6)] * 3, [(4, 6), (2, 8), (6, 2)]])
def test_mrope_positions_equal_transformers_rope_index(hf_dir, grids):
    """Left padding, two images in a row separated by text, one image in the other row; one
    grid for all images (fixed resolution) and three different ones (dynamic)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.qwen2_5_vl import qwen_mrope_positions

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir))
    c = hf.config
    img, vs, ve = c.image_token_id, c.vision_start_token_id, c.vision_end_token_id
    sizes = [h * w // 4 for h, w in grids]  # merged tokens per image (2x2 merge)

    def image(k):
        return [vs] + [img] * sizes[k] + [ve]

    rows = [[5, 6, *image(0), 7, 8, 9, *image(1), 10], [11, 12, 13, *image(2), 14, 15]]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    thw = torch.tensor([[1, h, w] for h, w in grids])
    expected, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == img).int(), image_grid_thw=thw,
                                          attention_mask=mask)
    ours = qwen_mrope_positions(ids, (mask.cumsum(-1) - 1).clamp_min(0), img, thw[:, 1:] // 2)
    real = mask.bool()
    assert torch.equal(ours[:, real], expected[:, real])


def test_preprocess_matches_the_transformers_processor(hf_dir, pg):
    """Fixed resolution squares every image; dynamic keeps each aspect ratio (per-image grids),
    and num_image_tokens agrees with the grids the processor produces."""
    from megatron_papo.convert import build_for_conversion
    from megatron_papo.models.qwen2_5_vl import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, build_image_processor

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 255, (40, 150, 3), dtype=np.uint8))
    fixed = build_for_conversion(hf_dir, pg, image_size=56)
    pixels = fixed.preprocess_images([rgb, torch.from_numpy(np.array(rgb)).permute(2, 0, 1), wide])
    assert pixels.pixel_values.shape == (3 * 16, 3 * 2 * 14 * 14)
    assert pixels.grid_thw.tolist() == [[1, 4, 4]] * 3 and fixed.num_image_tokens((300, 20)) == 4
    ref = build_image_processor(fixed.arch, 56 * 56, 56 * 56)(images=[rgb], return_tensors="pt")
    assert torch.equal(pixels.pixel_values[:16], ref["pixel_values"].float())
    assert torch.equal(pixels.pixel_values[16:32], pixels.pixel_values[:16])

    dynamic = build_for_conversion(hf_dir, pg)
    got = dynamic.preprocess_images([rgb, wide])
    assert got.grid_thw.tolist() == [[1, 4, 4], [1, 2, 10]]  # 56x56 -> 56x56; 40x150 -> 28x140
    assert [dynamic.num_image_tokens((56, 56)), dynamic.num_image_tokens((40, 150))] == [4, 5]
    assert got.num_tokens(2) == 9 and len(got) == 2
    ref = build_image_processor(dynamic.arch, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)(
        images=[rgb, wide], return_tensors="pt")
    assert torch.equal(got.pixel_values, ref["pixel_values"].float())
    assert dynamic.num_image_tokens((2000, 3000)) <= 1280  # max_pixels bounds the tokens
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_for_conversion(hf_dir, pg, image_size=50)


# --- parity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [None, 84])
def test_logit_parity_tp1(hf_dir, converted, pg, image_size):
    """Dynamic resolution (three images, three grids) and a fixed 84x84 resolution."""
    from megatron_papo.convert import run_parity_check

    r = run_parity_check(hf_dir, converted, pg, image_size=image_size, max_abs_tol=FP32_PARITY_ABS,
                         kl_tol=FP32_PARITY_KL)
    assert r.passed, r.line()
    assert r.tokens > 40 and r.max_abs_logit > 0.1  # a real batch, non-trivial logits


def test_mismapped_weight_fails_parity(hf_dir, pg, tmp_path):
    """Swap gate_proj and up_proj of one layer in a copy of the HF folder, convert the copy, and
    check it against the original: the parity check must fail (library and CLI exit code 1)."""
    from megatron_papo.convert import convert_hf_to_megatron, run_parity_check

    bad = tmp_path / "bad_hf"
    shutil.copytree(hf_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    gate, up = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    tensors[gate], tensors[up] = tensors[up].clone(), tensors[gate].clone()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    convert_hf_to_megatron(bad, tmp_path / "bad_meg", pg)
    r = run_parity_check(hf_dir, tmp_path / "bad_meg", pg)
    assert not r.passed and r.max_abs_diff > 1e-2, r.line()
    cli = subprocess.run([sys.executable, str(ROOT / "tools/check_hf_parity.py"), "--hf", str(hf_dir),
                          "--megatron", str(tmp_path / "bad_meg")], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "FAIL: max |logit_hf - logit_megatron|" in cli.stdout


# --- round trips --------------------------------------------------------------------------------
def test_round_trip_bit_identical(hf_dir, converted, pg, tmp_path):
    from megatron_papo.convert import convert_megatron_to_hf

    info = convert_megatron_to_hf(converted, tmp_path / "back", pg)
    n = _assert_bit_identical(hf_dir, tmp_path / "back")
    assert info["tensors"] == n
    config = json.loads((tmp_path / "back/config.json").read_text())
    assert config == json.loads((hf_dir / "config.json").read_text())


@pytest.mark.parametrize("kind", ["tied", "bf16", "sharded"])
def test_round_trip_variants(kind, pg, tmp_path):
    """Tied embeddings (no lm_head tensor, as Qwen2.5-VL-3B), bf16 weights, and a multi-file
    checkpoint written in small shards (index + several files) read back."""
    from megatron_papo.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl

    src = make_tiny_qwen2_5_vl(tmp_path / "src", seed=4, tied=kind == "tied",
                               dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    convert_hf_to_megatron(src, tmp_path / "meg", pg)
    shard = 1 << 18 if kind == "sharded" else 5 << 30
    info = convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", pg, max_shard_bytes=shard)
    if kind == "sharded":
        assert len(info["shards"]) > 3
        index = json.loads((tmp_path / "back/model.safetensors.index.json").read_text())
        merged = {}
        for f in sorted(set(index["weight_map"].values())):
            merged.update(load_file(str(tmp_path / "back" / f)))
        save_file(merged, str(tmp_path / "merged.safetensors"))
        (tmp_path / "m").mkdir()
        shutil.move(tmp_path / "merged.safetensors", tmp_path / "m/model.safetensors")
        _assert_bit_identical(src, tmp_path / "m")
        convert_hf_to_megatron(tmp_path / "back", tmp_path / "meg2", pg)  # the sharded folder reads back
        return
    names = set(load_file(str(tmp_path / "back/model.safetensors")))
    assert ("lm_head.weight" in names) == (kind != "tied")
    _assert_bit_identical(src, tmp_path / "back")
    if kind == "tied":  # transformers loads it and ties the head to the embedding
        from transformers import Qwen2_5_VLForConditionalGeneration

        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "back"))
        assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()


def test_exporter_buckets_are_bounded(hf_dir, converted, pg):
    from megatron_papo.convert import build_for_conversion
    from megatron_papo.models.hf_qwen2_5_vl import iter_hf_buckets
    from megatron_papo.training.checkpointing import load_checkpoint

    model = build_for_conversion(hf_dir, pg)
    load_checkpoint(converted, [model], None, pg, load_optimizer=False, load_rng=False)
    limit = 64 * 1024
    buckets = list(iter_hf_buckets([model], pg, bucket_bytes=limit))
    ref = load_file(str(hf_dir / "model.safetensors"))
    names = [n for b in buckets for n, _ in b]
    assert sorted(names) == sorted(ref) and len(buckets) > 5
    for b in buckets:
        sizes = [t.numel() * t.element_size() for _, t in b]
        assert sum(sizes) <= limit or len(b) == 1
        for n, t in b:
            assert torch.equal(t, ref[n])


# --- errors -------------------------------------------------------------------------------------
def test_unknown_architecture_is_named(tmp_path, pg):
    from megatron_papo.convert import convert_hf_to_megatron
    from megatron_papo.models.qwen2_5_vl import UnsupportedArchitectureError

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama/config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                             "model_type": "llama"}))
    with pytest.raises(UnsupportedArchitectureError, match=r"LlamaForCausalLM.*supported: "
                                                           r"Qwen2_5_VLForConditionalGeneration"):
        convert_hf_to_megatron(tmp_path / "llama", tmp_path / "out", pg)
    cli = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf",
                          str(tmp_path / "llama"), "--out", str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 2 and "not supported" in cli.stderr
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert_hf_to_megatron(tmp_path / "nowhere", tmp_path / "out", pg)


def test_tp_not_dividing_heads_is_named(hf_dir):
    from megatron_papo.models.qwen2_5_vl import Qwen25VLArch, load_hf_config

    arch = Qwen25VLArch.from_hf_config(load_hf_config(hf_dir))  # 6 heads, 2 KV heads, 4 layers
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide the 6 attention heads"):
        arch.check_parallel(4, 1)
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide the 2 key/value heads"):
        arch.check_parallel(3, 1)
    with pytest.raises(ValueError, match=r"parallel.pp=3 does not divide the model's 4 layers"):
        arch.check_parallel(1, 3)
    with pytest.raises(ValueError, match=r"parallel.vpp=4 must divide every stage's layer count"):
        arch.check_parallel(1, 2, 4)
    arch.check_parallel(2, 2)
    arch.check_parallel(1, 2, 2)
    arch.check_parallel(1, 3, first_stage_layers=2)  # uneven: 2 + 1 + 1
    with pytest.raises(ValueError, match="cannot share the remaining 3 of 4 layers"):
        arch.check_parallel(1, 3, first_stage_layers=1)


def test_missing_shards_and_tensors_are_named(hf_dir, tmp_path, pg):
    from megatron_papo.convert import convert_hf_to_megatron
    from megatron_papo.models.hf_qwen2_5_vl import HFCheckpointError, SafetensorsReader

    folder = tmp_path / "split"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder / "config.json")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:half]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in names[half:]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(HFCheckpointError, match=r"1 are missing .*model-00002-of-00002.safetensors"):
        SafetensorsReader(folder)
    # a single file with one tensor dropped: the error names the tensor
    drop = "model.layers.2.self_attn.k_proj.bias"
    single = tmp_path / "dropped"
    single.mkdir()
    shutil.copy(hf_dir / "config.json", single / "config.json")
    save_file({k: v for k, v in tensors.items() if k != drop}, str(single / "model.safetensors"))
    with pytest.raises(HFCheckpointError, match=f"no tensor '{drop}'"):
        convert_hf_to_megatron(single, tmp_path / "out", pg)
    with pytest.raises(HFCheckpointError, match=r"no model\.safetensors"):
        SafetensorsReader(tmp_path)


def test_transformers5_in_memory_names_are_read(hf_dir, tmp_path):
    from megatron_papo.models.hf_qwen2_5_vl import SafetensorsReader

    tensors = load_file(str(hf_dir / "model.safetensors"))
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    (tmp_path / "new").mkdir()
    save_file(renamed, str(tmp_path / "new/model.safetensors"))
    reader = SafetensorsReader(tmp_path / "new")
    assert reader.names() == sorted(tensors)
    assert torch.equal(reader.get("visual.merger.mlp.0.weight"), tensors["visual.merger.mlp.0.weight"])


# --- tokenizer ----------------------------------------------------------------------------------
def _tiny_hf_tokenizer(folder: Path) -> Path:
    """A word-level Hugging Face tokenizer with Qwen's special tokens, built and saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>"]
    words = ["what", "shape", "is", "this", "?", "system", "user", "assistant", "you", "are", "a", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=specials[1:])
    tok.save_pretrained(str(folder))
    return folder


def test_hf_tokenizer_wraps_images_in_vision_tokens(tmp_path):
    from megatron_papo.data.templates import encode_prompt, get_template
    from megatron_papo.data.tokenizer import HFTokenizer, Tokenizer

    tok = HFTokenizer(_tiny_hf_tokenizer(tmp_path / "tok"))
    assert isinstance(tok, Tokenizer)
    assert (tok.image_token_id, tok.eos_id, tok.pad_id, tok.bos_id) == (5, 2, 0, None)
    assert (tok.image_prefix_ids, tok.image_suffix_ids) == ([3], [4])
    parts = get_template("plain").parts("what shape is this ?", 1)
    ids = encode_prompt(tok, parts, num_image_tokens=4)
    assert ids[:6] == [3, 5, 5, 5, 5, 4] and tok.decode(ids[6:]) == "what shape is this ?"
    chat = encode_prompt(tok, get_template("qwen_chat_think_boxed").parts("what shape is this ?", 1), 4)
    assert chat[0] == 1 and chat.count(5) == 4 and chat[-1] not in (tok.eos_id,)  # <|im_start|> ... assistant
    with pytest.raises(FileNotFoundError, match="not a Hugging Face tokenizer folder"):
        HFTokenizer(tmp_path)


# --- review fixes -------------------------------------------------------------------------------
def test_bf16_model_keeps_the_vision_rope_frequencies_in_fp32(hf_dir, pg):
    from megatron_papo.convert import build_for_conversion

    fp32 = build_for_conversion(hf_dir, pg, precision="fp32")
    bf16 = build_for_conversion(hf_dir, pg, precision="bf16")
    assert bf16.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    buffers = dict(bf16.visual.named_buffers())
    assert buffers, "the vision tower has rope buffers"
    for name, buf in fp32.visual.named_buffers():
        assert buffers[name].dtype == torch.float32 and torch.equal(buffers[name], buf), name


def test_unused_hf_tensors_and_self_overwrite_are_refused(hf_dir, converted, pg, tmp_path):
    from megatron_papo.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_papo.models.hf_qwen2_5_vl import HFCheckpointError

    extra = tmp_path / "extra"
    shutil.copytree(hf_dir, extra)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["model.layers.99.mlp.up_proj.weight"] = torch.zeros(2, 2)  # a layer the config lacks
    save_file(tensors, str(extra / "model.safetensors"))
    with pytest.raises(HFCheckpointError, match=r"1 tensors are not used .*layers\.99"):
        convert_hf_to_megatron(extra, tmp_path / "out", pg)
    # the export never overwrites the folder it takes its config from, and keeps an old export
    # until the new one is complete
    with pytest.raises(HFCheckpointError, match="would overwrite"):
        convert_megatron_to_hf(converted, hf_dir, pg, hf_config=hf_dir)
    out = tmp_path / "back"
    convert_megatron_to_hf(converted, out, pg, max_shard_bytes=1 << 18)
    convert_megatron_to_hf(converted, out, pg)  # one file now: the shards and index are replaced
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert not (out / ".export_tmp").exists()
