"""Cost of scoring per-document label ids (B x n ids: positives + per-document negatives) with the label table's
two paths, at growing numbers of distinct ids U: one gather + bmm over the B x n ids, or one (B, U) matmul over the
distinct ids (`xmcneg.methods.label_table.UNIQUE_MATMUL` picks the matmul up to U = UNIQUE_MATMUL x n).

    python benchmarks/label_scoring.py [--threads 1] [--batch 256 --dim 256 --ids 69] [--labels 500 2000 ...]

Each timed step: score uniform random ids, a logsumexp loss, backward, one row-wise Adagrad step (as the sampled
classifier). One JSON line per C: {"labels", "distinct", "distinct_per_n", "bmm_ms", "matmul_ms"} (medians).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from xmcneg.methods import label_table  # noqa: E402
from xmcneg.methods.sparse_optim import SparseRowOptimizer  # noqa: E402


def step_ms(C, args, unique_matmul, reps=15, warmup=3):
    label_table.UNIQUE_MATMUL = unique_matmul
    torch.manual_seed(0)
    table = label_table.LabelTable(C, args.dim, sparse=True)
    opt = SparseRowOptimizer(table.parameters(), lr=0.05)
    times = []
    for r in range(warmup + reps):
        ids = torch.randint(0, C, (args.batch, args.ids))
        h = torch.randn(args.batch, args.dim, requires_grad=True)
        t0 = time.perf_counter()
        table.score(h, ids).logsumexp(1).sum().backward()
        opt.step()
        opt.zero_grad()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000, int(torch.unique(ids).numel())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ids", type=int, default=69, help="ids per document (positives + negatives)")
    p.add_argument("--labels", type=int, nargs="+", default=[500, 2000, 4271, 8000, 16000, 100000])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for C in args.labels:
        bmm, U = step_ms(C, args, unique_matmul=0)
        mm, _ = step_ms(C, args, unique_matmul=10 ** 9)
        print(json.dumps({"labels": C, "distinct": U, "distinct_per_n": round(U / args.ids, 1),
                          "bmm_ms": round(bmm, 2), "matmul_ms": round(mm, 2)}), flush=True)


if __name__ == "__main__":
    main()
