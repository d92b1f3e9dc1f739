"""Hugging Face <-> megatron-core checkpoint conversion and the logit parity check (library side of
``tools/convert_hf_to_megatron.py``, ``tools/convert_megatron_to_hf.py``, ``tools/check_hf_parity.py``).

Each function is collective over the ranks of an initialised megatron-core parallel state
(``megatron_papo.distributed.init_distributed(tp, pp)``; one process for TP = PP = 1) and only
ever holds this rank's part of the model plus one tensor (or one output shard) in flight.

A converted Megatron checkpoint is an ordinary project checkpoint root (``latest``, ``step_*``,
loadable under any TP/PP) plus ``hf_config/``: the source folder's config, tokenizer and
processor files, so that ``model.hf_path: <root>/hf_config`` and ``checkpoint.init_weights: <root>``
start training from it, and the reverse conversion knows the architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.config import ModelConfig
from megatron_papo.distributed import ProcessGroups, barrier
from megatron_papo.models.base import torch_dtype
from megatron_papo.models.hf_qwen2_5_vl import (
    SafetensorsReader,
    check_all_hf_tensors_used,
    copy_hf_side_files,
    export_hf_checkpoint,
    load_hf_weights,
)
from megatron_papo.models.qwen2_5_vl import Qwen25VLArch, build_qwen2_5_vl, load_hf_config
from megatron_papo.training.checkpointing import (
    TRAINER_STATE_FILE,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_papo.training.parts import pipeline_forward_fn

__all__ = [
    "HF_CONFIG_DIR",
    "ParityResult",
    "build_for_conversion",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "find_hf_config",
    "parity_batch",
    "run_parity_check",
]

HF_CONFIG_DIR = "hf_config"
"""Folder of a converted checkpoint root that keeps the Hugging Face side files."""

_PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _model_config(hf_path: str | Path, precision: str, image_size: int | None) -> Any:
    return ModelConfig(name="qwen2_5_vl", hf_path=str(hf_path), precision=precision, image_size=image_size,
                       transformer_impl="local" if not torch.cuda.is_available() else "auto")


def hf_precision(hf_path: str | Path) -> str:
    """fp32 / bf16 / fp16 of a Hugging Face folder's weights (its config's dtype; fp32 if unset)."""
    config_file = Path(hf_path) / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    table = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    if name not in table:
        raise ValueError(f"{hf_path}/config.json: dtype {name!r} is not one of {sorted(table)}")
    return table[name]


def build_for_conversion(hf_path: str | Path, pg: ProcessGroups, *, precision: str = "auto",
                         image_size: int | None = None) -> torch.nn.Module:
    """This rank's Qwen2.5-VL part, parameters allocated but not initialised (they get loaded)."""
    precision = hf_precision(hf_path) if precision == "auto" else precision
    arch = Qwen25VLArch.from_hf_config(load_hf_config(hf_path))
    cfg = _model_config(hf_path, precision, image_size)
    return build_qwen2_5_vl(cfg, vocab_size=arch.vocab_size, image_token_id=arch.image_token_id,
                            pre_process=pg.is_first_pp_stage, post_process=pg.is_last_pp_stage,
                            init_weights=False)


def convert_hf_to_megatron(hf_path: str | Path, out: str | Path, pg: ProcessGroups, *,
                           precision: str = "auto") -> Path:
    """HF folder -> a megatron-core distributed checkpoint root (step 0) + ``hf_config/``.

    Every rank reads only the tensors of its own TP/PP shards (memory-mapped safetensors, one at
    a time). Returns the checkpoint directory written.
    """

    load_hf_config(hf_path)  # the architecture first (cheap), then the shards, then the model
    reader = SafetensorsReader(hf_path)
    model = build_for_conversion(hf_path, pg, precision=precision)
    load_hf_weights(model, reader)
    check_all_hf_tensors_used(reader, [model], pg)
    state = {"step": 0, "phase": "rl", "converted_from": str(Path(hf_path).resolve()),
             "precision": _PRECISIONS[next(model.parameters()).dtype]}
    path = save_checkpoint(out, 0, [model], None, state, pg, keep_last=0)
    if pg.rank == 0:
        copy_hf_side_files(hf_path, Path(out) / HF_CONFIG_DIR)
    barrier(pg.world)
    return path


