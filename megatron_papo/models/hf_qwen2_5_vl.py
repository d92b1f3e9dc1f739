"""Qwen2.5-VL weights between Hugging Face safetensors and the megatron-core model, tensor by tensor.

Two directions, both streaming (one tensor, or one bucket, in flight beside the model):

    reader = SafetensorsReader(hf_folder)               # memory-mapped, reads on demand
    load_hf_weights(model, reader)                      # this rank's TP/PP shards <- HF tensors

    for name, tensor in iter_hf_tensors(model_chunks, pg):   # full HF tensors, on every rank of
        ...                                                  # the model-parallel group
    export_hf_checkpoint(model_chunks, pg, out_dir, config_dir)  # rank 0 writes safetensors shards

:func:`iter_hf_tensors` is the one exporter: the Megatron->HF converter writes what it yields and
the rollout engines' weight sync loads what it yields (buckets via :func:`iter_hf_buckets`).

Name mapping (HF hub layout, ``L`` = global layer index; megatron local-spec key, TE-spec key):

    model.embed_tokens.weight           language_model.embedding.word_embeddings.weight  (rows padded,
                                        split over TP)
    model.layers.L.input_layernorm      decoder.layers.l.input_layernorm
                                        (TE spec: self_attention.linear_qkv.layer_norm_weight)
    model.layers.L.self_attn.{q,k,v}_proj.{weight,bias}
                                        decoder.layers.l.self_attention.linear_qkv.{weight,bias}: per
                                        query group g: [q heads of g; k_g; v_g], groups split over TP
    model.layers.L.self_attn.o_proj     decoder.layers.l.self_attention.linear_proj (input dim over TP)
    model.layers.L.post_attention_layernorm
                                        decoder.layers.l.pre_mlp_layernorm
                                        (TE spec: mlp.linear_fc1.layer_norm_weight)
    model.layers.L.mlp.{gate,up}_proj   decoder.layers.l.mlp.linear_fc1: on TP rank r [gate_r; up_r]
    model.layers.L.mlp.down_proj        decoder.layers.l.mlp.linear_fc2 (input dim over TP)
    model.norm.weight                   language_model.decoder.final_layernorm.weight
    lm_head.weight                      language_model.output_layer.weight (absent when tied)
    visual.*                            visual.* (the same module, replicated)

Checkpoints written by transformers 5 with in-memory names (``model.language_model.*``,
``model.visual.*``) are read too (:func:`normalize_hf_name`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_papo.distributed import ProcessGroups
from megatron_papo.errors import UserError

__all__ = [
    "HFCheckpointError",
    "SafetensorsReader",
    "copy_hf_side_files",
    "export_hf_checkpoint",
    "iter_hf_buckets",
    "iter_hf_tensors",
    "load_hf_weights",
    "normalize_hf_name",
    "unused_hf_tensors",
]

LM = "language_model."
_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "chat_template.json", "chat_template.jinja", "added_tokens.json")
"""Non-weight files of a Hugging Face folder that conversions carry along."""


class HFCheckpointError(ValueError, UserError):
    """A Hugging Face folder is incomplete or does not match the model (names the file and tensor)."""


def normalize_hf_name(name: str) -> str:
    """transformers-5 in-memory names -> the hub layout this module maps."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Tensors of a Hugging Face folder by (normalised) name, read one at a time (mmap)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise HFCheckpointError(f"{self.folder}: not a directory")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFCheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise HFCheckpointError(f"{index} lists {len(files)} shard files but {len(missing)} are "
                                        f"missing from {self.folder}: {', '.join(missing)}")
        else:
            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise HFCheckpointError(f"{self.folder}: no model.safetensors or model.safetensors"
                                        ".index.json (only safetensors checkpoints are read)")
            files = [single.name]
            weight_map = None
        self._handles = {f: safe_open(str(self.folder / f), framework="pt") for f in files}
        self._where: dict[str, tuple[str, str]] = {}
        for f, handle in self._handles.items():
            for raw in handle.keys():
                if weight_map is not None and weight_map.get(raw) != f:
                    continue
                self._where[normalize_hf_name(raw)] = (f, raw)
        if weight_map is not None:
            absent = sorted(set(weight_map) - {raw for _, raw in self._where.values()})
            if absent:
                raise HFCheckpointError(f"{index} maps {len(absent)} tensors to shards that do not hold "
                                        f"them, e.g. {absent[0]}")

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> Tensor:
        """The tensor ``name`` (hub layout)."""
        if name not in self._where:
            raise HFCheckpointError(f"{self.folder}: the checkpoint has no tensor {name!r} "
                                    f"({len(self._where)} tensors present)")
        f, raw = self._where[name]
        return self._handles[f].get_tensor(raw)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's language-model tensors."""
        return self.get("model.embed_tokens.weight").dtype


