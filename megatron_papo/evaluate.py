"""Held-out accuracy (avg@k) with the original images and with patch-masked images.

    python -m megatron_papo.evaluate --config examples/tiny_papo_g.yaml [--checkpoint DIR] [key=value ...]

The gap between the two accuracies measures how much the policy relies on the image. The eval
split (data.eval) is opened with role="eval": the data layer refuses the test split for training.
Prompts are split over data-parallel ranks and the counts all-reduced.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_papo import steps
from megatron_papo.config import PapoConfig
from megatron_papo.distributed import ProcessGroups
from megatron_papo.rollout import SamplingParams


def _eval_dataset(parts: Any, cfg: PapoConfig) -> Any:
    from megatron_papo.data.dataset import build_prompt_dataset

    if "eval_dataset" not in parts.extra:
        model = parts.model_chunks[0]
        parts.extra["eval_dataset"] = build_prompt_dataset(
            cfg.data.eval, cfg.data, parts.tokenizer, model.num_image_tokens, role="eval")
    return parts.extra["eval_dataset"]


def evaluate(parts: Any, cfg: PapoConfig, pg: ProcessGroups) -> dict[str, float]:
    """eval/accuracy (original images), eval/accuracy_masked, eval/masked_gap, eval/format, avg@k."""
    ev = cfg.evaluation
    dataset = _eval_dataset(parts, cfg)
    total = len(dataset) if ev.num_prompts == 0 else min(ev.num_prompts, len(dataset))
    mine = list(range(pg.dp_rank, total, pg.dp_size))
    params = SamplingParams(n=ev.k, temperature=ev.temperature, top_p=ev.top_p,
                            max_new_tokens=cfg.rollout.max_new_tokens,
                            seed=steps.derive_seed(cfg.train.seed, 99))
    model = parts.model_chunks[0]
    sums = torch.zeros(4, dtype=torch.float64)  # correct, correct_masked, format, rows
    chunk = max(1, cfg.rollout.prompts_per_step)
    steps.prepare_engine(parts.engine, parts.model_chunks, pg)  # vLLM: the current weights, awake
    for lo in range(0, len(mine), chunk):
        samples = [dataset[i] for i in mine[lo:lo + chunk]]
        res = steps.rollout(parts.engine, samples, steps.prompt_pixels(model, samples), params)
        rew = steps.score(res, samples, parts.tokenizer, cfg.reward)
        sums[0] += rew.accuracy.double().sum()
        sums[2] += rew.format.double().sum()
        sums[3] += len(res)
        if ev.masked:
            masked = steps.masked_prompt_pixels(model, samples, cfg.masking, step=0)
            res_m = steps.rollout(parts.engine, samples, masked, params)
            sums[1] += steps.score(res_m, samples, parts.tokenizer, cfg.reward).accuracy.double().sum()
    parts.engine.release()
    if pg.dp_size > 1:
        dist.all_reduce(sums, group=pg.dp)
    rows = max(sums[3].item(), 1.0)
    out = {f"eval/accuracy@{ev.k}": sums[0].item() / rows, "eval/format": sums[2].item() / rows,
           "eval/prompts": float(total)}
    if ev.masked:
        out[f"eval/accuracy_masked@{ev.k}"] = sums[1].item() / rows
        out["eval/masked_gap"] = (sums[0].item() - sums[1].item()) / rows
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the model, load a checkpoint (optional), evaluate, print the numbers."""
    from megatron_papo.checkpointing import load_checkpoint
    from megatron_papo.cli import parse_cli
    from megatron_papo.config import ConfigError
    from megatron_papo.distributed import destroy_distributed, init_distributed_from_config, is_rank_zero
    from megatron_papo.trainer import build_parts

    try:
        args = parse_cli(sys.argv[1:] if argv is None else argv, extra_flags=("--checkpoint",))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cfg = args.config
    pg = init_distributed_from_config(cfg.parallel, seed=cfg.train.seed)
    parts = build_parts(cfg, pg)
    ckpt = args.flags.get("--checkpoint") or cfg.checkpoint.dir
    if ckpt:
        if load_checkpoint(ckpt, parts.ddp_chunks, None, pg, load_optimizer=False, load_rng=False) is None:
            raise SystemExit(f"no checkpoint found under {ckpt}")
    out = evaluate(parts, cfg, pg)
    if is_rank_zero():
        for k, v in out.items():
            print(f"{k:28s} {v:.4f}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
