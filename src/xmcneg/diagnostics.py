"""Negative diagnostics (conf/train.yaml `diagnostics`): how hard a sampler's negatives are under the current model.

Every `every_steps` training steps (before that step), for a method with a sampler and a sampled loss
(`model.sampler`, `model.loss`: methods/classifier.py), on a fixed probe batch of `probe_docs` seeded training
documents, `draws` sets of negatives are drawn through the sampler's own `sample(batch, doc_emb)`; its stream is
put back afterwards, so training draws the same negatives as without diagnostics. Logged to every logger
(csv/metrics.csv, wandb) with `train_time_s`; the time they take is excluded from the train clock.

  diag/rank_pct       mean rank percentile of the sampled negatives among all C labels by score <f(x),w_y> + b_y:
                      100 * #(labels scoring below it) / (C - 1), so 100 = the document's top-scoring label (exact:
                      all labels are scored, eval.label_chunk at a time)
  diag/above_min_pos  share of sampled negatives scoring above the document's lowest-scoring positive
  diag/pos_hit        share of draws that hit a positive of the document (masked in training)
  diag/grad_snr       signal-to-noise ratio of G, the loss gradient w.r.t. the label matrix W (C x d), over draws of
                      negatives for the same probe batch: ||E G||^2 / E||G - E G||^2. From R draws G_1..G_R:
                      V = sum_r ||G_r - mean G||^2 / (R - 1), S = ||mean G||^2 - V / R (unbiased for ||E G||^2),
                      snr = S / V (may be < 0 by chance when S is small); NaN when V is float rounding (under 1e-5
                      of E||G||^2: negatives fixed by the batch, e.g. in_batch)
  diag/cost_s         seconds the call took
The first three are over the first draw and the non-padding negatives (pos_hit) or the real ones (the others).
"""
import time

import numpy as np
import pytorch_lightning as pl
import torch

from xmcneg.distributed import to_device
from xmcneg.methods.base import mask_positives


def _per_doc(neg, log_q, n_docs):
    """Shared negatives (U,) as per-document (B, U), the form the loss gets in methods/classifier.py."""
    return (neg.expand(n_docs, -1), log_q.expand(n_docs, -1)) if neg.dim() == 1 else (neg, log_q)


def count_below(h, w, b, s, chunk=262144):
    """(B, k): for each score s[i, j], the number of labels y with <h_i, w_y> + b_y < s[i, j] (by more than float
    rounding: 1e-5 relative, so a label never counts below its own score); memory bounded by `chunk` labels."""
    srt, order = (s - 1e-5 * s.abs().clamp(min=1)).sort(1)
    bins = torch.zeros(s.shape[0], s.shape[1] + 1, dtype=torch.long, device=s.device)
    for i in range(0, w.shape[0], chunk):
        first = torch.searchsorted(srt, (h @ w[i: i + chunk].T + b[i: i + chunk]).contiguous(), right=True)
        bins.scatter_add_(1, first, torch.ones_like(first))  # a label is below the negatives from `first` on
    return torch.empty_like(bins[:, :-1]).scatter_(1, order, bins[:, :-1].cumsum(1))


def label_grad(model, batch, h, neg, log_q, w, b):
    """(rows, grads): the loss gradient w.r.t. the label rows it touches (duplicates not yet summed)."""
    pos = batch["pos"]
    rows = torch.cat([pos.clamp(min=0), neg.clamp(min=0)], 1)
    wr = w[rows].requires_grad_(True)
    s = (wr @ h.unsqueeze(-1)).squeeze(-1) + b[rows]
    neg_mask = (neg >= 0) & mask_positives(neg, pos)
    log_q_pos = (model.sampler.log_prob(batch, h, pos.clamp(min=0))
                 if getattr(model.loss, "needs_log_q_pos", False) else None)
    loss = model.loss(s[:, : pos.shape[1]], (pos >= 0).float(), s[:, pos.shape[1]:], neg_mask.float(), log_q, log_q_pos)
    return rows.reshape(-1), torch.autograd.grad(loss, wr)[0].reshape(-1, w.shape[1])


