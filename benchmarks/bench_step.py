"""One PAPO/GRPO update step of a Qwen2-shaped megatron-core GPT (random weights): time, tokens/s, MFU.

    python benchmarks/bench_step.py --tiny                                 # CPU, about a minute
    python benchmarks/bench_step.py --device cuda --peak-tflops 989        # GPU, Qwen2.5-0.5B shape

Model (defaults = the Qwen2.5-0.5B language model, vocabulary of Qwen2.5-VL): 24 layers, hidden
896, 14 query heads, 2 KV groups (GQA), SwiGLU ffn 4864, RMSNorm, qkv bias, rope base 1e6, vocab
152064, untied output layer: ~0.63 B parameters. ``--tiny`` keeps the vocabulary and shrinks the
rest (2 layers, hidden 128, 4 heads, 2 groups, ffn 352) for a CPU run.

One update step, per algorithm (configs from megatron_papo.config.ALGORITHM_PRESETS):
  grpo:    forward (with grad) of B sequences + GRPO loss (papo_loss, gamma = 0) + backward + AdamW;
  papo_g / papo_d, --kl-prcp-mode k3 (the presets' sampled forms): a no-grad forward of the
           masked branch for its log-probs, then the GRPO work + PAPO loss terms;
  papo_g / papo_d, --kl-prcp-mode full: both branches in one forward (2B sequences, the trainer's
           layout), the loss from both logit tensors via ops.papo_token_stats (full KL and
           entropies), backward through the original branch only (masked branch detached).
The "masked image" of this text-only model: the first --image-tokens prompt positions (the
image's place) hold a mask token id in the masked branch. Old / reference log-probs and
advantages are inputs prepared before timing (the rollout's work, not the update's).

MFU = model FLOPs / step time / --peak-tflops. Model FLOPs per token of a pass: 2 N (N = all
parameters except the input embedding, i.e. the matmul weights incl. the output layer) + 4 L S h
(attention scores and values, dense count, L layers, S tokens per sequence, h hidden); a pass with
backward costs 3x its forward. On CPU, --peak-tflops defaults to a measured fp32 matmul rate
(4096^2 GEMM), so MFU there is "fraction of this CPU's GEMM throughput", not a hardware peak.
Times: wall clock (CPU) or cuda events (GPU) per step, median of --steps after --warmup steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    """Language-model shape."""

    num_layers: int = 24
    hidden: int = 896
    heads: int = 14
    kv_groups: int = 2
    ffn: int = 4864
    vocab: int = 152064


TINY = Shape(num_layers=2, hidden=128, heads=4, kv_groups=2, ffn=352)


def build_model(shape: Shape, seq: int, precision: str, device: str) -> torch.nn.Module:
    """A megatron-core GPTModel of this shape (local or TE layer spec), random init, on ``device``."""
    from megatron.core.models.gpt import GPTModel

    from megatron_papo.compat.mcore_compat import have_transformer_engine
    from megatron_papo.models.base import common_transformer_fields, make_transformer_config
    from megatron_papo.models.tiny_vlm import language_layer_spec

    impl = "transformer_engine" if device == "cuda" and have_transformer_engine() else "local"
    config = make_transformer_config(
        num_layers=shape.num_layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_groups, ffn_hidden_size=shape.ffn, normalization="RMSNorm",
        layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=True, pipeline_model_parallel_size=1, **common_transformer_fields(1, precision))
    model = GPTModel(config=config, transformer_layer_spec=language_layer_spec(impl), vocab_size=shape.vocab,
                     max_sequence_length=seq, position_embedding_type="rope", rotary_base=1_000_000,
                     share_embeddings_and_output_weights=False)
    return model.to(device)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that multiply activations: all but the input embedding table."""
    return sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)


def pass_flops(n_params: int, shape: Shape, seq: int, tokens: int, backward: bool) -> float:
    """FLOPs of one pass over ``tokens`` tokens: (2 N + 4 L S h) per token, x3 with backward."""
    per_token = 2 * n_params + 4 * shape.num_layers * seq * shape.hidden
    return per_token * tokens * (3 if backward else 1)


def measured_matmul_tflops(device: str, n: int = 4096) -> float:
    """Best-of-3 fp32 (CPU) / bf16 (GPU) square GEMM rate in TFLOP/s."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Batch:
    """Inputs of one update: ids [B, S] (and the masked branch's), targets, masks, rollout log-probs."""

    ids: torch.Tensor
    masked_ids: torch.Tensor
    positions: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor
    old_log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    advantages: torch.Tensor


def make_batch(model: torch.nn.Module, shape: Shape, batch: int, seq: int, prompt: int, image_tokens: int,
               device: str) -> Batch:
    """Random token ids; the rollout's old log-probs come from a no-grad forward of the model."""
    from megatron_papo.ops import vocab_parallel_log_probs

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab - 1, (batch, seq), generator=gen).to(device)
    masked = ids.clone()
    masked[:, :image_tokens] = shape.vocab - 1  # the "mask token" over the image's positions
    target = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    pos = torch.arange(seq, device=device)
    loss_mask = ((pos >= prompt - 1) & (pos < seq - 1)).expand(batch, seq).float()
    positions = pos.expand(batch, seq)
    with torch.no_grad():
        logits = model(ids, positions, None)
        old = vocab_parallel_log_probs(logits, target).float()
    noise = torch.randn(batch, seq, generator=gen).to(device)
    return Batch(ids, masked, positions, target, loss_mask, old + 0.05 * noise, old - 0.05 * noise,
                 torch.randn(batch, generator=gen).to(device))


