"""The CPU suite sees device bugs: the model lives on a device that is not the CPU.

- RL path, on ``meta`` (a device every torch build has; tensors with shapes and no values): the
  rollout result (host lists, as every engine returns) -> ``steps.update_batch`` (the boundary) ->
  micro-batch dicts -> model inputs -> logits -> no-grad log-probs -> the PAPO loss and its
  backward. The recording model asserts every input is on its device, and a CPU tensor meeting a
  meta one raises, as CPU meets CUDA on a GPU. A host sync (``.item()``, ``.tolist()``) in the
  loss raises on meta too. Without the boundary's ``.to(device)`` the model sees CPU inputs (the
  mutation test below).
- Collectives, under ``FakeTensorMode`` (CPU-only torch makes fake ``cuda:0`` tensors): with an
  NCCL group every tensor handed to ``all_reduce`` is on CUDA (NCCL refuses
  CPU tensors), for the trainer's counters, the step metrics, token counts and the checkpoint's
  finiteness check.
"""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_papo.losses import PapoLossConfig, papo_loss
from megatron_papo.ops import global_token_count, vocab_parallel_log_probs
from megatron_papo.ops.groups import all_gather_int, all_reduce_int, collective_device
from megatron_papo.rollout import RolloutResult
from megatron_papo.training import steps
from megatron_papo.training.batch import micro_batch_dicts, model_device
from megatron_papo.training.checkpointing import _check_finite_parameters
from megatron_papo.training.metrics import reduce_step_metrics

FAKE_CUDA = torch.device("cuda", 0)
META = torch.device("meta")
VOCAB, HIDDEN = 32, 8


class RecordingModel(torch.nn.Module):
    """Embedding -> linear head with weights on ``device``; asserts its inputs are there too."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, device=device))
        self.head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, device=device))
        self.seen: list[str] = []

    def forward(self, input_ids, position_ids, attention_mask, pixel_values):
        for name, t in (("input_ids", input_ids), ("position_ids", position_ids),
                        ("attention_mask", attention_mask), ("pixel_values", pixel_values)):
            assert t.device == self.device, f"{name} reached the model on {t.device}"
            self.seen.append(name)
        h = torch.nn.functional.embedding(input_ids, self.embed) + pixel_values.mean()
        return h @ self.head.T  # [B, S, V]


def _rollout() -> RolloutResult:
    """2 prompts x 2 responses of different lengths, as an engine returns them (host lists)."""
    return RolloutResult(group_size=2, prompt_indices=[0, 0, 1, 1],
                         prompt_ids=[[3, 4, 5]] * 2 + [[6, 7]] * 2,
                         response_ids=[[8, 9, 1], [10, 1], [11], [12, 13, 14]],
                         response_log_probs=[[-1.0] * 3, [-1.0] * 2, [-1.0], [-1.0] * 3],
                         policy_log_probs=[[-1.0] * 3, [-1.0] * 2, [-1.0], [-1.0] * 3],
                         finish_reason=["stop", "stop", "length", "length"])


def _run_rl_data_path(update_batch=steps.update_batch):
    result = _rollout()
    adv = steps.Advantages(advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), kept_rows=torch.arange(4),
                           metrics={})
    pixels = [torch.rand(1, 3, 8, 8) for _ in range(2)]  # preprocessing runs on the host
    masked = [p * 0 for p in pixels]
    model = RecordingModel(META)
    batch = update_batch(result, adv, pixels, masked, pad_id=0, micro_batch_size=2,
                         device=model_device([model]))
    with torch.no_grad():  # the no-grad passes: old, masked, reference log-probs
        passes = (("old_log_probs", False), ("masked_log_probs", True), ("ref_log_probs", False))
        for field, branch in passes:
            per_mb = [vocab_parallel_log_probs(model(mb["input_ids"], mb["position_ids"],
                                                     mb["attention_mask"], mb["pixel_values"]),
                                               mb["target"], check_finite=False)
                      for mb in micro_batch_dicts(batch, 2, masked_branch=branch)]
            setattr(batch, field, torch.cat(per_mb))
    num_tokens = global_token_count(batch.loss_mask, None)
    config = PapoLossConfig(kl_prcp_mode="full", entropy_mode="full", gamma=0.02)
    for mb in micro_batch_dicts(batch, 2, both_branches=True):
        logits, masked_logits = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"],
                                      mb["pixel_values"]).chunk(2)
        loss, metrics = papo_loss(logits, mb["target"], mb["old_log_probs"], mb["advantages"],
                                  mb["loss_mask"], config=config, masked_logits=masked_logits,
                                  masked_log_probs=mb["masked_log_probs"], ref_log_probs=mb["ref_log_probs"],
                                  num_tokens=num_tokens, check_finite=False)
        loss.backward()
        assert loss.device == META
        # every metric on the device, but gamma: a host constant of the step (its schedule value),
        # which reduce_step_metrics reads with float() and never reduces (no device sync for it)
        assert {k: v.device for k, v in metrics.items() if v.device != META} == {"gamma": torch.device("cpu")}
    assert model.embed.grad.device == META
    return model


def test_the_rl_data_path_runs_on_the_models_device():
    model = _run_rl_data_path()
    assert model.seen.count("input_ids") == 2 * 4  # old, masked, reference, update micro-batches


def test_without_the_boundary_the_device_bug_is_caught():
    """The mutation: c990e1f built the batch on the host and nothing moved it."""
    def no_boundary(result, adv, pixels, masked, *, pad_id, micro_batch_size, device):
        return steps.update_batch(result, adv, pixels, masked, pad_id=pad_id,
                                  micro_batch_size=micro_batch_size, device="cpu")

    with pytest.raises(AssertionError, match="input_ids reached the model on cpu"):
        _run_rl_data_path(no_boundary)


class _Recorded(Exception):
    pass


@pytest.fixture
def fake_nccl_group(monkeypatch):
    """torch.distributed as a 2-rank NCCL job: all_reduce records its tensor's device, then stops
    the caller (the fake tensors have no values to read back)."""
    devices = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        devices.append(tensor.device)
        raise _Recorded

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    def all_gather(out, tensor, group=None, async_op=False):
        devices.append(tensor.device)
        raise _Recorded

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    return object(), devices


def test_collectives_get_tensors_on_their_groups_device(fake_nccl_group):
    group, devices = fake_nccl_group
    assert collective_device(group) == FAKE_CUDA and collective_device(None) == torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = RecordingModel(FAKE_CUDA)
        calls = [
            lambda: all_reduce_int(3, group, dist.ReduceOp.SUM),  # host int -> the group's device
            lambda: all_gather_int(3, group),
            lambda: reduce_step_metrics([{"reward": torch.tensor(0.5)}], group),  # host metrics
            lambda: reduce_step_metrics([{"loss": torch.zeros((), device=FAKE_CUDA),
                                          "num_tokens": torch.tensor(4)}], group, mode="sum"),
            lambda: global_token_count(torch.ones(2, 3, dtype=torch.bool, device=FAKE_CUDA), group),
            lambda: _check_finite_parameters([model], type("PG", (), {"world": group})(), step=1),
        ]
        for call in calls:
            with pytest.raises(_Recorded):
                call()
    assert devices == [FAKE_CUDA] * len(calls)
