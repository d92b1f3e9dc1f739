"""Verifiable rewards of PAPO: ``reward = w_acc * accuracy + w_fmt * format`` (0.9 / 0.1).

- accuracy (1/0): the answer in the last ``\\boxed{...}`` of the response equals the ground
  truth. Mathematical equality is decided by the ``math_verify`` library (parse + verify);
  answers made of words only ("blue", "yes", "circle") are compared as normalised,
  case-insensitive text instead, because math_verify reads a word as a product of symbols
  (it finds "yes" equal to "sey").
- format (1/0): the response is ``<think>...</think>`` followed by text with a ``\\boxed{...}``.

Units. math_verify's unit normalisation drops trailing units on both sides, so "5 cm",
"5\\text{ cm}", "5 meters" and "5" are all equal to a ground truth "5" (and to "5 cm"). A box
that wraps the whole answer in text (``\\text{5 cm}``) is unwrapped first, otherwise
math_verify would read it as the symbol "5cm". A unit *mismatch* ("5 m" vs "5 cm") is not
detected.

Threads. math_verify bounds its work with ``signal.alarm``, which only works in the main
thread. Off the main thread the timeouts are switched off (``parsing_timeout=None`` /
``timeout_seconds=None``), so rewards can be computed from worker threads; the caller then
owns any time limit. This matters: some short answers are very expensive to compare (e.g.
``10^{10^{10^{10}}}`` takes the whole 5 s timeout in the main thread and may never finish
without one). For a hard limit off the main thread, score in a process pool: the tasks of a
``ProcessPoolExecutor`` run on the worker process's main thread, where the timeout works.

Failures. Any exception or timeout inside math_verify, or an answer that math_verify cannot
extract anything from, is a *parse failure*: it is counted and scores 0 (unless the two
answers are already equal as normalised text). Nothing escapes :func:`check_answer`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_papo.rewards.extraction import (
    extract_last_boxed,
    is_word_answer,
    normalize_answer_text,
    normalize_word_answer,
    strip_math_delimiters,
    unwrap_text_commands,
)

logger = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    """Weights and switches of the verifiable reward."""

    accuracy_weight: float = 0.9
    """Weight of the accuracy term (answer correct: 1, else 0)."""

    format_weight: float = 0.1
    """Weight of the format term (``<think>...</think>`` then a boxed answer: 1, else 0)."""

    require_think: bool = True
    """If False, the format term only asks for a ``\\boxed{...}`` answer anywhere."""

    format_style: str = "reference"
    """How the think-then-box format is checked: ``reference`` (the PAPO / EasyR1 rule:
    whitespace around ``<``, ``>``, ``/`` removed, then a greedy full match of
    ``<think>.*</think>.*\\boxed{.*}.*``) or ``strict`` (exactly one think block first, a complete
    non-empty box after it, nothing else tag-like)."""

    math_timeout_s: int = 5
    """Seconds math_verify may spend per parse/compare (main thread only; 0 disables)."""

    def __post_init__(self) -> None:
        for name in ("accuracy_weight", "format_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {value!r}")
        if isinstance(self.math_timeout_s, bool) or not isinstance(self.math_timeout_s, int):
            raise ValueError(f"RewardConfig.math_timeout_s must be an int, got {self.math_timeout_s!r}")
        if self.math_timeout_s < 0:
            raise ValueError(f"RewardConfig.math_timeout_s must be >= 0, got {self.math_timeout_s}")
        if self.format_style not in FORMAT_STYLES:
            raise ValueError(f"RewardConfig.format_style must be one of {list(FORMAT_STYLES)}, "
                             f"got {self.format_style!r}")


@dataclass(frozen=True)
class AnswerCheck:
    """Outcome of comparing one response's final answer with the ground truth."""

    correct: bool
    """The last boxed answer equals the ground truth."""

    parse_failed: bool
    """math_verify raised, timed out, or could not extract an expression."""


@dataclass
class RewardResult:
    """Rewards of a batch of B responses (float32 tensors on the CPU)."""

    reward: torch.Tensor
    """``[B]`` accuracy_weight * accuracy + format_weight * format."""

    accuracy: torch.Tensor
    """``[B]`` 1.0 if the answer is correct, else 0.0."""

    format: torch.Tensor
    """``[B]`` 1.0 if the response is well formed, else 0.0."""

    num_parse_failures: int
    """Responses whose answer math_verify failed on (they score accuracy 0)."""

    @classmethod
    def concat(cls, parts: Sequence[RewardResult]) -> RewardResult:
        """Several batches' rewards as one (rows in order, parse failures summed)."""
        if not parts:
            raise ValueError("RewardResult.concat needs at least one part")
        return cls(reward=torch.cat([p.reward for p in parts]),
                   accuracy=torch.cat([p.accuracy for p in parts]),
                   format=torch.cat([p.format for p in parts]),
                   num_parse_failures=sum(p.num_parse_failures for p in parts))

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging."""
        return {
            f"{prefix}mean": self.reward.mean().item(),
            f"{prefix}accuracy": self.accuracy.mean().item(),
            f"{prefix}format": self.format.mean().item(),
            f"{prefix}parse_failures": float(self.num_parse_failures),
        }


# --------------------------------------------------------------------------------------
# math_verify, made thread safe and exception free
# --------------------------------------------------------------------------------------


def _effective_timeout(timeout_s: int | None) -> int | None:
    """math_verify's signal-based timeout only works in the main thread: None elsewhere."""
    if not timeout_s or threading.current_thread() is not threading.main_thread():
        return None
    return int(timeout_s)


