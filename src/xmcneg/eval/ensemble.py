"""Ensembles of trained models scored at prediction time: the mean over members of each member's scores
standardised per document (minus their mean over all labels, divided by their standard deviation), so that
members trained with different losses (softmax logits, squared-hinge margins) weigh the same.

Ranking only needs ``sum_m (s_m - mu_m) / sd_m`` up to a per-document constant, i.e. ``sum_m s_m / sd_m``: with
``s_m = <h_m, w_ml> + b_ml`` that is one inner product of concatenated vectors, the document side
``[h_1 / sd_1, 1 / sd_1, h_2 / sd_2, ...]`` and the label side ``[w_1l, b_1l, w_2l, ...]``. ``sd_m`` over all
labels comes in closed form from ``W^T W``, ``W^T b`` and the means of ``W`` and ``b``, so the exact top-k of
:func:`xmcneg.eval.topk.exact_topk` scores the ensemble in (document x label) blocks without a (N, C) matrix.
A member with a wide head (`wide.enabled`) adds scores that are not an inner product: then every member's scores
of a batch of documents are standardised directly (:func:`standardised_rows`) and summed (`evaluate.ensemble_topk`)."""
from __future__ import annotations

import torch


@torch.no_grad()
def standardised(emb, w, b=None):
    """One member's (document side (N, d + 1), label side (C, d + 1)) whose inner products are its scores divided
    by their standard deviation over the labels for each document."""
    emb64, w64 = emb.double(), w.detach().double()
    C = w64.shape[0]
    b64 = torch.zeros(C, dtype=torch.float64) if b is None else b.detach().double().reshape(-1)
    mean = emb64 @ w64.mean(0) + b64.mean()
    second = ((emb64 @ (w64.T @ w64 / C)) * emb64).sum(1) + 2 * emb64 @ (w64.T @ b64 / C) + (b64 * b64).mean()
    inv_sd = (second - mean * mean).clamp_min(1e-12).rsqrt()
    docs = torch.cat([emb64 * inv_sd[:, None], inv_sd[:, None]], 1)
    return docs.float(), torch.cat([w64, b64[:, None]], 1).float()


def standardised_rows(s):
    """Scores (n, C) minus their mean over the labels, over their standard deviation, per document (the direct
    form, for members whose scores are not one inner product: a wide head's)."""
    s = s.double()
    return ((s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)).float()


def combine(members):
    """(document side, label side) of the ensemble of members given as (embeddings, W, b) triples."""
    parts = [standardised(e, w, b) for e, w, b in members]
    return torch.cat([d for d, _ in parts], 1), torch.cat([lab for _, lab in parts], 1)
