"""planner: parameter counts of the Qwen2.5-VL presets, the formulas' structure, the CLI, and the
estimate against a measured tiny-VLM training step on CPU (stated tolerance: static categories
within 1%, activations within 10%, total within 5%; measured errors are in docs/SCALING.md)."""

import json

import pytest

from megatron_papo.compat import mcore_compat
from megatron_papo.planner import (
    GIB,
    PRESETS,
    RunShape,
    architecture_from_hf_config,
    format_plan,
    parse_gpu,
    plan_memory,
    stage_params,
    verdict,
)


@pytest.mark.parametrize("name,billions", [("qwen2_5_vl_3b", 3.75), ("qwen2_5_vl_7b", 8.29),
                                           ("qwen2_5_vl_32b", 33.45), ("qwen2_5_vl_72b", 73.4)])
def test_preset_parameter_counts_match_the_published_sizes(name, billions):
    # published totals (HF model cards / safetensors): 3B 3.75B, 7B 8.29B, 32B 33.5B, 72B 73.4B
    total = stage_params(PRESETS[name], tp=1, pp=1, stage="first").total
    assert total / 1e9 == pytest.approx(billions, rel=0.01)


def test_tp_and_pp_split_the_weights():
    arch = PRESETS["qwen2_5_vl_7b"]
    full = stage_params(arch, 1, 1, "first").total
    assert stage_params(arch, 4, 1, "first").total < full / 3
    first, last = stage_params(arch, 1, 2, "first"), stage_params(arch, 1, 2, "last")
    assert first.vision > 0 and last.vision == 0
    assert first.total + last.total == pytest.approx(full, rel=1e-6)


def test_distributed_optimizer_shards_state_and_recompute_cuts_activations():
    arch = PRESETS["qwen2_5_vl_7b"]
    base = RunShape(tp=2, dp=4, micro_batch=2, prompt_len=2048, response_len=1024)
    sharded, full = plan_memory(arch, base), plan_memory(arch, RunShape(**{**base.__dict__,
                                                                         "distributed_optimizer": False}))
    assert full.rows["optimizer"] == pytest.approx(4 * sharded.rows["optimizer"], rel=1e-6)
    assert sharded.rows["gradients"] == full.rows["gradients"]  # the fp32 grad buffer is never sharded
    rec = plan_memory(arch, RunShape(**{**base.__dict__, "recompute": True}))
    assert rec.rows["activations"] < sharded.rows["activations"] / 4
    grad_branch = plan_memory(arch, RunShape(**{**base.__dict__, "masked_grad": True}))
    assert grad_branch.rows["logits"] == 2 * sharded.rows["logits"]
    assert grad_branch.update_peak > sharded.update_peak


def test_fused_linear_removes_the_logits_and_keeps_a_tile():
    """3B at TP=1, 2 rows x 4096 tokens, both branches: the logits path holds [4, 4096, 151936] bf16
    logits and their gradient (9.3 GiB); fused_linear holds a 64 MiB tile's fp32 scratch and the
    fp32 gradient accumulators [T, H] (4 * 4096 * 2048 * 4 B = 128 MiB) and [4096, H] (32 MiB)."""
    arch = PRESETS["qwen2_5_vl_3b"]
    base = RunShape(tp=1, dp=8, micro_batch=2, prompt_len=2048, response_len=2048, masked_grad=True)
    plain = plan_memory(arch, base)
    fused = plan_memory(arch, RunShape(**{**base.__dict__, "fused_linear": True}))
    assert plain.rows["logits"] == 2 * 4 * 4096 * 151936 * 2
    assert fused.rows["logits"] == 0
    assert fused.rows["PAPO op scratch"] == 64 * 2**20 + 4 * 2048 * (4 * 4096 + 4096)
    assert plain.update_peak - fused.update_peak == (plain.rows["logits"] + plain.rows["PAPO op scratch"]
                                                     - fused.rows["PAPO op scratch"])


def test_interleaving_raises_first_stage_activations_by_the_schedule_factor():
    arch = PRESETS["qwen2_5_vl_72b"]
    base = RunShape(tp=8, pp=4, dp=2, micro_batch=1, prompt_len=1024, response_len=1024, images_per_sample=0,
                    num_microbatches=16, impl="local")
    plain = plan_memory(arch, base)
    inter = plan_memory(arch, RunShape(**{**base.__dict__, "vpp": 5}))
    # (1 + (pp - 1) / (pp * vpp)) on the language model's layers (the mask too; no images here)
    assert inter.rows["activations"] == pytest.approx(plain.rows["activations"] * (1 + 3 / 20), rel=1e-3)
    assert inter.rows["weights"] == plain.rows["weights"]


