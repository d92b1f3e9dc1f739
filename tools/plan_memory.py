"""Per-GPU memory plan of a PAPO run (a thin CLI over megatron_papo.planner).

    python tools/plan_memory.py --model qwen2_5_vl_7b --tp 2 --dp 4 --micro-batch 4 \\
        --prompt-len 1024 --response-len 2048 --recompute --gpu h100-80gb
    python tools/plan_memory.py --config examples/qwen2_5_vl_7b_papo_g.yaml --gpus 8 --gpu h100-80gb
    python tools/plan_memory.py --hf-config /models/Qwen2.5-VL-7B-Instruct --tp 4 --gpu 80
    python tools/plan_memory.py --validate       # planner vs a measured tiny-VLM step on this CPU

Prints the table (GiB per GPU by category) and whether the plan fits the GPU; exits 1 when it
does not fit. With --config, the model / parallel / train / rollout / loss sections give the
shape; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_papo.errors import exit_on_user_error
from megatron_papo.planner import (
    GIB,
    PRESETS,
    Architecture,
    RunShape,
    architecture_from_hf_config,
    format_plan,
    parse_gpu,
    plan_memory,
    verdict,
)

_HF_NAMES = {f"qwen/qwen2.5-vl-{s}-instruct": f"qwen2_5_vl_{s}" for s in ("3b", "7b", "32b", "72b")}


def _preset_of(hf_path: str) -> str | None:
    """The preset of a hub id (Qwen/Qwen2.5-VL-7B-Instruct) or of a folder named like one
    (/models/Qwen2.5-VL-7B-Instruct), when the folder is not on this machine."""
    key = hf_path.lower().rstrip("/")
    if key in _HF_NAMES:
        return _HF_NAMES[key]
    return _HF_NAMES.get("qwen/" + key.rsplit("/", 1)[-1])


def architecture_from_config(cfg: Any) -> Architecture:
    """The architecture a project config describes: a local HF folder, a known HF model id, or
    the registry model's sizes (tiny_vlm preset overridden by the model section's fields)."""
    m = cfg.model
    if m.hf_path:
        if (Path(m.hf_path) / "config.json").is_file():
            arch = architecture_from_hf_config(m.hf_path)
        elif _preset_of(m.hf_path) is not None:
            arch = PRESETS[_preset_of(m.hf_path)]
        else:
            raise ValueError(f"model.hf_path={m.hf_path!r}: no config.json there and not one of "
                             f"{sorted(_HF_NAMES)}; pass --model or --hf-config")
    elif m.name == "tiny_vlm":
        arch = PRESETS["tiny_vlm"]
    else:
        raise ValueError(f"model.name={m.name!r} without model.hf_path: pass --model or --hf-config")
    sizes = {k: getattr(m, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                          "vocab_size") if getattr(m, k) is not None}
    if m.num_query_groups is not None:
        sizes["num_query_groups"] = m.num_query_groups
    elif "num_attention_heads" in sizes and arch.name == "tiny_vlm":
        sizes["num_query_groups"] = sizes["num_attention_heads"]
    if sizes:
        arch = dataclasses.replace(arch, language=dataclasses.replace(arch.language, **sizes))
    return arch


def config_image_patches(cfg: Any, patch: int = 14) -> int | None:
    """Vision patches of the largest image a qwen2_5_vl config lets through: (image_size / 14)^2
    at a fixed resolution, max_pixels / 14^2 with dynamic resolution (the default 28*28*1280 when
    unset); None for other models (the preset's value stays)."""
    m = cfg.model
    if m.name != "qwen2_5_vl":
        return None
    if m.image_size is not None:
        return (m.image_size // patch) ** 2
    return (m.max_pixels or 28 * 28 * 1280) // (patch * patch)


def run_from_config(cfg: Any, gpus: int | None) -> dict[str, Any]:
    """RunShape fields from a project config (dp from --gpus when given)."""
    par, loss = cfg.parallel, cfg.loss
    precision = "fp8" if cfg.model.fp8 != "none" else ("bf16" if cfg.model.precision != "fp32" else "fp32")
    mp = par.tp * par.pp * par.cp
    fields: dict[str, Any] = dict(
        tp=par.tp, pp=par.pp, cp=par.cp, vpp=par.vpp or 1, micro_batch=cfg.train.micro_batch_size,
        first_stage_layers=par.first_stage_layers, last_stage_layers=par.last_stage_layers,
        prompt_len=cfg.data.max_prompt_length, response_len=cfg.rollout.max_new_tokens,
        num_microbatches=max(1, cfg.train.update_prompts * cfg.rollout.n // cfg.train.micro_batch_size),
        precision=precision, sequence_parallel=par.sequence_parallel,
        recompute=cfg.model.recompute_activations, distributed_optimizer=par.use_distributed_optimizer,
        reference_model=loss.ref_kl_coef > 0,
        masked_grad=loss.uses_masked_branch and (loss.masked_grad or loss.needs_logits),
        fused_linear=loss.fused_linear,
        # the vLLM engine always sleeps during the update (rollout.vllm_sleep_level 1 or 2)
        vllm_mode="sleep" if cfg.rollout.engine == "vllm" else "none",
        vllm_gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    patches = config_image_patches(cfg)
    if patches is not None:
        fields["image_patches"] = patches
    if gpus is not None:
        if gpus % mp:
            raise ValueError(f"--gpus {gpus} is not a multiple of tp*pp*cp = {mp}")
        fields["dp"] = gpus // mp
    if cfg.model.transformer_impl == "local":
        fields["impl"] = "local"
    return fields


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=sorted(PRESETS), help="built-in architecture")
    src.add_argument("--hf-config", help="a Hugging Face config.json (or its folder)")
    p.add_argument("--config", help="a project YAML config (its model/parallel/train/rollout/loss sections)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--cp", type=int)
    p.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (interleaved schedule)")
    p.add_argument("--first-stage-layers", type=int, help="uneven pipeline: language-model layers on stage 0")
    p.add_argument("--last-stage-layers", type=int,
                   help="uneven pipeline: language-model layers on the last stage")
    p.add_argument("--dp", type=int)
    p.add_argument("--gpus", type=int, help="total GPUs: dp = gpus / (tp*pp*cp)")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--num-microbatches", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--images-per-sample", type=int)
    p.add_argument("--image-patches", type=int, help="vision patches per image before merging (448px: 1024)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"])
    p.add_argument("--impl", choices=["local", "transformer_engine"])
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--reference-model", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--masked-grad", action=argparse.BooleanOptionalAction, default=None,
                   help="masked branch keeps its graph at update time (full KL / entropies / masked_grad)")
    p.add_argument("--fused-linear", action=argparse.BooleanOptionalAction, default=None,
                   help="loss.fused_linear: no logits (statistics from hidden states + output weight)")
    p.add_argument("--vllm", choices=["none", "colocated", "sleep"], dest="vllm_mode")
    p.add_argument("--vllm-util", type=float, dest="vllm_gpu_memory_utilization")
    p.add_argument("--vllm-tp", type=int)
    p.add_argument("--gpu", default="h100-80gb", help="h100-80gb, h200-141gb, a100-80gb, ... or GiB")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context + NCCL buffers")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction kept free for fragmentation")
    p.add_argument("--validate", action="store_true", help="compare with a measured tiny-VLM step (CPU)")
    return p


