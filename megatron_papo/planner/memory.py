"""Per-GPU memory plan of a PAPO run: weights, gradients, optimizer state, activations, logits,
the PAPO masked-image pass, a reference model and a colocated vLLM engine.

    arch = PRESETS["qwen2_5_vl_7b"]
    plan = plan_memory(arch, RunShape(tp=2, pp=1, dp=4, micro_batch=4, prompt_len=1024,
                                      response_len=2048, precision="bf16", recompute=True))
    print(format_plan(plan, gpu_bytes=GPUS["h100-80gb"]))

Pure arithmetic over dataclasses (no torch, no megatron-core): it runs anywhere and is tested
on CPU against measured peaks of the tiny model (tests/unit/test_planner.py, docs/SCALING.md).

The architectures planned for (``LanguageArch``, ``VisionArch``, ``Architecture``, ``PRESETS``,
``architecture_from_hf_config``) are in megatron_papo/planner/archs.py; this module holds the
run shape (``RunShape``), the formulas, ``plan_memory`` and the report.

Conventions. ``s`` = tokens of one sample (prompt + response, image tokens included), ``b`` =
micro-batch (responses), ``h`` = hidden, ``a`` = query heads, ``g`` = key/value heads, ``d`` =
head dim, ``f`` = MLP inner size, ``V`` = padded vocabulary, ``t`` = tensor parallel, ``c`` =
context parallel. Each formula is written next to the function that applies it.

What megatron_papo allocates (megatron_papo/training/optim.py): megatron-core DDP with
``grad_reduce_in_fp32=True`` (a full fp32 gradient buffer per rank, also under the distributed
optimizer), Adam with fp32 main parameters when the model is bf16, optimizer state sharded over
the data-parallel x context-parallel ranks when ``use_distributed_optimizer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_papo.pipeline_layout import stage_layers
from megatron_papo.planner.archs import (
    PRESETS,
    Architecture,
    LanguageArch,
    VisionArch,
    architecture_from_hf_config,
)

__all__ = [
    "GIB",
    "GPUS",
    "PRESETS",
    "Architecture",
    "LanguageArch",
    "MemoryPlan",
    "RunShape",
    "VisionArch",
    "architecture_from_hf_config",
    "format_plan",
    "kv_bytes_per_token",
    "parse_gpu",
    "plan_memory",
    "verdict",
    "vllm_weight_bytes",
]

GIB = 2**30
Precision = Literal["fp32", "bf16", "fp8"]
Impl = Literal["local", "transformer_engine"]


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------
def language_layer_params(lm: LanguageArch, tp: int) -> int:
    """One decoder layer on one TP rank: qkv (+bias), out proj, MLP split over tp; 2 norms replicated."""
    qkv_out = lm.hidden_size + 2 * lm.num_query_groups * lm.head_dim
    qkv = lm.hidden_size * qkv_out + (qkv_out if lm.qkv_bias else 0)
    proj = lm.hidden_size * lm.hidden_size
    mlp = lm.hidden_size * lm.ffn_hidden_size * (3 if lm.gated_mlp else 2)
    return (qkv + proj + mlp) // tp + 2 * lm.hidden_size


def vision_params(v: VisionArch, lm_hidden: int, tp: int) -> int:
    """Vision tower + projector on one TP rank (the first pipeline stage holds all of it)."""
    h, f = v.hidden_size, v.ffn_hidden_size
    norm = h * (2 if v.norm == "layernorm" else 1)
    bias = 1 if v.linear_bias else 0
    qkv = 3 * h * h + 3 * h * bias
    proj = h * h + h * bias
    mlp = (2 * h * f + 2 * f * bias + f * h + h * bias) if v.gated_mlp else (2 * h * f + (f + h) * bias)
    layer = (qkv + proj + mlp) // tp + 2 * norm
    patch = 3 * v.temporal_patch * v.patch_size**2 * h + (h if v.patch_bias else 0)
    positions = v.learned_positions * h
    pin = v.projector_in
    pf = v.projector_ffn or pin
    projector = (pin * pf + pf + pf * lm_hidden + lm_hidden) // tp + (norm if v.projector_norm else 0)
    return v.num_layers * layer + patch + positions + projector


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one rank of a pipeline stage."""

    language: int
    vision: int

    @property
    def total(self) -> int:
        return self.language + self.vision


