"""The PAPO objective (Perception-Aware Policy Optimization, arXiv 2507.06448), typed.

Minimised, per micro-batch (see ../shared/PAPO_SPEC.md):

    L = L_pg + beta * L_refkl - gamma_s * KL_prcp + eta1_s * H_orig + eta2_s * H_mask

    L_pg     clipped surrogate (losses.policy), aggregated by `loss_agg`
    L_refkl  KL estimator (k1/k2/k3) against the reference policy, aggregated by `loss_agg`
    KL_prcp  Implicit Perception Loss, MAXIMISED, always a token mean:
               "k3":   k_t = clamp(exp(d) - d - 1, 0, c),  d = clamp(l_m - l, -20, 20)
               "full": k_t = clamp(KL(pi(.|q,I,o<t) || pi(.|q,I_mask,o<t)), 0, c), exact, vocab-parallel
    H_orig, H_mask  Double Entropy Loss, MINIMISED, always a token mean:
               "sampled": -l and -l_m of the sampled token;  "full": exact entropies, vocab-parallel
    gamma_s, eta*_s  the coefficients times the gamma schedule factor s(step) in [0, 1]

GRPO = gamma 0, entropies 0, beta 0.01. DAPO = beta 0, eps 0.2/0.28. PAPO-G / PAPO-D add gamma
(and eta). The masked branch (l_m, masked logits) is detached unless `masked_grad` is set.

Two entry points share one core:
- `papo_loss_from_log_probs`: per-token log-probs only (sampled-token forms, "k3"/"sampled").
- `papo_loss`: from vocab-parallel logits of both branches, any mode, via ops.papo_token_stats.
Both return (loss, metrics): metrics are detached 0-dim tensors (no host sync in here).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from megatron_papo.losses.aggregation import LOSS_AGGS, LossAgg, aggregate, token_mean
from megatron_papo.losses.kl import KL_ESTIMATORS, KLEstimator, kl_estimate
from megatron_papo.losses.policy import clipped_policy_loss
from megatron_papo.ops import (
    linear_papo_token_stats,
    linear_vocab_parallel_log_probs_entropy,
    papo_token_stats,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
)

KlPrcpMode = Literal["k3", "full"]
EntropyMode = Literal["sampled", "full"]
GammaSchedule = Literal["constant", "linear"]


@dataclass
class PapoLossConfig:
    """Coefficients and switches of the PAPO objective. Defaults: PAPO-G 7B of the paper."""

    gamma: float = 0.02
    """Weight of the Implicit Perception Loss KL_prcp (maximised). 0 turns PAPO off (GRPO/DAPO)."""
    entropy_coef_orig: float = 0.05
    """eta1: weight of the original-branch entropy H_orig (minimised). 0 = off."""
    entropy_coef_mask: float = 0.05
    """eta2: weight of the masked-branch entropy H_mask (minimised). 0 = off."""
    ref_kl_coef: float = 0.01
    """beta: weight of the KL to the reference policy (GRPO 0.01; DAPO 0 = no reference model)."""
    ref_kl_estimator: KLEstimator = "k3"
    """Estimator of the reference KL: k1, k2 or k3."""
    ref_kl_clip: float = 10.0
    """Upper clamp of the per-token reference-KL estimate."""
    clip_ratio_low: float = 0.2
    """eps_low of the clipped surrogate: rho is clipped below at 1 - eps_low."""
    clip_ratio_high: float = 0.3
    """eps_high: rho clipped above at 1 + eps_high (GRPO ref code 0.3, DAPO 0.28)."""
    clip_ratio_dual: float | None = 3.0
    """Dual clip for negative advantages: loss capped at -A * c. None = off."""
    log_ratio_clamp: float = 20.0
    """Every log-ratio (policy/old, masked/policy, ref/policy) is clamped to +-this before exp."""
    kl_prcp_mode: KlPrcpMode = "k3"
    """"k3": sampled-token k3 estimate (reference code); "full": exact full-vocabulary KL."""
    kl_prcp_clip: float = 10.0
    """Upper clamp of the per-token KL_prcp value (reference default 10.0; its switch uses 0.2)."""
    entropy_mode: EntropyMode = "sampled"
    """"sampled": -log-prob of the sampled token (reference code); "full": exact entropies."""
    masked_grad: bool = False
    """Let gradient flow through the masked branch (needs masked logits/log-probs with a graph)."""
    kl_target_weights: Literal["pre_update", "current"] = "pre_update"
    """Weights the detached masked branch (the KL_prcp target and H_mask) is computed with, on the
    sampled-token path (k3 KL, sampled entropies, masked_grad off). "pre_update": one no-grad
    masked pass before the step's updates, reused by every mini-batch and epoch, like the old
    log-probs (the reference's order). "current": the update computes it itself, on the weights
    being updated (both branches in one pass; ~2x the update's activations). Whatever this says,
    the masked logits of full KL / full H_mask and masked_grad come from the update (current):
    a full distribution per token cannot be kept between passes."""
    gamma_schedule: GammaSchedule = "constant"
    """"linear": gamma and both entropy coefficients decay by the same factor."""
    gamma_decay_steps: int = 0
    """Steps over which the linear schedule goes from factor 1 to `gamma_final_factor`."""
    gamma_final_factor: float = 0.0
    """Factor reached at the end of the linear schedule (then held)."""
    loss_agg: LossAgg = "token-mean"
    """Aggregation of L_pg, L_refkl and KL_prcp: token-mean, seq-mean-token-mean or seq-mean-token-sum."""
    divide_logits_by_temperature: bool = True
    """RL log-prob passes (old, masked, reference, update) divide the logits by
    rollout.temperature, as the reference does (no effect at temperature 1); False = the plain
    temperature-1 policy. The warm start and evaluation never do."""
    token_mean_scope: Literal["global", "micro_batch"] = "global"
    """What a token mean divides by. "global": the token (sequence) count of the whole update
    batch over all data-parallel ranks, so every token weighs the same whatever the micro-batch
    split (the default). "micro_batch": each micro-batch's own count, then the mean over
    micro-batches and data-parallel ranks (the reference's arithmetic; a token in a short
    micro-batch weighs more)."""
    op_impl: Literal["auto", "torch", "triton"] = "auto"
    """Backend of the full-vocabulary token statistics (ops.papo_token_stats): "triton" = fused
    kernels (CUDA), "torch" = chunked torch ops, "auto" = triton on CUDA when it imports."""
    fused_linear: bool = False
    """Never materialise the logits: the model returns its last hidden states and every token
    statistic (update and no-grad passes) comes from them and the vocab-parallel output weight
    through ops.linear_papo_token_stats / linear_vocab_parallel_log_probs(_entropy), tiled and
    recomputed in backward. Same values as the logits path (to fp32 rounding)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"PapoLossConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("gamma", "entropy_coef_orig", "entropy_coef_mask", "ref_kl_coef"):
            if getattr(self, name) < 0:
                raise bad(name, "a value >= 0 (signs are fixed by the objective)")
        for name in ("clip_ratio_low", "clip_ratio_high"):
            if not 0 <= getattr(self, name) < 10:
                raise bad(name, "a value in [0, 10)")
        if self.clip_ratio_low >= 1:
            raise bad("clip_ratio_low", "a value < 1")
        if self.clip_ratio_dual is not None and self.clip_ratio_dual <= 1:
            raise bad("clip_ratio_dual", "a value > 1, or null to turn the dual clip off")
        for name in ("log_ratio_clamp", "kl_prcp_clip", "ref_kl_clip"):
            if getattr(self, name) <= 0:
                raise bad(name, "a value > 0")
        choices = {"ref_kl_estimator": KL_ESTIMATORS, "kl_prcp_mode": ("k3", "full"),
                   "entropy_mode": ("sampled", "full"), "gamma_schedule": ("constant", "linear"),
                   "loss_agg": LOSS_AGGS, "op_impl": ("auto", "torch", "triton"),
                   "token_mean_scope": ("global", "micro_batch"),
                   "kl_target_weights": ("pre_update", "current")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"one of {list(allowed)}")
        if self.gamma_schedule == "linear" and self.gamma_decay_steps <= 0:
            raise bad("gamma_decay_steps", "a positive step count when gamma_schedule is 'linear'")
        if not 0 <= self.gamma_final_factor <= 1:
            raise bad("gamma_final_factor", "a value in [0, 1]")

    @property
    def uses_masked_branch(self) -> bool:
        """True when the objective reads the masked-image branch at all."""
        return self.gamma > 0 or self.entropy_coef_mask > 0

    @property
    def masked_in_update(self) -> bool:
        """True when the update itself runs the masked branch (both branches in one pass): its
        logits are needed (full KL / entropies) or its gradient (masked_grad). The masked
        log-probs then come from that pass, on the weights being updated, and no separate no-grad
        masked pass runs before the update. Also with ``kl_target_weights: current``."""
        return self.uses_masked_branch and (self.masked_grad or self.masked_needs_logits
                                            or self.kl_target_weights == "current")

    @property
    def masked_needs_logits(self) -> bool:
        """True when a term needs the masked branch's full logits: full KL_prcp, or full H_mask
        with a weight on it (full H_orig alone needs only the original logits)."""
        return (self.gamma > 0 and self.kl_prcp_mode == "full") or (
            self.entropy_mode == "full" and self.entropy_coef_mask > 0)

    @property
    def needs_logits(self) -> bool:
        """True when a term needs full logits (full KL or full entropies)."""
        return (self.gamma > 0 and self.kl_prcp_mode == "full") or self.entropy_mode == "full"


def gamma_factor(config: PapoLossConfig, step: int) -> float:
    """Schedule factor s(step) in [0, 1] applied to gamma and both entropy coefficients."""
    if config.gamma_schedule == "constant":
        return 1.0
    frac = min(max(step, 0) / config.gamma_decay_steps, 1.0)
    return 1.0 - (1.0 - config.gamma_final_factor) * frac


def _check_shapes(mask: Tensor, **tensors: Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"papo loss: response_mask must be [B, L], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t is None:
            continue
        if name == "advantages" and t.shape == mask.shape[:1]:
            continue
        if t.shape != mask.shape:
            expected = "[B] or [B, L]" if name == "advantages" else "[B, L]"
            raise ValueError(f"papo loss: {name} must be {expected} matching response_mask "
                             f"{tuple(mask.shape)}, got {tuple(t.shape)}")


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision per-token values are promoted to fp32; fp32/fp64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_extreme(values: Tensor, mask: Tensor, largest: bool) -> Tensor:
    fill = torch.finfo(values.dtype).min if largest else torch.finfo(values.dtype).max
    v = torch.where(mask, values, torch.full_like(values, fill))
    return v.max() if largest else v.min()


def _objective(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor,
               config: PapoLossConfig, *, masked_log_probs: Tensor | None, full_kl: Tensor | None,
               entropy: Tensor | None, masked_entropy: Tensor | None, ref_log_probs: Tensor | None,
               step: int, num_tokens: Tensor | float | None, num_seqs: Tensor | float | None,
               row_tokens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Shared core. Per-token inputs [B, L] float; `mask` [B, L] bool. See the module docstring."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(log_probs.dtype)
    s = gamma_factor(config, step)
    gamma, eta1, eta2 = config.gamma * s, config.entropy_coef_orig * s, config.entropy_coef_mask * s

    def tok_mean(v: Tensor) -> Tensor:
        return token_mean(v, mask, num_tokens)

    pg = clipped_policy_loss(log_probs, old_log_probs, advantages, clip_low=config.clip_ratio_low,
                             clip_high=config.clip_ratio_high, clip_dual=config.clip_ratio_dual,
                             log_ratio_clamp=config.log_ratio_clamp)
    pg_loss = aggregate(pg.loss, mask, config.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                        row_tokens=row_tokens)
    loss = pg_loss
    fmask = mask.to(log_probs.dtype)
    metrics: dict[str, Tensor] = {
        "pg_loss": pg_loss,
        "pg_clipfrac": tok_mean(pg.clipped.to(log_probs.dtype)),
        "pg_clipfrac_dual": tok_mean(pg.dual_clipped.to(log_probs.dtype)),
        "ratio_mean": tok_mean(pg.ratio),
        "ratio_max": _masked_extreme(pg.ratio, mask, largest=True),
        "ratio_min": _masked_extreme(pg.ratio, mask, largest=False),
        "approx_kl_old": tok_mean(old_log_probs - log_probs.detach()),
        "num_tokens": fmask.sum(),
    }

    if config.ref_kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError("papo loss: ref_kl_coef > 0 needs ref_log_probs (or set ref_kl_coef: 0)")
        ref_kl = kl_estimate(log_probs, ref_log_probs.to(log_probs.dtype), config.ref_kl_estimator,
                             log_ratio_clamp=config.log_ratio_clamp, max_value=config.ref_kl_clip)
        ref_kl_loss = aggregate(ref_kl, mask, config.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                row_tokens=row_tokens)
        loss = loss + config.ref_kl_coef * ref_kl_loss
        metrics["ref_kl"] = ref_kl_loss

    if masked_log_probs is not None and not config.masked_grad:
        masked_log_probs = masked_log_probs.detach()
    if config.gamma > 0:  # the KL term; entropy_coef_mask alone reads the masked branch below
        if config.kl_prcp_mode == "full":
            if full_kl is None:
                raise ValueError("papo loss: kl_prcp_mode='full' needs logits of both branches; "
                                 "call papo_loss(..., masked_logits=...)")
            raw = full_kl
        else:
            if masked_log_probs is None:
                raise ValueError("papo loss: gamma > 0 or entropy_coef_mask > 0 needs the masked branch: "
                                 "pass masked_log_probs (or masked_logits to papo_loss)")
            d = (masked_log_probs.to(log_probs.dtype) - log_probs).clamp(-config.log_ratio_clamp,
                                                                         config.log_ratio_clamp)
            raw = torch.exp(d) - d - 1.0
        kl_tok = raw.clamp(min=0.0, max=config.kl_prcp_clip)
        # aggregated like the policy term (config.loss_agg), as the reference does
        kl_prcp = aggregate(kl_tok, mask, config.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                            row_tokens=row_tokens)
        loss = loss - gamma * kl_prcp
        metrics["kl_prcp"] = kl_prcp.detach()
        metrics["kl_prcp_clipfrac"] = tok_mean((raw.detach() >= config.kl_prcp_clip).to(log_probs.dtype))

    if config.entropy_mode == "full":
        if entropy is None:
            raise ValueError("papo loss: entropy_mode='full' needs logits; call papo_loss(...)")
        h_orig, h_mask = entropy, masked_entropy
    else:
        h_orig = -log_probs
        h_mask = None if masked_log_probs is None else -masked_log_probs.to(log_probs.dtype)
    entropy_orig = tok_mean(h_orig)
    metrics["entropy_orig"] = entropy_orig.detach()
    if eta1 > 0:
        loss = loss + eta1 * entropy_orig
    if h_mask is not None:
        entropy_mask = tok_mean(h_mask)
        metrics["entropy_mask"] = entropy_mask.detach()
        if eta2 > 0:
            loss = loss + eta2 * entropy_mask
    elif eta2 > 0:
        raise ValueError("papo loss: entropy_coef_mask > 0 needs the masked branch")

    metrics["gamma"] = torch.tensor(gamma)
    metrics["loss"] = loss.detach()
    return loss, {k: v.detach() for k, v in metrics.items()}


def papo_loss_from_log_probs(log_probs: Tensor, old_log_probs: Tensor, masked_log_probs: Tensor | None,
                             advantages: Tensor, response_mask: Tensor, *, config: PapoLossConfig,
                             ref_log_probs: Tensor | None = None, step: int = 0,
                             num_tokens: Tensor | float | None = None,
                             num_seqs: Tensor | float | None = None,
                             row_tokens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PAPO objective from per-token log-probs alone (sampled-token forms "k3" and "sampled").

    Args:
        log_probs: [B, L] log pi_theta(o_t | q, I, o_<t), with gradient.
        old_log_probs: [B, L] same under the rollout weights (no grad).
        masked_log_probs: [B, L] log pi(o_t | q, I_mask, o_<t); detached unless config.masked_grad.
            May be None when the config does not use the masked branch (GRPO / DAPO).
        advantages: [B] or [B, L] group-normalised advantages.
        response_mask: [B, L] bool/0-1, 1 on response tokens that count.
        config: PapoLossConfig; kl_prcp_mode and entropy_mode must be the sampled forms.
        ref_log_probs: [B, L] under the frozen reference model; needed when ref_kl_coef > 0.
        step: optimizer step, for the gamma schedule.
        num_tokens / num_seqs: global normalisers under data/context parallelism (aggregation).
        row_tokens: [B] valid tokens of each whole row, when the L positions are a context-parallel
            shard (the per-sequence divisor of seq-mean-token-mean; ``aggregate``).
    Returns:
        (loss 0-dim with gradient, metrics: dict of detached 0-dim tensors).
    """
    if config.needs_logits:
        raise ValueError("papo_loss_from_log_probs: kl_prcp_mode='full' / entropy_mode='full' need logits; "
                         "use megatron_papo.losses.papo_loss")
    _check_shapes(response_mask, log_probs=log_probs, old_log_probs=old_log_probs,
                  masked_log_probs=masked_log_probs, advantages=advantages, ref_log_probs=ref_log_probs)
    mask = response_mask.bool()
    return _objective(_at_least_fp32(log_probs), _at_least_fp32(old_log_probs), advantages, mask, config,
                      masked_log_probs=masked_log_probs, full_kl=None, entropy=None, masked_entropy=None,
                      ref_log_probs=ref_log_probs, step=step, num_tokens=num_tokens, num_seqs=num_seqs,
                      row_tokens=row_tokens)


def papo_loss(logits: Tensor, target: Tensor, old_log_probs: Tensor, advantages: Tensor,
              response_mask: Tensor, *, config: PapoLossConfig, masked_logits: Tensor | None = None,
              masked_log_probs: Tensor | None = None, ref_log_probs: Tensor | None = None,
              tp_group: torch.distributed.ProcessGroup | None = None, vocab_size: int | None = None,
              step: int = 0, num_tokens: Tensor | float | None = None,
              num_seqs: Tensor | float | None = None,
              row_tokens: Tensor | None = None,
              check_finite: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """PAPO objective from vocab-parallel logits (every mode), via ops.papo_token_stats.

    ``check_finite`` validates the logits and targets in the ops (one host sync per call); the
    trainer passes False and relies on its non-finite-update guard and a per-step target check.

    Args:
        logits: [B, L, V_local] this TP rank's vocabulary slice, original image, with gradient.
        target: [B, L] global ids of the sampled tokens (logits at t predict target at t).
        masked_logits: [B, L, V_local] same positions under the masked image; detached unless
            config.masked_grad. If None, `masked_log_probs` [B, L] serves the sampled forms.
        tp_group, vocab_size: as in megatron_papo.ops (vocab_size = unpadded vocabulary).
        Others: as in papo_loss_from_log_probs.
    The logits are never modified; no [B, L, V_local] fp32 copy is made (chunked fused op).
    """
    if logits.dim() != 3:
        raise ValueError(f"papo_loss: logits must be [B, L, V_local], got shape {tuple(logits.shape)}")
    _check_shapes(response_mask, target=target, old_log_probs=old_log_probs, advantages=advantages,
                  masked_log_probs=masked_log_probs, ref_log_probs=ref_log_probs)
    if target.shape != logits.shape[:2]:
        raise ValueError(f"papo_loss: target {tuple(target.shape)} must match logits' leading dims "
                         f"{tuple(logits.shape[:2])}")
    full_kl = entropy = masked_entropy = None
    if masked_logits is not None:
        if masked_logits.shape != logits.shape:
            raise ValueError(f"papo_loss: masked_logits {tuple(masked_logits.shape)} must match logits "
                             f"{tuple(logits.shape)}")
        if not config.masked_grad:
            masked_logits = masked_logits.detach()
        stats = papo_token_stats(logits, masked_logits, target, tp_group, vocab_size, impl=config.op_impl,
                                 check_finite=check_finite)
        log_probs, masked_log_probs = stats.log_probs, stats.masked_log_probs
        full_kl, entropy, masked_entropy = stats.kl, stats.entropy, stats.masked_entropy
    else:
        _check_one_branch_modes(config, "masked_logits")
        log_probs = vocab_parallel_log_probs(logits, target, tp_group, vocab_size, check_finite=check_finite)
        if config.entropy_mode == "full":
            entropy = vocab_parallel_entropy(logits, tp_group, vocab_size, check_finite=check_finite)
    old_log_probs = _at_least_fp32(old_log_probs).to(log_probs.dtype)
    return _objective(log_probs, old_log_probs, advantages, response_mask.bool(), config,
                      masked_log_probs=masked_log_probs, full_kl=full_kl, entropy=entropy,
                      masked_entropy=masked_entropy, ref_log_probs=ref_log_probs, step=step,
                      num_tokens=num_tokens, num_seqs=num_seqs, row_tokens=row_tokens)


def _check_one_branch_modes(config: PapoLossConfig, masked_name: str) -> None:
    """The full forms that need the masked branch's logits (or hidden states) when only one came."""
    if config.kl_prcp_mode == "full" and config.gamma > 0:
        raise ValueError(f"papo_loss: kl_prcp_mode='full' needs {masked_name}")
    if config.entropy_mode == "full" and config.entropy_coef_mask > 0:
        raise ValueError(f"papo_loss: entropy_mode='full' with entropy_coef_mask > 0 needs {masked_name}")


def papo_loss_from_hidden(hidden: Tensor, output_weight: Tensor, target: Tensor, old_log_probs: Tensor,
                          advantages: Tensor, response_mask: Tensor, *, config: PapoLossConfig,
                          masked_hidden: Tensor | None = None, masked_log_probs: Tensor | None = None,
                          ref_log_probs: Tensor | None = None,
                          tp_group: torch.distributed.ProcessGroup | None = None,
                          vocab_size: int | None = None, step: int = 0,
                          num_tokens: Tensor | float | None = None, num_seqs: Tensor | float | None = None,
                          row_tokens: Tensor | None = None,
                          check_finite: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """``papo_loss`` of the logits ``hidden @ output_weight.T`` without forming them
    (ops.linear_papo_token_stats; ``loss.fused_linear``).

    Args:
        hidden: [B, L, H] the output layer's input on the original-image branch, with gradient
            (replicated over TP; its gradient is this rank's share, summed over TP by the
            model's output-layer region, compat.mcore_compat.output_layer_returns_hidden).
        output_weight: [V_local, H] this rank's output-layer weight (the shared embedding when tied).
        masked_hidden: [B, L, H] the masked-image branch; without ``config.masked_grad`` it and its
            logits count as constants (no gradient to it or, through it, to the weight).
        Others: as in papo_loss.
    """
    if hidden.dim() != 3:
        raise ValueError(f"papo_loss_from_hidden: hidden must be [B, L, H], got shape {tuple(hidden.shape)}")
    _check_shapes(response_mask, target=target, old_log_probs=old_log_probs, advantages=advantages,
                  masked_log_probs=masked_log_probs, ref_log_probs=ref_log_probs)
    if target.shape != hidden.shape[:2]:
        raise ValueError(f"papo_loss_from_hidden: target {tuple(target.shape)} must match hidden's leading "
                         f"dims {tuple(hidden.shape[:2])}")
    full_kl = entropy = masked_entropy = None
    if masked_hidden is not None:
        if not config.masked_grad:
            masked_hidden = masked_hidden.detach()
        stats = linear_papo_token_stats(hidden, masked_hidden, output_weight, target, tp_group, vocab_size,
                                        masked_weight_grad=config.masked_grad, check_finite=check_finite)
        log_probs, masked_log_probs = stats.log_probs, stats.masked_log_probs
        full_kl, entropy, masked_entropy = stats.kl, stats.entropy, stats.masked_entropy
    else:
        _check_one_branch_modes(config, "masked_hidden")
        log_probs, ent = linear_vocab_parallel_log_probs_entropy(hidden, output_weight, target, tp_group,
                                                                 vocab_size, check_finite=check_finite)
        if config.entropy_mode == "full":
            entropy = ent
    old_log_probs = _at_least_fp32(old_log_probs).to(log_probs.dtype)
    return _objective(log_probs, old_log_probs, advantages, response_mask.bool(), config,
                      masked_log_probs=masked_log_probs, full_kl=full_kl, entropy=entropy,
                      masked_entropy=masked_entropy, ref_log_probs=ref_log_probs, step=step,
                      num_tokens=num_tokens, num_seqs=num_seqs, row_tokens=row_tokens)


def config_field_names() -> tuple[str, ...]:
    """Names of PapoLossConfig fields (what YAML users write under `loss:`)."""
    return tuple(f.name for f in fields(PapoLossConfig))
