"""The built-in easy-VQA source (``easy_vqa:train`` / ``easy_vqa:test``) from the `easy_vqa` package.

easy-VQA: 64x64 RGB PNGs of one coloured shape; 38,575 train questions on 4,000 images and
9,673 test questions on 1,000 images; 13 answers (yes/no, 3 shapes, 8 colours).

Quirks worth knowing:
- Image ids restart at 0 in each split (train 0-3999, test 0-999): an id alone does not name an
  image. Rows are named ``easy_vqa:<split>#<row>`` and carry the split's own file path.
- The two splits are different files with different bytes (no test image is a copy of a train
  image); the 107 distinct question texts are the same in both splits (templated questions).
- About 74% of the questions are yes/no.

The test split is held out: :func:`megatron_papo.data.rows.load_rows` refuses it for training.
Importing this module registers the source with the row reader (``rows.register_source``).

The easy-VQA word tokenizer (:func:`easy_vqa_tokenizer`) is built here from this source's texts:
the tokenizer module itself knows no dataset and no template.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import easy_vqa

from megatron_papo.config import DataConfig
from megatron_papo.data.rows import BuiltinSource, RawRow, load_rows, register_source
from megatron_papo.data.templates import template_corpus
from megatron_papo.data.tokenizer import BOX_CLOSE, BOX_OPEN, THINK_CLOSE, THINK_OPEN, WordTokenizer

SPLITS = ("train", "test")
EASY_VQA_ANSWERS: tuple[str, ...] = (
    "circle", "green", "red", "gray", "yes", "teal", "black",
    "rectangle", "yellow", "triangle", "brown", "blue", "no",
)
"""The 13 answers, in the order of the package's answers.txt."""


@dataclass(frozen=True)
class EasyVqaSplit:
    """One split as the package ships it (parallel lists + image id -> path)."""

    questions: list[str]
    answers: list[str]
    image_ids: list[int]
    image_paths: dict[int, str]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"easy_vqa has splits {SPLITS}, got {split!r}")


@functools.cache
def load_split(split: str) -> EasyVqaSplit:
    """Read a split's questions and image paths from the installed package (cached)."""
    _check_split(split)
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return EasyVqaSplit(list(questions), list(answers), [int(i) for i in image_ids], dict(paths))


def easy_vqa_train_questions() -> list[str]:
    """All train questions (the tokenizer's corpus)."""
    return load_split("train").questions


def easy_vqa_rows(split: str) -> Iterator[RawRow]:
    """Rows of one split, in the package's order (:func:`split_row`)."""
    data = load_split(split)
    for row in range(len(data.questions)):
        yield split_row(split, row, f"easy_vqa:{split}")


EASY_VQA_COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


@functools.cache
def image_captions(split: str) -> dict[int, str]:
    """image id -> "<colour> <shape>" of each image, as far as its own questions tell: a colour
    answer ("what color is the shape?" -> "red"), a shape answer, or a colour named in a question
    whose answer is a shape ("what is the red shape?" -> "triangle") and vice versa. Parts an
    image's questions do not tell are left out ("red", "circle" or no caption at all). Measured:
    3,181 of the 4,000 train images get both parts, none gets two colours or two shapes."""
    data = load_split(split)
    colours: dict[int, set[str]] = {}
    shapes: dict[int, set[str]] = {}
    for question, answer, image in zip(data.questions, data.answers, data.image_ids, strict=True):
        words = set(question.lower().rstrip("?").split())
        if answer in EASY_VQA_COLORS:
            colours.setdefault(image, set()).add(answer)
            shapes.setdefault(image, set()).update(words & EASY_VQA_SHAPES)
        elif answer in EASY_VQA_SHAPES:
            shapes.setdefault(image, set()).add(answer)
            colours.setdefault(image, set()).update(words & EASY_VQA_COLORS)
    out = {}
    for image in set(data.image_ids):
        parts = [next(iter(p)) for p in (colours.get(image, set()), shapes.get(image, set())) if len(p) == 1]
        if parts:
            out[image] = " ".join(parts)
    return out


