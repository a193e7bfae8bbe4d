"""Per-step training cost against the number of labels C (issue: sampled steps must not grow with C).

For each C and sampler: the default bow_mlp encoder on a synthetic sparse batch (50,000 features, 64 non-zeros
per row), d=256, batch 256, k=64 negatives. Times whole training steps (forward, sampling, loss, backward,
encoder AdamW step, label-matrix update) and, separately, the label side alone (sampling, gathering label rows,
scoring, loss, backward into the label tables, label update) with a fixed document embedding.
Median over --steps steps after --warmup steps. One JSON line per (sampler, C), then a summary line.

    python benchmarks/step_cost.py --labels 10000 1000000 --samplers full uniform frequency in_batch
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import torch
from omegaconf import OmegaConf

from xmcneg.encoders.bow_mlp import BowMLP
from xmcneg.methods.classifier import XMCClassifier
from xmcneg.methods.losses import BCE
from xmcneg.samplers.frequency import FrequencySampler
from xmcneg.samplers.in_batch import InBatchSampler
from xmcneg.samplers.uniform import UniformSampler

ROOT = Path(__file__).resolve().parents[1]

SAMPLERS = {"uniform": UniformSampler, "frequency": FrequencySampler, "in_batch": InBatchSampler}


def make_batch(rng, B, F, nnz, C, labels_per_doc):
    idx = torch.from_numpy(rng.integers(0, F, size=B * nnz))
    w = torch.from_numpy(rng.random(B * nnz).astype(np.float32)) / math.sqrt(nnz)
    # Zipf-ish positives so in_batch/frequency see realistic repeats
    ranks = np.minimum((rng.pareto(1.0, size=(B, labels_per_doc)) * 10).astype(np.int64), C - 1)
    return {"x": {"indices": idx, "offsets": torch.arange(0, B * nnz, nnz), "weights": w},
            "pos": torch.from_numpy(ranks), "idx": torch.arange(B)}


def build(name, C, args):
    train = OmegaConf.load(ROOT / "conf" / "train.yaml")
    optim = {**OmegaConf.to_container(train.optim), "label_optimizer": args.label_optimizer, "label_lr": 0.05}
    ev = {**OmegaConf.to_container(train.eval), "k": 5}
    sampler = None
    if name != "full":
        kw = {"max_negatives": 4096} if name == "in_batch" else {"num_negatives": args.negatives}
        sampler = SAMPLERS[name](seed=0, **kw)
    enc = BowMLP(args.features, dim=args.dim, hidden=args.hidden, num_layers=1, dropout=0.0)
    m = XMCClassifier(enc, C, BCE(), sampler=sampler, optim=optim, evaluation=ev)
    if sampler is not None:
        counts = np.zeros(C)
        counts[: min(C, 1000)] = np.arange(min(C, 1000), 0, -1)
        sampler.setup(SimpleNamespace(num_labels=C, train_label_counts=counts))
    return m, list(m.configure_optimizers().parts.values())


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def measure(name, C, args):
    rng = np.random.default_rng(0)
    m, opts = build(name, C, args)
    batches = [make_batch(rng, args.batch, args.features, args.nnz, C, args.labels_per_doc) for _ in range(8)]
    it = iter(range(10 ** 9))

    def loss_of(h, batch):
        return m.full_loss(h, batch) if m.sampler is None else m.sampled_loss(h, batch)

    def step():
        batch = batches[next(it) % len(batches)]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = loss_of(m.encoder(batch["x"]), batch)
        loss.backward()
        for o in opts:
            o.step()

    label_opt = opts[-1] if m.sampler is not None else torch.optim.AdamW(
        list(m.labels.parameters()), lr=1e-3)
    h_fixed = [m.encoder(b["x"]).detach() for b in batches]

    def label_step():
        i = next(it) % len(batches)
        label_opt.zero_grad(set_to_none=True)
        h = h_fixed[i].requires_grad_(True)
        loss_of(h, batches[i]).backward()
        label_opt.step()

    steps = args.steps
    step_ms = timed(step, args.warmup, steps)
    label_ms = timed(label_step, args.warmup, steps)
    return {"sampler": name, "labels": C, "step_ms": round(step_ms, 2), "label_ms": round(label_ms, 2),
            "steps": steps, "batch": args.batch, "negatives": args.negatives if name not in ("full", "in_batch")
            else (C if name == "full" else "in-batch"), "dim": args.dim, "features": args.features,
            "rss_mb": round(psutil.Process().memory_info().rss / 2 ** 20), "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, nargs="+", default=[10000, 100000, 1000000])
    p.add_argument("--samplers", nargs="+", default=["full", "uniform", "frequency", "in_batch"])
    p.add_argument("--features", type=int, default=50000)
    p.add_argument("--nnz", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--negatives", type=int, default=64)
    p.add_argument("--labels-per-doc", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--label-optimizer", default="rowwise_adagrad")
    p.add_argument("--full-max-labels", type=int, default=1_000_000,
                   help="skip `full` above this C (its dense C x d AdamW state and B x C logits)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    res = {}
    for name in args.samplers:
        if name != "full" and name not in SAMPLERS:
            p.error(f"unknown sampler {name}")
        for C in sorted(args.labels):
            if name == "full" and C > args.full_max_labels:
                print(json.dumps({"sampler": name, "labels": C, "skipped": "C > --full-max-labels"}), flush=True)
                continue
            r = measure(name, C, args)
            res.setdefault(name, {})[C] = r
            print(json.dumps(r), flush=True)
    summary = {"summary": True}
    for name, by_c in res.items():
        lo, hi = min(by_c), max(by_c)
        if lo != hi:
            summary[name] = {"ratio": round(by_c[hi]["step_ms"] / by_c[lo]["step_ms"], 3),
                             "label_ratio": round(by_c[hi]["label_ms"] / by_c[lo]["label_ms"], 3),
                             "labels": [lo, hi]}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
