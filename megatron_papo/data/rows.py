"""Raw rows: JSONL / Parquet files in the ViRL39K layout and built-in sources, read as `RawRow`s.

A row has an image column, a question column and an answer column (names from `DataConfig`).
The image value may be a path (relative to the data file's folder, or absolute), raw bytes, a
Hugging Face `Image` struct (``{"bytes": ..., "path": ...}``), or a list of those (several images).

Structural problems raise `DataError` at once, before any row is produced: a missing file, an
unknown format, a column absent from the whole file (the message names the file, the column and
the columns present). Problems of single rows (a bad JSON line, an empty answer, a missing image)
are left to the dataset, which skips and counts them.

Built-in sources are named ``<name>:<split>`` (``easy_vqa:train``). Held-out splits
(``easy_vqa:test``) are refused when ``role="train"``: the source name is the only way in.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from megatron_papo.errors import UserError

if TYPE_CHECKING:
    from megatron_papo.config import DataConfig

Role = Literal["train", "eval"]
ImageRef = Path | bytes
"""A resolved image reference: a file path or the encoded image bytes."""

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class BuiltinSource:
    """A dataset that a package ships, named ``<name>:<split>`` in ``data.train`` / ``data.eval``.

    Adapters register themselves (``register_source``) when their module is imported; the
    ``megatron_papo.data`` package imports the built-in ones, so this module never imports them.
    """

    name: str
    splits: tuple[str, ...]
    held_out: frozenset[str]
    """Splits that must never feed training (held-out evaluation data)."""
    open: Callable[[str], Iterator[RawRow]]
    """split -> its rows; reads eagerly enough that a broken install fails here, not mid-run."""


BUILTIN_SOURCES: dict[str, BuiltinSource] = {}
"""Registered built-in sources by name (see :func:`register_source`)."""


def register_source(source: BuiltinSource) -> BuiltinSource:
    """Make ``<source.name>:<split>`` a valid data source; returns ``source``."""
    BUILTIN_SOURCES[source.name] = source
    return source


class DataError(ValueError, UserError):
    """The data cannot be used at all (missing file or column, every row bad)."""


@dataclass
class RawRow:
    """One row as read from its source, before any validation."""

    source: str
    """The file path or built-in source name the row comes from."""
    row: int
    """Row position inside its source (0-based)."""
    question: Any = None
    answer: Any = None
    image: Any = None
    """Image value as stored: path, bytes, {"bytes", "path"} struct, or a list of those."""
    base_dir: Path | None = None
    """Folder that relative image paths are relative to (the data file's folder)."""
    problem: str | None = None
    """Set when the row could not even be read (e.g. invalid JSON); the dataset skips it."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``file:row`` for messages."""
        return f"{self.source}:{self.row}"


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def load_rows(source: str, cfg: DataConfig, *, role: Role = "train") -> Iterator[RawRow]:
    """Rows of a JSONL/Parquet file or a built-in source, first ``cfg.limit`` only.

    Raises DataError now (not on iteration) for a missing file, a missing column, an unknown
    built-in split, or a held-out split asked for training.
    """
    builtin = _builtin_source(source)
    if builtin is not None:
        rows = _open_builtin(*builtin, role=role)
    else:
        rows = _open_file(Path(source).expanduser(), cfg)
    return itertools.islice(rows, cfg.limit) if cfg.limit is not None else rows


def _builtin_source(source: str) -> tuple[str, str] | None:
    name, sep, split = source.partition(":")
    if sep and name in BUILTIN_SOURCES:
        return name, split
    return None


def _open_builtin(name: str, split: str, *, role: Role) -> Iterator[RawRow]:
    src = BUILTIN_SOURCES[name]
    if role == "train" and split in src.held_out:
        raise DataError(f"'{name}:{split}' is held-out evaluation data and cannot be used for training "
                        f"(data.train); use '{name}:train'")
    if split not in src.splits:
        raise DataError(f"unknown split '{split}' of built-in source '{name}'; known: {src.splits}")
    return src.open(split)


def _open_file(path: Path, cfg: DataConfig) -> Iterator[RawRow]:
    if not path.is_file():
        raise DataError(f"data file not found: {path} (built-in sources: "
                        f"{', '.join(s + ':train' for s in BUILTIN_SOURCES)})")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path, cfg)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_rows(path, cfg)
    raise DataError(f"{path}: unknown data format '{suffix}'; expected one of "
                    f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")


def _columns(cfg: DataConfig) -> dict[str, str]:
    return {"image": cfg.image_key, "question": cfg.question_key, "answer": cfg.answer_key}


def _optional_meta(record: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """The optional columns of a record as row meta: ``data.rationale_key`` -> "rationale"."""
    value = record.get(cfg.rationale_key)
    return {"rationale": value} if isinstance(value, str) and value.strip() else {}


def _check_columns(path: Path, present: list[str], cfg: DataConfig) -> None:
    for role, column in _columns(cfg).items():
        if column not in present:
            shown = ", ".join(present) if present else "(none)"
            raise DataError(f"{path}: the {role} column '{column}' (data.{role}_key) is missing; "
                            f"columns present: {shown}")


# --------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------


def _parse_jsonl_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """One line's record, or None and the reason it is skipped (a bad line is one bad row)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    return record, None


def _jsonl_rows(path: Path, cfg: DataConfig) -> Iterator[RawRow]:
    """Read the file (first `limit` non-blank lines) now; check columns; yield rows lazily.

    A row's number is its 0-based line index in the file (blank lines are skipped, not counted).
    """
    parsed: list[tuple[int, dict[str, Any] | None, str | None]] = []
    with path.open("rb") as f:  # decoded line by line: one non-UTF-8 line is one skipped row
        lines = ((i, line) for i, line in enumerate(f) if line.strip())
        for row, line in itertools.islice(lines, cfg.limit):
            parsed.append((row, *_parse_jsonl_line(line)))
    present: dict[str, None] = {}
    for _, record, _ in parsed:
        present.update(dict.fromkeys(record or {}))
    if parsed and any(record is not None for _, record, _ in parsed):
        _check_columns(path, list(present), cfg)
    return _jsonl_iter(path, parsed, cfg)


def _jsonl_iter(path: Path, parsed: list, cfg: DataConfig) -> Iterator[RawRow]:
    keys = _columns(cfg)
    for row, record, problem in parsed:
        if record is None:
            yield RawRow(source=str(path), row=row, base_dir=path.parent, problem=problem)
            continue
        yield RawRow(source=str(path), row=row, base_dir=path.parent, meta=_optional_meta(record, cfg),
                     **{role: record.get(column) for role, column in keys.items()})


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------


def _parquet_rows(path: Path, cfg: DataConfig) -> Iterator[RawRow]:
    """Check the schema now; read only the three columns, batch by batch, on iteration."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    _check_columns(path, list(parquet.schema_arrow.names), cfg)
    return _parquet_iter(path, parquet, cfg)


def _parquet_iter(path: Path, parquet: Any, cfg: DataConfig) -> Iterator[RawRow]:
    keys = _columns(cfg)
    columns = list(dict.fromkeys(keys.values()))
    if cfg.rationale_key in parquet.schema_arrow.names:
        columns.append(cfg.rationale_key)
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            yield RawRow(source=str(path), row=row, base_dir=path.parent, meta=_optional_meta(record, cfg),
                         **{role: record.get(column) for role, column in keys.items()})
            row += 1


# --------------------------------------------------------------------------------------
# Image references
# --------------------------------------------------------------------------------------


class ImageRefError(ValueError):
    """An image value that names no image (empty, wrong type)."""


def image_refs(value: Any, base_dir: Path | None) -> list[ImageRef]:
    """Resolve a row's image value into a list of paths / byte strings (nothing opened yet).

    Raises ImageRefError for an empty value or one of an unsupported type.
    """
    items = list(value) if isinstance(value, list | tuple) else [value]
    if hasattr(value, "tolist") and not isinstance(value, bytes | bytearray):
        items = list(value.tolist())  # numpy arrays of paths
    refs = [_image_ref(item, base_dir) for item in items]
    if not refs:
        raise ImageRefError("empty image list")
    return refs


def _image_ref(item: Any, base_dir: Path | None) -> ImageRef:
    if isinstance(item, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        item = item.get("bytes") or item.get("path")
    if isinstance(item, bytes | bytearray | memoryview):
        if not item:
            raise ImageRefError("empty image bytes")
        return bytes(item)
    if isinstance(item, str | Path):
        if not str(item).strip():
            raise ImageRefError("empty image path")
        path = Path(item).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path
    raise ImageRefError(f"image value of type {type(item).__name__}")


def open_image(ref: ImageRef) -> Any:
    """Decode one image fully into an RGB PIL image. Raises FileNotFoundError or an image error."""
    from PIL import Image

    handle: Any = io.BytesIO(ref) if isinstance(ref, bytes) else ref
    with Image.open(handle) as image:
        image.load()
        return image.convert("RGB")


def probe_image(ref: ImageRef) -> tuple[int, int]:
    """Check that an image can be opened from its header alone (fast; no decoding); its (height, width)."""
    from PIL import Image

    handle: Any = io.BytesIO(ref) if isinstance(ref, bytes) else ref
    with Image.open(handle) as image:
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image {image.size}")
        return image.height, image.width


ImageCheck = Literal["decode", "header"]


def decode_image_size(ref: ImageRef) -> tuple[int, int]:
    """Check that an image decodes fully (catches truncated files); its (height, width)."""
    image = open_image(ref)
    return image.height, image.width


IMAGE_CHECKS: dict[str, Callable[[ImageRef], tuple[int, int]]] = {"decode": decode_image_size,
                                                                  "header": probe_image}
"""Build-time image checks; each returns the image's (height, width)."""


__all__ = [
    "BUILTIN_SOURCES",
    "IMAGE_CHECKS",
    "BuiltinSource",
    "DataError",
    "ImageCheck",
    "ImageRef",
    "ImageRefError",
    "RawRow",
    "image_refs",
    "load_rows",
    "open_image",
    "probe_image",
    "register_source",
]
