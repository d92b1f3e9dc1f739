"""run_microbatches through megatron-core's schedules: PP=2 equals PP=1 (loss, per-token outputs, grads)."""

import re

import pytest
import torch

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow
V, S, H, LAYERS, MBS, NMB = 96, 12, 32, 2, 2, 3


def _gpt(pp: int, pre: bool, post: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4, ffn_hidden_size=64,
                            use_cpu_initialization=True, pipeline_model_parallel_size=pp,
                            params_dtype=torch.float32, pipeline_dtype=torch.float32,
                            hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(42)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=V,
                    max_sequence_length=S, pre_process=pre, post_process=post, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def _micro_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(NMB):
        ids = torch.randint(0, V, (MBS, S), generator=g)
        mask = torch.rand(MBS, S, generator=g) > 0.3
        out.append({"input_ids": ids, "target": torch.roll(ids, -1, 1), "mask": mask,
                    "position_ids": torch.arange(S).expand(MBS, S)})
    return out


def _forward(model, mb):
    attn = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1).view(1, 1, S, S)
    return model(mb["input_ids"], mb["position_ids"], attn)


def _loss(mb, logits):
    from megatron_papo.losses import token_mean
    from megatron_papo.ops import vocab_parallel_log_probs

    lp = vocab_parallel_log_probs(logits, mb["target"])
    nll = -token_mean(lp, mb["mask"])
    return nll, {"log_probs": lp.detach(), "nll": nll.detach()}


def _global_layer(key: str, stage: int) -> str:
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + stage}.", key)


def _run(rank, world):
    from megatron_papo.distributed import init_distributed
    from megatron_papo.training.schedule import run_microbatches

    init_distributed(tp=1, pp=1)
    full = _gpt(1, True, True)
    ref_sd = {k: v.clone() for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}
    ref_out = run_microbatches([full], _micro_batches(), _forward, _loss, forward_only=False, seq_length=S,
                               micro_batch_size=MBS)
    ref_grads = {n: p.grad.clone() for n, p in full.named_parameters()}
    with torch.no_grad():
        ref_fwd = run_microbatches([full], _micro_batches(), _forward, _loss, forward_only=True,
                                   seq_length=S, micro_batch_size=MBS)

    pg = init_distributed(tp=1, pp=2)
    stage = pg.pp_rank
    model = _gpt(2, pg.is_first_pp_stage, pg.is_last_pp_stage)
    tensors = {k: ref_sd[_global_layer(k, stage)] for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    out = run_microbatches([model], _micro_batches(), _forward, _loss, forward_only=False, seq_length=S,
                           micro_batch_size=MBS)
    grads = {_global_layer(n, stage): p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        fwd = run_microbatches([model], _micro_batches(), _forward, _loss, forward_only=True, seq_length=S,
                               micro_batch_size=MBS)
    return dict(stage=stage, ref_out=ref_out, ref_fwd=ref_fwd, out=out, fwd=fwd,
                grad_err=max((g - ref_grads[n]).abs().max().item() for n, g in grads.items()),
                n_grads=len(grads), n_ref=len(ref_grads))


def test_pipeline_parallel_equals_single_stage():
    res = run_distributed(_run, 2, timeout=240)
    last = next(r for r in res if r["stage"] == 1)
    first = next(r for r in res if r["stage"] == 0)
    assert first["out"] == [] and first["fwd"] == []  # metrics only on the last stage
    assert len(last["out"]) == NMB == len(last["ref_out"])
    for a, b in zip(last["out"], last["ref_out"], strict=True):
        torch.testing.assert_close(a["nll"], b["nll"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a["log_probs"], b["log_probs"], rtol=1e-6, atol=1e-6)
    for a, b in zip(last["fwd"], last["ref_fwd"], strict=True):
        torch.testing.assert_close(a["log_probs"], b["log_probs"], rtol=1e-6, atol=1e-6)
    for r in res:  # every parameter of each stage has the single-stage gradient
        assert r["grad_err"] < 1e-6, r["grad_err"]
    assert first["n_grads"] + last["n_grads"] == first["n_ref"]
