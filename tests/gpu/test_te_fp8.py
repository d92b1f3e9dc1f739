"""Transformer Engine specs and FP8 on a GPU: a TE-spec tiny VLM step equals the local-spec step
within bf16 tolerance, and an FP8 step runs (skipped without CUDA / Transformer Engine)."""

import pytest
import torch

from megatron_papo.compat import mcore_compat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not mcore_compat.have_transformer_engine(), reason="needs Transformer Engine"),
]

VOCAB, IMAGE, SEQ, BATCH = 192, 191, 128, 4


@pytest.fixture(scope="module")
def world():
    from megatron_papo.distributed import destroy_distributed, init_distributed

    init_distributed(seed=0)
    yield
    destroy_distributed()


def _batch(model):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, IMAGE, (BATCH, SEQ), generator=gen)
    ids[:, 1:1 + model.num_image_tokens(model.image_size)] = IMAGE
    pixels = torch.randn(BATCH, 3, *model.image_size, generator=gen)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    dev = torch.cuda.current_device()
    return ids.to(dev), torch.arange(SEQ, device=dev).expand(BATCH, SEQ), pixels.to(dev), target.to(dev)


def _step(impl: str, fp8: str = "none", precision: str = "bf16"):
    """One forward/backward of the tiny VLM: (loss, logits, {name: grad}) with TE or local specs."""
    from megatron_papo.config import ModelConfig
    from megatron_papo.models import build_model

    cfg = ModelConfig(seq_length=SEQ, precision=precision, fp8=fp8, transformer_impl=impl)
    model = build_model(cfg, vocab_size=VOCAB, image_token_id=IMAGE, seed=3)
    ids, pos, pixels, target = _batch(model)
    if fp8 != "none":
        from megatron.core.fp8_utils import get_fp8_context  # megatron-core's TE autocast wrapper

        ctx = get_fp8_context(model.config)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        logits = model(ids, pos, None, pixels)
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])  # loss maths in fp32
    loss = -log_probs.mean()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), logits.float().detach(), grads


def test_te_spec_step_matches_local_spec(world):
    loss_te, logits_te, _ = _step("transformer_engine")
    loss_local, logits_local, _ = _step("local")
    assert abs(loss_te - loss_local) < 2e-2 * max(1.0, abs(loss_local))
    assert (logits_te - logits_local).abs().max().item() < 0.1  # bf16 tolerance
    assert torch.nn.functional.cosine_similarity(logits_te.flatten(), logits_local.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("recipe", ["delayed", "current", "blockwise"])
def test_fp8_step_runs(world, recipe):
    from megatron_papo.compat.runtime_checks import cuda_capability, fp8_support_problem, te_version

    problem = fp8_support_problem(recipe, cuda_capability(), te_version())
    if problem:
        pytest.skip(problem)
    loss, logits, grads = _step("transformer_engine", fp8=recipe)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.isfinite(torch.tensor(loss)) and grads
    assert all(torch.isfinite(g).all() for g in grads.values())