def _math_equal(gold: str, prediction: str, timeout_s: int | None) -> AnswerCheck:
    """Ask math_verify whether two answers (LaTeX or plain) are equal."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    timeout = _effective_timeout(timeout_s)
    try:
        # Wrapping in \boxed{} makes math_verify take the whole string as the one answer.
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout, raise_on_error=True)
        pred_parsed = parse(f"\\boxed{{{prediction}}}", parsing_timeout=timeout, raise_on_error=True)
        if not gold_parsed or not pred_parsed:
            return AnswerCheck(correct=False, parse_failed=True)
        correct = verify(gold_parsed, pred_parsed, timeout_seconds=timeout, raise_on_error=True)
        return AnswerCheck(correct=bool(correct), parse_failed=False)
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        logger.debug("math_verify failed on gold=%r prediction=%r", gold, prediction, exc_info=True)
        return AnswerCheck(correct=False, parse_failed=True)


def _prepare(answer: str) -> str:
    """The answer as math_verify should see it: no $...$, no whole-answer \\text{...}."""
    return unwrap_text_commands(strip_math_delimiters(answer)).strip()


def check_answer(response: str, ground_truth: str, *, timeout_s: int | None = 5) -> AnswerCheck:
    """Compare the last boxed answer of ``response`` with ``ground_truth`` (never raises).

    Order: no box -> wrong; equal as normalised text -> right; word-only ground truth ->
    wrong (text was the only test); otherwise math_verify decides.
    """
    try:
        prediction = extract_last_boxed(response)
        ground_truth = str(ground_truth)
        if prediction is None or not prediction.strip():
            return AnswerCheck(correct=False, parse_failed=False)
        gold = extract_last_boxed(ground_truth)
        gold = ground_truth if gold is None else gold
        if normalize_answer_text(prediction) == normalize_answer_text(gold):
            return AnswerCheck(correct=True, parse_failed=False)
        if is_word_answer(gold):
            same = normalize_word_answer(prediction) == normalize_word_answer(gold)
            return AnswerCheck(correct=same, parse_failed=False)
        return _math_equal(_prepare(gold), _prepare(prediction), timeout_s)
    except Exception:
        logger.debug("answer check failed on %r", ground_truth, exc_info=True)
        return AnswerCheck(correct=False, parse_failed=True)


def accuracy_reward(response: str, ground_truth: str, *, timeout_s: int | None = 5) -> float:
    """1.0 if the last boxed answer of ``response`` equals ``ground_truth``, else 0.0."""
    return 1.0 if check_answer(response, ground_truth, timeout_s=timeout_s).correct else 0.0


# --------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------

FORMAT_STYLES = ("reference", "strict")
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def _has_box(text: str) -> bool:
    content = extract_last_boxed(text)
    return content is not None and content.strip() != ""


_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_REFERENCE_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def reference_format_reward(response: str) -> float:
    """The PAPO reference's format check: 1.0 iff, after removing whitespace around ``<``, ``>``
    and ``/``, the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (greedy,
    newlines included; an empty box and repeated think blocks pass)."""
    return 1.0 if _REFERENCE_FORMAT.fullmatch(_TAG_SPACE.sub(r"\1", response or "")) else 0.0


def format_reward(response: str, *, require_think: bool = True, style: str = "strict") -> float:
    """``style="reference"``: :func:`reference_format_reward`. ``style="strict"``: 1.0 iff
    ``response`` is ``<think>...</think>`` followed by text containing ``\\boxed{...}``.

    Whitespace around the parts is ignored; exactly one think block, before the answer,
    with nothing but whitespace before it; the box must be complete and non-empty. With
    ``require_think=False`` only the box is required.
    """
    if not response:
        return 0.0
    if not require_think:
        return 1.0 if _has_box(response) else 0.0
    if style == "reference":
        return reference_format_reward(response)
    if style != "strict":
        raise ValueError(f"format_reward: style must be one of {list(FORMAT_STYLES)}, got {style!r}")
    text = response.lstrip()
    if not text.startswith(_THINK_OPEN):
        return 0.0
    body = text[len(_THINK_OPEN) :]
    thought, closed, answer = body.partition(_THINK_CLOSE)
    if not closed or _THINK_OPEN in thought:
        return 0.0
    if _THINK_OPEN in answer or _THINK_CLOSE in answer:
        return 0.0
    return 1.0 if _has_box(answer) else 0.0


# --------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------


def compute_rewards(
    responses: Sequence[str], ground_truths: Sequence[str], config: RewardConfig | None = None
) -> RewardResult:
    """Score B responses against their ground truths.

    Args:
        responses: ``[B]`` decoded responses.
        ground_truths: ``[B]`` answers (plain text or LaTeX), aligned with ``responses``.
        config: weights; default :class:`RewardConfig`.

    Returns:
        :class:`RewardResult` with float32 ``[B]`` tensors.
    """
    config = RewardConfig() if config is None else config
    if len(responses) != len(ground_truths):
        raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
    accuracy, fmt, failures = [], [], 0
    for response, truth in zip(responses, ground_truths):
        check = check_answer(response, truth, timeout_s=config.math_timeout_s)
        failures += int(check.parse_failed)
        accuracy.append(1.0 if check.correct else 0.0)
        fmt.append(format_reward(response, require_think=config.require_think, style=config.format_style))
    acc_t = torch.tensor(accuracy, dtype=torch.float32)
    fmt_t = torch.tensor(fmt, dtype=torch.float32)
    reward = config.accuracy_weight * acc_t + config.format_weight * fmt_t
    return RewardResult(reward=reward, accuracy=acc_t, format=fmt_t, num_parse_failures=failures)
