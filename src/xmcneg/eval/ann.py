"""Maximum-inner-product search over label vectors with bias (faiss: the index stores [w_y, b_y], a query is
[x, 1]) and the exact re-scoring of a shortlist shared by every method. IVF defaults (nlist = sqrt(C), nprobe 16,
sq8 storage) come from benchmarks/inference_cost.py; HNSW builds far slower on a few cores.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from xmcneg.errors import ConfigError
from xmcneg.eval.topk import score_inputs

log = logging.getLogger(__name__)
_GPU_WARNED = False
_KINDS = ("hnsw", "ivf", "flat")
_STORAGE = ("flat", "sq8")  # sq8: faiss' 8-bit scalar quantizer


def _np32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


class LabelIndex:
    """faiss inner-product index (kind "hnsw" | "ivf" | "flat") over label vectors (+ bias). storage
    for ivf/hnsw: "auto" (sq8 for ivf, flat for hnsw), "flat" or "sq8" (approximate scores, corrected by ann_topk's
    re-scoring). use_gpu="auto" moves flat / IVF indexes to a GPU when faiss has one. Builds are deterministic
    (IVF: seeded k-means sample; HNSW with `deterministic`: one insertion thread). `version` counts the builds."""

    def __init__(self, kind: str = "hnsw", M: int = 32, ef_search: int = 128, ef_construction: int = 200,
                 nlist: int | None = None, nprobe: int = 16, use_gpu="auto", seed: int = 1234,
                 deterministic: bool = True, max_train_points_per_list: int = 64, kmeans_iters: int = 10,
                 storage: str = "auto"):
        if kind not in _KINDS:
            raise ConfigError("index.kind", f"must be one of {_KINDS}, got {kind!r}")
        if storage == "auto":
            storage = "sq8" if kind == "ivf" else "flat"
        if storage not in _STORAGE:
            raise ConfigError("index.storage", f"must be 'auto' or one of {_STORAGE}, got {storage!r}")
        if use_gpu not in ("auto", True, False):
            raise ConfigError("index.use_gpu", f"must be 'auto', true or false, got {use_gpu!r}")
        for key, val in (("M", M), ("ef_search", ef_search), ("ef_construction", ef_construction),
                         ("nprobe", nprobe), ("nlist", 1 if nlist is None else nlist)):
            if int(val) < 1:
                raise ConfigError(f"index.{key}", f"must be >= 1, got {val!r}")
        self.kind, self.M, self.ef_search, self.ef_construction = kind, int(M), int(ef_search), int(ef_construction)
        self.nlist, self.nprobe = None if nlist is None else int(nlist), int(nprobe)
        self.use_gpu, self.seed, self.deterministic = use_gpu, int(seed), bool(deterministic)
        self.max_train_points_per_list, self.kmeans_iters = int(max_train_points_per_list), int(kmeans_iters)
        self.storage, self.version, self.index, self.num_labels, self.dim = storage, 0, None, 0, 0
        self.on_gpu, self._has_bias, self._index_dim = False, False, 0
        self._gpu_res, self.nlist_used = None, None

    def build(self, label_w, label_b=None) -> "LabelIndex":
        """(Re)build the index from label vectors (C, d) float32 and optional biases (C,)."""
        import faiss  # imported lazily: only needed when an index is used

        W = _np32(label_w)
        C, d = W.shape
        parts = [W]
        self._has_bias = label_b is not None
        if self._has_bias:
            parts.append(_np32(label_b).reshape(-1, 1))
        width = sum(p.shape[1] for p in parts)
        if self.kind != "flat" and self.storage != "flat" and width % 16:
            # faiss' SIMD scalar-quantizer kernels need d % 16 == 0 (else a slow scalar path): zero-pad
            parts.append(np.zeros((C, 16 - width % 16), dtype=np.float32))
        X = np.ascontiguousarray(np.hstack(parts)) if len(parts) > 1 else W
        self._index_dim = D = X.shape[1]
        metric = faiss.METRIC_INNER_PRODUCT
        qt = faiss.ScalarQuantizer.QT_8bit

        if self.kind == "flat":
            index = faiss.IndexFlatIP(D)
        elif self.kind == "hnsw":
            if self.storage == "flat":
                index = faiss.IndexHNSWFlat(D, self.M, metric)
            else:
                index = faiss.IndexHNSWSQ(D, qt, self.M, metric)
                index.train(self._train_sample(X, min(C, 65536)))
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
        else:  # ivf
            nlist = self.nlist if self.nlist is not None else int(round(math.sqrt(C)))
            nlist = max(1, min(nlist, C // 39 if C >= 39 else 1))
            self.nlist_used = nlist
            quantizer = faiss.IndexFlatIP(D)
            index = (faiss.IndexIVFFlat(quantizer, D, nlist, metric) if self.storage == "flat"
                     else faiss.IndexIVFScalarQuantizer(quantizer, D, nlist, qt, metric))
            index.cp.seed = self.seed
            index.cp.niter = self.kmeans_iters
            index.cp.max_points_per_centroid = max(self.max_train_points_per_list, 39)
            index.train(self._train_sample(X, nlist * max(self.max_train_points_per_list, 39)))
            index.nprobe = min(self.nprobe, nlist)
        prev = faiss.omp_get_max_threads()
        if self.deterministic and self.kind == "hnsw":
            faiss.omp_set_num_threads(1)
        try:
            index.add(X)
        finally:
            faiss.omp_set_num_threads(prev)

        self.on_gpu = False
        if self.kind in ("flat", "ivf") and self.use_gpu in ("auto", True):
            global _GPU_WARNED
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                try:
                    if self._gpu_res is None:
                        self._gpu_res = faiss.StandardGpuResources()
                    gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
                    if self.kind == "ivf":
                        gpu_index.nprobe = min(self.nprobe, self.nlist_used)
                    index, self.on_gpu = gpu_index, True
                except Exception as exc:  # e.g. an index type this faiss GPU build lacks
                    log.warning("faiss GPU index failed (%s), using CPU", exc)
            elif not _GPU_WARNED:
                log.info("faiss GPU not available, using CPU")
                _GPU_WARNED = True
        self.index = index
        self.num_labels, self.dim = C, d
        self.version += 1
        return self

    def _train_sample(self, X: np.ndarray, n: int) -> np.ndarray:
        """A seeded subsample of n rows of X (all rows when n >= len(X)), in index order."""
        if n >= X.shape[0]:
            return X
        rng = np.random.default_rng(self.seed)
        return np.ascontiguousarray(X[np.sort(rng.choice(X.shape[0], size=n, replace=False))])

    def search(self, queries, k: int):
        """Top-k labels by (approximate) score <q, w> + b: (scores (n, k) float32, ids (n, k) int64); missing
        results (IVF when the probed lists hold fewer than k labels) have id -1 and score -inf."""
        k = min(int(k), self.num_labels)
        Q = _np32(queries)
        if self._index_dim != self.dim:  # [q, 1 (bias), 0... (padding)]
            Q = np.hstack([Q, np.zeros((Q.shape[0], self._index_dim - self.dim), dtype=np.float32)])
            Q[:, self.dim] = 1.0 if self._has_bias else 0.0
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        D, I = self.index.search(Q, k)
        I = I.astype(np.int64, copy=False)
        return np.where(I >= 0, D, -np.inf).astype(np.float32, copy=False), I


@torch.no_grad()
def candidate_scores(doc_emb, label_w, cand, label_b=None, extra=None, chunk: int = 4096):
    """Exact scores <doc, w_y> (+ b_y) (+ extra(rows, ids)) of the candidate ids `cand` (N, S) of each document,
    -inf where the id is -1 (no candidate). Chunked over documents; float32 (N, S) on doc_emb's device."""
    N, device = doc_emb.shape[0], doc_emb.device
    cand = cand.to(device)
    out = torch.empty(cand.shape, dtype=doc_emb.dtype, device=device)
    for s in range(0, N, chunk):
        q, c = doc_emb[s: s + chunk], cand[s: s + chunk]
        safe = c.clamp(min=0).to(label_w.device)
        sc = torch.bmm(label_w[safe].to(device, q.dtype), q.unsqueeze(2)).squeeze(2)
        if label_b is not None:
            sc = sc + label_b[safe].to(device, q.dtype)
        if extra is not None:
            sc = sc + extra(slice(s, s + chunk), safe.to(device)).to(device, q.dtype)
        out[s: s + chunk] = sc
    return out.masked_fill(cand < 0, float("-inf"))


