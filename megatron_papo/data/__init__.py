"""Data: raw rows (JSONL/Parquet, easy-VQA), prompt templates, validated prompt datasets,
a resumable data-parallel sampler and padding helpers.

    rows = load_rows(cfg.data.train, cfg.data)                      # DataError if unusable
    ds = PromptDataset(rows, tokenizer, cfg.data.prompt_template,
                       cfg.data.max_prompt_length, num_image_tokens)  # bad rows skipped, counted
    sampler = PromptSampler(len(ds), cfg.rollout.prompts_per_step, cfg.train.seed,
                            cfg.data.shuffle, dp_rank, dp_size)
    samples = [ds[i] for i in sampler.next_batch()]
    ids, mask = left_pad([s.prompt_ids for s in samples], tokenizer.pad_id)
"""

from megatron_papo.data.collate import Padded, build_position_ids, left_pad, right_pad
from megatron_papo.data.dataset import SKIP_REASONS, PromptDataset, Sample, SkipStats, build_prompt_dataset
from megatron_papo.data.easy_vqa import EASY_VQA_ANSWERS
from megatron_papo.data.easy_vqa_shortcut import SHORTCUT_SHARE  # registers easy_vqa_shortcut:*
from megatron_papo.data.rows import BUILTIN_SOURCES, DataError, RawRow, image_refs, load_rows, open_image
from megatron_papo.data.sampler import PromptSampler
from megatron_papo.data.templates import (
    TEMPLATES,
    ImageSlot,
    PromptTemplate,
    encode_prompt,
    get_template,
    register_template,
)

__all__ = [
    "BUILTIN_SOURCES",
    "EASY_VQA_ANSWERS",
    "SHORTCUT_SHARE",
    "SKIP_REASONS",
    "TEMPLATES",
    "DataError",
    "ImageSlot",
    "Padded",
    "PromptDataset",
    "PromptSampler",
    "PromptTemplate",
    "RawRow",
    "Sample",
    "SkipStats",
    "build_position_ids",
    "build_prompt_dataset",
    "encode_prompt",
    "get_template",
    "image_refs",
    "left_pad",
    "load_rows",
    "open_image",
    "register_template",
    "right_pad",
]