def update_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, b: Batch, algorithm: str,
                kl_mode: str, op_impl: str, vocab_size: int) -> float:
    """One update (see module docstring); returns the loss value."""
    from megatron_papo.config import ALGORITHM_PRESETS
    from megatron_papo.losses import PapoLossConfig, papo_loss
    from megatron_papo.ops import vocab_parallel_log_probs

    fields = dict(ALGORITHM_PRESETS[algorithm]["loss"], op_impl=op_impl)
    papo = algorithm != "grpo"
    if papo and kl_mode == "full":
        fields.update(kl_prcp_mode="full", entropy_mode="full")
    cfg = PapoLossConfig(**fields)
    optimizer.zero_grad(set_to_none=True)
    masked_logits = masked_log_probs = None
    if papo and kl_mode == "full":
        both = model(torch.cat([b.ids, b.masked_ids]), torch.cat([b.positions, b.positions]), None)
        logits, masked_logits = both.chunk(2, dim=0)
    else:
        if papo:
            with torch.no_grad():
                masked_log_probs = vocab_parallel_log_probs(model(b.masked_ids, b.positions, None), b.target)
        logits = model(b.ids, b.positions, None)
    loss, _ = papo_loss(logits, b.target, b.old_log_probs, b.advantages, b.loss_mask, config=cfg,
                        masked_logits=masked_logits, masked_log_probs=masked_log_probs,
                        ref_log_probs=b.ref_log_probs, vocab_size=vocab_size)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def step_flops(n_params: int, shape: Shape, seq: int, tokens: int, algorithm: str, kl_mode: str) -> float:
    """Model FLOPs of one update step of ``algorithm`` over ``tokens`` = B * S tokens."""
    train = pass_flops(n_params, shape, seq, tokens, backward=True)
    if algorithm == "grpo":
        return train
    return train + pass_flops(n_params, shape, seq, tokens, backward=False)  # the masked branch's forward


def time_steps(fn, device: str, warmup: int, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            fn()
            ev[1].record()
            torch.cuda.synchronize()
            times.append(ev[0].elapsed_time(ev[1]) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="CPU-sized model (2 layers, hidden 128), vocab kept")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-groups", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8 GPU, 2 CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048 GPU, 256 CPU)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default seq / 2)")
    p.add_argument("--image-tokens", type=int, default=None, help="masked positions (default prompt / 2)")
    p.add_argument("--algorithms", default="grpo,papo_g,papo_d")
    p.add_argument("--kl-prcp-mode", default="k3", choices=["k3", "full"],
                   help="PAPO's perception KL: presets' sampled k3, or the exact full-vocabulary KL")
    p.add_argument("--op-impl", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default bf16 GPU, fp32 CPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator (e.g. 989 for H100 SXM bf16 dense); default: measured GEMM rate")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    import dataclasses

    cuda = args.device == "cuda"
    base = TINY if args.tiny else Shape()
    shape = dataclasses.replace(base, **{k: v for k, v in dict(
        num_layers=args.layers, hidden=args.hidden, heads=args.heads, kv_groups=args.kv_groups, ffn=args.ffn,
        vocab=args.vocab).items() if v is not None})
    batch = args.batch or (8 if cuda else 2)
    seq = args.seq or (2048 if cuda else 256)
    prompt = args.prompt or seq // 2
    image_tokens = args.image_tokens if args.image_tokens is not None else prompt // 2
    precision = args.precision or ("bf16" if cuda else "fp32")

    from megatron_papo.distributed import destroy_distributed, init_distributed

    init_distributed(seed=0)  # one-rank world; applies megatron-core's CPU patches on CPU
    try:
        model = build_model(shape, seq, precision, args.device)
        n_all = sum(p.numel() for p in model.parameters())
        n_mm = matmul_params(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, **({"fused": True} if cuda else {}))
        b = make_batch(model, shape, batch, seq, prompt, image_tokens, args.device)
        peak = args.peak_tflops or measured_matmul_tflops(args.device)
        peak_src = "given" if args.peak_tflops else "measured GEMM"
        tokens = batch * seq
        dev = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
        print(f"# device {dev}, torch {torch.__version__}, precision {precision}; model {shape}, "
              f"{n_all / 1e6:.1f} M params ({n_mm / 1e6:.1f} M matmul); batch {batch} x seq {seq} "
              f"(prompt {prompt}, masked {image_tokens}); kl_prcp_mode {args.kl_prcp_mode}, "
              f"op_impl {args.op_impl}; peak {peak:.3g} TFLOP/s ({peak_src})")
        print("| algorithm | step s | tokens/s | vs GRPO | model TFLOP/step | MFU |")
        print("|---|---|---|---|---|---|")
        grpo_time = None
        for algo in args.algorithms.split(","):
            def step(a: str = algo) -> float:
                return update_step(model, optimizer, b, a, args.kl_prcp_mode, args.op_impl, shape.vocab)

            sec = time_steps(step, args.device, args.warmup, args.steps)
            flops = step_flops(n_mm, shape, seq, tokens, algo, args.kl_prcp_mode)
            grpo_time = sec if algo == "grpo" else grpo_time
            ratio = f"{sec / grpo_time:.2f}" if grpo_time else "-"
            print(f"| {algo} | {sec:.3f} | {tokens / sec:.0f} | {ratio} | {flops / 1e12:.3f} | "
                  f"{flops / sec / (peak * 1e12):.3f} |", flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