def stage_params(arch: Architecture, tp: int, pp: int, stage: Literal["first", "last"], *,
                 stage_layers: int | None = None) -> StageParams:
    """Parameters of the first or last pipeline stage on one TP rank.

    First stage: its layers (``stage_layers``; None = ceil(L/pp)) + the input embedding (V/t x h)
    + the vision tower and projector. Last stage: its layers + final norm + the output layer
    (V/t x h; with tied embeddings and pp > 1 megatron keeps a copy there too, with pp = 1 it
    is the embedding itself).
    """
    lm = arch.language
    count = math.ceil(lm.num_layers / pp) if stage_layers is None else stage_layers
    layers = count * language_layer_params(lm, tp)
    emb = lm.padded_vocab(tp) // tp * lm.hidden_size
    first, last = stage == "first" or pp == 1, stage == "last" or pp == 1
    language = layers
    if first:
        language += emb
    if last:
        language += lm.hidden_size  # final norm
        if not lm.tied_embeddings or pp > 1:
            language += emb
    vision = vision_params(arch.vision, lm.hidden_size, tp) if (arch.vision and first) else 0
    return StageParams(language=language, vision=vision)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunShape:
    """Parallel layout, batch shape and memory options of a run."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B; 1 = off)."""
    first_stage_layers: int | None = None
    """Language-model layers on the first stage (parallel.first_stage_layers; None = even)."""
    last_stage_layers: int | None = None
    """Language-model layers on the last stage (parallel.last_stage_layers; None = even)."""
    micro_batch: int = 1
    """Responses per forward/backward micro-batch."""
    prompt_len: int = 1024
    """Prompt tokens (image tokens included)."""
    response_len: int = 1024
    images_per_sample: int = 1
    image_patches: int = 1024
    """Vision patches per image before merging (e.g. a 448x448 image at patch 14 = 32*32 = 1024)."""
    num_microbatches: int = 8
    """Micro-batches per update (bounds the pipeline's in-flight micro-batches)."""
    precision: Precision = "bf16"
    impl: Impl = "transformer_engine"
    """Layer specs: local (unfused attention keeps the [a, s, s] probabilities) or TE (flash)."""
    sequence_parallel: bool = False
    recompute: bool = False
    """Full activation recomputation (megatron 'full', 'uniform', 1 layer per checkpoint)."""
    distributed_optimizer: bool = True
    reference_model: bool = False
    """A frozen reference model (loss.ref_kl_coef > 0): its weights stay on the GPU."""
    masked_grad: bool = False
    """The masked-image branch keeps its graph at update time (masked_grad, full KL or full
    entropies): each micro-batch carries both branches. False: the masked pass is a no-grad
    log-prob pass before the update."""
    vllm_mode: Literal["none", "colocated", "sleep"] = "none"
    """none: no vLLM; colocated: vLLM keeps its share all the time; sleep: vLLM releases its
    share during the update (sleep mode) and takes it back for rollouts."""
    vllm_gpu_memory_utilization: float = 0.5
    vllm_tp: int | None = None
    """vLLM's tensor parallel size (None = tp)."""
    papo_chunk_bytes: int = 128 * 2**20
    """fp32 scratch of one chunk of the fused PAPO op (megatron_papo/ops)."""
    fused_linear: bool = False
    """``loss.fused_linear``: no logits; the op works from the last hidden states and the output
    weight in (token x vocabulary) tiles (ops/fused_linear.py)."""

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp", "vpp", "micro_batch", "num_microbatches", "images_per_sample"):
            if getattr(self, name) < 1 and not (name == "images_per_sample" and getattr(self, name) == 0):
                raise ValueError(f"RunShape.{name}: expected >= 1, got {getattr(self, name)}")
        if self.precision == "fp8" and self.impl != "transformer_engine":
            raise ValueError("RunShape.precision='fp8' needs impl='transformer_engine'")
        if not 0 <= self.vllm_gpu_memory_utilization < 1:
            raise ValueError("RunShape.vllm_gpu_memory_utilization: expected a value in [0, 1), got "
                             f"{self.vllm_gpu_memory_utilization}")


