"""XC metrics with xclib's conventions. P@k and nDCG@k (IDCG over min(k, #true)) are means over all N points
(a point without labels counts 0); PSP@k and PSnDCG@k are ratios of sums over points: inverse propensities of the
hits (discounted by 1 / log2(j + 2) for PSnDCG) over the best achievable; R@k is the mean over points with labels
of #hits / #true. ``topk`` (N, K) holds label ids by decreasing score; ids outside [0, C) count as wrong.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from xmcneg.errors import ConfigError

_ROW_BLOCK = 65536


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_csr(Y) -> sp.csr_matrix:
    Y = sp.csr_matrix(Y, copy=True)
    Y.sum_duplicates()  # also sorts indices
    Y.eliminate_zeros()
    return Y


def propensities(train_Y, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """Label propensities of Jain et al. (2016), (C,) float64: p_l = 1 / (1 + c * exp(-a * log(n_l + b))),
    c = (log N - 1) * (b + 1)^a, with n_l the training points carrying label l and N the training points."""
    if not (a > 0):
        raise ConfigError("dataset.propensity_a", f"must be > 0, got {a!r}")
    if not (b > 0):
        raise ConfigError("dataset.propensity_b", f"must be > 0, got {b!r}")
    Y = _as_csr(train_Y)
    n_points = Y.shape[0]
    counts = np.bincount(Y.indices, minlength=Y.shape[1]).astype(np.float64)
    c = (np.log(max(n_points, 1)) - 1.0) * (b + 1.0) ** a
    return 1.0 / (1.0 + c * np.exp(-a * np.log(counts + b)))


def inverse_propensities(train_Y, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """``1 / propensities(train_Y, a, b)`` — the ``inv_prop`` argument of :func:`xc_metrics`."""
    return 1.0 / propensities(train_Y, a, b)


def _hits(topk_block: np.ndarray, rows_offset: int, Y: sp.csr_matrix) -> np.ndarray:
    """Boolean (n, K): whether topk_block[i, j] is a true label of point rows_offset + i."""
    n, K = topk_block.shape
    C = Y.shape[1]
    lo, hi = Y.indptr[rows_offset], Y.indptr[rows_offset + n]
    local_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(Y.indptr[rows_offset: rows_offset + n + 1]))
    true_keys = local_rows * C + Y.indices[lo:hi].astype(np.int64)  # sorted: rows ascending, indices sorted
    valid = (topk_block >= 0) & (topk_block < C)
    pred_keys = np.arange(n, dtype=np.int64)[:, None] * C + np.where(valid, topk_block, 0)
    if true_keys.size == 0:
        return np.zeros((n, K), dtype=bool)
    pos = np.searchsorted(true_keys, pred_keys)
    pos = np.minimum(pos, true_keys.size - 1)
    return valid & (true_keys[pos] == pred_keys)


def _ideal_prop_sums(Y: sp.csr_matrix, inv_prop: np.ndarray, ks, discount: np.ndarray):
    """Per k: (sum over points of the top-min(k,#true) inv_prop, same with position discounts)."""
    n = Y.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(Y.indptr))
    vals = inv_prop[Y.indices]
    order = np.lexsort((-vals, rows))  # by row, then by decreasing inv_prop
    vals = vals[order]
    rank = np.arange(vals.size, dtype=np.int64) - Y.indptr[rows]  # rows already sorted
    out_p, out_n = {}, {}
    for k in ks:
        m = rank < k
        out_p[k] = float(vals[m].sum())
        out_n[k] = float((vals[m] * discount[rank[m]]).sum())
    return out_p, out_n


def xc_metrics(topk, true_Y, inv_prop=None, ks=(1, 3, 5), recall_ks=(10, 100)) -> dict[str, float]:
    """P@k and nDCG@k (k in ks), PSP@k and PSnDCG@k (given ``inv_prop`` (C,)) and R@k (k in recall_ks, k <= K)
    of predictions ``topk`` (N, K) against the scipy sparse (N, C) ground truth ``true_Y`` (module docstring)."""
    topk = _to_numpy(topk).astype(np.int64, copy=False)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (N, K), got shape {topk.shape}")
    Y = _as_csr(true_Y)
    N, K = topk.shape
    if Y.shape[0] != N:
        raise ValueError(f"topk has {N} rows but true_Y has {Y.shape[0]}")
    C = Y.shape[1]
    ks = tuple(int(k) for k in ks)
    rks = tuple(int(k) for k in recall_ks if int(k) <= K)
    if inv_prop is not None:
        inv_prop = _to_numpy(inv_prop).astype(np.float64).reshape(-1)
        if inv_prop.shape[0] != C:
            raise ValueError(f"inv_prop has {inv_prop.shape[0]} entries, true_Y has {C} labels")
    kmax = max(ks + rks) if (ks + rks) else 1
    discount = 1.0 / np.log2(np.arange(max(kmax, 1), dtype=np.float64) + 2.0)  # (kmax,)
    cum_disc = np.concatenate([[0.0], np.cumsum(discount)])  # cum_disc[m] = IDCG for m true in top

    n_true = np.diff(Y.indptr).astype(np.int64)
    p_sum, ndcg_sum, psp_num, psn_num = ({k: 0.0 for k in ks} for _ in range(4))
    rec_sum = {k: 0.0 for k in rks}

    Kc = min(K, kmax)
    for s in range(0, N, _ROW_BLOCK):
        e = min(N, s + _ROW_BLOCK)
        blk = topk[s:e, :Kc]
        hits = _hits(blk, s, Y).astype(np.float64)  # (n, Kc)
        nt = n_true[s:e]
        cum_hits = np.cumsum(hits, axis=1) if Kc > 0 else np.zeros((e - s, 0))
        dcg = np.cumsum(hits * discount[:Kc], axis=1) if Kc > 0 else cum_hits
        if inv_prop is not None:
            w = np.where(blk >= 0, inv_prop[np.clip(blk, 0, C - 1)], 0.0) * hits
            cum_w = np.cumsum(w, axis=1) if Kc > 0 else cum_hits
            cum_wd = np.cumsum(w * discount[:Kc], axis=1) if Kc > 0 else cum_hits
        for k in ks:
            j = min(k, Kc) - 1  # last available column within the top k
            if j < 0:
                continue
            p_sum[k] += cum_hits[:, j].sum() / k
            idcg = cum_disc[np.minimum(nt, k)]
            ndcg_sum[k] += np.divide(dcg[:, j], idcg, out=np.zeros_like(idcg), where=idcg > 0).sum()
            if inv_prop is not None:
                psp_num[k] += cum_w[:, j].sum()
                psn_num[k] += cum_wd[:, j].sum()
        for k in rks:
            has = nt > 0
            rec_sum[k] += (cum_hits[has, k - 1] / nt[has]).sum()

    denom = max(N, 1)
    out = {f"P@{k}": float(p_sum[k] / denom) for k in ks}
    out.update({f"nDCG@{k}": float(ndcg_sum[k] / denom) for k in ks})
    if inv_prop is not None:
        ideal_p, ideal_n = _ideal_prop_sums(Y, inv_prop, ks, discount)  # len(discount) >= max(ks)
        out.update({f"PSP@{k}": float(psp_num[k] / ideal_p[k]) if ideal_p[k] > 0 else 0.0 for k in ks})
        out.update({f"PSnDCG@{k}": float(psn_num[k] / ideal_n[k]) if ideal_n[k] > 0 else 0.0 for k in ks})
    n_with = int((n_true > 0).sum())
    for k in rks:
        out[f"R@{k}"] = float(rec_sum[k] / n_with) if n_with > 0 else 0.0
    return out


def filter_predictions(topk, scores, filter_pairs):
    """New ``(topk, scores)`` (numpy or torch, as given; scores may be None) without the (doc, label) pairs of
    ``filter_pairs`` (M, 2): a filtered entry becomes -1 (score -inf) at the end of its row, the rest keep order."""
    ids = _to_numpy(topk).astype(np.int64, copy=True)
    sc = None if scores is None else _to_numpy(scores).copy()
    pairs = _to_numpy(filter_pairs).astype(np.int64).reshape(-1, 2)
    if pairs.size and ids.size:
        N = ids.shape[0]
        keep = (pairs[:, 0] >= 0) & (pairs[:, 0] < N) & (pairs[:, 1] >= 0)
        pairs = pairs[keep]
        rows = np.unique(pairs[:, 0])  # only rows named by some pair can change
        if rows.size:
            width = int(max(ids.max(), pairs[:, 1].max(), 0)) + 1
            sub = ids[rows]
            keys = rows[:, None] * width + np.where(sub >= 0, sub, 0)
            drop = (sub >= 0) & np.isin(keys, pairs[:, 0] * width + pairs[:, 1])
            if drop.any():
                sub[drop] = -1
                order = np.argsort(drop, axis=1, kind="stable")  # kept first, in their original order
                ids[rows] = np.take_along_axis(sub, order, axis=1)
                if sc is not None:
                    ssub = sc[rows]
                    if np.issubdtype(ssub.dtype, np.floating):
                        ssub[drop] = -np.inf
                    sc[rows] = np.take_along_axis(ssub, order, axis=1)
    if not hasattr(topk, "detach"):  # numpy in, numpy out
        return ids, sc
    import torch

    return torch.from_numpy(ids).to(topk.device), None if sc is None else torch.from_numpy(sc).to(scores.device)


def split_metrics(dm, split, idx, topk, inv_prop=None):
    """`xc_metrics` of the top-k label ids `topk` of rows `idx` of datamodule `dm`'s `split`, after dropping the
    split's filter pairs (LF benchmarks; a datamodule without `filter_pairs` has none)."""
    pairs = dm.filter_pairs(split, idx=idx) if hasattr(dm, "filter_pairs") else None
    if pairs is not None:
        topk, _ = filter_predictions(topk, None, pairs)
    return xc_metrics(topk, dm.split(split)[1][idx], inv_prop)
