"""Seeded synthetic XMC datasets: Zipf label popularity, labels in ``K`` clusters that share features (cluster
mates are each other's hard negatives), documents whose tokens come from their labels' cluster and own features or
a Zipf background (``MIX``); values ``(1 + log tf) * idf``, rows L2-normalised. :func:`generate` writes the XC
BoW splits, with ``write_text`` the text layout (words ``w{feature id}``), ``meta.json`` last; same arguments, same
bytes.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from omegaconf import DictConfig, OmegaConf

from xmcneg.data import formats
from xmcneg.data.tfidf import doc_freq, smooth_idf, tfidf_l2, weighted
from xmcneg.errors import ConfigError

GENERATOR_VERSION = 1
FEATS_PER_CLUSTER = 12
FEATS_PER_LABEL = 3
SAME_CLUSTER = 0.8
MIX = (0.6, 0.3, 0.1)  # background, cluster, label
BACKGROUND_ZIPF = 1.0
_REDRAWS = 8


class _Structure:
    """The latent label/feature structure shared by all splits."""

    def __init__(self, rng, C, F, K, zipf_a):
        self.C, self.F, self.K = C, F, K
        w = np.arange(1, C + 1, dtype=np.float64) ** -float(zipf_a)
        pop = np.empty(C, dtype=np.float64)
        pop[rng.permutation(C)] = w / w.sum()
        self.cdf = np.cumsum(pop)
        self.cdf /= self.cdf[-1]
        self.cluster = rng.integers(K, size=C).astype(np.int32)
        # labels sorted by cluster, with a popularity CDF over that order for within-cluster draws
        self.order = np.argsort(self.cluster, kind="stable")
        self.ccdf = np.cumsum(pop[self.order])
        self.cstart = np.searchsorted(self.cluster[self.order], np.arange(K), side="left")
        self.cend = np.searchsorted(self.cluster[self.order], np.arange(K), side="right")
        self.cluster_feats = rng.integers(F, size=(K, FEATS_PER_CLUSTER)).astype(np.int64)
        self.label_feats = rng.integers(F, size=(C, FEATS_PER_LABEL)).astype(np.int64)
        bw = np.arange(1, F + 1, dtype=np.float64) ** -BACKGROUND_ZIPF
        self.bg_perm = rng.permutation(F)
        self.bg_cdf = np.cumsum(bw)
        self.bg_cdf /= self.bg_cdf[-1]

    def draw_popular(self, rng, n):
        return np.minimum(np.searchsorted(self.cdf, rng.random(n), side="right"), self.C - 1)

    def draw_in_cluster(self, rng, clusters):
        lo, hi = self.cstart[clusters], self.cend[clusters]
        base = np.where(lo > 0, self.ccdf[np.maximum(lo - 1, 0)], 0.0)
        mass = self.ccdf[hi - 1] - base
        pos = np.searchsorted(self.ccdf, base + rng.random(len(clusters)) * mass, side="right")
        pos = np.clip(pos, lo, hi - 1)
        return self.order[pos]


def _make_split(rng, S: _Structure, n, avg_labels, doc_len):
    """Labels (CSR, binary) and token sequences (doc pointer, feature ids) of ``n`` documents."""
    C = S.C
    nlab = np.minimum(1 + rng.poisson(max(float(avg_labels) - 1.0, 0.0), size=n), C)
    slot_ptr = np.concatenate(([0], np.cumsum(nlab)))
    total = int(slot_ptr[-1])
    doc_of_slot = np.repeat(np.arange(n, dtype=np.int64), nlab)
    first_slots = slot_ptr[:-1]
    labels = np.empty(total, dtype=np.int64)
    labels[first_slots] = S.draw_popular(rng, n)
    first_cluster = S.cluster[labels[first_slots]]
    todo = np.setdiff1d(np.arange(total), first_slots)
    for _ in range(_REDRAWS):  # redraw labels that repeat one of the document's, so docs keep ~avg_labels
        if len(todo) == 0:
            break
        same = rng.random(len(todo)) < SAME_CLUSTER
        new = S.draw_popular(rng, len(todo))
        new[same] = S.draw_in_cluster(rng, first_cluster[doc_of_slot[todo[same]]])
        labels[todo] = new
        key = doc_of_slot * C + labels
        order = np.argsort(key, kind="stable")
        dup = np.zeros(total, dtype=bool)
        dup[order[1:]] = key[order[1:]] == key[order[:-1]]
        todo = np.flatnonzero(dup)
    Y = sp.csr_matrix((np.ones(total, dtype=np.float32), (doc_of_slot, labels)), shape=(n, C))
    Y.sum_duplicates()
    Y.data[:] = 1.0

    # tokens
    lens = np.maximum(rng.poisson(float(doc_len), size=n), 1)
    tok_ptr = np.concatenate(([0], np.cumsum(lens)))
    T = int(tok_ptr[-1])
    doc_of_tok = np.repeat(np.arange(n, dtype=np.int64), lens)
    ny = np.diff(Y.indptr)
    pick = Y.indptr[doc_of_tok] + np.minimum((rng.random(T) * ny[doc_of_tok]).astype(np.int64),
                                             ny[doc_of_tok] - 1)
    lab = Y.indices[pick].astype(np.int64)
    comp = np.searchsorted(np.cumsum(MIX)[:-1], rng.random(T), side="right")  # 0 bg, 1 cluster, 2 label
    slot = rng.random(T)
    feats = np.empty(T, dtype=np.int64)
    m = comp == 0
    feats[m] = S.bg_perm[np.minimum(np.searchsorted(S.bg_cdf, slot[m], side="right"), S.F - 1)]
    m = comp == 1
    feats[m] = S.cluster_feats[S.cluster[lab[m]], (slot[m] * FEATS_PER_CLUSTER).astype(np.int64)]
    m = comp == 2
    feats[m] = S.label_feats[lab[m], (slot[m] * FEATS_PER_LABEL).astype(np.int64)]
    return Y, tok_ptr, feats


def _write_docs_text(path, words, tok_ptr, feats):
    def lines(lo, hi):
        ws = words[feats[tok_ptr[lo]:tok_ptr[hi]]].tolist()
        ptr = (tok_ptr[lo:hi + 1] - tok_ptr[lo]).tolist()
        return [" ".join(ws[ptr[i]:ptr[i + 1]]) for i in range(hi - lo)]

    formats.write_rows(path, None, len(tok_ptr) - 1, lines)


def _write_label_text(path, words, S: _Structure, label_text_len):
    n_own = min(FEATS_PER_LABEL, (label_text_len + 1) // 2)
    n_clu = min(FEATS_PER_CLUSTER, label_text_len - n_own)

    def lines(lo, hi):
        ids = np.concatenate([S.label_feats[lo:hi, :n_own], S.cluster_feats[S.cluster[lo:hi], :n_clu]], axis=1)
        return [" ".join(r) for r in words[ids].tolist()]

    formats.write_rows(path, None, S.C, lines)


_INT_MIN = {"num_labels": 2, "num_features": 2, "num_train": 1, "num_test": 1, "num_val": 0, "seed": 0,
            "doc_len": 1, "label_text_len": 1}  # the integer parameters and their smallest values


def _normalise(kwargs) -> dict:
    """Fill defaults, coerce types (so equal settings hash equally: 3 vs 3.0, '0' vs 0) and check the values."""
    p = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
    try:
        p.update({k: int(p[k]) for k in _INT_MIN})
        p.update(avg_labels=float(p["avg_labels"]), zipf_a=float(p["zipf_a"]))
        p["num_clusters"] = None if p["num_clusters"] in (None, "null", "None") else int(p["num_clusters"])
        p["write_text"] = bool(p["write_text"])
    except (TypeError, ValueError) as e:
        raise ConfigError("dataset", f"bad synthetic-data parameter: {e}") from None
    for k, lo in _INT_MIN.items():
        if p[k] < lo:
            raise ConfigError(f"dataset.{k}", f"must be >= {lo}, got {p[k]}")
    if not p["avg_labels"] >= 1.0:
        raise ConfigError("dataset.avg_labels", f"must be >= 1, got {p['avg_labels']}")
    if not p["zipf_a"] >= 0.0:
        raise ConfigError("dataset.zipf_a", f"must be >= 0, got {p['zipf_a']}")
    k = p["num_clusters"]
    if k is not None and not 1 <= k <= p["num_labels"]:
        raise ConfigError("dataset.num_clusters", f"must be between 1 and num_labels={p['num_labels']}, got {k}")
    return p


def generate(out_dir, num_labels=1000, num_features=5000, num_train=20000, num_test=2000, num_val=0, seed=0,
             avg_labels=3.0, zipf_a=1.0, num_clusters=None, doc_len=40, label_text_len=4,
             write_text=True) -> Path:
    """Generate a dataset into ``out_dir`` (created if needed; see the module docstring). Returns ``out_dir``."""
    p = _normalise({k: v for k, v in locals().items() if k != "out_dir"})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    C, F = p["num_labels"], p["num_features"]
    K = p["num_clusters"] or max(1, min(C, int(round(math.sqrt(C)))))
    ss_struct, ss_train, ss_test, ss_val = np.random.SeedSequence([p["seed"], GENERATOR_VERSION]).spawn(4)
    S = _Structure(np.random.default_rng(ss_struct), C, F, K, p["zipf_a"])

    splits = [("train", "trn", p["num_train"], ss_train), ("test", "tst", p["num_test"], ss_test)]
    if p["num_val"] > 0:
        splits.append(("val", "val", p["num_val"], ss_val))
    words = np.array([f"w{i}" for i in range(F)]) if p["write_text"] else None
    idf = None
    stats, files = {}, []
    for name, short, n, ss in splits:
        Y, tok_ptr, feats = _make_split(np.random.default_rng(ss), S, n, p["avg_labels"], p["doc_len"])
        doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(tok_ptr))
        counts = sp.csr_matrix((np.ones(len(feats), dtype=np.float32), (doc, feats)), shape=(n, F))
        counts.sum_duplicates()
        if idf is None:  # training split comes first
            idf = smooth_idf(doc_freq(counts), n)
        X = tfidf_l2(weighted(counts, idf, log_tf=True, dtype=np.float64).astype(np.float32), dtype=np.float64)
        X.sort_indices()
        del counts
        formats.write_xc_bow(out / f"{name}.txt", X, Y)
        files.append(f"{name}.txt")
        if p["write_text"]:
            _write_docs_text(out / f"{short}_X.txt", words, tok_ptr, feats)
            formats.write_xy(out / f"{short}_X_Y.txt", Y)
            files += [f"{short}_X.txt", f"{short}_X_Y.txt"]
        stats[name] = {"points": int(n), "avg_labels": round(float(Y.nnz) / max(n, 1), 4),
                       "avg_features": round(float(X.nnz) / max(n, 1), 4),
                       "labels_used": int(np.count_nonzero(np.bincount(Y.indices, minlength=C)))}
        del X, Y, tok_ptr, feats
    if p["write_text"]:
        _write_label_text(out / "lbl_X.txt", words, S, p["label_text_len"])
        files.append("lbl_X.txt")
    np.save(out / "label_cluster.npy", S.cluster)
    files.append("label_cluster.npy")
    meta = {
        "generator": "xmcneg.data.synthetic", "version": GENERATOR_VERSION, "params": p,
        "num_clusters": int(K), "feats_per_cluster": FEATS_PER_CLUSTER, "feats_per_label": FEATS_PER_LABEL,
        "same_cluster": SAME_CLUSTER, "mix_background_cluster_label": list(MIX),
        "num_labels": C, "num_features": F, "splits": stats, "files": files,
    }
    with formats.atomic_file(out / "meta.json") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


DEFAULTS = {name: prm.default for name, prm in inspect.signature(generate).parameters.items()
            if name != "out_dir"}


def ensure(cfg_dict, cache_root) -> Path:
    """The dataset for these :func:`generate` parameters (``gen_seed`` = ``seed``) under
    ``cache_root/synthetic-<hash>``, generated unless complete in a temporary directory renamed into place (so
    concurrent callers share one copy)."""
    d = OmegaConf.to_container(cfg_dict, resolve=True) if isinstance(cfg_dict, DictConfig) else dict(cfg_dict or {})
    p = _normalise({"seed": d["gen_seed"], **d} if "gen_seed" in d else d)
    key = hashlib.sha1(json.dumps({"version": GENERATOR_VERSION, **p}, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_root)
    out = root / f"synthetic-{key}"
    if (out / "meta.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o755)
        generate(tmp, **p)
        try:
            os.rename(tmp, out)
        except OSError:
            if (out / "meta.json").exists():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # a stale incomplete directory: replace it
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