# ---------------------------------------------------------------------------------------------
# The per-parameter mapping
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """What the mapping needs to know about the model."""

    heads: int
    groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool


def _layout(model: Any) -> _Layout:
    a = model.arch
    return _Layout(heads=a.num_attention_heads, groups=a.num_query_groups, head_dim=a.head_dim,
                   vocab_size=a.vocab_size, padded_vocab_size=model.padded_vocab_size,
                   tied=a.tie_word_embeddings)


_LN_ATTN = ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
_LN_MLP = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")


def _layer_suffix_to_hf(suffix: str, layer: int) -> list[str]:
    """HF names a megatron layer parameter is made of (in the order the merge expects)."""
    p = f"model.layers.{layer}."
    if suffix in _LN_ATTN:
        return [p + "input_layernorm.weight"]
    if suffix in _LN_MLP:
        return [p + "post_attention_layernorm.weight"]
    table = {
        "self_attention.linear_qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "self_attention.linear_qkv.bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
        "self_attention.linear_proj.weight": [p + "self_attn.o_proj.weight"],
        "mlp.linear_fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "mlp.linear_fc2.weight": [p + "mlp.down_proj.weight"],
    }
    if suffix not in table:
        raise HFCheckpointError(f"no Hugging Face mapping for megatron layer parameter {suffix!r}")
    return table[suffix]


def hf_names_for(key: str, model: Any) -> list[str]:
    """HF tensor names a megatron state-dict key (``model.state_dict()``) is built from."""
    if key.startswith("visual."):
        return [key]
    if key == LM + "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if key == LM + "output_layer.weight":
        return ["model.embed_tokens.weight" if model.arch.tie_word_embeddings else "lm_head.weight"]
    if key == LM + "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    m = _LAYER.match(key)
    if m:
        local, suffix = int(m.group(1)), m.group(2)
        layer = model.language_model.decoder.layers[local].layer_number - 1
        return _layer_suffix_to_hf(suffix, layer)
    raise HFCheckpointError(f"no Hugging Face mapping for megatron parameter {key!r}")


def _qkv_merge(q: Tensor, k: Tensor, v: Tensor, lay: _Layout) -> Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> megatron's [groups * (heads/groups + 2) * d, ...]."""
    per = lay.heads // lay.groups
    rest = q.shape[1:]
    qg = q.reshape(lay.groups, per * lay.head_dim, *rest)
    kg = k.reshape(lay.groups, lay.head_dim, *rest)
    vg = v.reshape(lay.groups, lay.head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _qkv_split(qkv: Tensor, lay: _Layout) -> list[Tensor]:
    """Inverse of :func:`_qkv_merge`: [q, k, v]."""
    per = lay.heads // lay.groups
    rest = qkv.shape[1:]
    g = qkv.reshape(lay.groups, (per + 2) * lay.head_dim, *rest)
    q, k, v = g.split([per * lay.head_dim, lay.head_dim, lay.head_dim], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] > rows:
        raise HFCheckpointError(f"vocabulary of {t.shape[0]} rows does not fit the model's {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


_SPLITS = (  # how a megatron parameter is laid out over TP, by the end of its key
    ("replicated", ("visual.",), _LN_ATTN + _LN_MLP + ("final_layernorm.weight",)),
    ("vocab_rows", (), ("word_embeddings.weight", "output_layer.weight")),
    ("qkv", (), ("linear_qkv.weight", "linear_qkv.bias")),
    ("input_dim", (), ("linear_proj.weight", "linear_fc2.weight")),
    ("gate_up", (), ("linear_fc1.weight",)),
)


def tp_split_kind(key: str) -> str:
    """replicated (vision tower, norms) | vocab_rows (padded vocabulary rows over TP) | qkv (query
    groups over TP) | input_dim (row-parallel) | gate_up (fc1: [gate_r; up_r] per TP rank)."""
    for kind, prefixes, suffixes in _SPLITS:
        if key.startswith(prefixes) or key.endswith(suffixes):
            return kind
    raise HFCheckpointError(f"no Hugging Face mapping for megatron parameter {key!r}")


def hf_to_local(key: str, hf: list[Tensor], model: Any, tp_rank: int, tp: int) -> Tensor:
    """This TP rank's shard of megatron parameter ``key`` from its HF tensors (``hf_names_for``)."""
    lay = _layout(model)
    kind = tp_split_kind(key)
    if kind == "replicated":
        return hf[0]
    if kind == "vocab_rows":
        return _pad_rows(hf[0], lay.padded_vocab_size).chunk(tp, dim=0)[tp_rank]
    if kind == "qkv":
        return _qkv_merge(*hf, lay).chunk(tp, dim=0)[tp_rank]
    if kind == "input_dim":
        return hf[0].chunk(tp, dim=1)[tp_rank]
    gate, up = hf
    return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])


