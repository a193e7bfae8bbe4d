"""Per-step training cost against the number of labels C and of input features F, with a hardware floor.

For each sampler, C (--labels) and F (--features): the default bow_mlp encoder (hidden 1024, d 256) on synthetic
sparse batches (--nnz non-zeros per document; 112 is EURLEX57K's average), batch 256, k=64 negatives, the
--loss loss, built by the suite's own classes and optimisers (XMCClassifier.configure_optimizers). Times whole
training steps and their phases: forward (encoder + scoring + loss, without sampling), sampling (the sampler's
`sample`), backward, optimiser (every optimiser's step). Separately, the label side alone (sampling, gathering
label rows, scoring, loss, backward into the label tables, label update) with a fixed document embedding.
Median over --steps steps after --warmup steps.

Floor: the step's matrix FLOPs at the matmul throughput measured in the same run (a B x hidden x hidden
float32 matmul), plus the bytes it must touch at the memory bandwidth measured in the same run (a large copy):
the dense parameters (read in forward and backward, gradient written, AdamW reads/writes parameter, gradient
and two moments), the input-table rows the batch touches (the same per row) and the label rows scored
(sampled) or the whole label matrix (full), and the activations (B x hidden, a few passes). The floor does
not grow with F: an input layer that costs F-proportional time per step shows up as step_ms / floor_ms.

One JSON line per (sampler, C, F), then a summary line: per sampler `ratio`/`label_ratio` (largest / smallest
C, at the smallest F), `feature_ratio` (step at the largest / smallest F, at the smallest C) and `floor_ratio`
(step_ms / floor_ms at the smallest C and F: the EURLEX57K-like setting with the defaults below).

    python benchmarks/step_cost.py --labels 4271 --features 10000 1000000 --samplers uniform
    python benchmarks/step_cost.py --labels 10000 1000000 --samplers full uniform frequency in_batch
    python benchmarks/step_cost.py --features 10000 100000 --sparse-input false   # the dense input layer
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
from xmcneg.methods.losses import BCE, NegativeSampling, SampledSoftmax
from xmcneg.samplers.frequency import FrequencySampler
from xmcneg.samplers.in_batch import InBatchSampler
from xmcneg.samplers.uniform import UniformSampler
from xmcneg.train import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

LOSSES = {"bce": BCE, "softmax": SampledSoftmax, "ns": NegativeSampling}
SAMPLERS = {"uniform": UniformSampler, "frequency": FrequencySampler, "in_batch": InBatchSampler}


def make_batch(rng, B, F, nnz, C, labels_per_doc):
    # Zipf-ish feature ids (frequent words shared by many documents, as in tf-idf data) and positives
    idx = torch.from_numpy((rng.zipf(1.2, size=B * nnz) - 1) % F)
    w = torch.from_numpy(rng.random(B * nnz).astype(np.float32)) / math.sqrt(nnz)
    ranks = np.minimum((rng.pareto(1.0, size=(B, labels_per_doc)) * 10).astype(np.int64), C - 1)
    return {"x": {"indices": idx, "offsets": torch.arange(0, B * nnz, nnz), "weights": w},
            "pos": torch.from_numpy(ranks), "idx": torch.arange(B)}


def build(name, C, F, args):
    train = OmegaConf.load(ROOT / "conf" / "train.yaml")
    optim = {**OmegaConf.to_container(train.optim), "label_optimizer": args.label_optimizer, "label_lr": 0.05}
    ev = {**OmegaConf.to_container(train.eval), "k": 5}
    sampler = None
    if name != "full":
        node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "sampler" / f"{name}.yaml"))
        kw = {k: v for k, v in node.items() if k not in ("defaults", "name", "_target_")}
        if name != "in_batch":
            kw["num_negatives"] = args.negatives
        sampler = SAMPLERS[name](seed=0, **kw)
    kw = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "encoder" / "bow_mlp.yaml")).items()
          if k not in ("_target_", "text")}  # text: read by the datamodule
    if args.sparse_input is not None:
        kw["sparse_input"] = {"true": True, "false": False}.get(args.sparse_input, args.sparse_input)
    enc = BowMLP(F, **{**kw, "dim": args.dim, "hidden": args.hidden, "num_layers": 1, "dropout": 0.0})
    m = XMCClassifier(enc, C, LOSSES[args.loss](), sampler=sampler, optim=optim, evaluation=ev)
    if sampler is not None:
        counts = np.zeros(C)
        counts[: min(C, 1000)] = np.arange(min(C, 1000), 0, -1)
        sampler.setup(SimpleNamespace(num_labels=C, train_label_counts=counts))
    return m, list(m.configure_optimizers().parts.values())


def machine_speed(args):
    """(matmul FLOP/s, memory bytes/s) measured now, with the run's threads: a B x hidden x hidden matmul and
    a 256 MB copy, best of 5."""
    a, b = torch.randn(args.batch, args.hidden), torch.randn(args.hidden, args.hidden)
    out = torch.empty(args.batch, args.hidden)
    src, dst = torch.ones(2 ** 26), torch.empty(2 ** 26)
    mm, cp = [], []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b, out=out)
        mm.append((time.perf_counter() - t) / 10)
        t = time.perf_counter()
        dst.copy_(src)
        cp.append(time.perf_counter() - t)
    return 2 * args.batch * args.hidden ** 2 / min(mm), 2 * src.numel() * 4 / min(cp)


def floor_ms(m, batches, C, args, speed):
    """The step's matrix FLOPs / measured matmul throughput + bytes it must touch / measured bandwidth."""
    B, H, d = args.batch, args.hidden, args.dim
    enc_dense = sum(p.numel() for n, p in m.encoder.named_parameters() if not n.startswith("bag."))
    touched = statistics.mean(b["x"]["indices"].unique().numel() for b in batches)  # input rows per batch
    if m.sampler is None:  # every document scores all labels
        labels, scored = C, C
    elif getattr(m.sampler, "name", "") == "in_batch":  # the batch's positives, shared by all documents
        labels = scored = min(C, B * args.labels_per_doc)
    else:  # per-document positives + negatives
        labels, scored = B * (args.labels_per_doc + args.negatives), args.labels_per_doc + args.negatives
    # forward + backward = 3x the forward matmuls: hidden blocks, output layer, label scores
    flops = 3 * 2 * B * (H * H * len(m.encoder.blocks) + H * d + scored * d)
    f32 = 4
    n_lab = labels * (d + 1)
    bytes_ = f32 * (
        7 * enc_dense + 2 * enc_dense       # AdamW: read param/grad/m/v, write param/m/v; weights read fwd + bwd
        + 9 * touched * H                   # touched input rows: read fwd, grad write, optimiser 7 (Adam)
        + (7 if m.sampler is None else 5) * n_lab  # label rows: read, grad, update (row-wise: + accumulator)
        + 10 * B * H + args.nnz * B * 2)    # activations (a few B x hidden passes) and the sparse batch
    flop_s, byte_s = speed
    return 1000 * (flops / flop_s + bytes_ / byte_s), flops, bytes_, touched


