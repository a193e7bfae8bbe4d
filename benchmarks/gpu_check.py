"""One-command GPU check: every sampler for a few hundred steps on synthetic data at C = 1M in bf16, plus a
1-GPU `hardware=ddp` run, summarised in one JSON file (samples/s, peak GPU memory, each run's exit status).

    python benchmarks/gpu_check.py [-o gpu_check.json] [--labels 1000000] [--steps 300] [--budget-s 450]

Each run is one `benchmarks/throughput.py` child process (the real training path: train.py's config,
datamodule, LightningModule and pl.Trainer) on `hardware=gpu` (bf16-mixed); the DDP run is the uniform
sampler on `hardware=ddp` with one device. Runs share the --budget-s seconds: each gets at most what is left,
divided by the runs still to go, and a run past its share is stopped and recorded as "timeout" (the summary is
still written). The summary: {"device", "labels", "steps", "wall_s", "ok", "runs": [{"name", "sampler",
"hardware", "exit_status" (0 = completed, else the exit code or "timeout"), "samples_per_s", "step_ms",
"peak_mem_mb", "setup_s", "wall_s", "error"}]}. Without a CUDA GPU it prints one `error:` line and exits 2
(`--hardware cpu --ddp-hardware none` runs the same plan on the CPU, to check the script itself).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLERS = ("full", "uniform", "frequency", "in_batch", "adversarial", "mips", "ngame")


def plan(args):
    """(name, sampler, hardware, extra throughput.py arguments) of every run."""
    runs = [(s, s, args.hardware, []) for s in args.samplers]
    if args.ddp_hardware != "none":
        runs.append(("uniform_ddp1", "uniform", args.ddp_hardware, ["-o", "hardware.devices=1"]))
    return runs


def run_one(cmd, timeout):
    """(exit status, the child's RESULT dict or None, last stderr line)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", None, f"stopped after {timeout:.0f}s"
    lines = [ln[7:] for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    err = (p.stderr.strip().splitlines() or [""])[-1][:300]
    return p.returncode, (json.loads(lines[-1]) if lines else None), err


def main(argv=None, runner=run_one):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="gpu_check.json", help="the JSON summary")
    p.add_argument("--labels", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--budget-s", type=float, default=450.0, help="all runs together (the check must take < 8 min)")
    p.add_argument("--hardware", default="gpu", help="conf/hardware option of the sampler runs")
    p.add_argument("--ddp-hardware", default="ddp", help="conf/hardware option of the 1-device DDP run; none: skip")
    p.add_argument("--cache-dir", default=os.environ.get("XMC_CACHE_DIR", "/tmp/xmcneg-gpu-check-cache"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.labels < 2 or args.budget_s <= 0:
        print("error: gpu_check: --steps >= 1, --warmup >= 0, --labels >= 2 and --budget-s > 0 needed",
              file=sys.stderr)
        return 2
    device = "cpu"
    if args.hardware != "cpu":
        import torch

        if not torch.cuda.is_available():
            print("error: gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was run",
                  file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    runs, todo = [], plan(args)
    for i, (name, sampler, hardware, extra) in enumerate(todo):
        left = args.budget_s - (time.perf_counter() - t0)
        timeout = max(1.0, left / (len(todo) - i))
        cmd = [sys.executable, str(HERE / "throughput.py"), "--child", sampler, "--labels", str(args.labels),
               "--hardware", hardware, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--cache-dir", args.cache_dir, *extra]
        t = time.perf_counter()
        status, res, err = runner(cmd, timeout)
        row = {"name": name, "sampler": sampler, "hardware": hardware, "exit_status": status,
               "wall_s": round(time.perf_counter() - t, 1)}
        if res is not None:
            row.update({k: res.get(k) for k in ("samples_per_s", "step_ms", "peak_mem_mb", "setup_s", "precision",
                                                 "world_size", "device")})
        if status != 0 or res is None:
            row["error"] = err or "no result"
        runs.append(row)
        print(json.dumps(row), flush=True)
    summary = {"device": device, "labels": args.labels, "steps": args.steps,
               "wall_s": round(time.perf_counter() - t0, 1),
               "ok": all(r["exit_status"] == 0 and "error" not in r for r in runs), "runs": runs}
    Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"summary": args.output, "ok": summary["ok"], "wall_s": summary["wall_s"]}), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
