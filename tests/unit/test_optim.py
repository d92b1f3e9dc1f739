"""optim: megatron-core DDP + optimizer vs plain torch AdamW + clip_grad_norm_ (one-rank world), and
the learning-rate schedule."""

import pytest
import torch

from megatron_papo.config import ParallelConfig, TrainConfig
from megatron_papo.training.optim import (
    LrSchedule,
    build_optimizer,
    set_param_group_hparams,
)
from tests.optim_ckpt_models import lm_loss, random_tokens, tiny_gpt, train_step


@pytest.fixture
def one_rank_world():
    """init_distributed() without a launcher (in-process gloo world of one), torn down after;
    CPU patches reverted if this fixture applied them."""
    from megatron_papo.compat import mcore_compat
    from megatron_papo.distributed import destroy_distributed, init_distributed

    patched_before = bool(mcore_compat.applied_patches())
    pg = init_distributed()
    yield pg
    destroy_distributed()
    if not patched_before:
        mcore_compat.revert_cpu_patches()


def _reference_adamw(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """torch AdamW with megatron's grouping: no weight decay on biases and 1-D params."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=1e-8)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_megatron_adam_equals_torch_adamw(one_rank_world, distributed_optimizer):
    train = TrainConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, warmup_steps=2)
    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    model, ref = tiny_gpt(seed=3), tiny_gpt(seed=3)
    ddp_chunks, optimizer = build_optimizer([model], train, parallel)
    ref_opt = _reference_adamw(ref, train)
    schedule, ref_schedule = LrSchedule.from_config(train), LrSchedule.from_config(train)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = random_tokens(4, gen)
        loss, grad_norm = train_step(ddp_chunks, optimizer, schedule, tokens)

        ref_opt.zero_grad()
        ref_loss = lm_loss(ref, tokens)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), train.grad_clip)
        for group in ref_opt.param_groups:
            group["lr"] = ref_schedule.current_lr
        ref_opt.step()
        ref_schedule.advance()
        assert abs(loss - ref_loss.item()) < 1e-6
        assert abs(grad_norm - ref_norm.item()) < 1e-5 * max(1.0, ref_norm.item())
        assert grad_norm > train.grad_clip  # clipping was active
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    assert diff < 1e-6, diff
    assert all(g["lr"] == train.lr for g in optimizer.param_groups)  # warmup is over
    # biases / norms do not decay (megatron's wd_mult=0 groups), matrices do
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == [0.0, 0.1]


def test_build_optimizer_rejects_dtype_mismatch(one_rank_world):
    with pytest.raises(ValueError, match="no bf16 parameters"):
        build_optimizer([tiny_gpt()], TrainConfig(), ParallelConfig(), bf16=True)


def test_lr_schedule_warmup_then_constant():
    sched = LrSchedule(lr=1e-6, warmup_steps=4, weight_decay=0.01)
    assert [sched.lr_at(i) for i in range(6)] == pytest.approx([2.5e-7, 5e-7, 7.5e-7, 1e-6, 1e-6, 1e-6])
    assert LrSchedule(lr=1e-6).lr_at(0) == 1e-6  # PAPO: constant, no warmup

    groups = [{"lr": 0.0, "weight_decay": 0.0, "wd_mult": 1.0},
              {"lr": 0.0, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 0.5}]
    opt = type("Opt", (), {"param_groups": groups})()
    sched.advance(2)
    assert sched.apply(opt) == pytest.approx(7.5e-7)
    assert groups[0]["lr"] == pytest.approx(7.5e-7) and groups[1]["lr"] == pytest.approx(3.75e-7)
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.01, 0.0)

    resumed = LrSchedule.from_config(TrainConfig(lr=1e-6, warmup_steps=4))
    resumed.load_state_dict(sched.state_dict())
    assert resumed.num_steps == 2 and resumed.current_lr == sched.current_lr
    set_param_group_hparams(opt, lr=1.0, weight_decay=1.0)
    assert [g["lr"] for g in groups] == [1.0, 0.5]
    with pytest.raises(ValueError):
        LrSchedule(lr=1e-6, warmup_steps=-1)
