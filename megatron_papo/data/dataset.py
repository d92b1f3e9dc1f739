"""PromptDataset: rows -> validated, indexable prompts (`Sample`s) with images.

Building the dataset makes one pass over the rows and keeps the good ones. A bad row is skipped,
counted by reason in `SkipStats`, and the first few are named in the log (logger
``megatron_papo.data``); nothing raises for a single bad row. Reasons:

- ``malformed_row``   the line could not be read (invalid JSON, not an object)
- ``missing_question`` no question, or an empty one
- ``missing_answer``   no answer, or an empty one
- ``missing_image``    no image value (None, empty list, empty path/bytes, unsupported type)
- ``image_not_found``  an image path that is not a file
- ``corrupt_image``    an image PIL cannot open (``image_check="decode"``: cannot fully decode)
- ``prompt_too_long``  the prompt, image tokens included, exceeds ``max_prompt_length``
- ``unsupported_image`` the model cannot take the image's size (e.g. Qwen2.5-VL: aspect ratio > 200)

If every row is bad (or there are none) a `DataError` with the counts is raised at build time.

Images are decoded again when a sample is read (they are not kept in memory). Should a read fail
then (a file removed or damaged after the build), the failure is counted and logged and the next
good row takes its place, so a batch never comes back short.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_papo.data.rows import (
    IMAGE_CHECKS,
    DataError,
    ImageCheck,
    ImageRef,
    ImageRefError,
    RawRow,
    Role,
    image_refs,
    load_rows,
    open_image,
)
from megatron_papo.data.templates import PromptTemplate, encode_prompt, get_template
from megatron_papo.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from megatron_papo.config import DataConfig

logger = logging.getLogger("megatron_papo.data")

SKIP_REASONS = ("malformed_row", "missing_question", "missing_answer", "missing_image",
                "image_not_found", "corrupt_image", "prompt_too_long", "unsupported_image")


@dataclass
class Sample:
    """One prompt, ready for rollout."""

    prompt_ids: list[int]
    """Prompt token ids; each image appears as `num_image_tokens` copies of image_token_id."""
    images: list[Any]
    """The row's images as RGB PIL images, in prompt order."""
    answer: str
    """Ground-truth answer (as stored; the reward compares it)."""
    question: str
    source: str
    """``file:row`` of the row the sample comes from."""
    index: int
    """Position in the dataset (what the sampler hands out)."""
    subset: str = ""
    """The row's evaluation subset (``meta["subset"]`` of its source, e.g. whether an easy-VQA
    test question follows or contradicts a training shortcut); "" = none. Evaluation reports
    accuracy per subset besides the overall one."""
    rationale: str = ""
    """What the warm start writes inside its think block for this row (``meta["rationale"]`` of
    its source, e.g. the easy-VQA image's "red circle"); "" = an empty think block."""


@dataclass
class SkipStats:
    """Rows seen, kept and skipped per reason (build time and read time)."""

    total: int = 0
    """Rows read at build time."""
    kept: int = 0
    """Rows kept at build time."""
    counts: Counter[str] = field(default_factory=Counter)
    """Skips per reason (SKIP_REASONS), build and read time together."""
    examples: list[str] = field(default_factory=list)
    """The first few skipped rows as ``file:row: reason (detail)``."""
    read_failures: int = 0
    """Reads that failed after the build (an image removed or damaged since): each is also in
    ``counts`` under its reason; the trainer reports them per step (``data/read_failures``)."""

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def record(self, reason: str, where: str, detail: str, max_examples: int) -> bool:
        """Count a skip; True when it is among the first `max_examples` (to be logged)."""
        self.counts[reason] += 1
        if len(self.examples) >= max_examples:
            return False
        self.examples.append(f"{where}: {reason} ({detail})")
        return True

    def summary(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items())) or "none"
        return f"kept {self.kept} of {self.total} rows; skipped {self.skipped}: {reasons}"


