"""A 3-job sweep where one job fails: the other two complete, a re-run skips them, the report shows the failure."""
import json
import subprocess
import sys

from test_train_e2e import ROOT, TINY, run


def test_failing_job_does_not_stop_sweep_and_rerun_skips_completed(tmp_path):
    sweep = tmp_path / "sweep"
    # 500 negatives >= 200 labels: that job fails with a config error, the two others run
    args = ["-m", *TINY, "trainer.max_epochs=1", "sampler.num_negatives=8,16,500", f"hydra.sweep.dir={sweep}"]
    p = run("train.py", args, tmp_path, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    status = {d.name: json.loads((d / "results.json").read_text()) for d in sweep.iterdir() if d.is_dir()}
    assert sorted(r["status"] for r in status.values()) == ["completed", "completed", "failed"]
    failed = next(r for n, r in status.items() if "sampler.num_negatives=500" in n)
    assert "sampler.num_negatives" in failed["reason"]
    mtimes = {n: (sweep / n / "results.json").stat().st_mtime_ns for n in status}

    p = run("train.py", args, tmp_path, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    for n, r in status.items():
        same = (sweep / n / "results.json").stat().st_mtime_ns == mtimes[n]
        assert same == (r["status"] == "completed"), n  # completed jobs skipped, the failed one re-run
    assert "skipping" in p.stderr + p.stdout

    rep = subprocess.run([sys.executable, "-m", "xmcneg.report", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    summary = (sweep / "summary.md").read_text()
    assert "sampler.num_negatives=500" in summary and "Failed" in summary