def measure(name, C, F, args, speed):
    rng = np.random.default_rng(0)
    m, opts = build(name, C, F, args)
    batches = [make_batch(rng, args.batch, F, args.nnz, C, args.labels_per_doc) for _ in range(8)]
    it = iter(range(10 ** 9))
    clock = {"sampling": 0.0}
    if m.sampler is not None:
        sample = m.sampler.sample

        def timed_sample(*a, **k):
            t = time.perf_counter()
            out = sample(*a, **k)
            clock["sampling"] += time.perf_counter() - t
            return out
        m.sampler.sample = timed_sample

    def loss_of(h, batch):
        return m.full_loss(h, batch) if m.sampler is None else m.sampled_loss(h, batch)

    phases = {k: [] for k in ("forward", "sampling", "backward", "optimizer")}

    def step():
        batch = batches[next(it) % len(batches)]
        clock["sampling"] = 0.0
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = loss_of(m.encoder(batch["x"]), batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        for o in opts:
            o.step()
        t3 = time.perf_counter()
        for k, v in (("forward", t1 - t0 - clock["sampling"]), ("sampling", clock["sampling"]),
                     ("backward", t2 - t1), ("optimizer", t3 - t2)):
            phases[k].append(v * 1000)

    label_opt = opts[-1] if m.sampler is not None else torch.optim.AdamW(
        list(m.labels.parameters()), lr=1e-3)

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        for v in phases.values():
            v.clear()
        ts = []
        for _ in range(args.steps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
        return statistics.median(ts)

    step_ms = timed(step)
    phase_ms = {k: round(statistics.median(v), 2) for k, v in phases.items()}
    with torch.no_grad():
        h_fixed = [m.encoder(b["x"]) for b in batches]

    def label_step():
        i = next(it) % len(batches)
        label_opt.zero_grad(set_to_none=True)
        h = h_fixed[i].requires_grad_(True)
        loss_of(h, batches[i]).backward()
        label_opt.step()

    label_ms = timed(label_step)
    fl_ms, flops, nbytes, touched = floor_ms(m, batches, C, args, speed)
    return {"sampler": name, "labels": C, "features": F, "step_ms": round(step_ms, 2), "phases_ms": phase_ms,
            "label_ms": round(label_ms, 2), "floor_ms": round(fl_ms, 2), "floor_ratio": round(step_ms / fl_ms, 2),
            "floor_gflop": round(flops / 1e9, 3), "floor_mb": round(nbytes / 2 ** 20, 1),
            "touched_features": round(touched), "sparse_input": bool(getattr(m.encoder.bag, "sparse", False)),
            "optimizers": [type(o).__name__ for o in opts], "steps": args.steps, "batch": args.batch,
            "nnz": args.nnz, "loss": args.loss,
            "negatives": args.negatives if name not in ("full", "in_batch") else (C if name == "full" else "in-batch"),
            "dim": args.dim, "hidden": args.hidden, "rss_mb": round(psutil.Process().memory_info().rss / 2 ** 20),
            "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, nargs="+", default=[4271])
    p.add_argument("--features", type=int, nargs="+", default=[10000])
    p.add_argument("--samplers", nargs="+", default=["uniform"], choices=["full", *SAMPLERS])
    p.add_argument("--nnz", type=int, default=112, help="non-zeros per document (EURLEX57K: 112)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--negatives", type=int, default=64)
    p.add_argument("--loss", default="softmax", choices=["softmax", "bce", "ns"])
    p.add_argument("--labels-per-doc", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--label-optimizer", default="rowwise_adagrad")
    p.add_argument("--sparse-input", default=None, choices=["auto", "true", "false"],
                   help="the encoder's sparse_input option (default: the encoder's default)")
    p.add_argument("--full-max-labels", type=int, default=1_000_000,
                   help="skip `full` above this C (its dense C x d AdamW state and B x C logits)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py
    torch.manual_seed(0)
    speed = machine_speed(args)
    print(json.dumps({"matmul_gflop_s": round(speed[0] / 1e9, 1), "memory_gb_s": round(speed[1] / 1e9, 2),
                      "threads": torch.get_num_threads()}), flush=True)
    res = {}
    for name in args.samplers:
        for C in sorted(args.labels):
            for F in sorted(args.features):
                if name == "full" and C > args.full_max_labels:
                    print(json.dumps({"sampler": name, "labels": C, "skipped": "C > --full-max-labels"}), flush=True)
                    continue
                r = measure(name, C, F, args, speed)
                res.setdefault(name, {})[(C, F)] = r
                print(json.dumps(r), flush=True)
    summary = {"summary": True}
    for name, runs in res.items():
        cs, fs = sorted({c for c, _ in runs}), sorted({f for _, f in runs})
        s = {"floor_ratio": runs[(cs[0], fs[0])]["floor_ratio"], "at": {"labels": cs[0], "features": fs[0]}}
        if len(cs) > 1:
            lo, hi = runs[(cs[0], fs[0])], runs[(cs[-1], fs[0])]
            s.update(ratio=round(hi["step_ms"] / lo["step_ms"], 3),
                     label_ratio=round(hi["label_ms"] / lo["label_ms"], 3), labels=[cs[0], cs[-1]])
        if len(fs) > 1:
            s.update(feature_ratio=round(runs[(cs[0], fs[-1])]["step_ms"] / runs[(cs[0], fs[0])]["step_ms"], 3),
                     features=[fs[0], fs[-1]])
        summary[name] = s
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