def topk_of_candidates(scores, cand, k: int):
    """Top-k of candidate scores (N, S) -> (scores, ids) (N, k); ids -1 / scores -inf where a row has fewer than
    k finite candidates."""
    kk = min(int(k), scores.shape[1])
    ts, at = torch.topk(scores, kk, dim=1)
    ti = torch.gather(cand.to(scores.device).clamp(min=0), 1, at).masked_fill(torch.isinf(ts) & (ts < 0), -1)
    if kk < k:
        ts = torch.cat([ts, ts.new_full((ts.shape[0], k - kk), float("-inf"))], 1)
        ti = torch.cat([ti, ti.new_full((ti.shape[0], k - kk), -1)], 1)
    return ts, ti


def ann_topk(doc_emb, label_w, label_b, k: int, index: LabelIndex, shortlist: int = 100,
             query_chunk: int = 4096, extra=None):
    """Top-k (scores, ids) of ``shortlist`` ANN candidates re-scored exactly (+ ``extra(rows, ids)``), padded with
    id -1 / score -inf; an ``index`` never built is built from (label_w, label_b)."""
    doc, W, B, k = score_inputs(doc_emb, label_w, label_b, k)
    C = W.shape[0]
    if index.version == 0:
        index.build(W, B)
    S = min(max(int(shortlist), k), C)
    out_s, out_i = [], []
    for s in range(0, doc.shape[0], query_chunk):
        q = doc[s: s + query_chunk]
        cand = torch.from_numpy(index.search(q, S)[1])
        shifted = None if extra is None else (lambda rows, ids, s=s: extra(slice(rows.start + s, rows.stop + s), ids))
        ts, ti = topk_of_candidates(candidate_scores(q, W, cand, B, shifted, chunk=query_chunk), cand, k)
        out_s.append(ts)
        out_i.append(ti)
    if not out_s:
        return doc.new_empty((0, k)), torch.empty((0, k), dtype=torch.long, device=doc.device)
    return torch.cat(out_s), torch.cat(out_i)


def recall_against_exact(ann_ids, exact_ids) -> float:
    """Mean over rows of the fraction of exact top-k ids (ignoring -1) that appear in the ANN top-k."""
    a, x = (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (ann_ids, exact_ids))
    valid = x >= 0
    found, nv = ((x[:, :, None] == a[:, None, :]).any(2) & valid).sum(1), valid.sum(1)
    rows = nv > 0
    return float((found[rows] / nv[rows]).mean()) if rows.any() else 0.0
