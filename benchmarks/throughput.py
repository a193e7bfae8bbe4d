"""Training throughput (samples/s) of each sampler on the current hardware, at a given number of labels C.

    python benchmarks/throughput.py --labels 1000000 [--hardware cpu|gpu] [--samplers full uniform ...]
                                    [--steps 30 --warmup 5] [-o key=value ...]
    python benchmarks/throughput.py --dataset eurlex57k --samplers uniform full --threads 1

Every sampler runs the real training path (the Hydra config of train.py, its datamodule, LightningModule and a
pl.Trainer on `hardware=<--hardware>`) on synthetic data with C labels and --features features (or on the
real `--dataset`, whose own C and F apply), for --warmup + --steps training steps of
one epoch, without validation, checkpoints or loggers. The clock covers the --steps steps after the warm-up
(data loading, forward, sampling, loss, backward and updates; on a GPU each timed step ends with a
synchronisation), so one-time work (the adversarial tree fit, MIPS's first index build, caches) is excluded.
One JSON line per sampler:
    {"sampler", "labels", "hardware", "device", "precision", "world_size", "batch_size", "steps", "step_ms",
     "samples_per_s", "peak_mem_mb", "setup_s"}
and a summary line {"summary": true, "samples_per_s": {sampler: value}}.

Samplers run in separate processes (one at a time) so each one's memory and threads are its own. Defaults
per sampler for the benchmark (override any with -o): mips starts hard negatives at step 0 (warmup_epochs=0)
and rebuilds its index every 1000 steps (so the timed steps include queries, not a rebuild); ngame times its
phase 1 (Siamese) steps. `full` is skipped above --full-max-labels (its B x C logits and dense C x d state).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SAMPLERS = ("full", "uniform", "frequency", "in_batch", "adversarial", "mips", "ngame")
SAMPLER_OVERRIDES = {"mips": ["sampler.warmup_epochs=0", "sampler.refresh_steps=1000"]}


def _config(args, sampler):
    from hydra import compose, initialize_config_dir

    docs = args.batch_size * (args.warmup + args.steps) * 2
    data = [f"dataset={args.dataset}"]
    if args.dataset == "synthetic":
        data += [f"dataset.num_labels={args.labels}", f"dataset.num_train={max(docs, 2000)}", "dataset.num_test=100",
                 f"dataset.num_features={args.features}"]
    overrides = [
        f"sampler={sampler}", f"hardware={args.hardware}", *data, f"data.batch_size={args.batch_size}",
        "data.val_size=10",
        f"paths.cache_dir={args.cache_dir}", "paths.output_dir=/tmp/xmcneg-throughput", "logger=none",
        *SAMPLER_OVERRIDES.get(sampler, []), *args.override,
    ]
    if args.threads:
        overrides.append(f"hardware.num_threads={args.threads}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def measure(args, sampler):
    """Runs in a child process: build, train --warmup + --steps steps, time the last --steps."""
    import pytorch_lightning as pl
    import torch

    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.factory import build_module
    from xmcneg.train import keep_freed_memory

    cfg = _config(args, sampler)
    if cfg.hardware.get("num_threads"):
        torch.set_num_threads(int(cfg.hardware.num_threads))
    keep_freed_memory()  # as train.py
    pl.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    cuda = torch.cuda.is_available() and cfg.hardware.accelerator != "cpu"

    class Clock(pl.Callback):
        def __init__(self):
            self.t, self.setup_s = None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.setup_s = time.perf_counter() - t0
            if batch_idx == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                if cuda:
                    torch.cuda.synchronize()
                self.elapsed = time.perf_counter() - self.t

    clock = Clock()
    trainer = pl.Trainer(
        accelerator=cfg.hardware.accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
        strategy=cfg.hardware.strategy, precision=cfg.hardware.precision, max_epochs=1,
        limit_train_batches=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock], default_root_dir="/tmp/xmcneg-throughput",
        use_distributed_sampler=False)  # the datamodule shards the data itself under DDP (as train.py)
    trainer.fit(module, datamodule=dm)
    if not trainer.is_global_zero:
        return None
    step_s = clock.elapsed / args.steps
    global_batch = args.batch_size * trainer.world_size
    if cuda:
        device, mem = torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource

        device, mem = f"cpu x{torch.get_num_threads()} threads", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"sampler": sampler, "dataset": args.dataset, "labels": int(dm.num_labels), "hardware": args.hardware,
            "device": device, "precision": str(cfg.hardware.precision), "world_size": trainer.world_size,
            "batch_size": global_batch, "steps": args.steps, "step_ms": round(step_s * 1000, 2),
            "samples_per_s": round(global_batch / step_s, 1), "peak_mem_mb": round(mem),
            "setup_s": round(clock.setup_s, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=1_000_000)
    p.add_argument("--dataset", default="synthetic",
                   help="a conf/dataset option (a real dataset has its own C and F: --labels/--features unused)")
    p.add_argument("--hardware", default="cpu", help="a conf/hardware option: cpu | gpu | ddp | ddp_cpu")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--batch-size", type=int, default=256, help="per device")
    p.add_argument("--features", type=int, default=50000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the hardware option's setting)")
    p.add_argument("--full-max-labels", type=int, default=1_000_000)
    p.add_argument("--cache-dir", default=os.environ.get("XMC_CACHE_DIR", str(ROOT / ".cache" / "xmcneg")))
    p.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override, e.g. encoder.dim=128")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one sampler, in this process
        r = measure(args, args.child)
        if r is not None:
            print("RESULT " + json.dumps(r), flush=True)
        return 0
    summary = {}
    for s in args.samplers:
        if s == "full" and args.dataset == "synthetic" and args.labels > args.full_max_labels:
            print(json.dumps({"sampler": s, "labels": args.labels, "skipped": "C > --full-max-labels"}), flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", s, *(argv or sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(json.dumps({"sampler": s, "labels": args.labels, "error": err[:300]}), flush=True)
            continue
        r = json.loads(lines[-1])
        summary[s] = r["samples_per_s"]
        print(json.dumps(r), flush=True)
    labels = args.labels if args.dataset == "synthetic" else None  # a real dataset has its own C
    print(json.dumps({"summary": True, "dataset": args.dataset, "labels": labels, "hardware": args.hardware,
                      "samples_per_s": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