def split_row(split: str, row: int, source: str, **meta: str) -> RawRow:
    """Row ``row`` of an easy-VQA split as a RawRow named ``source`` (``meta`` added to its
    image id and split, and the image's caption as ``meta["rationale"]``: what the warm start
    writes in its think block). A question whose image file is not listed gets the would-be path,
    so the dataset counts it as a missing image instead of crashing."""
    data = load_split(split)
    image_id = data.image_ids[row]
    path = data.image_paths.get(image_id, f"<easy_vqa {split} image {image_id} not shipped>")
    caption = image_captions(split).get(image_id)
    extra = {"rationale": caption} if caption else {}
    return RawRow(source=source, row=row, question=data.questions[row], answer=data.answers[row],
                  image=path, meta={"image_id": image_id, "split": split, **extra, **meta})


def _open_split(split: str) -> Iterator[RawRow]:
    load_split(split)  # read the package now: errors surface before iteration
    return easy_vqa_rows(split)


SOURCE = register_source(BuiltinSource(name="easy_vqa", splits=SPLITS, held_out=frozenset({"test"}),
                                       open=_open_split))


def easy_vqa_corpus() -> list[str]:
    """Texts the easy-VQA tokenizer is built from: the distinct train questions (alone and inside
    every registered prompt template), the 13 answers boxed and inside a short think block.

    Test questions are left out on purpose (they are the same 107 texts, which a test checks).
    Piece ids are ordered by their count in this list (ties by text).
    """
    questions = sorted(set(easy_vqa_train_questions()))
    answers = [f"{BOX_OPEN}{a}{BOX_CLOSE}" for a in EASY_VQA_ANSWERS]
    answers += [f"{THINK_OPEN} the answer is {a} {THINK_CLOSE}" for a in EASY_VQA_ANSWERS]
    return [*questions, *answers, *template_corpus(questions)]


@functools.cache
def easy_vqa_tokenizer() -> WordTokenizer:
    """The tokenizer of the tiny easy-VQA model (built once per process, same ids everywhere)."""
    return WordTokenizer.build(easy_vqa_corpus(), min_freq=1)


def question_prior(rows: Iterable[RawRow]) -> dict[str, str]:
    """question text -> its most frequent answer among ``rows`` (ties: the answer seen first).

    The predictor of a model that never looks at the image: the best such model on data drawn
    like ``rows`` answers each templated question with that question's majority answer.
    """
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in rows:
        counts[str(row.question)][str(row.answer)] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def text_only_accuracy(eval_source: str = "easy_vqa:test", num_prompts: int = 0, *,
                       prior_source: str = "easy_vqa:train") -> float:
    """Accuracy of :func:`question_prior` of ``prior_source`` (the training data) on the first
    ``num_prompts`` rows of ``eval_source`` (0 = all): the text-only floor that a model using the
    image must beat. Either may be a built-in source (``<name>:<split>``) or a data file, read as
    ``data.eval`` is, on every call (0.670 for easy_vqa:train on the whole easy_vqa:test).
    Raises DataError for a source that does not exist."""
    prior = question_prior(load_rows(prior_source, DataConfig(), role="eval"))
    rows = load_rows(eval_source, DataConfig(), role="eval")
    if num_prompts > 0:
        rows = itertools.islice(rows, num_prompts)
    hits = total = 0
    for row in rows:
        hits += prior.get(str(row.question)) == str(row.answer)
        total += 1
    return hits / max(total, 1)


__all__ = [
    "EASY_VQA_ANSWERS",
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "SOURCE",
    "SPLITS",
    "EasyVqaSplit",
    "easy_vqa_corpus",
    "easy_vqa_rows",
    "easy_vqa_tokenizer",
    "easy_vqa_train_questions",
    "image_captions",
    "load_split",
    "question_prior",
    "split_row",
    "text_only_accuracy",
]
