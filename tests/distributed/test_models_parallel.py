"""The tiny VLM on 2 gloo ranks, in ONE spawned run (each spawn costs seconds):

1. TP=2: logits gathered over the vocabulary, the loss and the gradient norm equal TP=1's;
2. a distributed checkpoint saved at TP=2 loads at TP=1 (same logits) and at PP=2;
3. PP=2 (vision encoder on stage 0) through megatron-core's pipeline schedule: the loss and
   the gradients of both stages equal the PP=1 ones.
"""

from functools import partial

import pytest
import torch
import torch.distributed as dist

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow

VOCAB, IMAGE_TOKEN, SEQ, BATCH, TOKENS_PER_IMAGE = 100, 99, 40, 2, 16


def _batch() -> dict:
    """Two samples, one image each; sample 1 is left-padded by 3 tokens (mask + positions)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, IMAGE_TOKEN - 1, (BATCH, SEQ), generator=g)
    ids[0, 2:2 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    ids[1, 8:8 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    keep = torch.ones(BATCH, SEQ, dtype=torch.long)
    keep[1, :3] = 0
    return dict(input_ids=ids, position_ids=(keep.cumsum(1) - 1).clamp(min=0), attention_mask=keep,
                pixel_values=torch.randn(BATCH, 3, 64, 64, generator=g), target=torch.roll(ids, -1, 1))


def _build(seed: int, pre_process: bool = True, post_process: bool = True):
    from megatron_papo.config import ModelConfig
    from megatron_papo.models import build_model

    # divisible_by 64: 100 pads to 128 at tp=1 and tp=2, so the weights agree across tp
    cfg = ModelConfig(seq_length=64, make_vocab_size_divisible_by=64)
    return build_model(cfg, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN, pre_process=pre_process,
                       post_process=post_process, seed=seed)


def _nll(logits: torch.Tensor, target: torch.Tensor, tp_group) -> torch.Tensor:
    """Mean next-token NLL over every position, from vocab-parallel logits."""
    from megatron_papo.ops import vocab_parallel_log_probs

    return -vocab_parallel_log_probs(logits, target, tp_group, vocab_size=VOCAB).mean()


def _grad_norm(model, tp_group) -> float:
    """Global gradient norm: TP-sharded parameters summed over the TP group, replicated ones once."""
    sharded = sum(p.grad.double().pow(2).sum() for p in model.parameters()
                  if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.grad.double().pow(2).sum() for p in model.parameters()
                     if not getattr(p, "tensor_model_parallel", False))
    dist.all_reduce(sharded, group=tp_group)
    return float((sharded + replicated).sqrt())


def _forward_loss(model, batch: dict, tp_group) -> tuple[torch.Tensor, float, float]:
    """Full-vocabulary logits (gathered over tp), the loss, and the gradient norm after backward."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch["pixel_values"])
    loss = _nll(logits, batch["target"], tp_group)
    loss.backward()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, logits.detach().contiguous(), group=tp_group)
    return torch.cat(shards, -1), loss.item(), _grad_norm(model, tp_group)


def _pipeline_step(data_iterator, model):
    mb = next(data_iterator)
    out = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], mb["pixel_values"])

    def loss_func(target, logits):
        loss = _nll(logits, target, None)
        return loss, {"nll": loss.detach().clone()}

    return out, partial(loss_func, mb["target"])


def _micro_batches(batch: dict) -> list[dict]:
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(BATCH)]


def _reference_grads(model) -> dict:
    """Gradients compared between PP=1 and PP=2 (vision conv and layer 0 on stage 0, output layer on
    stage 1): those present on this model."""
    named = dict(model.named_parameters())
    keys = ("vision_model.conv1.weight", "language_model.decoder.layers.0.mlp.linear_fc1.weight",
            "language_model.output_layer.weight")
    return {k: named[k].grad.clone() for k in keys if k in named and named[k].grad is not None}


