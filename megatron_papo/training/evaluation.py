"""Held-out accuracy (avg@k) with the original images and with patch-masked images (the library
side of ``python -m megatron_papo.evaluate``; the trainer calls :func:`evaluate` too).

The gap between the two accuracies measures how much the policy relies on the image. Eval rows
that carry a subset (``Sample.subset``, e.g. easy_vqa_shortcut:test's follows / contradicts
shortcut) are also scored per subset (``eval/accuracy@k/<subset>``). The eval
split (data.eval) is opened with role="eval": the data layer refuses the test split for training.
Prompts are split over data-parallel ranks and the counts all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_papo.config import PapoConfig
from megatron_papo.data.dataset import PromptDataset, build_prompt_dataset
from megatron_papo.distributed import ProcessGroups
from megatron_papo.ops.groups import collective_device
from megatron_papo.rollout import SamplingParams
from megatron_papo.training import steps
from megatron_papo.training.parts import Parts


def _eval_dataset(parts: Parts, cfg: PapoConfig) -> PromptDataset:
    if "eval_dataset" not in parts.extra:
        model = parts.model_chunks[0]
        parts.extra["eval_dataset"] = build_prompt_dataset(
            cfg.data.eval, cfg.data, parts.tokenizer, model.num_image_tokens, role="eval")
    return parts.extra["eval_dataset"]


def evaluate(parts: Parts, cfg: PapoConfig, pg: ProcessGroups) -> dict[str, float]:
    """eval/accuracy (original images), eval/accuracy_masked, eval/masked_gap, eval/format, avg@k."""
    ev = cfg.evaluation
    dataset = _eval_dataset(parts, cfg)
    total = len(dataset) if ev.num_prompts == 0 else min(ev.num_prompts, len(dataset))
    per_rank = -(-total // pg.dp_size)  # contiguous blocks: each row's sampling stream is keyed
    mine = list(range(pg.dp_rank * per_rank, min(total, (pg.dp_rank + 1) * per_rank)))  # by its prompt
    params = SamplingParams(n=ev.k, temperature=ev.temperature, top_p=ev.top_p,
                            max_new_tokens=cfg.rollout.max_new_tokens,
                            seed=steps.derive_seed(cfg.train.seed, 99))
    model = parts.model_chunks[0]
    sums = [0.0, 0.0, 0.0, 0.0]  # correct, correct_masked, format, rows (host numbers: rewards are)
    subsets = sorted({dataset.subset(i) for i in range(total)} - {""})
    per_subset = {name: [0.0, 0.0, 0.0] for name in subsets}  # correct, correct_masked, rows
    chunk = max(1, cfg.rollout.prompts_per_step)
    steps.prepare_engine(parts.engine, parts.model_chunks, pg)  # vLLM: the current weights, awake
    for lo in range(0, len(mine), chunk):
        samples = [dataset[i] for i in mine[lo:lo + chunk]]
        offset = mine[lo]  # the prompts' place in the eval set: the same draws under any dp split,
        res = steps.rollout(parts.engine, samples, steps.prompt_pixels(model, samples), params,
                            batch_offset=offset)  # and for the masked images (common random numbers)
        rew = steps.score(res, samples, parts.tokenizer, cfg.reward)
        sums[0] += float(rew.accuracy.double().sum())
        sums[2] += float(rew.format.double().sum())
        sums[3] += len(res)
        acc_m = None
        if ev.masked:
            masked = steps.masked_prompt_pixels(model, samples, cfg.masking, step=0)
            res_m = steps.rollout(parts.engine, samples, masked, params, batch_offset=offset)
            acc_m = steps.score(res_m, samples, parts.tokenizer, cfg.reward).accuracy.double()
            sums[1] += float(acc_m.sum())
        for row in range(len(res)):  # group-major: response row -> sample row // k
            prompt = row // res.group_size
            if samples[prompt].subset:
                cell = per_subset[samples[prompt].subset]
                cell[0] += float(rew.accuracy[row])
                cell[1] += float(acc_m[row]) if acc_m is not None else 0.0
                cell[2] += 1
    parts.engine.release()
    flat = sums + [v for name in subsets for v in per_subset[name]]
    if pg.dp_size > 1:
        totals = torch.tensor(flat, dtype=torch.float64, device=collective_device(pg.dp))
        dist.all_reduce(totals, group=pg.dp)
        flat = totals.tolist()
    sums = flat[:4]
    for j, name in enumerate(subsets):
        per_subset[name] = flat[4 + 3 * j:7 + 3 * j]
    rows = max(sums[3], 1.0)
    out = {f"eval/accuracy@{ev.k}": sums[0] / rows, "eval/format": sums[2] / rows,
           "eval/prompts": float(total)}
    if ev.masked:
        out[f"eval/accuracy_masked@{ev.k}"] = sums[1] / rows
        out["eval/masked_gap"] = (sums[0] - sums[1]) / rows
    for name, (correct, correct_m, n) in per_subset.items():  # e.g. contradicts_shortcut
        out[f"eval/accuracy@{ev.k}/{name}"] = correct / max(n, 1.0)
        if ev.masked:
            out[f"eval/accuracy_masked@{ev.k}/{name}"] = correct_m / max(n, 1.0)
        out[f"eval/prompts/{name}"] = n / ev.k
    return out
