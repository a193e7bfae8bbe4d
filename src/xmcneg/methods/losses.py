"""Losses over positives and (sampled) negatives. Shapes: pos (B,P) with pos_mask, neg (B,k) with neg_mask,
log_q_neg (B,k) = log q(y|x) of one draw, k = number of draws. Masked entries never contribute.

- bce:     sum_valid softplus(-s_pos) + sum_valid softplus(s_neg), divided by the number of valid candidates.
- softmax: sampled softmax with logQ correction; per positive p:
           -log e^{s_p} / (e^{s_p} + sum_n e^{s_n - log(k q_n)}); other positives never enter the denominator
           (so with all C labels as negatives and q = 1/C, k = C this is exactly the full (decoupled) softmax).
- ns:      Bamler & Mandt binary logistic negative sampling: mean_p softplus(-s_p) + (1/k) sum_n softplus(s_n),
           optional regulariser reg_lambda * [(s_p + log q_p)^2 + (1/k) sum_n (s_n + log q_n)^2].
"""
import math

import torch
import torch.nn.functional as F

from xmcneg.errors import ConfigError

LOSSES = ("bce", "softmax", "ns")


def check_loss(name):
    if name not in LOSSES:
        raise ConfigError("loss.name", f"unknown loss '{name}', expected one of {', '.join(LOSSES)}")


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def bce_loss(pos, pos_mask, neg, neg_mask):
    total = (F.softplus(-pos) * pos_mask).sum() + (F.softplus(neg) * neg_mask).sum()
    return total / (pos_mask.sum() + neg_mask.sum()).clamp(min=1)


def sampled_softmax_loss(pos, pos_mask, neg, neg_mask, log_q_neg, num_draws=None):
    k = neg.shape[-1] if num_draws is None else num_draws
    corrected = neg - (log_q_neg + math.log(k))
    corrected = corrected.masked_fill(~neg_mask.bool(), float("-inf"))
    neg_lse = torch.logsumexp(corrected, dim=-1, keepdim=True)  # (B,1); -inf when no valid negative
    denom = torch.logaddexp(pos, neg_lse.expand_as(pos))
    return _masked_mean(denom - pos, pos_mask)


def ns_loss(pos, pos_mask, neg, neg_mask, log_q_pos=None, log_q_neg=None, reg_lambda=0.0):
    doc_has_pos = (pos_mask.sum(1) > 0).float()
    pos_term = (F.softplus(-pos) * pos_mask).sum(1) / pos_mask.sum(1).clamp(min=1)
    neg_term = (F.softplus(neg) * neg_mask).sum(1) / neg_mask.sum(1).clamp(min=1)
    per_doc = pos_term + neg_term
    if reg_lambda > 0:
        if log_q_pos is None:
            raise ConfigError("loss.reg_lambda", "the regulariser needs a sampler that gives log q of positives")
        rp = ((pos + log_q_pos) ** 2 * pos_mask).sum(1) / pos_mask.sum(1).clamp(min=1)
        rn = ((neg + log_q_neg) ** 2 * neg_mask).sum(1) / neg_mask.sum(1).clamp(min=1)
        per_doc = per_doc + reg_lambda * (rp + rn)
    return (per_doc * doc_has_pos).sum() / doc_has_pos.sum().clamp(min=1)


def compute_loss(cfg, pos, pos_mask, neg, neg_mask, log_q_neg, log_q_pos=None):
    name = cfg.name
    if name == "bce":
        return bce_loss(pos, pos_mask, neg, neg_mask)
    if name == "softmax":
        return sampled_softmax_loss(pos, pos_mask, neg, neg_mask, log_q_neg)
    return ns_loss(pos, pos_mask, neg, neg_mask, log_q_pos, log_q_neg, float(cfg.get("reg_lambda", 0.0)))
