"""The convergence study's parts: training-time validation cadence and budget, NGAME's phase share, the negative
diagnostics (hand-checkable values), the study command and the report over a study."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xmcneg import report
from xmcneg.diagnostics import count_below, grad_snr, negative_stats
from xmcneg.methods.losses import SampledSoftmax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from inprocess import run_in_process  # noqa: E402
from test_train_e2e import TINY, run  # noqa: E402


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------- training
def test_val_every_s_and_train_budget_and_diagnostics(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "logger=csv", "trainer.max_epochs=1000", "trainer.train_budget_s=3", "trainer.val_every_s=0.8",
            "diagnostics.every_steps=2", f"hydra.run.dir={out}"]
    p = run("train.py", args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = _csv(out / "metrics.csv")
    times = [float(r["train_time_s"]) for r in rows]
    steps_per_epoch = math.ceil(1425 / 128)
    # validation on the training-time cadence (not once per epoch), and a last one when the budget ends training
    # the cadence is wall time of training (diagnostics included, which the train clock leaves out); the last
    # validation is the one the budget triggers
    assert len(rows) >= 3 and min(b - a for a, b in zip(times[:-1], times[1:-1])) > 0.3
    assert any(int(r["step"]) % steps_per_epoch for r in rows)  # validations in the middle of epochs
    assert 3.0 <= res["train_time_s"] < 4.5 and res["epochs"] < 1000 and times[-1] >= 3.0
    diag = [r for r in _csv(out / "csv" / "metrics.csv") if r.get("diag/rank_pct")]
    assert len(diag) >= 2 and [int(r["step"]) for r in diag[:2]] == [0, 2]
    for r in diag:
        assert 0 <= float(r["diag/rank_pct"]) <= 100 and 0 <= float(r["diag/above_min_pos"]) <= 1
        assert 0 <= float(r["diag/pos_hit"]) < 0.2 and float(r["diag/cost_s"]) > 0


def test_diagnostics_leave_training_unchanged(tmp_path):
    """The diagnostics draw from the sampler's stream and put it back: the same run with and without them."""
    sweep = tmp_path / "sweep"  # the two runs as the two jobs of one multirun (one process)
    p = run("train.py", ["-m", *TINY, "sampler=frequency", "trainer.max_epochs=2", "diagnostics.every_steps=0,1",
                         "logger=csv", f"hydra.sweep.dir={sweep}",
                         "hydra.sweep.subdir=every${diagnostics.every_steps}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = []
    for every in (0, 1):
        out = sweep / f"every{every}"
        res.append(json.loads((out / "results.json").read_text())["test"])
        assert bool(every) == ("diag/rank_pct" in (out / "csv" / "metrics.csv").read_text())
    assert res[0] == res[1]


def test_ngame_phase_share_switches_on_the_budget_share(tmp_path):
    args = [*TINY, "sampler=ngame", "sampler.inference=exact", "trainer.max_epochs=100", "trainer.max_steps=24",
            "sampler.phase1_share=0.5", f"hydra.run.dir={tmp_path / 'run'}"]
    p = run("train.py", args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    # 12 batches per epoch: 12 of 24 steps (a share of 0.5) are done at the start of epoch 1
    assert "ngame: epoch 1: phase 2" in log and "ngame: epoch 0: phase 2" not in log
    p = run_in_process("train.py", [*args[:-3], "sampler.phase1_share=0.5", f"hydra.run.dir={tmp_path / 'bad'}"],
                       tmp_path)
    assert p.returncode == 2 and "error: config key 'sampler.phase1_share'" in p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------------- diagnostics
class _Model:
    """The narrow view negative_stats uses: embed, weights, sampler, loss."""

    def __init__(self, h, w, b, sampler):
        self.h, self.w, self.b, self.sampler, self.loss = h, w, b, sampler, SampledSoftmax()

    def embed(self, x):
        return self.h

    def weights(self):
        return self.w, self.b


class _TopSampler:
    """Draws the k top-scoring labels of each document that are not its positives (+ `with_pos` positives)."""

    def __init__(self, model_scores, pos, k, with_pos=0, noise=0.0):
        self.s, self.pos, self.k, self.with_pos, self.noise = model_scores, pos, k, with_pos, noise
        self.generator = torch.Generator().manual_seed(0)

    def sample(self, batch, h):
        s = self.s.clone().scatter_(1, self.pos, float("-inf"))
        if self.noise:
            s += self.noise * torch.rand(s.shape, generator=self.generator)
        neg = s.topk(self.k - self.with_pos, dim=1).indices
        neg = torch.cat([self.pos[:, : self.with_pos], neg], 1)
        return neg, torch.full(neg.shape, -math.log(self.s.shape[1]))


def _setup(C=50, d=4, P=3):
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(P, d, generator=g), torch.randn(C, d, generator=g), torch.randn(C, generator=g)
    s = h @ w.T + b
    pos = s.argsort(1)[:, :2]  # each document's two lowest-scoring labels are its positives
    return h, w, b, s, pos


def test_top_scoring_negatives_rank_near_100_percent():
    h, w, b, s, pos = _setup()
    C, k = s.shape[1], 5
    stats = negative_stats(_Model(h, w, b, _TopSampler(s, pos, k)), {"x": None, "pos": pos}, draws=4)
    # the top k labels have C-1, C-2, ..., C-k labels below them
    assert stats["diag/rank_pct"] == pytest.approx(100 * (C - (k + 1) / 2) / (C - 1))
    assert stats["diag/above_min_pos"] == 1.0 and stats["diag/pos_hit"] == 0.0
    assert math.isnan(stats["diag/grad_snr"])  # the same negatives every draw: no noise
    with_pos = negative_stats(_Model(h, w, b, _TopSampler(s, pos, k, with_pos=1)), {"x": None, "pos": pos})
    assert with_pos["diag/pos_hit"] == pytest.approx(1 / k)  # one draw in k is a positive (masked)
    noisy = negative_stats(_Model(h, w, b, _TopSampler(s, pos, k, noise=3.0)), {"x": None, "pos": pos}, draws=16)
    assert math.isfinite(noisy["diag/grad_snr"]) and noisy["diag/rank_pct"] < stats["diag/rank_pct"]


def test_count_below_matches_brute_force():
    h, w, b, s, _ = _setup(C=97)
    q = s[:, torch.tensor([0, 5, 7, 96])] + torch.tensor([0.0, 1e-3, -1e-3, 0.0])
    brute = (s.unsqueeze(1) < q.unsqueeze(2)).sum(-1)
    assert torch.equal(count_below(h, w, b, q, chunk=10), brute)


def test_grad_snr_by_hand():
    rows = torch.tensor([3])
    one = lambda v: (rows, torch.tensor([[float(v), 0.0]]))  # noqa: E731
    # G = 1, 2, 3: mean 2, V = (1 + 0 + 1) / 2 = 1, S = 4 - 1/3
    assert grad_snr([one(1), one(2), one(3)], 2) == pytest.approx(11 / 3)
    assert math.isnan(grad_snr([one(1), one(1)], 2))
    # duplicate rows within a draw are summed before the statistics
    two = (torch.tensor([3, 3]), torch.tensor([[0.5, 0.0], [0.5, 0.0]]))
    assert grad_snr([two, one(2), one(3)], 2) == pytest.approx(11 / 3)


# ---------------------------------------------------------------------------------------------------- study
def _fake(root, setting, sampler, seed, vals, C, diag=True):
    d = root / setting / f"sampler={sampler},seed={seed}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "sampler": {"name": sampler}}))
    with open(d / "metrics.csv", "w") as f:
        f.write("epoch,step,train_time_s,val/P@1,val/P@5\n")
        f.writelines(f"0,{i},{t},{p},{p / 2}\n" for i, (t, p) in enumerate(vals))
    if diag:
        (d / "csv").mkdir()
        (d / "csv" / "metrics.csv").write_text("step,train/loss,train_time_s,diag/rank_pct,diag/above_min_pos,"
                                               "diag/pos_hit,diag/grad_snr\n0,,0.1,50,0.5,0.01,2.0\n"
                                               "5,1.0,,,,,\n10,,5.0,60,0.3,0.0,-0.1\n")
    test = {k: vals[-1][1] for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")}
    (d / "results.json").write_text(json.dumps({
        "sampler": sampler, "dataset": setting.split("_")[0], "num_labels": C, "seed": seed, "status": "completed",
        "test": test, "train_time_s": vals[-1][0], "samples_per_s": 100.0, "peak_rss_mb": 1.0, "epochs": 1}))


def test_report_over_a_study(tmp_path, capsys):
    for seed in (0, 1):
        for setting, C in (("synthetic_C100", 100), ("eurlex57k_", 4271)):
            _fake(tmp_path, setting, "uniform", seed, [(10, 0.2), (20, 0.4), (40, 0.5)], C)
            _fake(tmp_path, setting, "adversarial", seed, [(2, 0.3), (4, 0.5), (40, 0.6)], C)
            _fake(tmp_path, setting, "full", seed, [(20, 0.45), (40, 0.48)], C, diag=False)
    assert report.main([str(tmp_path)]) == 0
    assert "in 2 settings" in capsys.readouterr().out
    study = (tmp_path / "study.md").read_text()
    assert "## eurlex57k C=4271" in study and "## synthetic C=100" in study
    for sub in ("eurlex57k_C4271", "synthetic_C100"):
        rows = {r["group"]: r for r in _csv(tmp_path / sub / "summary.csv")}
        # uniform's final val P@1 is 0.5: uniform reaches it at 40 s, adversarial at 4 s, full never
        assert float(rows["adversarial"]["speedup_vs_uniform_mean"]) == pytest.approx(10.0)
        assert float(rows["uniform"]["speedup_vs_uniform_mean"]) == pytest.approx(1.0)
        assert rows["full"]["speedup_vs_uniform_mean"] == "nan"
        assert (tmp_path / sub / "diagnostics.png").stat().st_size > 1000
        assert "10.00" in study


def test_study_commands_compose():
    """Every multirun of `sweeps/study.py` (both sizes) names existing samplers and options that compose."""
    from hydra import compose, initialize_config_dir

    for size in ("quick", "full"):
        p = subprocess.run([sys.executable, "sweeps/study.py", "--size", size, "--dry-run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert {"full", "uniform", "frequency", "in_batch", "adversarial", "mips", "mips_only", "ngame",
                "in_batch_random"} <= {s for ln in lines for s in ln.split(" sampler=")[1].split()[0].split(",")}
        for line in lines:
            over = [o for o in line.split(" -m ")[1].split() if not o.startswith("hydra.")]
            if any(o.startswith("sampler.") for o in over):  # Hydra checks them before sweeping the sampler
                assert not any(o.startswith(("sampler=", "seed=")) and "," in o for o in over), line
            over = [o.split(",")[0] if o.startswith(("sampler=", "seed=")) else o for o in over]
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("train", overrides=over)
            assert cfg.trainer.train_budget_s > 0 and cfg.trainer.val_every_s > 0 and not cfg.logger.wandb
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("train", overrides=["sampler=mips_only"]).sampler.mode == "mips_only"
