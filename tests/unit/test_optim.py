"""optim: megatron-core DDP + optimizer vs plain torch AdamW + clip_grad_norm_ (one-rank world), and
the learning-rate schedule."""

import pytest
import torch

from megatron_papo.config import ParallelConfig, TrainConfig
from megatron_papo.training.optim import (
    LrSchedule,
    build_optimizer,
    set_param_group_hparams,
    sft_lr_at,
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


def _adam_update_bound(beta1: float, beta2: float, k: int) -> float:
    """max |m_hat / sqrt(v_hat)| after k Adam steps over any gradients (Cauchy-Schwarz):
    m = sum a_t g_t, v = sum c_t g_t^2 with a_t = (1-b1) b1^(k-t), c_t = (1-b2) b2^(k-t), so
    |m_hat| / sqrt(v_hat) <= sqrt(sum a_t^2 / c_t) * sqrt(1 - b2^k) / (1 - b1^k)."""
    s = sum(((1 - beta1) * beta1 ** (k - t)) ** 2 / ((1 - beta2) * beta2 ** (k - t)) for t in range(1, k + 1))
    return s ** 0.5 * (1 - beta2**k) ** 0.5 / (1 - beta1**k)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_megatron_adam_equals_torch_adamw(one_rank_world, distributed_optimizer):
    """Same model, data and hyper-parameters through megatron-core (DDP buffers, distributed or
    plain optimizer) and through torch AdamW + clip_grad_norm_.

    Tolerance, derived per parameter element rather than chosen: both sides compute each gradient
    element as an fp32 sum over the N = B * S token terms, in different orders, so they differ by
    at most dg = 2 N eps32 G (worst-case linear summation bound on each side; G = the step's largest
    |gradient| element). Adam divides by sqrt(v_hat), so an element's update u = m_hat/(sqrt(v_hat)+eps)
    moves by at most 2 dg / (sqrt(v_hat) + eps) (one dg through m, one through v), and never by more
    than twice the largest possible |u| (``_adam_update_bound``). Each step adds lr_k times that to
    the element's bound. Elements with gradients near zero get a wide bound (their update's sign is
    rounding noise); elements with real gradients get ~1e-7 (measured differences: up to 2.1e-6
    on the first kind with the distributed optimizer, whose grad norm differs by 2.8e-7 at step 1).
    """
    train = TrainConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, warmup_steps=2)
    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    model, ref = tiny_gpt(seed=3), tiny_gpt(seed=3)
    ddp_chunks, optimizer = build_optimizer([model], train, parallel)
    ref_opt = _reference_adamw(ref, train)
    schedule, ref_schedule = LrSchedule.from_config(train), LrSchedule.from_config(train)
    gen = torch.Generator().manual_seed(0)
    eps32 = torch.finfo(torch.float32).eps
    bound = {q: torch.zeros_like(q) for q in ref.parameters()}
    for k in range(1, 4):
        tokens = random_tokens(4, gen)
        loss, grad_norm = train_step(ddp_chunks, optimizer, schedule, tokens)

        ref_opt.zero_grad()
        ref_loss = lm_loss(ref, tokens)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), train.grad_clip)
        lr = ref_schedule.current_lr
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        ref_schedule.advance()
        n_terms = tokens.numel()
        # loss: an fp32 mean over n_terms (8 eps |loss| covers both sides' reductions) plus the
        # first-order effect of the parameter difference so far (|grad|_2 |dp|_2)
        dp = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), ref.parameters())])
        g2 = torch.cat([q.grad.flatten() for q in ref.parameters()]).norm().item() * ref_norm.item()
        assert abs(loss - ref_loss.item()) <= 8 * eps32 * abs(loss) + g2 / train.grad_clip * dp.norm().item()
        # grad norm: a sum of squares of fp32 gradients, each within 2 N eps32 relative
        assert abs(grad_norm - ref_norm.item()) <= 4 * n_terms * eps32 * ref_norm.item()
        assert grad_norm > train.grad_clip  # clipping was active
        g_max = max(q.grad.abs().max().item() for q in ref.parameters())
        dg = 2 * n_terms * eps32 * g_max
        cap = 2 * _adam_update_bound(train.adam_beta1, train.adam_beta2, k)
        for q in ref.parameters():
            v_hat = ref_opt.state[q]["exp_avg_sq"] / (1 - train.adam_beta2**k)
            bound[q] += lr * (2 * dg / (v_hat.sqrt() + 1e-8)).clamp(max=cap)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        excess = ((p - q).abs() - bound[q]).max().item()
        assert excess <= 0, (name, excess)
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


def test_sft_lr_warmup_then_cosine():
    """Warm-start lr: linear warmup to sft_lr, cosine down to sft_lr * sft_min_lr_ratio at the
    last step (values worked by hand: 10 steps, 2 of warmup, cosine over steps 2..9)."""
    import itertools
    import math

    train = TrainConfig(sft_warmup_steps=10, sft_lr=1e-3, sft_lr_warmup_steps=2, sft_lr_decay="cosine",
                        sft_min_lr_ratio=0.1)
    lrs = [sft_lr_at(i, train) for i in range(10)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 7))  # step 5 = decay step 3 of 7
    assert lrs[5] == pytest.approx(mid)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))  # non-increasing after warmup
    const = TrainConfig(sft_warmup_steps=10, sft_lr=1e-3)
    assert [sft_lr_at(i, const) for i in range(10)] == [1e-3] * 10  # the default: constant