class _Skip(Exception):
    """A row is unusable (internal: always caught by the dataset)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Entry:
    """A row that passed the checks."""

    where: str
    question: str
    answer: str
    images: tuple[ImageRef, ...]
    subset: str = ""
    rationale: str = ""


def _text_field(value: Any, reason: str) -> str:
    if value is None:
        raise _Skip(reason, "no value")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Skip(reason, f"a {type(value).__name__}, not text")
    text = str(value).strip()
    if not text:
        raise _Skip(reason, "empty")
    return text


def _images_of(row: RawRow) -> tuple[ImageRef, ...]:
    if row.image is None:
        raise _Skip("missing_image", "no value")
    try:
        return tuple(image_refs(row.image, row.base_dir))
    except ImageRefError as e:
        raise _Skip("missing_image", str(e)) from None


def _image_failure(ref: ImageRef, error: Exception) -> _Skip:
    name = str(ref) if isinstance(ref, Path) else f"<{len(ref)} bytes>"
    if isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return _Skip("image_not_found", name)
    return _Skip("corrupt_image", f"{name}: {type(error).__name__}: {error}")


class PromptDataset:
    """Validated prompts with random access: ``len(ds)``, ``ds[i] -> Sample``, iteration."""

    def __init__(
        self,
        rows: Iterable[RawRow],
        tokenizer: Tokenizer,
        template: str | PromptTemplate = "think_boxed",
        max_prompt_length: int = 512,
        num_image_tokens: int | Callable[[tuple[int, int]], int] = 1,
        *,
        add_bos: bool = False,
        image_check: ImageCheck = "decode",
        log_first: int = 5,
    ) -> None:
        """
        Args:
            rows: raw rows (e.g. from `load_rows`); consumed once, here.
            tokenizer: any `Tokenizer`.
            template: a registered template name or a `PromptTemplate`.
            max_prompt_length: longest prompt kept, image tokens included.
            num_image_tokens: visual tokens per image: a number, or the model's
                ``num_image_tokens((height, width))`` when it depends on the image size
                (Qwen2.5-VL's dynamic resolution).
            add_bos: start prompts with the tokenizer's bos (when it has one).
            image_check: "decode" fully decodes every distinct image at build time (catches
                truncated files); "header" only opens it (fast, for large image sets).
            log_first: how many skipped rows are named in the log.
        """
        if not callable(num_image_tokens) and num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if image_check not in IMAGE_CHECKS:
            raise ValueError(f"image_check must be one of {sorted(IMAGE_CHECKS)}, got {image_check!r}")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_prompt_length = max_prompt_length
        self.num_image_tokens = num_image_tokens
        self.add_bos = add_bos
        self.log_first = log_first
        self.stats = SkipStats()
        self._check_image = IMAGE_CHECKS[image_check]
        self._image_ok: dict[Path, tuple[_Skip | None, tuple[int, int]]] = {}
        self._length_cache: dict[tuple[str, tuple[int, ...]], int] = {}
        self._entries: list[_Entry] = self._index(rows)

    # ----------------------------------------------------------------- build

    def _index(self, rows: Iterable[RawRow]) -> list[_Entry]:
        entries, sources = [], {}
        for row in rows:
            self.stats.total += 1
            sources.setdefault(row.source, None)
            try:
                entries.append(self._validate(row))
            except _Skip as skip:
                self._record(skip, row.where)
        self.stats.kept = len(entries)
        self._report(entries, list(sources))
        return entries

    def _validate(self, row: RawRow) -> _Entry:
        if row.problem is not None:
            raise _Skip("malformed_row", row.problem)
        question = _text_field(row.question, "missing_question")
        answer = _text_field(row.answer, "missing_answer")
        images = _images_of(row)
        sizes = [self._probe(ref) for ref in images]
        try:
            counts = [self._tokens_of(hw) for hw in sizes]
        except ValueError as e:
            raise _Skip("unsupported_image", str(e)) from None
        length = self._prompt_length(question, counts)
        if length > self.max_prompt_length:
            raise _Skip("prompt_too_long", f"{length} tokens > max_prompt_length {self.max_prompt_length}")
        return _Entry(row.where, question, answer, images, str(row.meta.get("subset", "")),
                      str(row.meta.get("rationale", "")).strip())

    def _probe(self, ref: ImageRef) -> tuple[int, int]:
        """Check an image once per distinct path (bytes are checked every time); its (height, width)."""
        if isinstance(ref, Path) and ref in self._image_ok:
            failure, hw = self._image_ok[ref]
        else:
            hw = (0, 0)
            try:
                hw = self._check_image(ref)
                failure = None
            except Exception as e:  # PIL raises many types for a bad image
                failure = _image_failure(ref, e)
            if isinstance(ref, Path):
                self._image_ok[ref] = (failure, hw)
        if failure is not None:
            raise failure
        return hw

    def _tokens_of(self, hw: tuple[int, int]) -> int:
        """Image-token placeholders of one image of size ``hw``."""
        n = self.num_image_tokens(hw) if callable(self.num_image_tokens) else self.num_image_tokens
        if n < 1:
            raise ValueError(f"num_image_tokens{hw} must be >= 1, got {n}")
        return n

    def _prompt_length(self, question: str, counts: list[int]) -> int:
        key = (question, tuple(counts))
        if key not in self._length_cache:
            self._length_cache[key] = len(self._encode(question, counts))
        return self._length_cache[key]

    def _encode(self, question: str, counts: list[int]) -> list[int]:
        """Prompt ids; image slot i becomes ``counts[i]`` image tokens."""
        parts = self.template.parts(question, len(counts))
        return encode_prompt(self.tokenizer, parts, counts, bos=self.add_bos)

    def _record(self, skip: _Skip, where: str) -> None:
        if self.stats.record(skip.reason, where, skip.detail, self.log_first):
            logger.warning("skipping row %s: %s (%s)", where, skip.reason, skip.detail)

    def _report(self, entries: list[_Entry], sources: list[str]) -> None:
        self._length_cache.clear()
        self._image_ok.clear()
        named = ", ".join(sources) or "(no source)"
        if not entries:
            raise DataError(f"no usable rows in {named}: {self.stats.summary()}; "
                            f"first skipped: {self.stats.examples or 'none'}")
        if self.stats.skipped:
            logger.warning("data %s: %s", named, self.stats.summary())
        else:
            logger.info("data %s: %s", named, self.stats.summary())

    # ----------------------------------------------------------------- read

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_images(self) -> int:
        """The most images one kept row has."""
        return max((len(e.images) for e in self._entries), default=0)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        for offset in range(len(self)):
            entry = self._entries[(index + offset) % len(self)]
            try:
                images = [_read_image(ref) for ref in entry.images]
                return self._sample(entry, images, index)
            except _Skip as skip:
                self.stats.read_failures += 1
                self._record(skip, entry.where)
            except ValueError as e:  # an image replaced since the build by one the model refuses
                self.stats.read_failures += 1
                self._record(_Skip("unsupported_image", str(e)), entry.where)
        raise DataError(f"no image of the dataset could be read any more: {self.stats.summary()}")

    def _sample(self, entry: _Entry, images: list[Any], index: int) -> Sample:
        counts = [self._tokens_of((image.height, image.width)) for image in images]
        return Sample(prompt_ids=self._encode(entry.question, counts), images=images,
                      answer=entry.answer, question=entry.question, source=entry.where, index=index,
                      subset=entry.subset, rationale=entry.rationale)

    def question(self, index: int) -> str:
        """The question text of sample ``index``, without reading its image."""
        return self._entries[index].question

    def answer(self, index: int) -> str:
        """The ground-truth answer of sample ``index``, without reading its image."""
        return self._entries[index].answer

    def subset(self, index: int) -> str:
        """The evaluation subset of sample ``index`` (:attr:`Sample.subset`), without reading its image."""
        return self._entries[index].subset

    def prompt_text(self, index: int) -> str:
        """The rendered prompt of sample `index` with ``<image>`` markers (for logs)."""
        entry = self._entries[index]
        return self.template.render(entry.question, len(entry.images))


def _read_image(ref: ImageRef) -> Any:
    try:
        return open_image(ref)
    except Exception as e:  # PIL raises many types for a bad image
        raise _image_failure(ref, e) from None


def build_prompt_dataset(
    source: str,
    cfg: DataConfig,
    tokenizer: Tokenizer,
    num_image_tokens: int | Callable[[tuple[int, int]], int],
    *,
    role: Role = "train",
    **kwargs: Any,
) -> PromptDataset:
    """`load_rows` + `PromptDataset` with the config's template, keys, limit and length."""
    rows = load_rows(source, cfg, role=role)
    return PromptDataset(rows, tokenizer, cfg.prompt_template, cfg.max_prompt_length,
                         num_image_tokens, **kwargs)


__all__ = ["SKIP_REASONS", "PromptDataset", "Sample", "SkipStats", "build_prompt_dataset"]
