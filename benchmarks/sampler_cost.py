"""Sampler cost vs. number of labels: time per negative of `sampler.sample(batch, doc_emb)`.

    python benchmarks/sampler_cost.py --labels 1024 1048576 [--samplers uniform frequency adversarial]
                                      [--batch 256 --negatives 64 --k 16] [--fit-labels N | --no-fit]

For every C in --labels and every sampler, a batch of --batch documents (sparse rows with --nnz features out of
--features, in EmbeddingBag form, as the datamodule builds them) is sampled --repeats times after --warmup calls,
each sampler's C values in turn (round robin, so that load changes on a shared machine hit them alike;
--flush-mb evicts the caches before every call, as a training step's forward/backward pass would);
the median wall time per call gives ``us_per_negative`` = median / (batch x negatives). The adversarial sampler
is timed on a tree of depth ceil(log2 C) with random node parameters of the right shape (labels at random leaves,
padding included) and a random (F, k) projection: its sampling cost does not depend on the fitted values.

Separately (unless --no-fit), a real tree is fitted on synthetic clustered (point, label) pairs in x~-space
(--fit-labels labels, default the largest C; --fit-points points with ~--avg-labels labels each) and timed; a
tree is also fitted at the smallest C, and both fitted trees' sampling cost is measured at training inputs (walks
concentrate on likely labels, so fitted trees sample faster than the near-uniform random tree): one JSON line
with "fit": true, and "adversarial_fitted" in the summary. The acceptance uses the random (worst-case) tree.

Output: one JSON line per (sampler, C) {"sampler", "labels", "us_per_negative", "ms_per_call", ...}, then the fit
line, then {"summary": true, "<sampler>": {"ratio": cost(C_max) / cost(C_min), ...}, "acceptance": {...}}.
Acceptance: adversarial ratio <= 3 (O(log C) per negative).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from xmcneg.samplers.adversarial import AdversarialSampler  # noqa: E402
from xmcneg.samplers.frequency import FrequencySampler  # noqa: E402
from xmcneg.samplers.label_tree import LabelTree, Projection, fit_label_tree, tree_depth  # noqa: E402
from xmcneg.samplers.uniform import UniformSampler  # noqa: E402

SAMPLERS = ("uniform", "frequency", "adversarial")


def random_tree(num_labels: int, k: int = 16, seed: int = 0, scale: float = 1.0, shuffle: bool = True):
    """A LabelTree with random node parameters; labels at evenly spread leaves, shuffled if `shuffle`."""
    g = torch.Generator().manual_seed(seed)
    D = tree_depth(num_labels)
    M = (1 << D) - 1
    w = torch.randn(M, k, generator=g) * (scale / math.sqrt(k))
    b = torch.randn(M, generator=g) * 0.5 * scale
    leaves = (torch.arange(num_labels, dtype=torch.float64) * (1 << D) / num_labels).floor().long()
    if shuffle:
        leaves = leaves[torch.randperm(num_labels, generator=g)]
    return LabelTree(w, b, leaves, D, num_labels)


def synthetic_pairs(num_labels: int, num_points: int, avg_labels: float = 3.0, k: int = 16, seed: int = 0,
                    zipf_a: float = 1.0, noise: float = 1.0):
    """Clustered synthetic data in x~-space: ~sqrt(C) clusters, a Zipf-popular first label per point, the
    others from its cluster; points = mean of their labels' centres + noise, standardised.
    Returns (Z (N, k) float32, rows, labels, label_cluster) without duplicate pairs."""
    rng = np.random.default_rng(seed)
    C, N = int(num_labels), int(num_points)
    G = max(1, int(round(math.sqrt(C))))
    cluster = rng.integers(G, size=C)
    centres = (rng.standard_normal((G, k)) * 2.0)[cluster] + rng.standard_normal((C, k))
    w = np.arange(1, C + 1, dtype=np.float64) ** -zipf_a
    cdf = np.cumsum(w[rng.permutation(C)])
    cdf /= cdf[-1]
    first = np.minimum(np.searchsorted(cdf, rng.random(N), side="right"), C - 1)
    n_lab = 1 + rng.poisson(max(avg_labels - 1.0, 0.0), size=N)
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(G))
    sizes = np.bincount(cluster, minlength=G)
    rows = np.repeat(np.arange(N), n_lab)
    c = cluster[first][rows]
    labels = order[starts[c] + (rng.random(len(rows)) * sizes[c]).astype(np.int64)]
    is_first = np.concatenate([[True], rows[1:] != rows[:-1]])
    labels[is_first] = first
    key = np.unique(rows.astype(np.int64) * C + labels)
    rows, labels = key // C, key % C
    Z = np.zeros((N, k))
    np.add.at(Z, rows, centres[labels])
    Z = Z / np.bincount(rows, minlength=N)[:, None] + noise * rng.standard_normal((N, k))
    Z = (Z - Z.mean(0)) / Z.std(0)
    return torch.from_numpy(Z.astype(np.float32)), rows, labels, cluster


class _DM:
    """The little a sampler's setup reads from a datamodule."""

    def __init__(self, num_labels, num_features, seed):
        rng = np.random.default_rng(seed)
        self.num_labels, self.num_features = num_labels, num_features
        ranks = rng.permutation(num_labels) + 1.0
        self.train_label_counts = rng.poisson(1000.0 / ranks)  # Zipf-like counts


