"""Qwen2.5-VL on 2 gloo ranks, in ONE spawned run (each spawn costs seconds), against transformers
and against TP=1:

1. TP=2: convert HF -> Megatron with each rank reading its own shards; logit parity vs
   transformers; export back to HF bit-identical; the loss and the gradients of the vision tower
   (replicated over TP) and of TP-sharded LM weights equal TP=1's.
2. PP=2 (vision tower + embedding + layers 0-1 on stage 0): the TP=2 checkpoint loads, logit
   parity vs transformers, and the export (TP gathers + PP broadcasts) is bit-identical.
3. CP=2 (zigzag-sharded sequences with 3-D rope positions and images of three grids): logit
   parity vs transformers, and the loss and the gradients (summed over the cp ranks) equal TP=1's.
"""

import pytest
import torch

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow

FP32_PARITY_ABS, FP32_PARITY_KL = 1e-4, 1e-9
GRAD_PARAMS = ("visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.2.weight",
               "language_model.decoder.layers.0.input_layernorm.weight")


def _loss_and_grads(model, batch, pg) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean log-prob of the next real token (vocab-parallel), and full gradients of GRAD_PARAMS
    plus the full embedding gradient (TP shards gathered). Under context parallelism the batch
    is right-padded to a multiple of 2 * cp, each rank's loss is its zigzag shard's share, and
    the loss and gradients are summed over the cp group."""
    import torch.distributed as dist

    from megatron_papo.ops import vocab_parallel_log_probs
    from megatron_papo.ops.context_parallel import pad_to_multiple, zigzag_split

    model.train()
    model.zero_grad(set_to_none=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = torch.roll(ids, -1, 1)
    keep = (mask & torch.roll(mask, -1, 1)).float()
    keep[:, -1] = 0
    total = keep.sum()
    positions = batch["position_ids"]
    if pg.cp_size > 1:
        ids, mask, positions, target, keep = (pad_to_multiple(t, 2 * pg.cp_size, dim=1)
                                              for t in (ids, mask, positions, target, keep))
        target, keep = (zigzag_split(t, pg.cp_rank, pg.cp_size, dim=1) for t in (target, keep))
    logits = model(ids, positions, mask, batch["pixel_values"])
    lp = vocab_parallel_log_probs(logits, target, pg.tp, model.vocab_size)
    loss = (lp * keep).sum() / total
    loss.backward()
    named = dict(model.named_parameters())
    grads = {n: named[n].grad.clone() for n in GRAD_PARAMS}
    if pg.cp_size > 1:
        loss = loss.detach().clone()
        for t in (loss, *grads.values(), named["language_model.embedding.word_embeddings.weight"].grad):
            dist.all_reduce(t, group=pg.cp)
    emb = named["language_model.embedding.word_embeddings.weight"].grad
    if pg.tp_size > 1:
        parts = [torch.empty_like(emb) for _ in range(pg.tp_size)]
        dist.all_gather(parts, emb.contiguous(), group=pg.tp)
        emb = torch.cat(parts)
    grads["embedding"] = emb[:model.vocab_size].clone()
    return loss.item(), grads


def _run(rank: int, world: int, hf_dir: str, work: str) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    from megatron_papo.convert import (
        build_for_conversion,
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        parity_batch,
        run_parity_check,
    )
    from megatron_papo.distributed import barrier, init_distributed
    from megatron_papo.training.checkpointing import load_checkpoint

    work_dir = Path(work)
    ref = load_file(str(Path(hf_dir) / "model.safetensors"))

    def identical(folder: Path) -> bool:
        back = load_file(str(folder / "model.safetensors"))
        same = all(torch.equal(back[k].view(-1).view(torch.uint8), ref[k].view(-1).view(torch.uint8))
                   for k in ref)
        return sorted(back) == sorted(ref) and same

    out: dict = {}
    # 1. TP=2
    pg = init_distributed(tp=2, seed=0)
    convert_hf_to_megatron(hf_dir, work_dir / "tp2", pg)
    r = run_parity_check(hf_dir, work_dir / "tp2", pg, max_abs_tol=FP32_PARITY_ABS, kl_tol=FP32_PARITY_KL)
    out["tp2_parity"] = (r.passed, r.line())
    convert_megatron_to_hf(work_dir / "tp2", work_dir / "back_tp2", pg)
    barrier()
    out["tp2_identical"] = identical(work_dir / "back_tp2")
    model = build_for_conversion(hf_dir, pg)
    load_checkpoint(work_dir / "tp2", [model], None, pg, load_optimizer=False, load_rng=False)
    batch = parity_batch(model, seed=1)
    out["tp2_loss"] = _loss_and_grads(model, batch, pg)

    # the TP=1 reference (dp=2: both ranks compute the same thing)
    pg = init_distributed(tp=1, seed=0)
    model = build_for_conversion(hf_dir, pg)
    load_checkpoint(work_dir / "tp2", [model], None, pg, load_optimizer=False, load_rng=False)
    out["tp1_loss"] = _loss_and_grads(model, batch, pg)
    barrier()

    # 2. PP=2, from the TP=2 checkpoint
    pg = init_distributed(pp=2, seed=0)
    r = run_parity_check(hf_dir, work_dir / "tp2", pg, max_abs_tol=FP32_PARITY_ABS, kl_tol=FP32_PARITY_KL)
    out["pp2_parity"] = (r.passed, r.line())
    convert_megatron_to_hf(work_dir / "tp2", work_dir / "back_pp2", pg)
    barrier()
    out["pp2_identical"] = identical(work_dir / "back_pp2")

    # 3. CP=2, from the TP=2 checkpoint
    pg = init_distributed(cp=2, seed=0)
    r = run_parity_check(hf_dir, work_dir / "tp2", pg, max_abs_tol=FP32_PARITY_ABS, kl_tol=FP32_PARITY_KL)
    out["cp2_parity"] = (r.passed, r.line())
    model = build_for_conversion(hf_dir, pg)
    load_checkpoint(work_dir / "tp2", [model], None, pg, load_optimizer=False, load_rng=False)
    out["cp2_loss"] = _loss_and_grads(model, batch, pg)
    out["cp2_seq"] = batch["input_ids"].shape[1]
    return out


def test_qwen_tp2_pp2_cp2_parity_round_trip_and_gradients(tmp_path):
    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl

    hf = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=7)
    results = run_distributed(_run, 2, args=(str(hf), str(tmp_path)), timeout=600)
    for rank, out in enumerate(results):
        for layout in ("tp2", "pp2"):
            passed, line = out[f"{layout}_parity"]
            assert passed, f"rank {rank} {layout}: {line}"
            assert out[f"{layout}_identical"], f"rank {rank}: {layout} export differs from the HF source"
        passed, line = out["cp2_parity"]
        assert passed, f"rank {rank} cp2: {line}"
        assert out["cp2_seq"] % 4, "the parity batch should need padding for cp=2 (the test covers it)"
        (loss1, g1) = out["tp1_loss"]
        for layout in ("tp2", "cp2"):
            loss2, g2 = out[f"{layout}_loss"]
            assert abs(loss2 - loss1) <= 1e-6 * max(1.0, abs(loss1)), (layout, loss2, loss1)
            for name in g1:
                scale = g1[name].abs().max().item()
                assert scale > 0, f"{name}: zero gradient (the test would not see a mismatch)"
                torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-6 * scale,
                                           msg=f"{layout} {name}")