def test_vllm_share_and_verdict():
    arch, gpu = PRESETS["qwen2_5_vl_7b"], parse_gpu("h100-80gb")
    run = RunShape(tp=4, dp=2, micro_batch=2, prompt_len=4096, response_len=2048, recompute=True,
                   sequence_parallel=True, reference_model=True, vllm_mode="sleep",
                   vllm_gpu_memory_utilization=0.4)
    plan = plan_memory(arch, run, gpu)
    assert plan.rollout_peak > plan.update_peak and plan.kv_cache_tokens > 0
    fits, spare = verdict(plan, gpu)
    assert fits and spare > 0
    assert "FITS" in format_plan(plan, gpu)
    assert not verdict(plan, parse_gpu("24"))[0]
    with pytest.raises(ValueError, match="--gpu"):
        parse_gpu("tpu")


def test_hf_config_reader(tmp_path):
    cfg = {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
           "intermediate_size": 11008, "vocab_size": 151936, "tie_word_embeddings": True,
           "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = architecture_from_hf_config(tmp_path)
    assert arch.language == PRESETS["qwen2_5_vl_3b"].language
    assert arch.vision == PRESETS["qwen2_5_vl_3b"].vision
    with pytest.raises(ValueError, match="num_hidden_layers"):
        architecture_from_hf_config({"hidden_size": 8})


def _load_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "plan_memory.py"
    spec = importlib.util.spec_from_file_location("plan_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_from_project_config(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    main = _load_tool().main
    assert main(["--config", "examples/tiny_papo_g.yaml", "--gpu", "8", "--impl", "local"]) == 0
    out = capsys.readouterr().out
    assert "tiny_vlm" in out and "FITS" in out


@pytest.fixture(scope="module")
def one_rank_world():
    from megatron_papo.distributed import destroy_distributed, init_distributed

    patched_before = bool(mcore_compat.applied_patches())
    init_distributed(seed=0)
    yield
    destroy_distributed()
    if not patched_before:
        mcore_compat.revert_cpu_patches()


@pytest.mark.parametrize("micro_batch,seq,recompute", [(4, 128, False), (8, 256, False), (8, 256, True)])
def test_planner_matches_measured_tiny_vlm_step(one_rank_world, micro_batch, seq, recompute):
    from megatron_papo.config import ModelConfig
    from megatron_papo.testing.memory import measure_tiny_vlm_step

    measured = measure_tiny_vlm_step(ModelConfig(seq_length=seq, recompute_activations=recompute),
                                     vocab_size=192, image_token_id=191, micro_batch=micro_batch, seq_len=seq)
    plan = plan_memory(PRESETS["tiny_vlm"], RunShape(micro_batch=micro_batch, prompt_len=seq, response_len=0,
                                                     image_patches=16, precision="fp32", impl="local",
                                                     recompute=recompute, num_microbatches=1))
    for key in ("weights", "gradients", "optimizer", "logits"):
        assert plan.rows[key] == pytest.approx(getattr(measured, key), rel=0.01), key
    assert plan.rows["activations"] == pytest.approx(measured.activations, rel=0.10)
    planned_total = sum(plan.rows[k] for k in ("weights", "gradients", "optimizer", "activations", "logits"))
    assert planned_total == pytest.approx(measured.total, rel=0.05)
    assert measured.total < 1 * GIB


def test_config_image_patches_follow_the_resolution_settings():
    """--config sizes the vision tower for the largest image the config lets through."""
    import importlib.util
    from pathlib import Path

    from megatron_papo.config import load_config

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("plan_memory", root / "tools/plan_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    qwen = root / "examples/qwen2_5_vl_7b_papo_g.yaml"
    assert tool.config_image_patches(load_config(str(qwen))) == 1003520 // 196  # max_pixels / 14^2
    assert tool.config_image_patches(load_config(str(qwen), ["model.max_pixels=null", "model.min_pixels=null",
                                                             "model.image_size=448"])) == 1024
    assert tool.config_image_patches(load_config(str(qwen), ["model.max_pixels=null"])) == 5120  # default
    assert tool.config_image_patches(load_config(str(root / "examples/tiny_papo_g.yaml"))) is None


@pytest.mark.parametrize("args,match", [
    (["--tp", "3"], "tp=3 does not divide qwen2_5_vl_7b's num_attention_heads=28"),
    (["--tp", "8"], "tp=8 does not divide qwen2_5_vl_7b's num_attention_heads=28"),
    (["--tp", "16", "--gpus", "8"], "--gpus 8 is not a multiple of tp*pp*cp = 16"),
    (["--pp", "5"], "pp=5 x vpp=1 = 5 pipeline chunks do not divide qwen2_5_vl_7b's num_layers=28"),
    (["--tp", "0"], "RunShape.tp: expected >= 1, got 0"),
])
def test_cli_refuses_layouts_megatron_cannot_build_with_one_line_and_exit_2(args, match, capsys):
    from tools.plan_memory import main

    assert main(["--model", "qwen2_5_vl_7b", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {match}") and err.count("\n") == 1, err  # one line, no traceback
