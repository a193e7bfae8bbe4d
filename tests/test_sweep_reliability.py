"""A 3-job sweep where one job fails: the other two complete, a re-run skips them, the report shows the failure."""
import json

import pytest

from test_train_e2e import TINY, run
from xmcneg import report


def test_failing_job_does_not_stop_sweep_and_rerun_skips_completed(tmp_path):
    sweep = tmp_path / "sweep"
    # 500 negatives >= 200 labels: that job fails with a config error, the two others run
    # (without the progress-bar key: the job dir names, built from the overrides, must stay under 255 characters)
    tiny = [a for a in TINY if a != "trainer.enable_progress_bar=false"]
    args = ["-m", *tiny, "trainer.max_epochs=1", "sampler.num_negatives=8,16,500", f"hydra.sweep.dir={sweep}"]
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

    assert report.main([str(sweep)]) == 0  # the CLI of `python -m xmcneg.report`, in this process
    summary = (sweep / "summary.md").read_text()
    assert "sampler.num_negatives=500" in summary and "Failed" in summary


@pytest.mark.slow
def test_rerun_sweep_resumes_a_killed_job_from_its_checkpoint(tmp_path):
    """Two jobs that differ only in the kill hook: the first is SIGKILLed in the middle of epoch 1 (the whole sweep
    dies with it), the re-run (same command; the hook does not fire in a resumed run) resumes it from its own
    last.ckpt (end of epoch 0) and runs the second from scratch; both end with the same metrics, bit for bit."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.max_epochs=2", "debug.kill_in=train", "debug.kill_epoch=1,99",
            f"hydra.sweep.dir={sweep}"]
    p = run("train.py", args, tmp_path, timeout=400)
    assert p.returncode == -9, p.stderr[-3000:]
    killed = next(d for d in sweep.iterdir() if "debug.kill_epoch=1," in d.name + ",")
    assert (killed / "checkpoints" / "last.ckpt").exists() and not (killed / "results.json").exists()

    p = run("train.py", args, tmp_path, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'} (epoch 0" in p.stderr + p.stdout
    other = next(d for d in sweep.iterdir() if "debug.kill_epoch=99" in d.name)
    res, ref = (json.loads((d / "results.json").read_text()) for d in (killed, other))
    assert res["status"] == ref["status"] == "completed"
    assert res["resumed_from"]["epoch"] == 0 and "resumed_from" not in ref
    assert res["test"] == ref["test"] and res["global_step"] == ref["global_step"]
    rows = (killed / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1]  # one row per epoch, none lost or doubled


def test_sweep_resume_decision(tmp_path):
    """What a re-run sweep job starts from: its last.ckpt; nothing after a failure on bad input; a corrupt
    last.ckpt is reported, moved aside and the job starts over."""
    import torch

    from xmcneg.records import write_json
    from xmcneg.resume import sweep_resume_ckpt

    job = tmp_path / "job"
    last = job / "checkpoints" / "last.ckpt"
    assert sweep_resume_ckpt(job) is None  # never ran
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "xmcneg_config": {}, "loops": {}, "optimizer_states": [],
                "epoch": 3, "global_step": 40}, last)
    assert sweep_resume_ckpt(job) == str(last)  # killed: no results.json
    write_json(job / "results.json", {"status": "failed", "error": "crash", "reason": "RuntimeError: CUDA error"})
    assert sweep_resume_ckpt(job) == str(last)
    write_json(job / "results.json", {"status": "failed", "error": "input", "reason": "DataFormatError: ..."})
    assert sweep_resume_ckpt(job) is None and last.exists()
    write_json(job / "results.json", {"status": "failed", "error": "crash"})
    last.write_bytes(last.read_bytes()[:100])  # truncated
    assert sweep_resume_ckpt(job) is None
    assert not last.exists() and (job / "checkpoints" / "last.ckpt.corrupt").exists()
