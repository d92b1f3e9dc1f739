"""Small JSONL training files made from the easy-VQA package's own images (tests, benchmarks)."""

from __future__ import annotations

from typing import Any

__all__ = ["easy_vqa_rows_answered"]


def easy_vqa_rows_answered(answer: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` easy-VQA training rows whose answer is ``answer``, as JSONL rows
    (``image`` path, ``problem``, ``answer``): e.g. "yes" makes a subset a short warm start
    partly learns."""
    import easy_vqa  # the data package: imported when a file is made

    qs, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    rows = [{"image": paths[i], "problem": q, "answer": a}
            for q, a, i in zip(qs, answers, ids, strict=True) if a == answer]
    return rows[:limit]
