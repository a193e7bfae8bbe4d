"""NGAME clustering cost per refresh, and its share of an epoch, against the number of training documents N.

    python benchmarks/clustering_cost.py --docs 45000 1000000 [--dim 256 --cluster-size 32 --threads 0]
                                         [--samples-per-s X]

For each N: a memory bank of N unit vectors of dimension --dim (drawn around N / 200 random topic directions, as
embeddings of real documents are; the cost does not depend on the values), clustered by
`balanced_spherical_clusters` (recursive balanced spherical 2-means, NGAME's refresh) at --cluster-size, timed
over --repeats refreshes (median). The epoch time it is compared with is N / samples_per_s, where samples_per_s
is NGAME's phase-1 training throughput on this machine: measured with benchmarks/throughput.py (ngame, default
encoder bow_mlp, batch 256) unless given with --samples-per-s. One refresh per epoch is NGAME's schedule
(refresh_epochs=1), so share = cluster_s / (epoch_s + cluster_s).

One JSON line per N: {"docs", "dim", "cluster_size", "clusters", "cluster_s", "epoch_s", "share",
"samples_per_s", "threads"}, then a summary line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xmcneg.samplers.cluster_batching import balanced_spherical_clusters  # noqa: E402


def bank(n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    topics = torch.nn.functional.normalize(torch.randn(max(n // 200, 2), dim, generator=g), dim=1)
    z = topics[torch.randint(0, topics.shape[0], (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g) / dim ** 0.5
    return torch.nn.functional.normalize(z, dim=1)


def ngame_samples_per_s(threads):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--samplers", "ngame", "--labels", "4271",
           "--steps", "20", "--warmup", "3"] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        r = json.loads(line)
        if r.get("sampler") == "ngame" and "samples_per_s" in r:
            return r["samples_per_s"]
    raise RuntimeError(f"throughput.py gave no ngame line: {out[-300:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[45000, 1_000_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--cluster-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10, help="2-means rounds per split (sampler.cluster_iters)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--samples-per-s", type=float, default=None,
                   help="NGAME phase-1 training samples/s (default: measured with benchmarks/throughput.py)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sps = args.samples_per_s or ngame_samples_per_s(args.threads)
    rows = []
    for n in args.docs:
        X = bank(n, args.dim)
        ts, ids = [], None
        for r in range(args.repeats):
            t = time.perf_counter()
            ids = balanced_spherical_clusters(X, args.cluster_size, seed=r, max_iter=args.iters)
            ts.append(time.perf_counter() - t)
        sizes = np.bincount(ids)
        cluster_s = statistics.median(ts)
        epoch_s = n / sps
        row = {"docs": n, "dim": args.dim, "cluster_size": args.cluster_size, "clusters": int(len(sizes)),
               "size_min": int(sizes.min()), "size_max": int(sizes.max()), "cluster_s": round(cluster_s, 3),
               "epoch_s": round(epoch_s, 1), "share": round(cluster_s / (epoch_s + cluster_s), 4),
               "samples_per_s": sps, "threads": torch.get_num_threads()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": True, "share": {r["docs"]: r["share"] for r in rows},
                      "cluster_s": {r["docs"]: r["cluster_s"] for r in rows}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
