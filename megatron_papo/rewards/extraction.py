"""Answer extraction and plain-text normalisation for verifiable rewards.

Only string handling lives here; deciding whether two *mathematical* answers are equal is
left to the ``math_verify`` library (see :mod:`megatron_papo.rewards.math_reward`).
"""

from __future__ import annotations

import re

# "\boxed" or "\fbox", not followed by another letter (so "\boxedx" is not a box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The argument of "\boxed 5": one token, up to whitespace or a closing "$".
_BARE_TOKEN = re.compile(r"[^\s$]+")
# Text-like wrappers whose argument is the answer itself: \text{blue} -> blue.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# LaTeX spacing commands.
_LATEX_SPACES = re.compile(r"\\[,;:! ]|~")
# An answer made of words only ("blue", "light blue", "yes", "A", "isosceles triangle").
_WORDS = re.compile(r"[A-Za-z]+(?:[\s'-]+[A-Za-z]+)*\.?")


def _read_braced(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at ``text[open_index] == "{"``; None if unbalanced.

    Escaped braces (``\\{``, ``\\}``) do not count.
    """
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None


def _read_box_argument(text: str, start: int) -> str | None:
    """Argument of a box command whose name ends at ``start``: ``{...}`` or `` token``."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        return _read_braced(text, i)
    if i > start:  # "\boxed 5"
        token = _BARE_TOKEN.match(text, i)
        return token.group(0) if token else None
    return None


def extract_last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed token`` in ``text``.

    Braces are matched with nesting (``\\boxed{\\frac{\\sqrt{2}}{2}}`` -> ``\\frac{\\sqrt{2}}{2}``).
    A box that is never closed (a truncated response) is skipped and the previous complete
    box is used. Returns None when there is no complete box; ``""`` for ``\\boxed{}``.
    """
    if not text:
        return None
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _read_box_argument(text, match.end())
        if content is not None:
            return content
    return None


def strip_math_delimiters(answer: str) -> str:
    """Drop surrounding ``$``/``$$``, ``\\(...\\)``, ``\\[...\\]`` and whitespace."""
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            return answer[len(left) : -len(right)].strip()
    return answer


def unwrap_text_commands(answer: str) -> str:
    """Replace ``\\text{X}``-like wrappers by ``X`` (repeatedly, innermost first)."""
    previous = None
    while previous != answer:
        previous = answer
        answer = _TEXT_WRAPPER.sub(lambda m: m.group(1), answer)
    return answer


def normalize_answer_text(answer: str) -> str:
    """Light normalisation for an exact string comparison.

    Math delimiters, text wrappers and LaTeX spacing go; case and runs of whitespace are
    folded; a final period is dropped. Signs, digits and operators are kept ("-3" != "3").
    """
    answer = unwrap_text_commands(strip_math_delimiters(answer))
    answer = _LATEX_SPACES.sub(" ", answer)
    answer = " ".join(answer.lower().split())
    return answer.rstrip(".").strip()


def is_word_answer(answer: str) -> bool:
    """True when ``answer`` is words only (no digits, no LaTeX), e.g. "Blue", "yes", "A"."""
    return _WORDS.fullmatch(unwrap_text_commands(strip_math_delimiters(answer)).strip()) is not None


def normalize_word_answer(answer: str) -> str:
    """Case-insensitive, punctuation-insensitive form of a word answer ("Light-blue." -> "light blue")."""
    text = unwrap_text_commands(strip_math_delimiters(answer)).lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())
