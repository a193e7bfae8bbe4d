"""Losses over positives and (sampled) negatives. Shapes: pos (B,P) with pos_mask, neg (B,k) with neg_mask,
log_q_neg (B,k) = log q(y|x) of one draw, k = number of draws. Masked entries never contribute.
conf/loss/<name>.yaml instantiates one of the classes at the end (`BCE`, `SampledSoftmax`, `NegativeSampling`,
`SquaredHinge`).

- bce:     sum_valid softplus(-s_pos) + sum_valid softplus(s_neg), divided by the number of valid candidates.
- softmax: sampled softmax with logQ correction; per positive p:
           -log e^{s_p} / (e^{s_p} + sum_n e^{s_n - log(k q_n)}); other positives never enter the denominator
           (so with all C labels as negatives and q = 1/C, k = C this is exactly the full (decoupled) softmax).
- ns:      Bamler & Mandt binary logistic negative sampling: mean_p softplus(-s_p) + (1/k) sum_n softplus(s_n),
           optional regulariser reg_lambda * [(s_p + log q_p)^2 + (1/k) sum_n (s_n + log q_n)^2].
- sq_hinge: one-vs-rest squared hinge (the L2-loss SVM of linear XMC models): per document
           sum_valid max(0, 1 - s_pos)^2 + sum_valid max(0, 1 + s_neg)^2, averaged over documents.
"""
import math

import torch
import torch.nn.functional as F

from xmcneg.errors import ConfigError


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _row_mean(x, mask):
    """Per row, the mean of x over the mask's entries (0 for an empty row)."""
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def bce_loss(pos, pos_mask, neg, neg_mask):
    total = (F.softplus(-pos) * pos_mask).sum() + (F.softplus(neg) * neg_mask).sum()
    return total / (pos_mask.sum() + neg_mask.sum()).clamp(min=1)


def sampled_softmax_loss(pos, pos_mask, neg, neg_mask, log_q_neg):
    corrected = (neg - (log_q_neg + math.log(neg.shape[-1]))).masked_fill(~neg_mask.bool(), float("-inf"))
    neg_lse = torch.logsumexp(corrected, dim=-1, keepdim=True)  # (B,1); -inf when no valid negative
    return _masked_mean(torch.logaddexp(pos, neg_lse.expand_as(pos)) - pos, pos_mask)


def ns_loss(pos, pos_mask, neg, neg_mask, log_q_pos=None, log_q_neg=None, reg_lambda=0.0):
    doc_has_pos = (pos_mask.sum(1) > 0).float()
    per_doc = _row_mean(F.softplus(-pos), pos_mask) + _row_mean(F.softplus(neg), neg_mask)
    if reg_lambda > 0:
        if log_q_pos is None:
            raise ConfigError("loss.reg_lambda", "the regulariser needs a sampler that gives log q of positives")
        reg = _row_mean((pos + log_q_pos) ** 2, pos_mask) + _row_mean((neg + log_q_neg) ** 2, neg_mask)
        per_doc = per_doc + reg_lambda * reg
    return (per_doc * doc_has_pos).sum() / doc_has_pos.sum().clamp(min=1)


class BCE:
    """Binary cross-entropy; the sampler's bias is corrected at prediction time (samplers/base.py)."""
    name, logq_corrected = "bce", False

    def __call__(self, pos, pos_mask, neg, neg_mask, log_q_neg, log_q_pos=None):
        return bce_loss(pos, pos_mask, neg, neg_mask)

    def full(self, logits, target, pos):
        """The loss over all labels: logits (B, C), target (B, C) bool, pos (B, P) padded with -1."""
        return F.binary_cross_entropy_with_logits(logits, target.float())


class SampledSoftmax:
    """Sampled softmax with logQ correction (no prediction-time correction needed)."""
    name, logq_corrected = "softmax", True

    def __call__(self, pos, pos_mask, neg, neg_mask, log_q_neg, log_q_pos=None):
        return sampled_softmax_loss(pos, pos_mask, neg, neg_mask, log_q_neg)

    def full(self, logits, target, pos):
        """Decoupled full softmax: other positives never enter the denominator."""
        pos_mask = pos >= 0
        s_pos = logits.gather(1, pos.clamp(min=0))
        neg_lse = torch.logsumexp(logits.masked_fill(target, float("-inf")), dim=1, keepdim=True)
        return _masked_mean(torch.logaddexp(s_pos, neg_lse.expand_as(s_pos)) - s_pos, pos_mask)


class SquaredHinge:
    """One-vs-rest squared hinge; scores are margins, not log-probabilities: no prediction-time correction."""
    name, logq_corrected = "sq_hinge", True

    def __call__(self, pos, pos_mask, neg, neg_mask, log_q_neg, log_q_pos=None):
        per_doc = (F.relu(1 - pos) ** 2 * pos_mask).sum(1) + (F.relu(1 + neg) ** 2 * neg_mask).sum(1)
        return per_doc.mean()

    def full(self, logits, target, pos):
        return (F.relu(1 - torch.where(target, logits, -logits)) ** 2).sum(1).mean()


class NegativeSampling:
    """Bamler & Mandt's binary logistic NS loss (+ the optional regulariser); needs sampled negatives."""
    name, logq_corrected = "ns", False

    def __init__(self, reg_lambda: float = 0.0):
        if float(reg_lambda) < 0:
            raise ConfigError("loss.reg_lambda", f"must be >= 0, got {reg_lambda}")
        self.reg_lambda = float(reg_lambda)
        self.needs_log_q_pos = self.reg_lambda > 0

    def __call__(self, pos, pos_mask, neg, neg_mask, log_q_neg, log_q_pos=None):
        return ns_loss(pos, pos_mask, neg, neg_mask, log_q_pos, log_q_neg, self.reg_lambda)
