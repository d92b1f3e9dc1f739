"""Tokenizers: the protocol the trainer uses, and a small word-level tokenizer built in-tree.

The tiny CPU model needs a vocabulary of a few hundred entries that the project can build itself
(no downloads). The Hugging Face tokenizer of Qwen2.5-VL satisfies the same :class:`Tokenizer`
protocol through an adapter later.

WordTokenizer, how text becomes ids
-----------------------------------
1. Normalise: lower-case (``lowercase=True``) and fold every whitespace run into one space.
   Nothing else changes, so ``decode(encode(x)) == tok.normalize(x)`` for any text whose
   characters are printable ASCII (in-vocabulary words are one token each; other words are
   spelled out, see 4).
2. Split out the special tokens wherever they occur in the text: ``<pad> <bos> <eos> <unk>
   <image> <think> </think> \\boxed{ }``. ``\\boxed{`` and ``}`` are single tokens so a tiny model
   can open and close a boxed answer in one step each. Every ``}`` is the special token
   (``\\frac{1}{2}`` still round-trips: ``{`` is an ordinary character).
3. Split the text between special tokens into pieces, GPT-2 style: a piece carries the single
   space before it (``" shape"`` and ``"shape"`` are different pieces). A piece is a run of
   letters, one ASCII digit (numbers are spelled digit by digit), one other character, or a
   lone space (before a special token or at the end).
4. A piece in the vocabulary is one id. An unknown piece falls back to characters: the
   vocabulary always holds every printable ASCII character with and without a leading space,
   so an unknown ASCII word costs one id per character and still decodes exactly. A character
   outside that alphabet (e.g. "é") becomes ``<unk>`` and does not round-trip.

Decoding concatenates the token strings; ``skip_special=True`` drops the control tokens
(``<pad> <bos> <eos> <image>``) but keeps the text-like ones (``<think>``, ``</think>``,
``\\boxed{``, ``}``) that the reward functions read.

Ids are a pure function of the corpus: specials first (fixed ids 0-8), then the character
alphabet, then corpus pieces by descending count, ties broken by the piece's text. The corpus
comes from the caller (the easy-VQA one: ``megatron_papo.data.easy_vqa.easy_vqa_tokenizer``); this
module imports no dataset and no template.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<unk>"
IMAGE = "<image>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
BOX_OPEN = "\\boxed{"
BOX_CLOSE = "}"

SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE, THINK_OPEN, THINK_CLOSE, BOX_OPEN, BOX_CLOSE)
"""Special tokens in id order (id = position)."""

CONTROL_TOKENS: frozenset[str] = frozenset({PAD, BOS, EOS, IMAGE})
"""Special tokens that ``decode(..., skip_special=True)`` drops."""

_FORMAT = "megatron_papo.word_tokenizer"
_FORMAT_VERSION = 1

_WHITESPACE = re.compile(r"\s+")
# Letters run | one ASCII digit | any other visible character | a lone space; each may carry the
# space before it. Alternatives are tried in order, so the third one only sees non-letters.
_PIECE = re.compile(r" ?[^\W\d_]+| ?[0-9]| ?\S| ")
_SPECIAL_SPLIT = re.compile(
    "(" + "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)) + ")"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer, rollout and trainer need from a tokenizer."""

    vocab_size: int
    """Number of ids (unpadded); every id is in [0, vocab_size)."""
    pad_id: int
    eos_id: int
    bos_id: int | None
    """None when the tokenizer has no beginning-of-sequence token (Qwen2.5)."""
    image_token_id: int
    """The id a prompt repeats once per visual token of an image."""

    def encode(self, text: str) -> list[int]:
        """Text to ids; no bos/eos added."""
        ...

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Ids to text; ``skip_special`` drops control tokens (pad, bos, eos, image)."""
        ...


# --------------------------------------------------------------------------------------
# Pre-tokenization (pure functions of the text)
# --------------------------------------------------------------------------------------


def normalize_text(text: str, lowercase: bool = True) -> str:
    """What the word tokenizer preserves of ``text``: case-folded, whitespace runs as one space."""
    text = _WHITESPACE.sub(" ", text)
    return text.lower() if lowercase else text


def split_pieces(text: str) -> list[str]:
    """Split already-normalised text into special tokens and word pieces (in order)."""
    pieces: list[str] = []
    for i, segment in enumerate(_SPECIAL_SPLIT.split(text)):
        if i % 2 == 1:  # re.split puts the captured separators at odd positions
            pieces.append(segment)
        elif segment:
            pieces.extend(_PIECE.findall(segment))
    return pieces


def _alphabet(lowercase: bool) -> list[str]:
    """Every printable ASCII character, bare and with a leading space, plus the lone space."""
    chars = string.ascii_lowercase if lowercase else string.ascii_letters
    chars += string.digits + string.punctuation.replace(BOX_CLOSE, "")
    return [" ", *chars, *(" " + c for c in chars)]


# --------------------------------------------------------------------------------------
# WordTokenizer
# --------------------------------------------------------------------------------------


@dataclass
class WordTokenizer:
    """Word-level tokenizer with special tokens and an ASCII character fallback (module docstring)."""

    tokens: list[str]
    """Id -> token string. Starts with SPECIAL_TOKENS, then the character alphabet."""
    lowercase: bool = True
    """Fold case before splitting (the vocabulary then holds lower-case pieces only)."""
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a WordTokenizer vocabulary must start with {SPECIAL_TOKENS}")
        self._ids = {}
        for i, token in enumerate(self.tokens):
            if token in self._ids:
                raise ValueError(f"token {token!r} appears twice (ids {self._ids[token]} and {i})")
            self._ids[token] = i
        missing = [c for c in _alphabet(self.lowercase) if c not in self._ids]
        if missing:
            raise ValueError(f"vocabulary lacks fallback characters {missing[:10]}")

    # ----------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        min_freq: int = 1,
        extra_tokens: Iterable[str] = (),
        lowercase: bool = True,
    ) -> WordTokenizer:
        """Build the vocabulary from a corpus.

        Args:
            texts: corpus; every piece seen at least ``min_freq`` times gets an id.
            min_freq: minimum count of a piece (pieces below it are spelled out by characters).
            extra_tokens: pieces that get an id whatever their count (e.g. ``"circle"``, the
                answer as it follows ``\\boxed{``). Each must be exactly one piece.
            lowercase: fold case (see the module docstring).
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        base = [*SPECIAL_TOKENS, *_alphabet(lowercase)]
        counts = Counter(
            piece
            for text in texts
            for piece in split_pieces(normalize_text(text, lowercase))
            if piece not in SPECIAL_TOKENS
        )
        kept = {p for p, n in counts.items() if n >= min_freq}
        kept.update(_check_extra_tokens(extra_tokens, lowercase))
        known = set(base)
        words = sorted((p for p in kept if p not in known), key=lambda p: (-counts.get(p, 0), p))
        return cls(tokens=base + words, lowercase=lowercase)

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT or data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: not a {_FORMAT} v{_FORMAT_VERSION} file")
        return cls(tokens=list(data["tokens"]), lowercase=bool(data["lowercase"]))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (ids are list positions)."""
        data = {"format": _FORMAT, "version": _FORMAT_VERSION, "lowercase": self.lowercase,
                "tokens": self.tokens}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------- protocol

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def image_token_id(self) -> int:
        return self._ids[IMAGE]

    def token_to_id(self, token: str) -> int | None:
        """Id of an exact token string, or None."""
        return self._ids.get(token)

    def normalize(self, text: str) -> str:
        """What ``decode(encode(text))`` returns for ASCII text."""
        return normalize_text(text, self.lowercase)

    def encode(self, text: str) -> list[int]:
        """Text to ids (no bos/eos added)."""
        ids: list[int] = []
        for piece in split_pieces(self.normalize(text)):
            ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Ids to text; out-of-range ids raise ValueError."""
        parts = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"id {i} out of range for vocab_size {len(self.tokens)}")
            token = self.tokens[i]
            if skip_special and token in CONTROL_TOKENS:
                continue
            parts.append(token)
        return "".join(parts)

    def _encode_piece(self, piece: str) -> list[int]:
        known = self._ids.get(piece)
        if known is not None:
            return [known]
        # Character fallback: the first character keeps the piece's leading space.
        head = 2 if piece.startswith(" ") else 1
        chars = [piece[:head], *piece[head:]]
        return [self._ids.get(c, self.unk_id) for c in chars]


