"""Cost of the wide head (`wide.*`, src/xmcneg/methods/wide_head.py) against the label table's full scoring, on
the training documents of any dataset config of the suite, at several `wide.features`:

    python benchmarks/wide_head.py [overrides, e.g. dataset=eurlex57k or dataset.num_labels=19000
        dataset.num_train=40000 dataset.num_test=4000 dataset.num_features=20000] [--threads 1] [--features 8 16 32]

Each timed step: one batch of `data.batch_size` training documents, scores of every label, sum, backward. One JSON
line per `features`: {"labels", "features", "support", "products_per_batch", "wide_ms", "label_table_ms"}
(medians; "products": the batch's non-zeros times the labels each of their features supports; "label_table_ms":
a (batch, dim) x (dim, labels) scoring of `encoder.dim` dims, the cost the wide head is added to).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from xmcneg.data.datamodule import build_datamodule  # noqa: E402
from xmcneg.data.inputs import csr_rows_to_bag  # noqa: E402
from xmcneg.methods.wide_head import WideHead  # noqa: E402


def median_ms(fn, reps=10, warmup=2):
    times = []
    for r in range(warmup + reps):
        t0 = time.perf_counter()
        fn(r)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return round(sorted(times)[len(times) // 2] * 1000, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--features", type=int, nargs="+", default=[8, 16, 32])
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    X, Y = dm.split("train")
    B, C, d = int(cfg.data.batch_size), Y.shape[1], int(cfg.encoder.dim)
    rng = np.random.default_rng(0)
    batches = [csr_rows_to_bag(X, np.sort(rng.choice(X.shape[0], min(B, X.shape[0]), replace=False)))
               for _ in range(12)]
    h, w = torch.randn(B, d), torch.randn(C, d, requires_grad=True)
    table_ms = median_ms(lambda r: (h @ w.T).sum().backward())
    for k in args.features:
        head = WideHead(X.shape[1], C, k)
        head.set_support(X, Y)
        products = int(np.median([int(head.spans(x["indices"])[1].sum()) for x in batches]))
        ms = median_ms(lambda r: head(batches[r]).sum().backward())
        print(json.dumps({"dataset": cfg.dataset.name, "labels": C, "features": k, "support": head.size,
                          "products_per_batch": products, "wide_ms": ms, "label_table_ms": table_ms}), flush=True)


if __name__ == "__main__":
    main()