def full_to_hf(key: str, shards: list[Tensor], model: Any) -> list[Tensor]:
    """HF tensors of megatron parameter ``key`` from its TP shards (rank order)."""
    lay = _layout(model)
    kind = tp_split_kind(key)
    if kind == "replicated":
        return [shards[0]]
    if kind == "vocab_rows":
        return [torch.cat(shards)[:lay.vocab_size]]
    if kind == "qkv":
        return _qkv_split(torch.cat(shards), lay)
    if kind == "input_dim":
        return [torch.cat(shards, dim=1)]
    halves = [s.chunk(2, dim=0) for s in shards]
    return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


def _weight_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys that hold weights (TE's ``_extra_state`` entries are not weights)."""
    return [k for k in model.state_dict() if not k.endswith("_extra_state")]


def _tp_info() -> tuple[int, int, dist.ProcessGroup | None]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None)


def load_hf_weights(model: torch.nn.Module, reader: SafetensorsReader) -> dict[str, int]:
    """Copy this rank's shards of every parameter from the HF checkpoint into ``model`` (in place).

    Tensors are read one at a time; a shape mismatch names the megatron key, the HF names and
    both shapes. Returns counts: ``{"tensors": megatron tensors set, "hf_tensors": HF tensors read}``.
    """
    tp_rank, tp, _ = _tp_info()
    state = model.state_dict(keep_vars=True)
    used: set[str] = set()
    count = 0
    for key in _weight_keys(model):
        names = hf_names_for(key, model)
        local = hf_to_local(key, [reader.get(n) for n in names], model, tp_rank, tp)
        target = state[key]
        if tuple(local.shape) != tuple(target.shape):
            raise HFCheckpointError(f"{reader.folder}: megatron {key} expects shape {tuple(target.shape)} "
                                    f"on TP rank {tp_rank}/{tp} but {names} give {tuple(local.shape)}: the "
                                    "config.json does not match these weights")
        with torch.no_grad():
            target.data.copy_(local)
        used.update(names)
        count += 1
    return {"tensors": count, "hf_tensors": len(used)}


def unused_hf_tensors(reader: SafetensorsReader, model_chunks: Sequence[torch.nn.Module]) -> list[str]:
    """HF tensors none of this rank's chunks read (on one rank of a multi-stage pipeline, the
    other stages' tensors are among them); e.g. an ``lm_head.weight`` next to a tied config."""
    used = {n for chunk in model_chunks for key in _weight_keys(chunk) for n in hf_names_for(key, chunk)}
    return [n for n in reader.names() if n not in used]


def check_all_hf_tensors_used(reader: Any, model_chunks: list[torch.nn.Module], pg: ProcessGroups) -> None:
    """HFCheckpointError naming the checkpoint's tensors that no rank's model read (collective over
    the pipeline group): a config that does not describe these weights (e.g. tie_word_embeddings
    set while the folder holds an lm_head) would otherwise drop them silently."""
    unused = set(unused_hf_tensors(reader, model_chunks))
    if pg.pp_size > 1:
        every: list[Any] = [None] * pg.pp_size
        dist.all_gather_object(every, sorted(unused), group=pg.pp)
        unused = set.intersection(*(set(u) for u in every))
    if unused:
        names = sorted(unused)
        raise HFCheckpointError(f"{reader.folder}: {len(names)} tensors are not used by the model its "
                                f"config.json describes, e.g. {names[:3]}")


# ---------------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------------
def _owned_items(chunk: Any) -> list[tuple[str, list[str], list[tuple[int, ...]], str]]:
    """(megatron key, HF names, HF shapes, dtype) of what this chunk exports, in a fixed order."""
    lay = _layout(chunk)
    state = chunk.state_dict()
    out = []
    _, tp, _ = _tp_info()
    for key in _weight_keys(chunk):
        if key == LM + "output_layer.weight" and lay.tied:
            continue  # tied: the embedding is exported (HF has no lm_head tensor then)
        names = hf_names_for(key, chunk)
        local = state[key]
        meta = [torch.empty_like(local, device="meta")] * tp  # shapes only, no data
        shapes = [tuple(t.shape) for t in full_to_hf(key, meta, chunk)]
        out.append((key, names, shapes, str(local.dtype).removeprefix("torch.")))
    return out