def make_batch(B, F, nnz, C, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = {"indices": torch.randint(0, F, (B * nnz,), generator=g),
         "offsets": torch.arange(0, B * nnz, nnz),
         "weights": torch.rand(B * nnz, generator=g) / math.sqrt(nnz)}
    batch = {"x": {k: v.to(device) for k, v in x.items()},
             "pos": torch.randint(0, C, (B, 3), generator=g).to(device),
             "idx": torch.arange(B, device=device)}
    return batch, torch.randn(B, 64, generator=g).to(device)


def conf_args(name, **over):
    """conf/sampler/<name>.yaml's constructor arguments, with `over` replacing some of them."""
    node = OmegaConf.to_container(OmegaConf.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                              "conf", "sampler", f"{name}.yaml")))
    return {**{k: v for k, v in node.items() if k not in ("defaults", "name", "_target_")}, **over}


def build(name, C, args):
    dm = _DM(C, args.features, args.seed)
    if name == "uniform":
        s = UniformSampler(**conf_args(name, num_negatives=args.negatives), seed=args.seed)
    elif name == "frequency":
        s = FrequencySampler(**conf_args(name, num_negatives=args.negatives), seed=args.seed)
    elif name == "adversarial":
        s = AdversarialSampler(**conf_args(name, num_negatives=args.negatives, k=args.k), seed=args.seed)
        # no fit: a random tree of the right shape (sampling cost does not depend on the fitted values)
        g = torch.Generator().manual_seed(args.seed + 1)
        proj = Projection(torch.randn(args.features, args.k, generator=g), torch.zeros(args.k), "bag")
        s.num_labels, s.tree, s.proj = C, random_tree(C, k=args.k, seed=args.seed), proj
        s.generator.manual_seed(args.seed)
        return s
    else:
        raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    s.setup(dm, None)
    return s


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(configs, warmup, repeats, device, flush_mb=0):
    """Median seconds per `sample` call of each (sampler, batch, emb) config. The configs are timed in turn,
    one call each per round, so a change of machine load hits all of them alike (shared machines). With
    `flush_mb`, a buffer of that size is rewritten before every timed call (cold caches, as after a training
    step's forward/backward pass)."""
    junk = torch.zeros(flush_mb << 18) if flush_mb else None
    times = [[] for _ in configs]
    with torch.no_grad():
        for s, batch, emb in configs:
            for _ in range(warmup):
                s.sample(batch, emb)
        _sync(device)
        for _ in range(repeats):
            for i, (s, batch, emb) in enumerate(configs):
                if junk is not None:
                    junk.add_(1.0)
                t = time.perf_counter()
                ids, logq = s.sample(batch, emb)
                _sync(device)
                times[i].append(time.perf_counter() - t)
                assert ids.shape == (emb.shape[0], s.num_negatives) and bool(torch.isfinite(logq).all())
    return [statistics.median(t) for t in times]


def _fitted(C, N, args):
    Z, rows, labels, _ = synthetic_pairs(C, N, avg_labels=args.avg_labels, k=args.k, seed=args.seed)
    tree, info = fit_label_tree(Z, rows, labels, C, seed=args.seed)
    s = AdversarialSampler(**conf_args("adversarial", num_negatives=args.negatives, k=args.k), seed=args.seed)
    # x~ = Z rows: a "dense" identity projection, so the timed batch samples at real (training) inputs
    s.num_labels, s.tree, s.proj = C, tree, Projection(torch.eye(args.k), torch.zeros(args.k), "dense")
    return s, Z[: args.batch], info


