"""Prompt templates: a registry of short texts that wrap a question and place its images.

A template text holds ``{question}`` once and the image marker ``<image>`` once (where the row's
images go, one after another). When the question itself carries as many ``<image>`` markers as
the row has images (the ViRL39K convention), the images go there and the template's marker is
dropped; otherwise the question's markers are removed.

Templates are rendered to *parts* (text and image slots) rather than one string, so that image
tokens are inserted by id and no tokenizer has to recognise the marker in text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from megatron_papo.data.tokenizer import Tokenizer

IMAGE_MARKER = "<image>"
QUESTION_FIELD = "{question}"


@dataclass(frozen=True)
class ImageSlot:
    """Where image number `index` of the row goes in a prompt."""

    index: int


PromptPart = str | ImageSlot


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt text with one ``{question}`` field and one ``<image>`` marker."""

    name: str
    text: str
    in_word_corpus: bool = True
    """Whether the project's word tokenizer learns this template's pieces (False for chat formats
    of Hugging Face tokenizers; keeps the easy-VQA vocabulary unchanged)."""

    def __post_init__(self) -> None:
        for needle in (QUESTION_FIELD, IMAGE_MARKER):
            if self.text.count(needle) != 1:
                raise ValueError(f"template '{self.name}' must contain {needle} exactly once, "
                                 f"found {self.text.count(needle)}")

    def parts(self, question: str, num_images: int) -> list[PromptPart]:
        """The prompt as text pieces and image slots, in order."""
        if question.count(IMAGE_MARKER) == num_images and num_images > 0:
            text = self.text.replace(IMAGE_MARKER, "").replace(QUESTION_FIELD, question)
        else:
            question = question.replace(IMAGE_MARKER, "")
            text = self.text.replace(QUESTION_FIELD, question)
            text = text.replace(IMAGE_MARKER, IMAGE_MARKER * num_images)
        return _split_images(text)

    def render(self, question: str, num_images: int) -> str:
        """The prompt as one string with ``<image>`` markers (for logs)."""
        parts = self.parts(question, num_images)
        return "".join(IMAGE_MARKER if isinstance(p, ImageSlot) else p for p in parts)


def _split_images(text: str) -> list[PromptPart]:
    parts: list[PromptPart] = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append(ImageSlot(i - 1))
        if chunk:
            parts.append(chunk)
    return parts


def encode_prompt(tokenizer: Tokenizer, parts: Sequence[PromptPart], num_image_tokens: int | Sequence[int],
                  bos: bool = False) -> list[int]:
    """Token ids of a rendered prompt; image slot i becomes ``num_image_tokens`` image ids (one
    number for every image, or one per image slot index)."""
    slots = [p.index for p in parts if isinstance(p, ImageSlot)]
    counts = ([num_image_tokens] * (max(slots, default=-1) + 1) if isinstance(num_image_tokens, int)
              else list(num_image_tokens))
    if any(c < 1 for c in counts) or (slots and max(slots) >= len(counts)):
        raise ValueError(f"num_image_tokens must give >= 1 tokens for each of the {len(slots)} images, "
                         f"got {num_image_tokens}")
    ids = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
    for part in parts:
        if isinstance(part, ImageSlot):  # HF tokenizers wrap an image (Qwen: <|vision_start|> ...)
            ids.extend(getattr(tokenizer, "image_prefix_ids", ()))
            ids.extend([tokenizer.image_token_id] * counts[part.index])
            ids.extend(getattr(tokenizer, "image_suffix_ids", ()))
        else:
            ids.extend(tokenizer.encode(part))
    return ids


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate, *, overwrite: bool = False) -> PromptTemplate:
    """Add a template under its name (a clash raises unless `overwrite`)."""
    if template.name in TEMPLATES and not overwrite:
        raise ValueError(f"a prompt template named '{template.name}' is already registered")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """The registered template `name` (a template passes through)."""
    if isinstance(name, PromptTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template '{name}' (data.prompt_template); "
                         f"known: {', '.join(sorted(TEMPLATES))}") from None


def template_corpus(questions: Iterable[str]) -> list[str]:
    """Every question rendered with every registered template, one image each (a tokenizer corpus:
    the pieces at the joins, e.g. ``". what"``, are the ones real prompts contain)."""
    questions = list(questions)
    return [t.render(q, 1) for t in TEMPLATES.values() if t.in_word_corpus for q in questions]


THINK_BOXED = register_template(PromptTemplate(
    name="think_boxed",
    text="<image>Reason inside <think></think>, then put the final answer in \\boxed{}. {question}",
))
"""Default: image, a one-line instruction, then the question (about 20 tokens of text)."""

PLAIN = register_template(PromptTemplate(name="plain", text="<image>{question}"))
"""Image and question only (for models already trained on the format)."""

QWEN_CHAT_THINK_BOXED = register_template(PromptTemplate(
    name="qwen_chat_think_boxed",
    text=("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>{question} "
          "You FIRST think about the reasoning process as an internal monologue and then provide the final "
          "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
          "MUST BE put in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"),
    in_word_corpus=False,
))
"""Qwen2.5-VL chat format with the reasoning / boxed-answer instruction of the PAPO runs
(a Hugging Face tokenizer turns the ``<|im_start|>`` markers into their special ids)."""


__all__ = [
    "IMAGE_MARKER",
    "PLAIN",
    "QWEN_CHAT_THINK_BOXED",
    "TEMPLATES",
    "THINK_BOXED",
    "ImageSlot",
    "PromptPart",
    "PromptTemplate",
    "encode_prompt",
    "get_template",
    "register_template",
    "template_corpus",
]
