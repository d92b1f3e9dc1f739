"""Verifiable rewards (megatron_papo.rewards): extraction, accuracy, format, batch, threads."""

import threading

import pytest
import torch

from megatron_papo.rewards import (
    RewardConfig,
    accuracy_reward,
    check_answer,
    compute_rewards,
    extract_last_boxed,
    format_reward,
    reference_format_reward,
)


def boxed(answer: str) -> str:
    return f"<think>reasoning</think> The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed {x+1}", "x+1"),
        ("\\boxed{}", ""),
        ("\\boxed{3} and then \\boxed{4", "3"),  # a truncated last box is skipped
        ("no box here", None),
        ("\\boxedx{3}", None),
        ("", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "1/2"),
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "$\\frac12$"),
        ("\\dfrac{1}{2}", "0.5"),
        ("-3", "-3"),
        ("-\\frac{3}{4}", "-0.75"),
        ("5 cm", "5"),
        ("5\\text{ cm}", "5"),
        ("\\text{5 cm}", "5"),
        ("5", "5 cm"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("(1,2]", "(1, 2]"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("Blue", "blue"),
        ("\\text{Yes}", "yes"),
        ("no", "No."),
        ("circle", "circle"),
        ("(A)", "A"),
    ],
)
def test_accuracy_correct(answer, truth):
    assert accuracy_reward(boxed(answer), truth) == 1.0


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("3", "-3"),
        ("-3", "3"),
        ("0.51", "1/2"),
        ("(1,2)", "(1,2]"),
        ("sey", "yes"),  # math_verify alone would call these equal (products of symbols)
        ("no", "yes"),
        ("square", "circle"),
        ("B", "A"),
    ],
)
def test_accuracy_wrong(answer, truth):
    assert accuracy_reward(boxed(answer), truth) == 0.0


def test_last_box_counts():
    response = "First \\boxed{1}, no wait: \\boxed{2}"
    assert accuracy_reward(response, "2") == 1.0
    assert accuracy_reward(response, "1") == 0.0


def test_no_box_and_empty():
    assert accuracy_reward("the answer is 2", "2") == 0.0
    assert accuracy_reward("", "2") == 0.0
    assert accuracy_reward("\\boxed{}", "2") == 0.0
    assert check_answer("", "2").parse_failed is False


def test_garbage_never_raises():
    for response in ["\\boxed{\\frac{}{}}", "\\boxed{)(}", "\\boxed{\\{}", "\\boxed{\\sqrt}"]:
        assert accuracy_reward(response, "1") == 0.0
    assert accuracy_reward(boxed("1"), None) == 0.0  # type: ignore[arg-type]


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response",
    [
        "<think>step</think>\\boxed{1}",
        "  <think>\nline 1\nline 2\n</think>\n\nSo the answer is \\boxed{\\frac{1}{2}}.\n",
        "<think></think> \\boxed{x}",
    ],
)
def test_format_ok(response):
    assert format_reward(response) == 1.0
    assert format_reward(response, style="reference") == 1.0  # what strict accepts, the reference does


@pytest.mark.parametrize(
    "response",
    [
        "",
        "\\boxed{1}",
        "<think>step</think> the answer is 1",
        "<think>step \\boxed{1}</think>",
        "intro <think>step</think> \\boxed{1}",
        "<think>a</think><think>b</think> \\boxed{1}",
        "<think>a <think>b</think> \\boxed{1}",
        "<think>a</think> \\boxed{1} </think>",
        "<think>step \\boxed{1}",
        "<think>step</think> \\boxed{}",
        "<think>step</think> \\boxed{1",
    ],
)
def test_format_bad(response):
    assert format_reward(response) == 0.0


@pytest.mark.parametrize("response,reference", [
    ("<think>a</think><think>b</think> \\boxed{1}", 1.0),  # greedy: repeated think blocks pass
    ("<think>a <think>b</think> \\boxed{1}", 1.0),
    ("<think>a</think> \\boxed{1} </think>", 1.0),
    ("<think>step</think> \\boxed{}", 1.0),  # an empty box passes the reference
    ("< think >step< / think > \\boxed{2}", 1.0),  # whitespace around < > / is removed first
    ("  <think>x</think>\n\\boxed{2}", 1.0),
    ("intro <think>step</think> \\boxed{1}", 0.0),  # full match: nothing before the think block
    ("<think>step \\boxed{1}</think>", 0.0),
    ("<think>step</think> \\boxed{1", 0.0),
    ("<think>step</think> the answer is 1", 0.0),
    ("", 0.0),
])
def test_reference_format_rule(response, reference):
    """The PAPO / EasyR1 rule (whitespace around < > / removed, greedy full match of
    <think>.*</think>.*\\boxed{.*}.*), worked by hand per case; strict refuses the first five."""
    assert reference_format_reward(response) == reference
    assert format_reward(response, style="reference") == reference
    for style, want in (("reference", reference), ("strict", format_reward(response))):
        assert compute_rewards([response], ["1"], RewardConfig(format_style=style)).format.item() == want
    with pytest.raises(ValueError, match="format_style"):
        RewardConfig(format_style="loose")


def test_format_without_think():
    assert format_reward("\\boxed{1}", require_think=False) == 1.0
    assert format_reward("answer 1", require_think=False) == 0.0


# ---------------------------------------------------------------- batch


def test_compute_rewards_weights():
    responses = [boxed("0.5"), "\\boxed{0.5}", boxed("7"), "nothing"]
    truths = ["1/2", "1/2", "1/2", "1/2"]
    out = compute_rewards(responses, truths)
    assert out.reward.dtype == torch.float32 and out.reward.shape == (4,)
    assert out.accuracy.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.format.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.allclose(out.reward, torch.tensor([1.0, 0.9, 0.1, 0.0]))
    assert out.num_parse_failures == 0

    custom = compute_rewards(responses, truths, RewardConfig(accuracy_weight=1.0, format_weight=0.5))
    assert torch.allclose(custom.reward, torch.tensor([1.5, 1.0, 0.5, 0.0]))
    loose = compute_rewards(responses, truths, RewardConfig(require_think=False))
    assert loose.format.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert set(out.metrics()) == {"reward/mean", "reward/accuracy", "reward/format", "reward/parse_failures"}


def test_compute_rewards_counts_parse_failures(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_verify, "verify", broken)
    out = compute_rewards([boxed("1/2"), boxed("blue")], ["0.5", "blue"])
    assert out.accuracy.tolist() == [0.0, 1.0]  # the word answer never reaches math_verify
    assert out.num_parse_failures == 1


def test_compute_rewards_length_mismatch():
    with pytest.raises(ValueError, match="ground truths"):
        compute_rewards(["a"], ["a", "b"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"accuracy_weight": float("nan")}, "accuracy_weight"),
        ({"format_weight": "x"}, "format_weight"),
        ({"math_timeout_s": -1}, "math_timeout_s"),
    ],
)
def test_bad_reward_config(kwargs, field):
    with pytest.raises(ValueError, match=f"RewardConfig.{field}"):
        RewardConfig(**kwargs)


# ---------------------------------------------------------------- threads


def test_rewards_from_worker_thread():
    results, errors = {}, []

    def work():
        try:
            results["out"] = compute_rewards([boxed("\\frac{1}{2}"), boxed("2")], ["0.5", "3"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors
    out = results["out"]
    assert out.accuracy.tolist() == [1.0, 0.0]
    assert out.num_parse_failures == 0