def fit_line(args, device, small_C):
    """Real fit at --fit-labels (timed), plus a fit at the smallest C; both fitted trees' sampling cost (a fitted
    tree concentrates each document's walks, so it is cheaper than the near-uniform random tree above)."""
    C, N = args.fit_labels, args.fit_points or args.fit_labels
    t0 = time.perf_counter()
    big, Zb, info = _fitted(C, N, args)
    total_s = time.perf_counter() - t0
    small, Zs, _ = _fitted(small_C, max(4 * small_C, args.batch), args)
    meds = time_round_robin([(small, {}, Zs.to(device)), (big, {}, Zb.to(device))], args.warmup, args.repeats,
                            device, args.flush_mb)
    us = [m / (args.batch * args.negatives) * 1e6 for m in meds]
    return {"fit": True, "sampler": "adversarial", "labels": C, "points": N, "pairs": info["pairs"], "k": args.k,
            "depth": info["depth"], "fit_s": round(info["fit_s"], 2),
            "data_gen_s": round(total_s - info["fit_s"], 2),
            "train_avg_log_p": round(info["train_avg_log_p"], 4), "uniform_log_p": round(-math.log(C), 4),
            "fitted_tree_us_per_negative": round(us[1], 4), "fitted_tree_labels_min": small_C,
            "fitted_tree_us_per_negative_min_C": round(us[0], 4), "fitted_ratio": round(us[1] / us[0], 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, nargs="+", default=[1024, 1048576])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=64)
    ap.add_argument("--k", type=int, default=16, help="projection dims of the adversarial tree")
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--nnz", type=int, default=32, help="features per document")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30, help="timed calls (median), >= 20")
    ap.add_argument("--fit-labels", type=int, default=None, help="labels of the timed real fit (default: max C)")
    ap.add_argument("--fit-points", type=int, default=None, help="points of the real fit (default: = labels)")
    ap.add_argument("--avg-labels", type=float, default=3.0)
    ap.add_argument("--no-fit", action="store_true", help="skip the real fit")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--flush-mb", type=int, default=0,
                    help="rewrite a buffer of this many MB before each timed call (cold caches); 0: off")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 20:
        ap.error("--repeats must be >= 20")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    labels = sorted(set(args.labels))
    cost = {}
    for name in args.samplers:  # per sampler, its C values in round robin
        configs = [(build(name, C, args), *make_batch(args.batch, args.features, args.nnz, C, args.seed, device))
                   for C in labels]
        meds = time_round_robin(configs, args.warmup, args.repeats, device, args.flush_mb)
        for C, (s, _, _), med in zip(labels, configs, meds):
            us = med / (args.batch * args.negatives) * 1e6
            cost[(name, C)] = us
            row = {"sampler": name, "labels": C, "us_per_negative": round(us, 4), "ms_per_call": round(med * 1e3, 3),
                   "batch": args.batch, "negatives": args.negatives, "repeats": args.repeats,
                   "threads": torch.get_num_threads(), "device": str(device), "flush_mb": args.flush_mb}
            if name == "adversarial":
                row.update({"k": args.k, "depth": s.tree.depth, "tree": "random"})
            print(json.dumps(row), flush=True)
        del configs
    fit = None
    if not args.no_fit:
        args.fit_labels = args.fit_labels or labels[-1]
        fit = fit_line(args, device, labels[0])
        print(json.dumps(fit), flush=True)
    summary = {"summary": True, "labels": [labels[0], labels[-1]]}
    for name in args.samplers:
        lo, hi = cost[(name, labels[0])], cost[(name, labels[-1])]
        summary[name] = {"ratio": round(hi / lo, 3), "us_per_negative_min_C": round(lo, 4),
                         "us_per_negative_max_C": round(hi, 4)}
    if fit is not None:
        summary["adversarial_fitted"] = {"ratio": fit["fitted_ratio"], "labels": [labels[0], fit["labels"]],
                                         "fit_s": fit["fit_s"]}
    if "adversarial" in args.samplers:
        summary["acceptance"] = {"adversarial_ratio_le_3": summary["adversarial"]["ratio"] <= 3.0}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
