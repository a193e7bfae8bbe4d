"""The convergence study of docs/results.md as one command: every sampler at equal training-time budgets on
EURLEX57K and on synthetic data at C = 10^4, 10^5 and 10^6, then the report.

    python sweeps/study.py [--size full|quick] [--out outputs/study/<size>] [--jobs 2] [--dry-run]

Each race (a setting: dataset and label count) is a set of Hydra multiruns of train.py with conf/sweep/study.yaml
(one per seed and sampler group, because some groups take extra options), all jobs writing into OUT/<setting>/
as `sampler=<name>,seed=<s>/`. `--jobs` multiruns run at a time, each job on one thread. Re-running the same
command skips the completed jobs and resumes the others from their checkpoints (sweeps/README.md); the checkpoints
of completed jobs are deleted (at C = 10^6 one is ~1.5 GB). Then `python -m xmcneg.report OUT` writes
OUT/study.md and a report per setting (summary.md, convergence.png, diagnostics.png). Wall times go to
OUT/study_time.json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# sampler groups: a multirun each (the options after the names apply to that group only)
GROUPS = {
    "main": (["full", "uniform", "frequency", "in_batch", "adversarial"], []),
    "mips": (["mips", "mips_only"], ["sampler.index=ivf"]),
    "ngame": (["ngame", "in_batch_random"], ["sampler.phase1_share=0.5"]),
}


def synthetic(c, train, features, test=2000):
    return ["dataset=synthetic", f"dataset.num_labels={c}", f"dataset.num_features={features}",
            f"dataset.num_train={train}", f"dataset.num_test={test}"]


# IVF with 256 lists: k-means over 10^6 labels with the default sqrt(C) = 1000 lists took ~170 s on one thread
MIPS_1M = ["+sampler.index_args.nlist=256", "sampler.index_args.nprobe=16"]
# exact scoring: an HNSW build over 10^5+ labels at every validation takes minutes on one thread
NGAME_1M = ["sampler.inference=exact", "sampler.fusion_alphas=[0.5]"]
# name: (overrides, seeds, budget_s, val_every_s, samplers left out, extra options by group). Every setting trains on
# the same seeded 12,800 training documents (data.max_train_docs: 50 batches an epoch, so that NGAME's clustering
# curriculum and the MIPS warm-up, both counted in epochs, happen within budgets of a minute). Sizing (full, about
# 55 minutes on 2 cores): 3 seeds where a job is cheap; at 10^5 2 seeds; at 10^6 one seed, no full softmax (a
# 10^6-wide dense softmax step) and no adversarial (its label tree alone takes over 2 minutes to fit on one thread).
SUB = ["data.max_train_docs=12800"]
M4 = synthetic(10_000, 50_000, 20_000) + SUB
M5 = synthetic(100_000, 50_000, 50_000) + SUB + ["data.val_max_docs=1000"]  # validation over 10^5+ labels is costly
M6 = synthetic(1_000_000, 50_000, 50_000, 1000) + SUB + ["data.val_max_docs=500", "diagnostics.every_steps=50"]
EUR = ["dataset=eurlex57k"] + SUB
SIZES = {
    "full": {
        "eurlex57k": (EUR, 3, 35, 7, [], {}),
        "synthetic_C10000": (M4, 3, 35, 7, [], {}),
        "synthetic_C100000": (M5, 2, 50, 10, [], {"ngame": NGAME_1M}),
        "synthetic_C1000000": (M6, 1, 100, 50, ["full", "adversarial"], {"ngame": NGAME_1M, "mips": MIPS_1M}),
    },
    "quick": {
        "eurlex57k": (EUR, 1, 10, 5, [], {}),
        "synthetic_C10000": (M4, 1, 10, 5, [], {}),
        "synthetic_C100000": (M5, 1, 10, 5, [], {}),
        "synthetic_C1000000": (M6, 1, 10, 10, ["full", "adversarial", "frequency", "in_batch", "mips_only", "ngame",
                                               "in_batch_random"], {"mips": MIPS_1M}),
    },
}


def prepare(overrides):
    """Generate a synthetic dataset once, before parallel jobs would both generate it: the dataset config train.py
    composes from these overrides, generated where its datamodule looks for it."""
    if "dataset=synthetic" not in overrides:
        return
    from hydra import compose, initialize_config_dir
    from xmcneg.data import synthetic as gen

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [o for o in overrides if o.startswith("dataset")])
    gen.ensure(cfg.dataset, Path(cfg.paths.cache_dir) / "synthetic")


def commands(size, out):
    for seed in range(max(s[1] for s in SIZES[size].values())):
        for name, (overrides, seeds, budget, val_every, left_out, extra) in SIZES[size].items():
            for group, (samplers, opts) in GROUPS.items():
                names = [s for s in samplers if s not in left_out]
                if seed >= seeds or not names:
                    continue
                # one job per multirun where the group has its own options (Hydra checks them against the default
                # sampler when the sampler itself is swept) and at C = 10^6 (its checkpoints go before the next job)
                for part in ([names] if "C1000000" not in name and not opts else [[n] for n in names]):
                    yield seed, (budget + 100 * ("C1000000" in name)) * len(part), name, f"{'+'.join(part)}_seed{seed}", [
                        sys.executable, "train.py", "-m", "+sweep=study", *overrides, *opts,
                                 *extra.get(group, []), f"sampler={','.join(part)}", f"seed={seed}",
                                 f"trainer.train_budget_s={budget}", f"trainer.val_every_s={val_every}",
                                 "hardware.num_threads=1", f"hydra.sweep.dir={out / name}"]


def run_one(name, label, cmd, out):
    log = out / "logs" / f"{name}_{label}.log"
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    for res in (out / name).glob("*/results.json"):  # completed jobs need no checkpoint
        if json.loads(res.read_text()).get("status") == "completed":
            shutil.rmtree(res.parent / "checkpoints", ignore_errors=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name} {label}: exit {rc}, {time.time() - t0:.0f} s",
          flush=True)
    return rc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default=None, help="study dir (default outputs/study/<size>)")
    p.add_argument("--jobs", type=int, default=2, help="multiruns at a time (one thread each)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--settings", nargs="+", default=None, help="only these settings (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out or ROOT / "outputs" / "study" / a.size).resolve()
    # seed by seed (a study cut short misses the last seeds, not whole settings), the longest multiruns first
    cmds = [c[2:] for c in sorted(commands(a.size, out), key=lambda c: (c[0], -c[1]))
            if (a.seeds is None or c[0] in a.seeds) and (a.settings is None or c[2] in a.settings)]
    if a.dry_run:
        print("\n".join(" ".join(c) for *_, c in cmds))
        return 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for overrides, *_ in SIZES[a.size].values():
        prepare(overrides)
    with ThreadPoolExecutor(a.jobs) as pool:
        rcs = list(pool.map(lambda nc: run_one(*nc, out), cmds))
    t_runs = time.time() - t0
    rc = subprocess.call([sys.executable, "-m", "xmcneg.report", str(out)], cwd=ROOT)
    times = {"size": a.size, "runs_s": round(t_runs, 1), "total_s": round(time.time() - t0, 1),
             "multiruns": len(cmds), "failed_multiruns": sum(r != 0 for r in rcs)}
    (out / "study_time.json").write_text(json.dumps(times, indent=2) + "\n")
    print(json.dumps(times))
    return rc


if __name__ == "__main__":
    sys.exit(main())