def _param_bytes(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2  # fp8 (TE) keeps bf16 parameters


def _act_bytes(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2


def _linear_input_bytes(precision: Precision) -> int:
    """Inputs saved by linear layers: TE saves them in FP8 under an FP8 recipe."""
    return 1 if precision == "fp8" else _act_bytes(precision)


def language_layer_activation_bytes(lm: LanguageArch, run: RunShape, tokens: int) -> int:
    """Bytes one decoder layer saves for backward for ``tokens`` = s/c * b tokens on one rank.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
    style accounting, redone for this architecture (RMSNorm, SwiGLU, GQA, no dropout):

    TE specs (fused norm+linear, flash attention), per token:
        norm inputs + norm outputs (saved by the following linear)   4h        (/t with SP)
        q, k, v kept by flash attention                               (h + 2gd)/t
        attention output (out-proj input)                             h/t
        fc1 output (2f) and SwiGLU output (fc2 input)                 3f/t
        + softmax statistics a/t fp32 (flash) -- small
    Context parallel (cp > 1, either spec): the core attention is models.cp_attention's (the
    all-gather flavour, not flash). Per local token it keeps q h/t, the gathered keys and values
    expanded to all heads 2 a d / t x cp, and the probabilities over all s keys a s / t; these
    replace the q/k/v terms of either spec (measured on the tiny VLM: the saved tensors of one
    layer are exactly these).
    Local specs (megatron-core's unfused DotProductAttention, torch norms), per token:
        each torch RMSNorm keeps its input and x*rstd                 2 x 2h
        linear inputs (qkv, fc1)                                      2h
        q and k after rope, k/v expanded to all heads (GQA)           3h/t, + 2gd/t when g = a
                                                                      (v is then a view of the qkv buffer)
        rope cos/sin tables of q and k, expanded over the batch       4d
        attention probabilities [a/t, s, s]                           a s / t per token
        context (out-proj input) h/t; fc1 output 2f/t, a copy of the gate half f/t, SiLU
        output f/t, product f/t
    FP8 halves the bytes of the inputs saved by the linear layers (qkv, proj, fc1, fc2).
    """
    h, a, g, d, f, t = lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.head_dim, \
        lm.ffn_hidden_size, run.tp
    act, lin = _act_bytes(run.precision), _linear_input_bytes(run.precision)
    sp = t if run.sequence_parallel else 1
    f_out = 2 * f if lm.gated_mlp else f
    if run.cp > 1:  # all-gather attention (either spec): q, gathered expanded k and v, probabilities
        attention = (a * d / t + 2 * a * d / t * run.cp + a / t * run.seq_len) * act
    elif run.impl == "transformer_engine":
        attention = (h + 2 * g * d) / t * act + a / t * 4  # q, k, v kept by flash; softmax lse (fp32)
    else:  # q and k after rope, k/v expanded (or the qkv buffer v views), the probabilities
        attention = (3 * h / t + (2 * g * d / t if g == a else 0) + a / t * run.seq_len) * act
    per_token = attention
    if run.impl == "transformer_engine":
        per_token += (2 * h * act + 2 * h * lin) / sp  # norm inputs (bf16) + LN outputs = linear inputs
        per_token += h / t * lin  # out-proj input
        per_token += f_out / t * act + f / t * lin  # fc1 out, fc2 in
    else:
        per_token += 2 * (2 * h) * act / sp  # two torch RMSNorms: input and x * rstd
        per_token += 2 * h * lin / sp  # qkv and fc1 inputs
        per_token += 4 * d * act  # rope cos / sin of q and k, expanded over the batch
        per_token += h / t * lin  # out-proj input
        # fc1 output; SwiGLU: a copy of the gate half, SiLU output, the product (fc2 input)
        per_token += (f_out + (3 * f if lm.gated_mlp else f)) / t * act
    return int(per_token * tokens)


def vision_layer_activation_bytes(v: VisionArch, run: RunShape, patches: int, per_image_seq: int) -> int:
    """Bytes one ViT layer saves for ``patches`` patch tokens (images x per-image patches).

    Same accounting as the language layer, with MHA, optional LayerNorm (local: torch
    LayerNorm keeps only its input) and the unfused attention's [a, s_img, s_img] per image.
    Qwen2.5-VL's windowed attention only shortens s_img in 28 of 32 layers; we use full
    attention everywhere (an upper bound on the local path; flash has no s^2 term).
    """
    h, f, a, t = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads, run.tp
    act, lin = _act_bytes(run.precision), _linear_input_bytes(run.precision)
    f_out = 2 * f if v.gated_mlp else f
    if run.impl == "transformer_engine":
        per_token = 2 * h * act + 2 * h * lin + 4 * h / t * act + f_out / t * act + f / t * lin
    else:
        norm_saved = 1 if v.norm == "layernorm" else 2
        per_token = 2 * norm_saved * h * act + 2 * h * lin  # norms; qkv and fc1 inputs
        # the fused qkv buffer (q, k, v are views of it), plus rotated copies of q and k with rope
        per_token += (5 if v.rope else 3) * h / t * act
        per_token += a / t * per_image_seq * act  # attention probabilities
        per_token += h / t * lin  # out-proj input
        per_token += (f_out + (2 * f if v.gated_mlp else 0)) / t * act + f / t * lin  # fc1 out, act, fc2 in
    return int(per_token * patches)


def logits_bytes(lm: LanguageArch, run: RunShape, rows: int) -> int:
    """Logits [rows, s/c, V/t] in the compute dtype, and their gradient during backward (same size)."""
    v_local = lm.padded_vocab(run.tp) // run.tp
    return 2 * rows * math.ceil(run.seq_len / run.cp) * v_local * _act_bytes(run.precision)


def papo_op_bytes(lm: LanguageArch, run: RunShape, rows: int) -> int:
    """Working set of the fused PAPO op: chunks of <= papo_chunk_bytes fp32 scratch, about three
    chunk-sized buffers alive at once (softmax of both branches, the gradient chunk)."""
    v_local = lm.padded_vocab(run.tp) // run.tp
    tokens = rows * math.ceil(run.seq_len / run.cp)
    chunk_tokens = max(1, min(tokens, run.papo_chunk_bytes // (4 * v_local)))
    return 3 * chunk_tokens * v_local * 4


# Tile of the fused linear op (ops/fused_linear.py: default_tile): ~64 MiB of fp32 scratch and a
# 4096-row vocabulary block whose weight gradient is summed in fp32.
_LINEAR_TILE_SCRATCH = 64 * 2**20
_LINEAR_VOCAB_BLOCK = 4096


def fused_linear_bytes(lm: LanguageArch, run: RunShape, rows: int, *, backward: bool = True) -> int:
    """Working set of the fused linear op for ``rows`` rows: one tile's fp32 scratch, and in
    backward the fp32 accumulators of the hidden-state gradient [tokens, H] and of one vocabulary
    block's weight gradient [4096, H]. No [T, V/tp] tensor exists."""
    tokens = rows * math.ceil(run.seq_len / run.cp)
    if not backward:
        return _LINEAR_TILE_SCRATCH
    v_local = lm.padded_vocab(run.tp) // run.tp
    return _LINEAR_TILE_SCRATCH + 4 * lm.hidden_size * (tokens + min(v_local, _LINEAR_VOCAB_BLOCK))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Per-GPU bytes by category for the heavier of the first and last pipeline stages."""

    arch: Architecture
    run: RunShape
    stage: str
    params: int
    """Parameters on this rank (elements)."""
    rows: dict[str, int] = field(default_factory=dict)
    """Category -> bytes (the table)."""
    notes: dict[str, str] = field(default_factory=dict)
    """Category -> how it was computed."""
    update_peak: int = 0
    """Bytes at the peak of the update phase."""
    rollout_peak: int = 0
    """Bytes while vLLM generates (0 without vLLM)."""
    kv_cache_tokens: int = 0
    """Tokens of KV cache that vLLM's share holds on this GPU (after its weights)."""

    @property
    def peak(self) -> int:
        return max(self.update_peak, self.rollout_peak)


def _stage_plan(arch: Architecture, run: RunShape, stage: Literal["first", "last"]) -> MemoryPlan:
    lm = arch.language
    counts = run_stage_layers(arch, run)
    stage_count = counts[0] if stage == "first" else counts[-1]
    sp = stage_params(arch, run.tp, run.pp, stage, stage_layers=stage_count)
    first, last = stage == "first" or run.pp == 1, stage == "last" or run.pp == 1
    pbytes = _param_bytes(run.precision)
    shard = run.dp * run.cp if run.distributed_optimizer else 1
    opt_per_param = 8 if run.precision == "fp32" else 12  # Adam m, v (+ fp32 main params)
    rows: dict[str, int] = {}
    notes: dict[str, str] = {}
    rows["weights"] = sp.total * pbytes
    notes["weights"] = f"{sp.total / 1e9:.3f}B params x {pbytes} B"
    if run.precision == "fp8":
        linear = sp.total - lm.padded_vocab(run.tp) // run.tp * lm.hidden_size * (int(first) + int(last))
        rows["weights"] += 2 * max(linear, 0)
        notes["weights"] += " + FP8 weight and transpose caches (2 B per linear param)"
    rows["gradients"] = sp.total * 4
    notes["gradients"] = "fp32 gradient buffer (DDP grad_reduce_in_fp32), full size on every rank"
    rows["optimizer"] = math.ceil(sp.total * opt_per_param / shard)
    notes["optimizer"] = (f"Adam {'m, v' if run.precision == 'fp32' else 'fp32 main + m, v'} "
                          f"({opt_per_param} B/param) / {shard} (dp x cp shards)")
    if run.reference_model:
        rows["reference model"] = sp.total * pbytes
        notes["reference model"] = "frozen copy of the weights (loss.ref_kl_coef > 0)"

    # Activations: 1F1B keeps min(pp, M) micro-batches in flight on the first stage, fewer later.
    # Interleaved (vpp > 1, Narayanan et al. 2021): the first stage holds (1 + (pp - 1) / (pp vpp))
    # times as much: its warm-up runs (pp - 1) * 2 + (vpp - 1) * pp + 1 chunk-micro-batches of
    # layers / (pp vpp) layers each (not measured: CPU measurement covers one stage, no schedule).
    in_flight = float(min(run.pp, run.num_microbatches)) if first else 1.0
    if first and run.vpp > 1 and run.pp > 1:
        in_flight *= 1 + (run.pp - 1) / (run.pp * run.vpp)
    branches = 2 if run.masked_grad else 1
    rows_mb = run.micro_batch * branches
    tokens = rows_mb * math.ceil(run.seq_len / run.cp)
    layers = stage_count
    per_layer = language_layer_activation_bytes(lm, run, tokens)
    act = _act_bytes(run.precision)
    sp_div = run.tp if run.sequence_parallel else 1
    if run.recompute:
        checkpoint = int(tokens * lm.hidden_size * act / sp_div)
        lm_act = int(in_flight * layers * checkpoint)
        notes["activations"] = (f"full recompute: {layers} layer inputs x {in_flight:g} micro-batch(es) "
                                "in flight")
    else:
        lm_act = int(in_flight * layers * per_layer)
        notes["activations"] = (f"{layers} layers x {per_layer / GIB:.3f} GiB x {in_flight:g} "
                                "micro-batch(es) in flight")
    if run.impl == "local" or run.cp > 1:  # the [b, 1, s / cp, s] bool mask, shared by the layers
        lm_act += int(in_flight * rows_mb * math.ceil(run.seq_len / run.cp) * run.seq_len)
    if last:  # final norm (input, x * rstd for torch norms) + output-layer input
        lm_act += (3 if run.impl == "local" else 2) * tokens * lm.hidden_size * act // sp_div
    vis_act = 0
    if arch.vision is not None and first and run.images_per_sample > 0:
        v = arch.vision
        patches = rows_mb * run.images_per_sample * run.image_patches
        vis_layer = vision_layer_activation_bytes(v, run, patches, run.image_patches)
        merged = patches // v.spatial_merge**2
        pf = v.projector_ffn or v.projector_in
        projector = merged * (v.projector_in + 2 * pf) * act  # input, fc1 output, activation output
        pixels = patches * 3 * v.temporal_patch * v.patch_size**2 * act  # the patch-embedding input
        vis_act = int(in_flight * (vis_layer * v.num_layers + projector + pixels))
        notes["activations"] += f"; vision tower + projector {vis_act / GIB:.3f} GiB"
    rows["activations"] = lm_act + vis_act
    if run.recompute:
        rows["recompute"] = per_layer
        notes["recompute"] = "one layer's activations, rebuilt during backward"
    if run.fused_linear:
        rows["logits"] = 0
        rows["PAPO op scratch"] = fused_linear_bytes(lm, run, rows_mb) if last else 0
    else:
        rows["logits"] = logits_bytes(lm, run, rows_mb) if last else 0
        rows["PAPO op scratch"] = papo_op_bytes(lm, run, rows_mb) if last else 0
    if last and run.fused_linear:
        notes["logits"] = "none: fused_linear works from the hidden states and the output weight"
        notes["PAPO op scratch"] = ("fused linear op: one tile's fp32 scratch (64 MiB) + fp32 [T, H] "
                                    "and [4096, H] gradient accumulators")
    elif last:
        v_local = lm.padded_vocab(run.tp) // run.tp
        shape = f"[{rows_mb}, {math.ceil(run.seq_len / run.cp)}, {v_local}]"
        notes["logits"] = f"{shape} x {act} B, and their gradient"
        notes["PAPO op scratch"] = "fused op: ~3 fp32 chunks of <= 128 MiB (never a [T, V/tp] fp32 copy)"
    # The masked-image branch.
    if run.masked_grad:
        rows["PAPO masked pass"] = 0
        notes["PAPO masked pass"] = "counted above: each micro-batch carries both branches (2x rows)"
        nograd = 0
    else:
        nograd = per_layer // 2  # forward working set of one layer without saving for backward (rough)
        if last and run.fused_linear:
            nograd += fused_linear_bytes(lm, run, run.micro_batch, backward=False)
        elif last:
            nograd += logits_bytes(lm, run, run.micro_batch) // 2 + papo_op_bytes(lm, run, run.micro_batch)
        rows["PAPO masked pass"] = nograd
        notes["PAPO masked pass"] = ("no-grad log-prob pass before the update (one layer's working set + "
                                     "logits); not stacked on the update's activations")
    training = (rows["activations"] + rows.get("recompute", 0) + rows["logits"] + rows["PAPO op scratch"])
    static = rows["weights"] + rows["gradients"] + rows["optimizer"] + rows.get("reference model", 0)
    update = static + max(training, nograd)
    plan = MemoryPlan(arch=arch, run=run, stage=stage, params=sp.total, rows=rows, notes=notes)
    if run.vllm_mode != "none":
        share = run.vllm_gpu_memory_utilization
        rows["vLLM share"] = -1  # filled by plan_memory, which knows the GPU size
        notes["vLLM share"] = (f"gpu_memory_utilization {share} of the GPU; "
                               + ("held during the update too" if run.vllm_mode == "colocated"
                                  else "released during the update (sleep mode)"))
    plan.update_peak = update
    plan.rows["total (update)"] = update
    return plan


def vllm_weight_bytes(arch: Architecture, run: RunShape) -> int:
    """vLLM's own bf16 copy of the weights on one GPU (its TP = vllm_tp or tp; no pipeline)."""
    tp = run.vllm_tp or run.tp
    sp = stage_params(arch, tp, 1, "first")
    return sp.total * 2


def kv_bytes_per_token(lm: LanguageArch, tp: int) -> int:
    """bf16 K and V for every layer: 2 x L x g/tp x d x 2 bytes (g/tp >= 1: KV heads are replicated)."""
    return 2 * lm.num_layers * max(1, lm.num_query_groups // tp) * lm.head_dim * 2


def run_stage_layers(arch: Architecture, run: RunShape) -> list[int]:
    """Language-model layers per pipeline stage of ``run`` (pipeline_layout.stage_layers)."""
    return stage_layers(arch.language.num_layers, run.pp, first=run.first_stage_layers,
                        last=run.last_stage_layers, vpp=run.vpp)


def check_layout(arch: Architecture, run: RunShape) -> None:
    """Raise ValueError (with the reason) for a layout megatron-core cannot build: tp must divide
    the query heads, the KV heads and the MLP width; the pipeline stages must share the language
    model's layers (evenly, or as first_stage_layers / last_stage_layers say) and vpp each stage's."""
    lm = arch.language
    for what, n in (("num_attention_heads", lm.num_attention_heads),
                    ("num_query_groups", lm.num_query_groups), ("ffn_hidden_size", lm.ffn_hidden_size)):
        if n % run.tp:
            raise ValueError(f"tp={run.tp} does not divide {arch.name}'s {what}={n}: megatron-core splits "
                             f"it evenly over the tensor-parallel ranks")
    if run.first_stage_layers is None and run.last_stage_layers is None:
        stages = run.pp * run.vpp
        if lm.num_layers % stages:
            raise ValueError(f"pp={run.pp} x vpp={run.vpp} = {stages} pipeline chunks do not divide "
                             f"{arch.name}'s num_layers={lm.num_layers} (an uneven split: "
                             "--first-stage-layers / --last-stage-layers)")
    try:
        run_stage_layers(arch, run)
    except ValueError as e:
        raise ValueError(f"{arch.name}: {e}") from None


def plan_memory(arch: Architecture, run: RunShape, gpu_bytes: int | None = None) -> MemoryPlan:
    """The per-GPU plan of the heavier pipeline stage (first vs last), with the vLLM phase when
    ``run.vllm_mode`` is not none (needs ``gpu_bytes``). A layout that megatron-core cannot
    build raises ValueError (:func:`check_layout`)."""
    check_layout(arch, run)
    stages = ["first"] if run.pp == 1 else ["first", "last"]
    plans = [_stage_plan(arch, run, s) for s in stages]  # type: ignore[arg-type]
    if run.vllm_mode != "none":
        if gpu_bytes is None:
            raise ValueError("plan_memory: a vLLM share needs gpu_bytes (the GPU's memory)")
        share = int(run.vllm_gpu_memory_utilization * gpu_bytes)
        for p in plans:
            static = sum(p.rows.get(k, 0) for k in ("weights", "gradients", "optimizer", "reference model"))
            p.rows["vLLM share"] = share
            p.rollout_peak = static + share
            if run.vllm_mode == "colocated":
                p.update_peak += share
                p.rows["total (update)"] = p.update_peak
            p.rows["total (rollout)"] = p.rollout_peak
            tp = run.vllm_tp or run.tp
            kv_room = max(0, share - vllm_weight_bytes(arch, run))
            p.kv_cache_tokens = kv_room // kv_bytes_per_token(arch.language, tp)
    return max(plans, key=lambda p: p.peak)


# ---------------------------------------------------------------------------------------------
# GPUs and output
# ---------------------------------------------------------------------------------------------
GPUS: dict[str, int] = {
    "h100-80gb": 80 * 10**9,  # "80GB" is decimal: 74.5 GiB (torch reports ~79.1 GiB total incl. reserved)
    "h200-141gb": 141 * 10**9,
    "a100-80gb": 80 * 10**9,
    "a100-40gb": 40 * 10**9,
    "l40s-48gb": 48 * 10**9,
    "b200-180gb": 180 * 10**9,
}


def parse_gpu(text: str) -> int:
    """A GPU name from GPUS or a number of GiB ("80", "79.6") -> bytes."""
    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        gib = float(key.removesuffix("gib").removesuffix("g"))
    except ValueError:
        raise ValueError(f"--gpu: expected one of {sorted(GPUS)} or a size in GiB, got {text!r}") from None
    if gib <= 0:
        raise ValueError(f"--gpu: expected a positive size, got {text!r}")
    return int(gib * GIB)


def verdict(plan: MemoryPlan, gpu_bytes: int, *, reserve_bytes: int = 3 * GIB,
            headroom: float = 0.10) -> tuple[bool, int]:
    """(fits, spare bytes): usable = (gpu - reserve) * (1 - headroom) for the CUDA context, NCCL
    buffers and allocator fragmentation; spare = usable - peak (negative = does not fit)."""
    usable = int((gpu_bytes - reserve_bytes) * (1 - headroom))
    spare = usable - plan.peak
    return spare >= 0, spare


def format_plan(plan: MemoryPlan, gpu_bytes: int | None = None, *, reserve_bytes: int = 3 * GIB,
                headroom: float = 0.10) -> str:
    """The table (GiB per GPU) and, given the GPU size, the verdict."""
    r = plan.run
    lines = [f"{plan.arch.name}: tp={r.tp} pp={r.pp} cp={r.cp} dp={r.dp} micro_batch={r.micro_batch} "
             f"seq={r.prompt_len}+{r.response_len} {r.precision} {r.impl} recompute={r.recompute} "
             f"sp={r.sequence_parallel} dist_opt={r.distributed_optimizer} ref={r.reference_model} "
             f"masked_grad={r.masked_grad} fused_linear={r.fused_linear} vllm={r.vllm_mode}",
             f"heaviest pipeline stage: {plan.stage}; {plan.params / 1e9:.3f}B parameters on this GPU",
             f"{'category':<20} {'GiB':>9}  how", "-" * 78]
    for name, value in plan.rows.items():
        if name.startswith("total"):
            continue
        lines.append(f"{name:<20} {value / GIB:9.2f}  {plan.notes.get(name, '')}")
    lines.append("-" * 78)
    lines.append(f"{'total (update)':<20} {plan.update_peak / GIB:9.2f}")
    if plan.rollout_peak:
        lines.append(f"{'total (rollout)':<20} {plan.rollout_peak / GIB:9.2f}  trainer state + vLLM share; "
                     f"KV cache for ~{plan.kv_cache_tokens:,} tokens "
                     f"(~{plan.kv_cache_tokens // max(r.seq_len, 1)} sequences of {r.seq_len})")
    if gpu_bytes is not None:
        fits, spare = verdict(plan, gpu_bytes, reserve_bytes=reserve_bytes, headroom=headroom)
        usable = int((gpu_bytes - reserve_bytes) * (1 - headroom))
        lines.append(f"GPU {gpu_bytes / GIB:.1f} GiB, usable {usable / GIB:.1f} GiB "
                     f"({reserve_bytes / GIB:.1f} GiB reserved, {headroom:.0%} headroom): "
                     + (f"FITS with {spare / GIB:.1f} GiB to spare" if fits
                        else f"DOES NOT FIT: {-spare / GIB:.1f} GiB over"))
    return "\n".join(lines)
