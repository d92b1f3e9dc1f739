"""easy-VQA with a text shortcut (``easy_vqa_shortcut:train`` / ``easy_vqa_shortcut:test``): the
stage where perception is the bottleneck (docs/RESULTS.md).

Training split: a subsample of easy-VQA train in which each question text predicts one answer,
its *shortcut answer*, for at least ``SHORTCUT_SHARE`` (80%) of its rows. For every one of the 107
question texts, the shortcut answer is drawn (seeded, ``SHORTCUT_SEED``, independent of any run's
seed) from the answers that text has in train; all its rows with that answer are kept, and of its
other rows a seeded random subset of ``round(kept * (1 - share) / share)`` (all of them when there
are fewer, so the share is higher for some texts). 21,463 rows on 3,987 images; a model that
never looks at the image scores 0.849 on it, and 0.464 on the unbiased test split (against 0.670
for the prior of the whole train split).

Test split: the whole, unbiased easy-VQA test split; each row's ``meta["subset"]`` says whether
its answer is the shortcut answer of its question text (``follows_shortcut``) or not
(``contradicts_shortcut``): on the latter only looking at the image can be right, and evaluation
reports the accuracy of each subset (``eval/accuracy@k/contradicts_shortcut``).

Row ids are the easy-VQA row positions (``easy_vqa_shortcut:train#<row of easy_vqa:train>``), so
a row can be traced to the package's files. The split is a fixed dataset: the same rows on every
machine and for every run.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Iterator

from megatron_papo.data.easy_vqa import load_split, split_row
from megatron_papo.data.rows import BuiltinSource, RawRow, register_source

SHORTCUT_SHARE = 0.8
"""Share of each question text's training rows whose answer is its shortcut answer."""
SHORTCUT_SEED = 20260716
"""Seed of the shortcut answers and of the subsample (fixed: the split is one dataset)."""
SPLITS = ("train", "test")
FOLLOWS, CONTRADICTS = "follows_shortcut", "contradicts_shortcut"


@functools.cache
def shortcut_answers() -> dict[str, str]:
    """question text -> its shortcut answer (one of the answers it has in easy-VQA train)."""
    data = load_split("train")
    answers: dict[str, set[str]] = defaultdict(set)
    for question, answer in zip(data.questions, data.answers, strict=True):
        answers[question].add(answer)
    rng = random.Random(SHORTCUT_SEED)
    return {q: rng.choice(sorted(answers[q])) for q in sorted(answers)}


@functools.cache
def shortcut_train_rows() -> tuple[int, ...]:
    """Row positions of easy-VQA train kept in the shortcut training split, ascending."""
    data = load_split("train")
    short = shortcut_answers()
    by_question: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for row, (question, answer) in enumerate(zip(data.questions, data.answers, strict=True)):
        by_question[question][answer != short[question]].append(row)
    rng = random.Random(SHORTCUT_SEED + 1)
    kept: list[int] = []
    for question in sorted(by_question):
        follows, others = by_question[question]
        n_other = min(len(others), round(len(follows) * (1 - SHORTCUT_SHARE) / SHORTCUT_SHARE))
        kept += follows + rng.sample(others, n_other)
    return tuple(sorted(kept))


def shortcut_rows(split: str) -> Iterator[RawRow]:
    """Rows of one split (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"easy_vqa_shortcut has splits {SPLITS}, got {split!r}")
    data = load_split(split)
    short = shortcut_answers()
    rows = shortcut_train_rows() if split == "train" else range(len(data.questions))
    source = f"easy_vqa_shortcut:{split}"
    for row in rows:
        subset = FOLLOWS if short.get(data.questions[row]) == data.answers[row] else CONTRADICTS
        yield split_row(split, row, source, subset=subset)


def _open_split(split: str) -> Iterator[RawRow]:
    shortcut_train_rows()  # read the package now: errors surface before iteration
    return shortcut_rows(split)


SOURCE = register_source(BuiltinSource(name="easy_vqa_shortcut", splits=SPLITS, held_out=frozenset({"test"}),
                                       open=_open_split))

__all__ = ["CONTRADICTS", "FOLLOWS", "SHORTCUT_SEED", "SHORTCUT_SHARE", "SOURCE", "shortcut_answers",
           "shortcut_rows", "shortcut_train_rows"]
