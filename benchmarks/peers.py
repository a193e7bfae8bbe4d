"""Linear XMC baselines on a dataset of the suite: omikuji (Parabel-style trees), PECOS XR-Linear, napkinXC PLT.

The data come from the suite's own datamodule, composed from `conf/` with the given Hydra overrides (so the same
files, the same feature transform, the same seeded validation split as `train.py`): each library trains on the
"train" split (the training file minus the validation points, the rows our models train on) and predicts the top 5
of the "test" split. Scores come from `xmcneg.eval.metrics.xc_metrics` with the dataset's propensity parameters
(propensities from the whole training file, as `train.py`). Each library runs in its own forked process, so
`peak_rss_mb` is that process's peak (data included, as in our runs' results.json). One JSON line per library:

    python benchmarks/peers.py dataset=bibtex                          # all three libraries
    python benchmarks/peers.py dataset=eurlex57k --libraries omikuji   # one of them
    python benchmarks/peers.py dataset=xc dataset.dir=/my/data --threads 2 >> peers.jsonl

The libraries come with the optional extra: pip install -e .[peers]. Their hyper-parameters are the libraries'
standard ones (Parabel's for omikuji, PECOS's XR-Linear defaults, napkinXC's PLT defaults); they are printed with
every line. PECOS and napkinXC are seeded (seed 0); omikuji has no seed, so its figures vary slightly between runs
(Bibtex P@1 .630-.633 in three runs). omikuji's file reader needs a label and a feature on every line: training rows
without either are left out for omikuji only.
"""
import argparse
import importlib.util
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("omikuji", "pecos", "napkinxc")
PACKAGES = {"omikuji": "omikuji", "pecos": "libpecos", "napkinxc": "napkinxc"}
TOP_K = 5

# Parabel's settings (omikuji's defaults): 3 trees, balanced 2-means splits down to 100 labels, hinge-loss linear
# classifiers (C=1), weights pruned below 0.1, beam 10.
OMIKUJI_PARAMS = {"n_trees": 3, "cluster_k": 2, "min_branch_size": 100, "max_depth": 20, "linear_loss": "hinge",
                  "linear_c": 1.0, "linear_eps": 0.1, "linear_weight_threshold": 0.1, "beam_size": 10}
# PECOS XR-Linear defaults: PIFA label embeddings, 16-way hierarchical k-means to leaves of <= 100 labels,
# teacher-forced negatives, L2-loss SVMs (C=1), weights pruned below 0.1, beam 10.
PECOS_PARAMS = {"label_embedding": "pifa", "nr_splits": 16, "max_leaf_size": 100,
                "negative_sampling_scheme": "tfn", "solver_type": "L2R_L2LOSS_SVC_DUAL", "Cp": 1.0, "Cn": 1.0,
                "threshold": 0.1, "beam_size": 10}
# napkinXC PLT defaults: binary hierarchical k-means tree, leaves of <= 100 labels, logistic loss (LIBLINEAR, C=10).
NAPKINXC_PARAMS = {"tree_type": "hierarchicalKmeans", "arity": 2, "max_leaves": 100, "loss": "log",
                   "liblinear_c": 10.0, "liblinear_eps": 0.1, "weights_threshold": 0.1}


def load_split(overrides):
    """(X_train, Y_train, X_test, Y_test, inverse propensities, dataset name) from the suite's datamodule."""
    from hydra import compose, initialize_config_dir

    from xmcneg.data.datamodule import XCDataModule, build_datamodule
    from xmcneg.errors import ConfigError
    from xmcneg.eval.metrics import inverse_propensities

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    dm = build_datamodule(cfg)
    if not isinstance(dm, XCDataModule):
        raise ConfigError("encoder", "the peers read sparse BoW features: use a BoW dataset and encoder, not text")
    dm.setup()
    (Xtr, Ytr), (Xte, Yte) = dm.split("train"), dm.split("test")
    inv_prop = inverse_propensities(dm.full_train_Y, float(cfg.dataset.propensity_a),
                                    float(cfg.dataset.propensity_b))
    return Xtr, Ytr, Xte, Yte, inv_prop, str(cfg.dataset.name)


def write_xc_file(path, X, Y):
    """X, Y (CSR) -> XC sparse text format (header `N F C`, lines `l1,l2 f:v ...`)."""
    with open(path, "w") as f:
        f.write(f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}\n")
        for i in range(X.shape[0]):
            labels = ",".join(map(str, Y.indices[Y.indptr[i]:Y.indptr[i + 1]]))
            lo, hi = X.indptr[i], X.indptr[i + 1]
            feats = " ".join(f"{j}:{v:.6g}" for j, v in zip(X.indices[lo:hi], X.data[lo:hi]))
            f.write(f"{labels} {feats}\n")


def run_omikuji(Xtr, Ytr, Xte, threads):
    import omikuji

    hp = omikuji.Model.default_hyper_param()
    p = OMIKUJI_PARAMS
    hp.n_trees, hp.cluster_k, hp.min_branch_size, hp.max_depth = p["n_trees"], p["cluster_k"], \
        p["min_branch_size"], p["max_depth"]
    hp.linear_loss_type = omikuji.LossType.HINGE.value
    hp.linear_c, hp.linear_eps, hp.linear_weight_threshold = p["linear_c"], p["linear_eps"], \
        p["linear_weight_threshold"]
    keep = (Ytr.getnnz(axis=1) > 0) & (Xtr.getnnz(axis=1) > 0)  # omikuji's reader needs a label and a feature
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        write_xc_file(path, Xtr[keep], Ytr[keep])
        model = omikuji.Model.train_on_data(path, hp, n_threads=threads)
    train_s = time.perf_counter() - t0
    model.init_prediction_thread_pool(threads)
    t0 = time.perf_counter()
    topk = []
    for i in range(Xte.shape[0]):
        lo, hi = Xte.indptr[i], Xte.indptr[i + 1]
        pred = model.predict(list(zip(Xte.indices[lo:hi].tolist(), Xte.data[lo:hi].tolist())),
                             beam_size=p["beam_size"], top_k=TOP_K)
        topk.append([label for label, _ in pred])
    return topk, train_s, time.perf_counter() - t0


