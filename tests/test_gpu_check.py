"""benchmarks/gpu_check.py's CPU-side logic: the one-line failure without CUDA, the run plan, the per-run time
shares and the JSON summary (runs replaced by a fake), and one real tiny run on the CPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(tmp_path):
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "XMC_CACHE_DIR": str(tmp_path / "cache")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_cuda_one_error_line(tmp_path):
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "-o", str(out)], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: gpu_check: no CUDA GPU") and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_plan_time_shares_and_summary(tmp_path):
    gc = _module()
    calls = []

    def fake(cmd, timeout):
        calls.append((cmd, timeout))
        sampler = cmd[cmd.index("--child") + 1]
        if sampler == "mips":
            return "timeout", None, "stopped after 1s"
        if sampler == "adversarial":
            return 1, None, "RuntimeError: boom"
        return 0, {"samples_per_s": 1000.0, "step_ms": 256.0, "peak_mem_mb": 123, "setup_s": 1.0,
                   "precision": "bf16-mixed", "world_size": 1, "device": "fake"}, ""

    out = tmp_path / "s.json"
    rc = gc.main(["-o", str(out), "--hardware", "cpu", "--budget-s", "80", "--steps", "7"], runner=fake)
    assert rc == 1  # two runs failed
    s = json.loads(out.read_text())
    names = [r["name"] for r in s["runs"]]
    assert names == [*gc.SAMPLERS, "uniform_ddp1"] and s["labels"] == 1_000_000 and s["steps"] == 7
    by = {r["name"]: r for r in s["runs"]}
    assert by["mips"]["exit_status"] == "timeout" and "error" in by["mips"]
    assert by["adversarial"]["exit_status"] == 1 and by["adversarial"]["error"] == "RuntimeError: boom"
    assert by["uniform"]["exit_status"] == 0 and by["uniform"]["samples_per_s"] == 1000.0
    assert by["uniform"]["peak_mem_mb"] == 123 and "error" not in by["uniform"]
    assert not s["ok"]
    ddp_cmd = calls[-1][0]
    assert ddp_cmd[ddp_cmd.index("--hardware") + 1] == "ddp" and "hardware.devices=1" in ddp_cmd
    assert all(c[c.index("--labels") + 1] == "1000000" and c[c.index("--steps") + 1] == "7" for c, _ in calls)
    assert calls[0][1] == pytest.approx(80 / 8, rel=0.05)  # the budget shared by the runs still to go
    assert all(t <= 80 for _, t in calls)


def test_bad_arguments_one_line(tmp_path, capsys):
    assert _module().main(["--steps", "0", "-o", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err.startswith("error: gpu_check:")


def test_real_tiny_run_on_cpu(tmp_path):
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "-o", str(out), "--hardware", "cpu", "--ddp-hardware", "none",
                        "--samplers", "uniform", "--labels", "300", "--steps", "2", "--warmup", "1",
                        "--budget-s", "120", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=200)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["ok"] and len(s["runs"]) == 1 and s["runs"][0]["exit_status"] == 0
    assert s["runs"][0]["samples_per_s"] > 0 and s["runs"][0]["world_size"] == 1