def _check_extra_tokens(extra_tokens: Iterable[str], lowercase: bool) -> list[str]:
    out = []
    for token in extra_tokens:
        pieces = split_pieces(normalize_text(token, lowercase))
        if len(pieces) != 1 or pieces[0] != normalize_text(token, lowercase):
            raise ValueError(f"extra token {token!r} is not a single piece (it splits into {pieces})")
        if pieces[0] not in SPECIAL_TOKENS:
            out.append(pieces[0])
    return out


__all__ = [
    "BOX_CLOSE",
    "BOX_OPEN",
    "CONTROL_TOKENS",
    "IMAGE",
    "SPECIAL_TOKENS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "Tokenizer",
    "WordTokenizer",
    "normalize_text",
    "split_pieces",
]


# --------------------------------------------------------------------------------------
# Hugging Face tokenizers (Qwen2.5-VL)
# --------------------------------------------------------------------------------------

QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_VISION_START = "<|vision_start|>"
QWEN_VISION_END = "<|vision_end|>"


class HFTokenizer:
    """A Hugging Face tokenizer folder behind the :class:`Tokenizer` protocol (offline).

    Qwen2.5-VL conventions: the image placeholder is ``<|image_pad|>`` and each image's run of
    placeholders is wrapped in ``<|vision_start|>`` ... ``<|vision_end|>``
    (:attr:`image_prefix_ids` / :attr:`image_suffix_ids`, which prompt encoding inserts);
    special tokens written in the text (``<|im_start|>`` ...) are recognised; nothing is added
    around the text (no bos).
    """

    def __init__(self, path: str | Path, image_token: str = QWEN_IMAGE_TOKEN) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise FileNotFoundError(f"{folder}: no tokenizer.json / tokenizer_config.json / vocab.json: not "
                                    "a Hugging Face tokenizer folder (set model.tokenizer to one)")
        from transformers import AutoTokenizer

        self.path = folder
        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image = self._tok.convert_tokens_to_ids(image_token)
        if image is None or image == self._tok.unk_token_id:
            raise ValueError(f"{folder}: the tokenizer has no image token {image_token!r}")
        self.image_token_id = int(image)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"{folder}: the tokenizer defines no eos token")
        self.eos_id = int(eos)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else eos)
        self.bos_id = None
        self.image_prefix_ids = self._ids_of(QWEN_VISION_START)
        self.image_suffix_ids = self._ids_of(QWEN_VISION_END)

    def _ids_of(self, token: str) -> list[int]:
        i = self._tok.convert_tokens_to_ids(token)
        return [] if i is None or i == self._tok.unk_token_id else [int(i)]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)