def run_pecos(Xtr, Ytr, Xte, threads):
    import numpy as np
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    p = PECOS_PARAMS
    X, Y = Xtr.astype(np.float32).tocsr(), Ytr.astype(np.float32).tocsr()
    t0 = time.perf_counter()
    label_feat = LabelEmbeddingFactory.create(Y, X, method=p["label_embedding"])
    chain = Indexer.gen(label_feat, indexer_type="hierarchicalkmeans", nr_splits=p["nr_splits"],
                        max_leaf_size=p["max_leaf_size"], threads=threads, seed=0)
    model = XLinearModel.train(X, Y, C=chain, threads=threads, negative_sampling_scheme=p["negative_sampling_scheme"],
                               solver_type=p["solver_type"], Cp=p["Cp"], Cn=p["Cn"], threshold=p["threshold"])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model.predict(Xte.astype(np.float32).tocsr(), beam_size=p["beam_size"], only_topk=TOP_K,
                           threads=threads).tocsr()
    topk = []
    for i in range(scores.shape[0]):
        lo, hi = scores.indptr[i], scores.indptr[i + 1]
        order = np.argsort(-scores.data[lo:hi], kind="stable")
        topk.append(scores.indices[lo:hi][order].tolist())
    return topk, train_s, time.perf_counter() - t0


def run_napkinxc(Xtr, Ytr, Xte, threads):
    from napkinxc.models import PLT

    labels = [Ytr.indices[Ytr.indptr[i]:Ytr.indptr[i + 1]].tolist() for i in range(Ytr.shape[0])]
    with tempfile.TemporaryDirectory() as tmp:
        model = PLT(os.path.join(tmp, "plt"), threads=threads, seed=0, **NAPKINXC_PARAMS)
        t0 = time.perf_counter()
        model.fit(Xtr, labels)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        topk = model.predict(Xte, top_k=TOP_K)
        predict_s = time.perf_counter() - t0
    return [list(row) for row in topk], train_s, predict_s


RUNNERS = {"omikuji": (run_omikuji, OMIKUJI_PARAMS), "pecos": (run_pecos, PECOS_PARAMS),
           "napkinxc": (run_napkinxc, NAPKINXC_PARAMS)}


def to_topk_array(rows, k=TOP_K):
    """Ragged lists of predicted label ids -> (N, k) int64 array padded with -1 (no prediction)."""
    import numpy as np

    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        row = list(row)[:k]
        out[i, :len(row)] = row
    return out


def evaluate(library, data, threads):
    """Train + predict one library and score it with the suite's metrics: the JSON-line dict."""
    from importlib.metadata import version

    from xmcneg.eval.metrics import xc_metrics

    Xtr, Ytr, Xte, Yte, inv_prop, name = data
    run, params = RUNNERS[library]
    topk, train_s, predict_s = run(Xtr, Ytr, Xte, threads)
    m = xc_metrics(to_topk_array(topk), Yte, inv_prop=inv_prop, ks=(1, 3, 5), recall_ks=())
    return {"dataset": name, "library": library, "version": version(PACKAGES[library]),
            **{k: round(m[k], 6) for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")},
            "train_s": round(train_s, 3), "predict_s": round(predict_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            "threads": threads, "train_docs": int(Xtr.shape[0]), "test_docs": int(Xte.shape[0]),
            "params": params}


def _child(library, data, threads, conn):
    os.dup2(2, 1)  # the libraries' own logs go to stderr; stdout carries only the JSON lines
    try:
        conn.send(("ok", evaluate(library, data, threads)))
    except Exception as e:  # noqa: BLE001 - reported as the library's line, the other libraries go on
        conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()


def run_isolated(library, data, threads):
    """evaluate() in a forked process (its own peak RSS; a library crash does not stop the others)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(library, data, threads, child))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "process died"
    proc.join()
    if status == "error" or proc.exitcode not in (0, None):
        return {"dataset": data[5], "library": library, "status": "failed",
                "reason": payload if status == "error" else f"exit code {proc.exitcode}"}
    return payload


def missing_libraries(libraries):
    mods = {"omikuji": "omikuji", "pecos": "pecos", "napkinxc": "napkinxc"}
    return [lib for lib in libraries if importlib.util.find_spec(mods[lib]) is None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. dataset=bibtex")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    p.add_argument("--threads", type=int, default=1, help="threads per library (default 1)")
    a = p.parse_args(argv)
    if a.threads < 1:
        print(f"error: --threads {a.threads}: must be >= 1", file=sys.stderr)
        return 2
    missing = missing_libraries(a.libraries)
    if missing:
        print(f"error: {', '.join(missing)} not installed: pip install -e .[peers]", file=sys.stderr)
        return 2
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    from hydra.errors import HydraException

    from xmcneg.errors import XMCError

    try:
        data = load_split(a.overrides)
    except (XMCError, HydraException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)  # Hydra's messages list the options
        return 2
    failed = False
    for library in a.libraries:
        line = run_isolated(library, data, a.threads)
        failed |= line.get("status") == "failed"
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
