"""Sweep report (xmcneg.report), the multirun/ddp guard, the sweep configs, and a real two-job joblib sweep."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xmcneg import report
from xmcneg.errors import ConfigError
from xmcneg.sweep_guard import check_multirun

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- fixtures
def _run(root, name, sampler, seed, rows=None, results=None, num_negatives=64):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "sampler": {"name": sampler, "num_negatives": num_negatives}}))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"sampler={sampler}", f"seed={seed}"]))
    if rows is not None:
        with open(d / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "train_time_s", "val/P@1", "val/P@3", "val/P@5", "val/nDCG@5"])
            for i, (t, p1) in enumerate(rows):
                w.writerow([i, 10 * (i + 1), t, p1, p1 * 0.8, p1 * 0.5, p1 * 0.7])
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    return d


def _results(sampler, seed, p1, train_time, status="completed", **extra):
    r = {"sampler": sampler, "dataset": "synthetic", "encoder": "BowMLP", "seed": seed,
         "test": {"P@1": p1, "P@3": p1 * 0.8, "P@5": p1 * 0.5, "nDCG@1": p1, "nDCG@3": p1 * 0.9,
                  "nDCG@5": p1 * 0.7, "PSP@1": p1 * 0.6, "PSP@3": p1 * 0.5, "PSP@5": p1 * 0.4},
         "train_time_s": train_time, "eval_time_s": 1.0, "samples_per_s": 1000.0 + seed, "peak_rss_mb": 500.0,
         "time_to_target_s": None, "epochs": 3, "status": status}
    r.update(extra)
    return r


@pytest.fixture
def sweep(tmp_path):
    """uniform x 2 seeds, frequency x 1 (completed), mips (failed, with reason), in_batch (no results.json).

    Final val P@1: uniform 0.60 and 0.64 (mean 0.62), frequency 0.58 -> default target 0.62 - 0.01 = 0.61:
    uniform seed 0 first reaches 0.61 at t=20 (0.62), seed 1 at t=32 (0.64) -> mean 26, std sqrt(72);
    frequency never reaches it -> uniform is first.
    """
    s = tmp_path / "sweep"
    _run(s, "sampler=uniform,seed=0", "uniform", 0, [(10, 0.30), (20, 0.62), (30, 0.60)],
         _results("uniform", 0, 0.50, 30.5))
    _run(s, "sampler=uniform,seed=1", "uniform", 1, [(12, 0.35), (22, 0.50), (32, 0.64)],
         _results("uniform", 1, 0.60, 32.5))
    d = _run(s, "sampler=frequency,seed=0", "frequency", 0, [(5, 0.40), (10, 0.55), (15, 0.58)],
             _results("frequency", 0, 0.55, 15.5))
    (d / "csv").mkdir()  # Lightning's CSV logger dir inside a run: not a run of its own
    (d / "csv" / "metrics.csv").write_text("epoch,step,val/P@1\n0,1,0.99\n")
    _run(s, "sampler=mips,seed=0", "mips", 0, [(4, 0.2)],
         {"sampler": "mips", "seed": 0, "status": "failed", "reason": "RuntimeError: faiss index build failed",
          "train_time_s": 4.5})
    _run(s, "sampler=in_batch,seed=0", "in_batch", 0, [(3, 0.1)], None)
    (s / "multirun.yaml").write_text("hydra: {}\n")
    return s


def _csv_rows(path):
    with open(path) as f:
        return {r["group"]: r for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------------- report
def test_report_on_hand_made_sweep(sweep):
    res = report.make_report([sweep])
    for name in ("convergence.png", "summary.md", "summary.csv"):
        assert (sweep / name).is_file() and (sweep / name).stat().st_size > 0, name
    assert (sweep / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["runs"]) == 5  # the csv/ dir inside a run is not a run

    assert res["target"] == pytest.approx(0.61)
    assert res["first"]["group"] == "uniform" and res["first"]["time_s"] == pytest.approx(26.0)

    rows = _csv_rows(sweep / "summary.csv")
    assert set(rows) == {"uniform", "frequency", "mips", "in_batch"}
    u, f = rows["uniform"], rows["frequency"]
    assert (u["n"], u["failed"], u["reached_target"]) == ("2", "0", "2")
    assert float(u["time_to_target_s_mean"]) == pytest.approx(26.0)
    assert float(u["time_to_target_s_std"]) == pytest.approx(math.sqrt(72), abs=1e-4)
    assert float(u["test_P@1_mean"]) == pytest.approx(0.55)
    assert float(u["test_P@1_std"]) == pytest.approx(0.0707107, abs=1e-5)
    assert float(u["train_time_s_mean"]) == pytest.approx(31.5)
    assert float(u["samples_per_s_mean"]) == pytest.approx(1000.5)
    assert float(u["final_val_P@1_mean"]) == pytest.approx(0.62)
    assert (f["n"], f["reached_target"], f["time_to_target_s_mean"]) == ("1", "0", "")
    assert float(f["test_PSP@5_mean"]) == pytest.approx(0.22)
    assert (rows["mips"]["n"], rows["mips"]["failed"]) == ("0", "1")

    md = (sweep / "summary.md").read_text()
    assert "0.6100" in md and "First to reach the target: **uniform**, mean 26.0 s" in md
    assert "0.5500 ± 0.0707" in md
    failed = md.split("## Failed / unfinished runs")[1].split("## Runs")[0]
    assert "sampler=mips,seed=0" in failed and "RuntimeError: faiss index build failed" in failed
    assert "| failed |" in failed
    assert "sampler=in_batch,seed=0" in failed and "no results.json" in failed
    assert "sampler=uniform" not in failed


def test_report_cli_target_out_and_log_time(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.main([str(sweep), "--target", "0.5", "--out", str(out), "--log-time"]) == 0
    assert {p.name for p in out.iterdir()} >= {"convergence.png", "summary.md", "summary.csv"}
    assert not (sweep / "summary.md").exists()
    rows = _csv_rows(out / "summary.csv")
    # target 0.5: uniform seed 0 at t=20 (0.62), seed 1 at t=22 (0.50) -> 21; frequency at t=10 (0.55)
    assert float(rows["uniform"]["time_to_target_s_mean"]) == pytest.approx(21.0)
    assert float(rows["frequency"]["time_to_target_s_mean"]) == pytest.approx(10.0)
    text = capsys.readouterr().out
    assert "first reached by frequency (10.0 s)" in text and "faiss index build failed" in text
    assert json.loads((out / "summary.json").read_text())["first_to_target"]["group"] == "frequency"


def test_report_several_dirs_group_by_and_errors(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "n8", "uniform", 0, [(1, 0.1), (2, 0.2)], _results("uniform", 0, 0.2, 2.0), num_negatives=8)
    _run(b, "n32", "uniform", 0, [(1, 0.3), (2, 0.4)], _results("uniform", 0, 0.4, 2.0), num_negatives=32)
    res = report.make_report([a, b], group_by=["sampler.num_negatives"])
    groups = [r["group"] for r in res["rows"]]
    assert groups == ["uniform sampler.num_negatives=32", "uniform sampler.num_negatives=8"]
    assert res["target"] == pytest.approx(0.39) and res["first"]["group"].endswith("=32")
    assert (a / "summary.csv").is_file()
    # a single run dir works too; an empty dir is an error
    assert report.main([str(a / "n8"), "--out", str(tmp_path / "one")]) == 0
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no run dirs" in capsys.readouterr().err


def test_band_interpolates_on_common_grid():
    import numpy as np
    x, mean, lo, hi = report._band([(np.array([0.0, 10.0]), np.array([0.0, 1.0])),
                                    (np.array([0.0, 20.0]), np.array([0.0, 1.0]))])
    # common range [0, 10]; at t=10 the first run is at 1.0, the second (interpolated) at 0.5
    assert x[0] == 0.0 and x[-1] == pytest.approx(10.0)
    assert (mean[-1], lo[-1], hi[-1]) == (pytest.approx(0.75), pytest.approx(0.5), pytest.approx(1.0))
    i = int(np.argmin(abs(x - 4.0)))
    assert mean[i] == pytest.approx(0.75 * x[i] / 10)
    # curves that do not overlap: union range, each point from the curves that cover it
    x, mean, _, _ = report._band([(np.array([0.0, 1.0]), np.array([0.0, 1.0])),
                                  (np.array([2.0, 3.0]), np.array([5.0, 5.0]))])
    assert x[0] == 0.0 and x[-1] == 3.0 and mean[-1] == 5.0


# ---------------------------------------------------------------------------------------------------- guard
def _hw(**kw):
    from omegaconf import OmegaConf
    base = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}
    base.update(kw)
    return OmegaConf.create({"hardware": base})


@pytest.mark.parametrize("hw, refused", [
    (dict(strategy="ddp", devices=2), True),
    (dict(strategy="ddp", devices=1, num_nodes=2), True),
    (dict(strategy="ddp_find_unused_parameters_true", devices="auto"), True),
    (dict(strategy="ddp", devices=[0, 1]), True),
    (dict(name="ddp", strategy="ddp", devices=1), True),
    (dict(strategy="ddp", devices=1), False),
    (dict(strategy="ddp_spawn", devices=2), False),
    (dict(strategy="auto", devices=1), False),
])
def test_check_multirun(hw, refused):
    cfg = _hw(**hw)
    check_multirun(cfg, multirun=False, launcher="")  # single runs are never refused
    check_multirun(cfg, multirun=True,
                   launcher="hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    if refused:
        with pytest.raises(ConfigError) as e:
            check_multirun(cfg, multirun=True, launcher="hydra._internal.core_plugins.basic_launcher.BasicLauncher")
        assert e.value.key == "hardware.strategy" and "submitit_slurm" in str(e.value)
    else:
        check_multirun(cfg, multirun=True, launcher="x.BasicLauncher")


def test_check_multirun_outside_hydra_is_a_no_op():
    check_multirun(_hw(strategy="ddp", devices=4))


# ---------------------------------------------------------------------------------------------------- configs
def _compose(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_convergence_sweep_names_existing_samplers():
    cfg = _compose(["+sweep=convergence"])
    params = cfg.hydra.sweeper.params
    samplers = str(params["sampler"]).split(",")
    full_list = ["full", "uniform", "frequency", "adversarial", "mips", "ngame"]
    assert samplers == [s for s in full_list if s in samplers] and samplers[:3] == full_list[:3]
    missing = [s for s in samplers if not (ROOT / "conf" / "sampler" / f"{s}.yaml").is_file()]
    assert not missing, f"conf/sweep/convergence.yaml names samplers without conf/sampler/<name>.yaml: {missing}"
    assert str(params["seed"]) == "0,1"
    assert cfg.trainer.max_time and cfg.eval.target_p1 is None
    assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_negatives_and_batch_size_sweeps_compose():
    cfg = _compose(["+sweep=negatives"])
    assert cfg.sampler.name == "uniform" and str(cfg.hydra.sweeper.params["sampler.num_negatives"]) == "8,32,128,512"
    if not (ROOT / "conf" / "sampler" / "ngame.yaml").is_file():
        pytest.skip("conf/sampler/ngame.yaml does not exist yet: +sweep=batch_size (NGAME) cannot compose")
    cfg = _compose(["+sweep=batch_size"])
    assert cfg.sampler.name == "ngame" and "data.batch_size" in cfg.hydra.sweeper.params


def test_lr_optuna_sweep_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e .[optuna]")
    cfg = _compose(["+sweep=lr_optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"optim.encoder_lr", "optim.label_lr"}


def test_wandb_sweep_config():
    w = yaml.safe_load((ROOT / "sweeps" / "wandb_convergence.yaml").read_text())
    assert w["program"] == "train.py"
    assert w["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert w["parameters"]["sampler"]["values"] == str(_compose(["+sweep=convergence"])
                                                      .hydra.sweeper.params["sampler"]).split(",")


# ---------------------------------------------------------------------------------------------------- real sweep
def test_two_job_joblib_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "sampler=uniform,frequency", "dataset=synthetic", "dataset.num_labels=200", "dataset.num_train=600",
           "dataset.num_test=100", "dataset.num_features=300", "trainer.max_epochs=1", "logger=none",
           f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, WANDB_MODE="disabled", XMC_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode == 0, tail
    subdirs = sorted(d.name for d in sweep_dir.iterdir() if d.is_dir())
    assert len(subdirs) == 2, f"{subdirs}\n{tail}"
    for sampler in ("uniform", "frequency"):
        # one subdir per job, named by its overrides (hydra.job.override_dirname)
        name = next((n for n in subdirs if f"sampler={sampler}" in n.split(",")), None)
        assert name is not None, f"no subdir for {sampler}: {subdirs}\n{tail}"
        assert "trainer.max_epochs=1" in name.split(",") and "dataset.num_labels=200" in name.split(",")
        d = sweep_dir / name
        assert (d / ".hydra").is_dir()
        assert (d / "results.json").is_file(), f"{d}: no results.json\n{tail}"
        res = json.loads((d / "results.json").read_text())
        assert res["status"] == "completed", res
        assert res["sampler"] == sampler and 0.0 <= res["test"]["P@1"] <= 1.0
        assert (d / "metrics.csv").is_file()
    rep = report.make_report([sweep_dir])
    assert {r["group"] for r in rep["rows"]} == {"uniform", "frequency"} and not rep["failed"]


def test_each_job_in_one_process_gets_its_own_wandb_run(tmp_path, monkeypatch):
    """The joblib launcher runs several jobs in one worker process: each must log to its own (offline) wandb run,
    and no run may stay open after a job."""
    import wandb
    from hydra import compose, initialize_config_dir

    from xmcneg import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    run_ids = []
    for seed in (0, 1):
        out = tmp_path / f"job{seed}"
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[
                "logger=wandb", f"seed={seed}", "dataset.num_labels=200", "dataset.num_train=300",
                "dataset.num_test=50", "dataset.num_features=100", "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'c'}"])
        train.run(cfg)
        assert wandb.run is None  # closed at the end of the job
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        run_ids.append(runs[0].name.rsplit("-", 1)[-1])
    assert run_ids[0] != run_ids[1]


# ---------------------------------------------------------------------------------------------------- peers
def _peer(dataset, library, p1, p5, **extra):
    line = {"dataset": dataset, "library": library, "version": "1.0", "P@1": p1, "P@3": p1 * 0.8, "P@5": p5,
            "nDCG@5": p1 * 0.9, "PSP@5": p1 * 0.7, "train_s": 2.5, "predict_s": 0.5, "peak_rss_mb": 300.0}
    line.update(extra)
    return line


def test_report_peers_table_and_reference_lines(sweep, tmp_path, monkeypatch):
    """--peers: the sweep's dataset's peer lines (not another dataset's) in summary.md and as labelled horizontal
    lines at their test P@1 / P@5 on the P@1 / P@5 panels; a failed peer is listed, not drawn."""
    import matplotlib.axes

    peers = tmp_path / "peers.jsonl"
    peers.write_text("\n".join(json.dumps(p) for p in [
        _peer("synthetic", "omikuji", 0.7123, 0.41),
        _peer("synthetic", "napkinxc", 0.6987, 0.40),
        {"dataset": "synthetic", "library": "pecos", "status": "failed", "reason": "RuntimeError: boom"},
        _peer("bibtex", "omikuji", 0.6311, 0.28),
    ]) + "\n\n")
    drawn, notes = [], []
    axhline, annotate = matplotlib.axes.Axes.axhline, matplotlib.axes.Axes.annotate

    def spy_line(ax, y=0, *args, **kwargs):
        drawn.append((ax.get_ylabel(), round(y, 4), kwargs.get("label")))
        return axhline(ax, y, *args, **kwargs)

    def spy_note(ax, text, *args, **kwargs):
        notes.append((ax.get_ylabel(), text))
        return annotate(ax, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy_line)
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", spy_note)
    out = tmp_path / "rep"
    assert report.main([str(sweep), "--out", str(out), "--peers", str(peers)]) == 0

    md = (out / "summary.md").read_text()
    section = md.split("## Linear baselines (benchmarks/peers.py)")[1].split("## Failed / unfinished runs")[0]
    assert "| synthetic | omikuji | 1.0 | 0.7123 |" in section and "| 0.4100 |" in section
    assert "| synthetic | napkinxc |" in section and "failed: RuntimeError: boom" in section
    assert "bibtex" not in section
    lines = [d for d in drawn if "target" not in (d[2] or "")]
    # each peer on both panels of its metric (time and epoch axes), one legend entry per library and panel
    assert sorted(d[:2] for d in lines) == sorted(2 * [("val/P@1", 0.7123), ("val/P@1", 0.6987),
                                                       ("val/P@5", 0.41), ("val/P@5", 0.40)])
    assert sorted(d[2] for d in lines if d[2] != "_nolegend_") == sorted(4 * ["omikuji (test)", "napkinxc (test)"])
    assert sorted(notes) == sorted(2 * [("val/P@1", "omikuji 0.712"), ("val/P@1", "napkinxc 0.699"),
                                        ("val/P@5", "omikuji 0.410"), ("val/P@5", "napkinxc 0.400")])
    assert [p["library"] for p in json.loads((out / "summary.json").read_text())["peers"]] == \
        ["omikuji", "napkinxc", "pecos"]
    # without --peers: no section, no reference lines
    drawn.clear(), notes.clear()
    assert report.main([str(sweep), "--out", str(tmp_path / "plain")]) == 0
    assert "Linear baselines" not in (tmp_path / "plain" / "summary.md").read_text()
    assert all("target" in (d[2] or "") for d in drawn) and not notes


def test_report_peers_bad_file(sweep, tmp_path, capsys):
    bad = tmp_path / "peers.jsonl"
    bad.write_text(json.dumps(_peer("synthetic", "omikuji", 0.7, 0.4)) + "\n{not json\n")
    assert report.main([str(sweep), "--out", str(tmp_path / "o"), "--peers", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:2: not a JSON line") and "\n" not in err
    bad.write_text(json.dumps({"library": "omikuji"}) + "\n")
    assert report.main([str(sweep), "--peers", str(bad)]) == 2
    assert f"{bad}:1: expected a JSON object" in capsys.readouterr().err
    assert report.main([str(sweep), "--peers", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