_FLAG_FIELDS = ("tp", "pp", "cp", "dp", "vpp", "first_stage_layers", "last_stage_layers",
                "micro_batch", "num_microbatches", "prompt_len",
                "response_len", "images_per_sample", "image_patches", "precision", "impl",
                "sequence_parallel", "recompute", "distributed_optimizer", "reference_model",
                "masked_grad", "fused_linear", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tp")


def validate_on_cpu() -> int:
    """Planner vs measured bytes of a tiny-VLM step, for a few shapes (the docs' table)."""
    from megatron_papo.config import ModelConfig
    from megatron_papo.distributed import destroy_distributed, init_distributed
    from megatron_papo.testing.memory import measure_tiny_vlm_step

    init_distributed(seed=0)
    print(f"{'shape':<28} {'category':<12} {'measured MiB':>12} {'planned MiB':>12} {'error':>8}")
    for mb, seq, rec in [(4, 128, False), (8, 256, False), (8, 256, True), (2, 512, False)]:
        m = measure_tiny_vlm_step(ModelConfig(seq_length=seq, recompute_activations=rec), vocab_size=192,
                                  image_token_id=191, micro_batch=mb, seq_len=seq)
        plan = plan_memory(PRESETS["tiny_vlm"], RunShape(micro_batch=mb, prompt_len=seq, response_len=0,
                                                         image_patches=16, precision="fp32", impl="local",
                                                         recompute=rec, num_microbatches=1))
        est = {"weights": plan.rows["weights"], "gradients": plan.rows["gradients"],
               "optimizer": plan.rows["optimizer"], "activations": plan.rows["activations"],
               "logits": plan.rows["logits"]}
        est["total"] = sum(est.values())
        for key, value in est.items():
            got = m.total if key == "total" else getattr(m, key)
            print(f"{f'mb={mb} seq={seq} recompute={rec}':<28} {key:<12} {got / 2**20:12.3f} "
                  f"{value / 2**20:12.3f} {(value - got) / got:+8.1%}")
    destroy_distributed()
    return 0


@exit_on_user_error  # any UserError not caught below: "error: <message>", exit 2 (errors.py)
def main(argv: list[str] | None = None) -> int:
    """Exit 0 (fits), 1 (does not fit) or 2 (a wrong argument, config or layout: one line)."""
    args = build_parser().parse_args(argv)
    if args.validate:
        return validate_on_cpu()
    from megatron_papo.config import ConfigError

    try:
        return _plan(args)
    except (ValueError, ConfigError) as e:  # ConfigError is a ValueError; named for the reader
        print(f"error: {e}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {}
    arch: Architecture | None = None
    if args.config:
        from megatron_papo.config import load_config

        cfg = load_config(args.config, args.override)
        fields.update(run_from_config(cfg, args.gpus))
        arch = architecture_from_config(cfg)
    if args.model:
        arch = PRESETS[args.model]
    elif args.hf_config:
        arch = architecture_from_hf_config(args.hf_config)
    if arch is None:
        raise ValueError("pass --model, --hf-config or --config")
    for name in _FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.gpus is not None and "dp" not in fields:
        mp = fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1)
        if mp < 1 or args.gpus % mp:
            raise ValueError(f"--gpus {args.gpus} is not a multiple of tp*pp*cp = {mp}")
        fields["dp"] = args.gpus // mp
    if arch.name == "tiny_vlm":
        fields.setdefault("image_patches", 16)
    run = RunShape(**fields)
    gpu = parse_gpu(args.gpu)
    plan = plan_memory(arch, run, gpu)
    print(format_plan(plan, gpu, reserve_bytes=int(args.reserve_gib * GIB), headroom=args.headroom))
    fits, _ = verdict(plan, gpu, reserve_bytes=int(args.reserve_gib * GIB), headroom=args.headroom)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