def _parallel_run(rank: int, world: int, ckpt_dir: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_papo.compat import mcore_compat
    from megatron_papo.distributed import barrier, init_distributed

    batch, out = _batch(), {}

    # 1. TP=2, then save its weights
    pg = init_distributed(tp=2, seed=0)
    model = _build(seed=5)
    out["tp2"] = _forward_loss(model, batch, pg.tp)
    out["tp2_local_vocab"] = model(**{k: v for k, v in batch.items() if k != "target"}).shape[-1]
    mcore_compat.dist_ckpt_save(model.sharded_state_dict(), ckpt_dir)
    barrier()

    # 2. TP=1 (dp=2): same seed, then a different seed reloaded from the TP=2 checkpoint
    pg = init_distributed(tp=1, seed=0)
    out["tp1"] = _forward_loss(_build(seed=5), batch, pg.tp)
    other = _build(seed=99)
    out["tp1_other_seed"] = _forward_loss(other, batch, pg.tp)[1]
    other.load_state_dict(mcore_compat.dist_ckpt_load(other.sharded_state_dict(), ckpt_dir))
    model.zero_grad(set_to_none=True)
    other.zero_grad(set_to_none=True)
    loss = torch.stack([_nll(other(**{k: v for k, v in mb.items() if k != "target"}), mb["target"], None)
                        for mb in _micro_batches(batch)]).mean()
    loss.backward()
    out["tp1_from_ckpt"], out["pp1_grads"] = loss.item(), _reference_grads(other)
    barrier()

    # 3. PP=2: vision + embedding + layer 0 on stage 0, layer 1 + output layer on stage 1
    init_distributed(pp=2, seed=0)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    stage = _build(seed=99, pre_process=first, post_process=last)
    stage.load_state_dict(mcore_compat.dist_ckpt_load(stage.sharded_state_dict(), ckpt_dir))
    out["stage_has_vision"] = stage.vision_model is not None
    losses = get_forward_backward_func()(
        forward_step_func=_pipeline_step, data_iterator=iter(_micro_batches(batch)), model=stage,
        num_microbatches=BATCH, seq_length=SEQ, micro_batch_size=1, forward_only=False)
    out["pp2_loss"] = torch.stack([x["nll"] for x in losses]).mean().item() if last else None
    out["pp2_grads"] = _reference_grads(stage)  # stage-local names: layer 0 of each stage
    out["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    return out


def test_tiny_vlm_tp2_pp2_and_checkpoint_equal_tp1(tmp_path):
    res = run_distributed(_parallel_run, 2, args=(str(tmp_path),))
    for out in res:
        (logits2, loss2, norm2), (logits1, loss1, norm1) = out["tp2"], out["tp1"]
        assert out["tp2_local_vocab"] == 64 and logits2.shape == logits1.shape == (BATCH, SEQ, 128)
        torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=0)  # TP=2 == TP=1
        assert abs(loss2 - loss1) < 1e-5 and abs(norm2 - norm1) < 1e-5 * norm1, (loss2, loss1, norm2, norm1)
        # the TP=2 checkpoint, loaded at TP=1 into a differently seeded model, gives TP=2's loss
        assert abs(out["tp1_other_seed"] - loss2) > 1e-3
        assert abs(out["tp1_from_ckpt"] - loss2) < 1e-5
    # PP=2: the vision encoder only on stage 0; loss on the last stage equals PP=1's
    stage0, stage1 = sorted(res, key=lambda o: o["pp_rank"])
    assert stage0["stage_has_vision"] and not stage1["stage_has_vision"]
    assert abs(stage1["pp2_loss"] - stage1["tp1_from_ckpt"]) < 1e-5
    ref = stage0["pp1_grads"]
    grad0 = stage0["pp2_grads"]
    torch.testing.assert_close(grad0["vision_model.conv1.weight"], ref["vision_model.conv1.weight"],
                               atol=1e-6, rtol=1e-4)  # the gradient crossed the stage boundary
    fc1 = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    torch.testing.assert_close(grad0[fc1], ref[fc1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(stage1["pp2_grads"]["language_model.output_layer.weight"],
                               ref["language_model.output_layer.weight"], atol=1e-6, rtol=1e-4)