def find_hf_config(megatron_path: str | Path) -> Path:
    """The Hugging Face config folder of a checkpoint: ``<root>/hf_config`` (a converted one), or
    the ``model.hf_path`` recorded in a training checkpoint's trainer_state.json."""
    root = Path(megatron_path)
    for candidate in (root / HF_CONFIG_DIR, root.parent / HF_CONFIG_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    ckpt = resolve_checkpoint(root)
    if ckpt is not None and (ckpt / TRAINER_STATE_FILE).is_file():
        try:
            state = json.loads((ckpt / TRAINER_STATE_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{ckpt / TRAINER_STATE_FILE}: not valid JSON ({e})") from None
        hf = (state.get("config") or {}).get("model", {}).get("hf_path")
        if hf and (Path(hf) / "config.json").is_file():
            return Path(hf)
    raise FileNotFoundError(f"{root}: no {HF_CONFIG_DIR}/config.json and no model.hf_path in its trainer "
                            "state; pass --hf-config <Hugging Face folder with the model's config.json>")


def convert_megatron_to_hf(megatron_path: str | Path, out: str | Path, pg: ProcessGroups, *,
                           hf_config: str | Path | None = None, precision: str = "auto",
                           max_shard_bytes: int = 5 << 30) -> dict[str, Any]:
    """A megatron-core checkpoint (converted or trained, any TP/PP) -> a Hugging Face folder
    loadable by transformers. The model is loaded under this process group's TP/PP; the exporter
    gathers shards one parameter at a time and rank 0 writes shards as they fill."""

    config_dir = Path(hf_config) if hf_config else find_hf_config(megatron_path)
    model = build_for_conversion(config_dir, pg, precision=precision)
    if load_checkpoint(megatron_path, [model], None, pg, load_optimizer=False, load_rng=False) is None:
        raise CheckpointError(f"{megatron_path}: no checkpoint to convert (no 'latest' and no step_* dir)")
    return export_hf_checkpoint([model], pg, out, config_dir, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------
@dataclass
class ParityResult:
    """Logit comparison over the real (non-padding) tokens of the parity batch."""

    max_abs_diff: float
    mean_kl: float
    """Mean over tokens of KL(p_hf || p_megatron) on the true vocabulary, nats."""
    tokens: int
    max_abs_logit: float
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: max |logit_hf - logit_megatron| = {self.max_abs_diff:.3e} "
                f"(max |logit| {self.max_abs_logit:.2f}), mean KL(hf || megatron) per token = "
                f"{self.mean_kl:.3e} over {self.tokens} tokens")


def _synthetic_images(seed: int) -> list[Any]:
    """Three images of different sizes and modes (smooth gradients + noise), made here."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((48, 80), (100, 64), (56, 56)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
        noise = rng.normal(0, 25, (h, w, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    out[2] = out[2].convert("L")  # a grayscale one: the processor must convert it
    return out


def parity_batch(model: Any, seed: int = 0) -> dict[str, Any]:
    """Two left-padded rows: row 0 text + one image + text; row 1 text + two images separated by
    text (``vision_start`` / ``vision_end`` around each image; three sizes, so with dynamic
    resolution three different grids). Returns input_ids, attention_mask [B, S], position_ids
    [B, S], the images, pixel_values (``QwenImages``) and the HF inputs."""
    a = model.arch
    rng = np.random.default_rng(seed)
    special = {a.image_token_id, a.vision_start_token_id, a.vision_end_token_id,
               getattr(a.hf_config, "video_token_id", None)}
    pool = np.array([i for i in range(min(a.vocab_size, 4096)) if i not in special])
    images = _synthetic_images(seed)
    counts = [model.num_image_tokens((im.height, im.width)) for im in images]

    def text(k: int) -> list[int]:
        return [int(x) for x in rng.choice(pool, k)]

    def image(n: int) -> list[int]:
        wrap = [a.vision_start_token_id] if a.vision_start_token_id is not None else []
        end = [a.vision_end_token_id] if a.vision_end_token_id is not None else []
        return wrap + [a.image_token_id] * n + end

    rows = [text(6) + image(counts[0]) + text(9),
            text(3) + image(counts[1]) + text(4) + image(counts[2]) + text(2)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = True
    pixels = model.preprocess_images(images)
    hf_inputs = {"input_ids": ids, "attention_mask": mask.long(),
                 "pixel_values": pixels.pixel_values, "image_grid_thw": pixels.grid_thw,
                 "mm_token_type_ids": (ids == a.image_token_id).int()}
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "images": images, "pixel_values": pixels, "hf_inputs": hf_inputs}


def megatron_full_logits(model_chunks: list[torch.nn.Module], pg: ProcessGroups,
                         batch: dict[str, Any]) -> Tensor:
    """[B, S, V] logits of the true vocabulary on every rank (TP shards gathered, PP broadcast)."""
    model = model_chunks[0]
    for m in model_chunks:
        m.eval()
    forward = pipeline_forward_fn(model_chunks, pg)
    with torch.no_grad():
        local = forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                        [[batch["pixel_values"]]])
    if pg.tp_size > 1:
        shards = [torch.empty_like(local) for _ in range(pg.tp_size)]
        dist.all_gather(shards, local.contiguous(), group=pg.tp)
        local = torch.cat(shards, dim=-1)
    return local[..., :model.vocab_size].float()


def compare_logits(hf_logits: Tensor, meg_logits: Tensor, mask: Tensor, *, max_abs_tol: float,
                   kl_tol: float) -> ParityResult:
    """Max |difference| and mean KL(hf || megatron) over the tokens where ``mask`` is True."""
    a, b = hf_logits.double()[mask], meg_logits.double()[mask]
    diff = float((a - b).abs().max())
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    ok = math.isfinite(diff) and math.isfinite(kl) and diff <= max_abs_tol and kl <= kl_tol
    return ParityResult(max_abs_diff=diff, mean_kl=kl, tokens=int(mask.sum()),
                        max_abs_logit=float(a.abs().max()), passed=ok)


DEFAULT_TOLERANCES = {"fp32": (1e-3, 1e-6), "bf16": (0.5, 2e-2), "fp16": (0.1, 2e-3)}
"""(max_abs_tol, kl_tol) per precision. fp32: both sides compute the same maths in a different
order (measured ~1e-6); bf16/fp16: rounding differs layer by layer."""


def run_parity_check(hf_path: str | Path, megatron_path: str | Path, pg: ProcessGroups, *,
                     precision: str = "fp32", image_size: int | None = None, seed: int = 0,
                     max_abs_tol: float | None = None, kl_tol: float | None = None) -> ParityResult:
    """Same image+text batch through transformers (rank 0) and the Megatron model (all ranks).

    The Megatron side loads ``megatron_path`` under this process group's TP/PP; the HF side is
    ``Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_path)`` in the same precision.
    The result (on every rank) says whether both tolerances hold.
    """
    default_abs, default_kl = DEFAULT_TOLERANCES[precision]
    max_abs_tol = default_abs if max_abs_tol is None else max_abs_tol
    kl_tol = default_kl if kl_tol is None else kl_tol
    model = build_for_conversion(hf_path, pg, precision=precision, image_size=image_size)
    if load_checkpoint(megatron_path, [model], None, pg, load_optimizer=False, load_rng=False) is None:
        raise CheckpointError(f"{megatron_path}: no checkpoint")
    batch = parity_batch(model, seed)  # preprocessing needs no vision tower: same on every stage
    meg = megatron_full_logits([model], pg, batch)
    result: list[Any] = [None]
    if pg.rank == 0:
        hf_logits = hf_forward(hf_path, batch["hf_inputs"], precision)
        result[0] = compare_logits(hf_logits, meg, batch["attention_mask"], max_abs_tol=max_abs_tol,
                                   kl_tol=kl_tol)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def hf_forward(hf_path: str | Path, inputs: dict[str, Tensor], precision: str) -> Tensor:
    """Logits [B, S, V] float32 of transformers' Qwen2.5-VL on ``inputs``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    dtype = torch_dtype(precision)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_path), dtype=dtype).eval()
    with torch.no_grad():
        out = hf(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()})
    return out.logits.float()
