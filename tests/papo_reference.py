"""Float64 single-process reference of the PAPO objective from full-vocabulary logits.

Written independently of megatron_papo.ops / losses (plain log_softmax + autograd) so the
library is checked against the formula, not against itself.
"""

import torch

from megatron_papo.losses import PapoLossConfig


def reference_papo_loss(logits, masked_logits, target, old_lp, adv, mask, ref_lp, cfg: PapoLossConfig,
                        vocab_size=None):
    """logits/masked_logits [B, L, V] (float64, may require grad), others [B, L]; adv [B].

    Token-mean aggregation; full or sampled KL_prcp / entropies per cfg; returns scalar loss.
    """
    if vocab_size is not None:  # drop padded columns
        logits, masked_logits = logits[..., :vocab_size], masked_logits[..., :vocab_size]
    if not cfg.masked_grad:
        masked_logits = masked_logits.detach()
    lp_all = torch.log_softmax(logits, -1)
    lq_all = torch.log_softmax(masked_logits, -1)
    lp = lp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    lq = lq_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    m = mask.to(lp.dtype)
    n = m.sum()
    mean = lambda v: (v * m).sum() / n
    ratio = torch.exp(lp - old_lp)
    a = adv.unsqueeze(1)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high))
    if cfg.clip_ratio_dual is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * cfg.clip_ratio_dual), pg)
    loss = mean(pg)
    if cfg.ref_kl_coef > 0:
        d = ref_lp - lp
        loss = loss + cfg.ref_kl_coef * mean((torch.exp(d) - d - 1).clamp(0, cfg.ref_kl_clip))
    if cfg.kl_prcp_mode == "full":
        kl = (lp_all.exp() * (lp_all - lq_all)).sum(-1)
    else:
        d = lq - lp
        kl = torch.exp(d) - d - 1
    loss = loss - cfg.gamma * mean(kl.clamp(0, cfg.kl_prcp_clip))
    if cfg.entropy_mode == "full":
        h_p = -(lp_all.exp() * lp_all).sum(-1)
        h_q = -(lq_all.exp() * lq_all).sum(-1)
    else:
        h_p, h_q = -lp, -lq
    return loss + cfg.entropy_coef_orig * mean(h_p) + cfg.entropy_coef_mask * mean(h_q)


def make_case(b=3, length=5, vocab=37, padded=None, seed=0):
    """Random float64 case: logits [b, length, padded or vocab] (pad columns hold garbage)."""
    g = torch.Generator().manual_seed(seed)
    width = padded or vocab
    logits = 3 * torch.randn(b, length, width, generator=g, dtype=torch.float64)
    masked = logits + torch.randn(b, length, width, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (b, length), generator=g)
    with torch.no_grad():
        full = torch.log_softmax(logits[..., :vocab], -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    old_lp = full + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    ref_lp = full + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, length, generator=g) > 0.25
    mask[:, 0] = True
    return logits, masked, target, old_lp, adv, mask, ref_lp