def grad_snr(parts, dim):
    """snr (module docstring) from R draws' (rows, grads)."""
    uniq = torch.unique(torch.cat([r for r, _ in parts]))
    total, sq, R = torch.zeros(len(uniq), dim), 0.0, len(parts)
    for rows, g in parts:
        G = torch.zeros(len(uniq), dim).index_add_(0, torch.searchsorted(uniq, rows), g.float().cpu())
        sq += float(G.pow(2).sum())
        total += G
    m2 = float((total / R).pow(2).sum())
    var = (sq - R * m2) / (R - 1)
    return (m2 - var / R) / var if var > 1e-5 * max(sq / R, 1e-30) else float("nan")  # below: float32 rounding


@torch.no_grad()
def negative_stats(model, batch, draws=8, chunk=262144):
    """The diag/* values (module docstring) for `batch` under the model's current weights."""
    h = model.embed(batch["x"]).float()
    w, b = (t.float() for t in model.weights())
    pos, n = batch["pos"], h.shape[0]
    samples = [_per_doc(*model.sampler.sample(batch, h), n) for _ in range(max(int(draws), 2))]
    neg = samples[0][0]
    valid = neg >= 0
    hit = valid & ~mask_positives(neg, pos)
    real = valid & ~hit
    s_neg = (w[neg.clamp(min=0)] @ h.unsqueeze(-1)).squeeze(-1) + b[neg.clamp(min=0)]
    s_pos = (w[pos.clamp(min=0)] @ h.unsqueeze(-1)).squeeze(-1) + b[pos.clamp(min=0)]
    low = s_pos.masked_fill(pos < 0, float("inf")).min(1, keepdim=True).values
    has_pos = real & (pos >= 0).any(1, keepdim=True)
    pct = 100.0 * count_below(h, w, b, s_neg, chunk).double() / max(w.shape[0] - 1, 1)
    with torch.enable_grad():
        parts = [label_grad(model, batch, h, ng, lq, w, b) for ng, lq in samples]
    return {"diag/rank_pct": float(pct[real].mean()) if real.any() else float("nan"),
            "diag/above_min_pos": float((s_neg > low)[has_pos].float().mean()) if has_pos.any() else float("nan"),
            "diag/pos_hit": float(hit.sum() / valid.sum().clamp(min=1)),
            "diag/grad_snr": grad_snr(parts, w.shape[1])}


class NegativeDiagnostics(pl.Callback):
    def __init__(self, recorder, every_steps=200, probe_docs=32, draws=8, seed=0):
        self.recorder, self.every, self.docs, self.draws, self.seed = recorder, int(every_steps), int(probe_docs), \
            int(draws), int(seed)
        self.probe = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sampler = pl_module.sampler
        if (self.every <= 0 or sampler is None or getattr(pl_module, "loss", None) is None
                or not trainer.is_global_zero or pl_module.train_steps % self.every):
            return
        self.recorder.pause()
        t0 = time.perf_counter()
        if self.probe is None:
            n = trainer.datamodule.split("train")[1].shape[0]
            rows = np.sort(np.random.default_rng(self.seed).choice(n, min(self.docs, n), replace=False))
            self.probe = to_device(trainer.datamodule.collate("train")(rows), pl_module.device)
        state = sampler.generator.get_state()
        try:
            stats = negative_stats(pl_module, self.probe, self.draws, int(pl_module.evaluation.label_chunk))
        finally:
            sampler.generator.set_state(state)
        stats.update({"diag/cost_s": time.perf_counter() - t0, "train_time_s": self.recorder.elapsed()})
        for lg in trainer.loggers:
            lg.log_metrics(stats, step=pl_module.train_steps)
        self.recorder.start()
