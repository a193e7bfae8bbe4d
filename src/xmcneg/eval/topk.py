"""Exact top-k over all labels in (doc_chunk x label_chunk) blocks merged into a running top-k, so memory does not
grow with C; runs on ``doc_emb``'s device."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from xmcneg.errors import ConfigError

Correction = Callable[[torch.Tensor, int, int], torch.Tensor]


def score_inputs(doc_emb, label_w, label_b, k):
    """(float doc_emb, label_w, label_b as (C,) or None, int k); ConfigError('eval.k') unless 1 <= k <= C."""
    doc_emb = torch.as_tensor(doc_emb)
    if not doc_emb.is_floating_point():
        doc_emb = doc_emb.float()
    label_w = torch.as_tensor(label_w)
    label_b = None if label_b is None else torch.as_tensor(label_b).reshape(-1)
    k, C = int(k), label_w.shape[0]
    if k < 1 or k > C:
        raise ConfigError("eval.k", f"must be between 1 and the number of labels ({C}), got {k}")
    return doc_emb, label_w, label_b, k


@torch.no_grad()
def exact_topk(doc_emb, label_w, label_b=None, k: int = 5, doc_chunk: int = 2048, label_chunk: int = 262144,
               correction: Optional[Correction] = None):
    """Top-k ``(scores, ids)`` (N, k) of <doc_emb, label_w> + label_b (+ ``correction(doc_emb_chunk, start, end)``,
    the (n, end - start) term of labels start..end-1), by decreasing score."""
    doc_emb, label_w, label_b, k = score_inputs(doc_emb, label_w, label_b, k)
    device, dtype = doc_emb.device, doc_emb.dtype
    N, C = doc_emb.shape[0], label_w.shape[0]

    out_scores = torch.empty((N, k), dtype=dtype, device=device)
    out_ids = torch.empty((N, k), dtype=torch.long, device=device)
    if N == 0:
        return out_scores, out_ids

    for ds in range(0, N, doc_chunk):
        de = min(N, ds + doc_chunk)
        d = doc_emb[ds:de]
        best_s = best_i = None
        for ls in range(0, C, label_chunk):
            le = min(C, ls + label_chunk)
            w = label_w[ls:le].to(device=device, dtype=dtype)  # no copy when already there
            if label_b is not None:
                b = label_b[ls:le].to(device=device, dtype=dtype)
                s = torch.addmm(b.unsqueeze(0), d, w.t())
            else:
                s = d @ w.t()
            if correction is not None:
                s += correction(d, ls, le).to(device=device, dtype=dtype)
            kk = min(k, le - ls)
            cs, ci = torch.topk(s, kk, dim=1, largest=True, sorted=True)
            del s
            ci += ls
            if best_s is None:
                best_s, best_i = cs, ci
            else:
                ms = torch.cat([best_s, cs], dim=1)
                mi = torch.cat([best_i, ci], dim=1)
                best_s, pos = torch.topk(ms, min(k, ms.shape[1]), dim=1, largest=True, sorted=True)
                best_i = torch.gather(mi, 1, pos)
        out_scores[ds:de] = best_s
        out_ids[ds:de] = best_i
    return out_scores, out_ids
