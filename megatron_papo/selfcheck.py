"""Installation self-check: megatron-core, the process groups and the PAPO maths, end to end.

    python -m megatron_papo.selfcheck                          # one process
    torchrun --nproc-per-node 2 -m megatron_papo.selfcheck     # tensor parallel over 2 ranks

On every rank count it
 1. initialises torch.distributed + megatron-core with tp = world size (gloo on CPU, nccl on GPU);
 2. checks the fused vocab-parallel PAPO op (log-probs of both branches, KL, both entropies and
    their gradients) on bf16 logits against a float64 full-vocabulary reference;
 3. builds a tiny megatron-core GPT (local layer specs, same weights for any tp), runs the
    original and a perturbed ("masked") input, computes the full-vocabulary PAPO objective from
    the vocab-parallel logits and back-propagates; then rebuilds everything at tp = 1 and checks
    that the loss and the gradient norm agree.
It prints a table and exits non-zero when a check fails.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_papo.compat import mcore_compat
from megatron_papo.distributed import destroy_distributed, init_distributed, is_rank_zero
from megatron_papo.errors import exit_on_user_error
from megatron_papo.losses import PapoLossConfig, papo_loss
from megatron_papo.ops import papo_token_stats, vocab_parallel_log_probs

VOCAB, PADDED = 1000, 1024  # true vocabulary, padded to a multiple of 128 * tp for tp <= 8


@dataclass
class Check:
    name: str
    value: float
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.value <= self.tolerance


def _shard(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    width = x.shape[-1] // size
    return x[..., rank * width:(rank + 1) * width]


def check_fused_op(tp_group: dist.ProcessGroup | None, rank: int, size: int) -> list[Check]:
    """Fused op on bf16 shards vs float64 reference on the full vocabulary (same bf16 values)."""
    g = torch.Generator().manual_seed(0)
    tokens = 257
    full = (4 * torch.randn(tokens, PADDED, generator=g)).bfloat16()
    full_m = (full.float() + torch.randn(tokens, PADDED, generator=g)).bfloat16()
    target = torch.randint(0, VOCAB, (tokens,), generator=g)
    weights = torch.randn(5, tokens, generator=g, dtype=torch.float64)

    t0 = time.perf_counter()
    a = _shard(full, rank, size).clone().requires_grad_(True)
    b = _shard(full_m, rank, size).clone().requires_grad_(True)
    s = papo_token_stats(a, b, target, tp_group, VOCAB)
    outs = (s.log_probs, s.masked_log_probs, s.kl, s.entropy, s.masked_entropy)
    sum((w.float() * o).sum() for w, o in zip(weights, outs, strict=True)).backward()
    seconds = time.perf_counter() - t0

    ra = full[:, :VOCAB].double().requires_grad_(True)
    rb = full_m[:, :VOCAB].double().requires_grad_(True)
    lp, lq = torch.log_softmax(ra, -1), torch.log_softmax(rb, -1)
    ref = (lp.gather(-1, target[:, None])[:, 0], lq.gather(-1, target[:, None])[:, 0],
           (lp.exp() * (lp - lq)).sum(-1), -(lp.exp() * lp).sum(-1), -(lq.exp() * lq).sum(-1))
    sum((w * o).sum() for w, o in zip(weights, ref, strict=True)).backward()
    value_err = max((o.double() - r).abs().max().item() for o, r in zip(outs, ref, strict=True))
    pad = torch.zeros(tokens, PADDED - VOCAB, dtype=torch.float64)
    grad_ref = _shard(torch.cat([ra.grad, pad], -1), rank, size)
    grad_ref_m = _shard(torch.cat([rb.grad, pad], -1), rank, size)
    grad_err = max((a.grad.double() - grad_ref).abs().max().item(),
                   (b.grad.double() - grad_ref_m).abs().max().item())
    scale = max(grad_ref.abs().max().item(), grad_ref_m.abs().max().item())
    return [Check("fused op values vs fp64 (max abs)", value_err, 1e-4, seconds),
            Check("fused op grads vs fp64 (max abs / max|g|)", grad_err / scale, 1e-2, 0.0)]


def _tiny_gpt(tp: int) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                            use_cpu_initialization=True, tensor_model_parallel_size=tp,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(42)  # CPU init splits one master weight: identical model for any tp
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=PADDED,
                    max_sequence_length=32, position_embedding_type="rope")


def papo_step_on_gpt(tp_group: dist.ProcessGroup | None, tp: int) -> tuple[float, float, float]:
    """(loss, global grad norm, seconds) of one PAPO objective backward through a tiny GPT."""
    g = torch.Generator().manual_seed(1)
    b, s = 4, 32
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    masked_tokens = torch.where(torch.rand(b, s, generator=g) < 0.3, 0, tokens)  # stand-in for I_mask
    position_ids = torch.arange(s).expand(b, s)
    attn = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    target = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[:, :8] = False  # the "prompt"
    mask[:, -1] = False
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    cfg = PapoLossConfig(gamma=0.02, entropy_coef_orig=0.05, entropy_coef_mask=0.05, ref_kl_coef=0.0,
                         kl_prcp_mode="full", entropy_mode="full", masked_grad=True)
    model = _tiny_gpt(tp)
    t0 = time.perf_counter()
    logits = model(tokens, position_ids, attn)  # [b, s, PADDED / tp], vocab-parallel
    masked_logits = model(masked_tokens, position_ids, attn)
    with torch.no_grad():
        old_lp = vocab_parallel_log_probs(logits.detach(), target, tp_group, VOCAB) - 0.05
    loss, _ = papo_loss(logits, target, old_lp, adv, mask, config=cfg, masked_logits=masked_logits,
                        tp_group=tp_group, vocab_size=VOCAB)
    loss.backward()
    seconds = time.perf_counter() - t0
    sq = torch.zeros(())
    for p in model.parameters():
        if p.grad is None:
            continue
        part = p.grad.double().square().sum()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            dist.all_reduce(part, group=tp_group)  # sharded: sum over shards
        sq = sq + part.float()
    return loss.item(), sq.sqrt().item(), seconds


@exit_on_user_error  # a missing extra or a layout that does not fit: one line, exit 2 (errors.py)
def main() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pg = init_distributed(tp=world)
    rank = pg.tp_rank
    checks = check_fused_op(pg.tp, rank, pg.tp_size)
    loss_tp, norm_tp, sec_tp = papo_step_on_gpt(pg.tp, pg.tp_size)
    if world > 1:
        pg1 = init_distributed(tp=1)
        loss_1, norm_1, sec_1 = papo_step_on_gpt(pg1.tp, 1)
    else:
        loss_1, norm_1, sec_1 = loss_tp, norm_tp, sec_tp
    checks.append(Check(f"GPT PAPO loss, tp={world} vs tp=1 (rel)", abs(loss_tp - loss_1) / abs(loss_1),
                        1e-5, sec_tp))
    checks.append(Check(f"GPT grad norm, tp={world} vs tp=1 (rel)", abs(norm_tp - norm_1) / norm_1,
                        1e-4, sec_1))
    failed = [c for c in checks if not c.ok]
    if is_rank_zero():
        print(f"megatron_papo self-check: world={world} backend={dist.get_backend()} "
              f"torch={torch.__version__} megatron-core={mcore_compat.MCORE_VERSION} "
              f"cuda={torch.cuda.is_available()} te={mcore_compat.have_transformer_engine()} "
              f"vllm={mcore_compat.have_vllm()}")
        print(f"cpu patches: {', '.join(mcore_compat.applied_patches()) or 'none'}")
        print(f"{'check':48s} {'value':>10s} {'tolerance':>10s} {'time s':>8s}  result")
        for c in checks:
            print(f"{c.name:48s} {c.value:10.2e} {c.tolerance:10.0e} {c.seconds:8.3f}  "
                  f"{'ok' if c.ok else 'FAIL'}")
        print(f"GPT PAPO loss tp={world}: {loss_tp:.9g}  tp=1: {loss_1:.9g}; "
              f"grad norm tp={world}: {norm_tp:.9g}  tp=1: {norm_1:.9g}")
        print("self-check " + ("PASSED" if not failed else f"FAILED ({len(failed)} checks)"))
    destroy_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
