"""Tiny megatron-core GPT and batches for the optimizer and checkpoint tests."""

from __future__ import annotations

import torch

VOCAB, SEQ, HIDDEN = 64, 8, 32


def tiny_gpt(tp: int = 1, seed: int = 42, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer GPTModel (local spec) whose full weights depend on ``seed`` only, not on ``tp``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                            ffn_hidden_size=2 * HIDDEN, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, params_dtype=torch.float32,
                            hidden_dropout=dropout, attention_dropout=dropout)
    torch.manual_seed(seed)  # CPU init draws the full weight, then keeps this rank's shard
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


def random_tokens(batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids from ``generator`` (default: torch's global RNG, so RNG state matters)."""
    return torch.randint(0, VOCAB, (batch, SEQ), generator=generator)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a causal LM over ``tokens`` [B, SEQ]."""
    batch, seq = tokens.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    return model(tokens, position_ids, mask, labels=torch.roll(tokens, -1, dims=1)).mean()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [B, SEQ, V/tp], no grad."""
    batch, seq = tokens.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    with torch.no_grad():
        return model(tokens, position_ids, mask)


def train_step(ddp_chunks: list, optimizer, schedule, tokens: torch.Tensor) -> tuple[float, float]:
    """One update of the tiny GPT's LM loss through megatron DDP + optimizer: (loss, grad_norm)."""
    from megatron_papo.training.optim import finish_grad_sync, optimizer_step, zero_grads

    zero_grads(ddp_chunks, optimizer)
    loss = lm_loss(ddp_chunks[0], tokens)
    loss.backward()
    finish_grad_sync(ddp_chunks)
    schedule.apply(optimizer)
    ok, grad_norm, _ = optimizer_step(optimizer)
    assert ok
    schedule.advance()
    return loss.item(), grad_norm