def iter_hf_tensors(model_chunks: Sequence[torch.nn.Module], pg: Any) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, full tensor) for every weight of the model, on every rank of the
    model-parallel group (every rank must iterate to the end: TP gathers and PP broadcasts are
    collective). Tensors are fresh, contiguous and on the parameters' device; one megatron
    parameter's tensors are in flight at a time.

    Args:
        model_chunks: this rank's model chunks (bare modules, not DDP wrappers).
        pg: :class:`megatron_papo.distributed.ProcessGroups` (tp, pp groups and ranks).
    """
    _, tp, tp_group = _tp_info()
    # (chunk index, item): with virtual pipeline stages two chunks share local key names
    mine = [(ci, item) for ci, chunk in enumerate(model_chunks) for item in _owned_items(chunk)]
    if pg.pp_size > 1:  # every stage learns every stage's items, in stage order
        gathered: list[Any] = [None] * pg.pp_size
        dist.all_gather_object(gathered, mine, group=pg.pp)
        plan = [(stage, ci, item) for stage, items in enumerate(gathered) for ci, item in items]
        pp_ranks = dist.get_process_group_ranks(pg.pp)
    else:
        plan = [(0, ci, item) for ci, item in mine]
        pp_ranks = []
    states = [chunk.state_dict() for chunk in model_chunks]  # views of the parameters, taken once
    for stage, ci, (key, names, shapes, dtype) in plan:
        if stage == pg.pp_rank:
            chunk = model_chunks[ci]
            local = states[ci][key].detach()
            if tp > 1 and tp_split_kind(key) != "replicated":
                shards = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(shards, local.contiguous(), group=tp_group)
            else:
                shards = [local]
            tensors = [t.contiguous().clone() for t in full_to_hf(key, shards, chunk)]
        else:
            device = _device(model_chunks)
            tensors = [torch.empty(s, dtype=getattr(torch, dtype), device=device) for s in shapes]
        if pg.pp_size > 1:
            for t in tensors:
                dist.broadcast(t, src=pp_ranks[stage], group=pg.pp)
        yield from zip(names, tensors, strict=True)


def _device(model_chunks: Sequence[torch.nn.Module]) -> torch.device:
    for chunk in model_chunks:
        for p in chunk.parameters():
            return p.device
    return torch.device("cpu")




def iter_hf_buckets(model_chunks: Sequence[torch.nn.Module], pg: Any,
                    bucket_bytes: int = 1 << 30) -> Iterator[list[tuple[str, Tensor]]]:
    """:func:`iter_hf_tensors` grouped into lists of about ``bucket_bytes`` (one tensor larger
    than that is a bucket of its own). Peak extra memory: one bucket + one parameter's tensors."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in iter_hf_tensors(model_chunks, pg):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def copy_hf_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config / tokenizer / processor files (never weights) of a HF folder; returns their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "config.json" not in copied:
        raise HFCheckpointError(f"{src}: no config.json to carry into {dst}")
    return copied


def export_hf_checkpoint(model_chunks: Sequence[torch.nn.Module], pg: Any, out_dir: str | Path,
                         config_dir: str | Path, max_shard_bytes: int = 5 << 30,
                         write: bool | None = None) -> dict[str, Any]:
    """Write the model as a Hugging Face folder (safetensors shards + index + the config files of
    ``config_dir``). Collective over the model-parallel group; the rank with ``write`` (default:
    global rank 0) writes. Shards are written as they fill, so memory stays at one shard.

    Returns: {"tensors": count, "bytes": total, "shards": [file names]} (on every rank).
    """
    from safetensors.torch import save_file

    write = (not dist.is_initialized() or dist.get_rank() == 0) if write is None else write
    out = Path(out_dir)
    if out.resolve() == Path(config_dir).resolve():
        raise HFCheckpointError(f"{out}: the export would overwrite the Hugging Face folder it takes its "
                                "config from; choose another --out")
    staging = out / ".export_tmp"  # shards go here; the previous export stays until the end
    if write:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    shard: dict[str, Tensor] = {}
    size = total = count = 0
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, size
        if shard and write:
            name = f"part-{len(written):05d}.safetensors"
            save_file({k: v.cpu() for k, v in shard.items()}, str(staging / name), metadata={"format": "pt"})
            written.append((name, list(shard)))
        elif shard:
            written.append(("", list(shard)))
        shard, size = {}, 0

    for name, tensor in iter_hf_tensors(model_chunks, pg):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        # ranks that do not write keep only the name (their tensors are freed at once)
        shard[name] = tensor if write else torch.empty(0)
        size += nbytes
        total += nbytes
        count += 1
    flush()
    n = len(written)
    finals = (["model.safetensors"] if n == 1
              else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    if write:
        weight_map = {}
        for (tmp, names), final in zip(written, finals, strict=True):
            os.replace(staging / tmp, staging / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_hf_side_files(config_dir, staging)
        for old in out.glob("model*.safetensors*"):  # only now is the previous export replaced
            old.unlink()
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        staging.rmdir()
    return {"tensors": count, "bytes": total, "shards": finals}
