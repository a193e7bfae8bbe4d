"""End to end through train.py / eval.py on tiny synthetic data (subprocesses, as a user runs them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inprocess import run_in_process

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.num_labels=200", "dataset.num_train=1500", "dataset.num_test=300", "dataset.num_features=800",
        "logger=none", "trainer.enable_progress_bar=false", "data.batch_size=128", "sampler=uniform",
        "encoder=bow_mlp", "data.val_min_docs=0"]  # 1,425 training rows: 12 batches an epoch
RESULT_KEYS = {"sampler", "dataset", "encoder", "test", "train_time_s", "eval_time_s", "samples_per_s",
               "peak_rss_mb", "time_to_target_s", "epochs", "status"}


def run(script, args, tmp_path, timeout=240):
    env = dict(os.environ, XMC_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="disabled")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uni")
    out = tmp / "run"
    p = run("train.py", [*TINY, "trainer.max_epochs=3", "eval.target_p1=0.05", f"hydra.run.dir={out}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, out


def test_run_records_follow_the_contract(uniform_run):
    _, out = uniform_run
    res = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(res)
    assert res["status"] == "completed" and res["sampler"] == "uniform" and res["epochs"] == 3
    assert {"P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5"} <= set(res["test"])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,train_time_s,val/P@1")
    assert len(rows) == 1 + 3
    times = [float(r.split(",")[2]) for r in rows[1:]]
    assert times == sorted(times) and times[-1] == pytest.approx(res["train_time_s"], abs=0.5)
    assert res["time_to_target_s"] == times[0]  # target 0.05 is reached at the first validation
    assert (out / "checkpoints" / "last.ckpt").exists()


def test_learns_far_above_the_most_popular_label(uniform_run):
    import numpy as np

    from xmcneg.data import formats
    tmp, out = uniform_run
    res = json.loads((out / "results.json").read_text())
    data_dir = next((tmp / "cache" / "synthetic").glob("synthetic-*"))
    _, ytr = formats.read_xc_bow(data_dir / "train.txt")
    _, yte = formats.read_xc_bow(data_dir / "test.txt")
    top = int(np.argmax(np.bincount(ytr.indices, minlength=ytr.shape[1])))
    popular_p1 = float(yte[:, top].toarray().mean())
    assert res["test"]["P@1"] > popular_p1 + 0.2


def test_eval_reproduces_test_metrics_and_predicts(uniform_run, tmp_path):
    tmp, out = uniform_run
    res = json.loads((out / "results.json").read_text())
    ckpt = out / "checkpoints" / f"{res['tested']}.ckpt"  # the checkpoint train.py tested
    p = run("eval.py", [*TINY, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'ev'}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["test"]["P@1"] == pytest.approx(res["test"]["P@1"], abs=1e-6)
    data_dir = next((tmp / "cache" / "synthetic").glob("synthetic-*"))
    pred = tmp_path / "pred.txt"
    p = run("eval.py", [*TINY, "mode=predict", f"ckpt_path={ckpt}", f"input={data_dir / 'test.txt'}",
                        f"output={pred}", "k=4", f"hydra.run.dir={tmp_path / 'pr'}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = pred.read_text().splitlines()
    assert len(lines) == 300 and all(len(line.split()) == 4 for line in lines)


def test_full_softmax_runs(tmp_path):
    """Full softmax, label vectors started at their documents' centroids (optim.label_init=centroid, set after
    the encoder exists and before the first step)."""
    p = run("train.py", [*TINY, "sampler=full", "loss=softmax", "trainer.max_epochs=1", "optim.label_init=centroid",
                         f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "label vectors initialised at the centroids of" in (tmp_path / "r" / "train.log").read_text()
    assert json.loads((tmp_path / "r" / "results.json").read_text())["test"]["P@1"] > 0.3


def test_malformed_file_gives_one_line_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.txt").write_text("3 5 4\n0,1 0:1.0 2:0.5\n1 1:x\n2 3:1\n")
    (d / "test.txt").write_text("1 5 4\n0 0:1\n")
    p = run_in_process("train.py", ["dataset=xc", f"dataset.dir={d}", "logger=none", f"hydra.run.dir={tmp_path / 'r'}"],
                       tmp_path)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert err[-1].startswith(f"error: {d / 'train.txt'}:3:"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "failed"


def test_nan_loss_stops_run_and_marks_failed(tmp_path):
    out = tmp_path / "r"
    p = run("train.py", [*TINY, "trainer.max_epochs=3", "debug.nan_at_step=15", f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 2
    assert "non-finite training loss" in p.stderr and "at step 15" in p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "step 15" in res["reason"]
    assert (out / "checkpoints" / "last.ckpt").exists()  # 12 steps per epoch: epoch 0's checkpoint survives


def test_without_a_validation_split_every_row_trains_and_the_last_weights_are_tested(tmp_path):
    """data.val_size=0: no validation; all 1,500 training rows each epoch, one metrics.csv row per epoch end."""
    out = tmp_path / "r"
    p = run("train.py", [*TINY, "data.val_size=0", "trainer.max_epochs=2", "eval.target_p1=0.05",
                         "debug.record_train_rows=true", f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no validation split" in p.stderr + p.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["tested"] == "last" and res["epochs"] == 2
    assert res["time_to_target_s"] is None and res["test"]["P@1"] > 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,train_time_s" and [r.split(",")[:2] for r in rows[1:]] == [["0", "12"], ["1", "24"]]
    trained = json.loads((out / "debug" / "train_rows_e0_r0.json").read_text())
    assert sorted(i for b in trained for i in b) == list(range(1500))


def test_full_label_lr_zero_keeps_the_label_table_at_its_init():
    """optim.full_label_lr=0 (sampler=full): the label table is fixed random unit vectors, the encoder alone learns."""
    import torch

    from train_conf import encoder_args, section
    from xmcneg.encoders.bow_linear import BowLinear
    from xmcneg.methods.classifier import XMCClassifier
    from xmcneg.methods.losses import SquaredHinge

    m = XMCClassifier(BowLinear(10, **encoder_args("bow_linear", dim=8)), 6, SquaredHinge(),
                      optim={**section("optim"), "full_label_lr": 0.0},
                      evaluation=section("eval"))
    opt = m.configure_optimizers()
    assert list(opt.parts) == ["encoder"] and not any(p.requires_grad for p in m.labels.parameters())
    labels, table = m.labels.w.weight.detach().clone(), m.encoder.bag.weight.detach().clone()
    torch.testing.assert_close(labels.norm(dim=1), torch.ones(6))
    x = {"indices": torch.tensor([0, 3, 4, 7]), "offsets": torch.tensor([0, 2]), "weights": torch.ones(4)}
    loss = m.full_loss(m.encoder(x), {"pos": torch.tensor([[1, -1], [2, 5]])})
    loss.backward()
    opt.step()
    assert torch.equal(m.labels.w.weight, labels) and not torch.equal(m.encoder.bag.weight, table)


def test_auto_input_optimizer_is_sgd_with_every_label_scored_below_its_label_count():
    """optim.input_optimizer=auto: plain SGD on the input table with full scoring below input_sgd_below_labels
    labels; AdamW with sampled negatives or at or above that count."""
    import torch

    from train_conf import encoder_args, section
    from xmcneg.encoders.bow_linear import BowLinear
    from xmcneg.methods.classifier import XMCClassifier
    from xmcneg.methods.losses import SampledSoftmax

    def model(below):
        return XMCClassifier(BowLinear(10, **encoder_args("bow_linear", dim=8)), 6, SampledSoftmax(),
                             optim={**section("optim"), "input_optimizer": "auto", "input_sgd_below_labels": below},
                             evaluation=section("eval"))

    m = model(10000)
    assert m.input_optimizer_kind() == "sgd"
    assert isinstance(m.configure_optimizers().parts["encoder"], torch.optim.SGD)  # bow_linear: the table alone
    assert model(6).input_optimizer_kind() == "adamw" and model(None).input_optimizer_kind() == "adamw"
    m.sampler = object()  # sampled negatives
    assert m.input_optimizer_kind() == "adamw"


def test_centroid_label_init_starts_from_a_nearest_centroid_classifier():
    """LabelTable.set_centroids: w_y = direction of the sum of y's documents' outputs, length norm / median
    document norm, b_y = 0; a label without documents keeps its vector. On separable data the initial scores
    already rank each document's own label first."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    from xmcneg.methods.label_table import LabelTable

    h = torch.tensor([[3.0, 0.0], [1.0, 0.2], [0.0, 2.0], [0.1, 1.0]])
    Y = sp.csr_matrix(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=np.float32))
    t = LabelTable(3, 2, sparse=False)
    untouched = t.w.weight[2].detach().clone()
    with torch.no_grad():
        t.b.weight.fill_(5.0)
    assert t.set_centroids(h, Y, norm=2.0) == 2
    med = h.norm(dim=1).median()
    torch.testing.assert_close(t.w.weight[0], torch.nn.functional.normalize(h[:2].sum(0), dim=0) * 2.0 / med)
    torch.testing.assert_close(t.w.weight[1], torch.nn.functional.normalize(h[2:].sum(0), dim=0) * 2.0 / med)
    assert torch.equal(t.w.weight[2], untouched) and not t.b.weight.any()
    assert torch.equal(t.score_all(h)[:, :2].argmax(1), torch.tensor([0, 0, 1, 1]))


def test_deferred_nan_check_names_the_window_and_fires_at_epoch_end():
    """The accelerator path (no per-step host sync): NaN/Inf is read every finite_check_every steps, and at the
    epoch end (before the epoch's checkpoint)."""
    import torch
    from omegaconf import OmegaConf

    from xmcneg.encoders.bow_linear import BowLinear
    from train_conf import encoder_args, section
    from xmcneg.methods.base import NonFiniteLossError
    from xmcneg.methods.classifier import XMCClassifier
    from xmcneg.methods.losses import SampledSoftmax

    m = XMCClassifier(BowLinear(10, **encoder_args("bow_linear", dim=4)), 6, SampledSoftmax(), optim=section("optim"),
                      evaluation=section("eval"))
    m.defer_finite_check, m.finite_check_every = True, 4
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    for step, loss in enumerate([ok, ok, ok, ok, ok, nan, ok]):  # steps 0..6: the NaN at 5 is not read yet
        m.train_steps = step
        m.guard_finite(loss)
    m.train_steps = 7
    with pytest.raises(NonFiniteLossError, match="between steps 4 and 7"):
        m.guard_finite(ok)
    m.train_steps = 8
    m.guard_finite(nan)  # step 8 opens a new window ...
    with pytest.raises(NonFiniteLossError, match="between steps 8 and 8"):
        m.on_train_epoch_end()  # ... which the epoch end reads
    m.on_train_epoch_end()  # nothing pending: no error


def test_help_lists_config_groups(tmp_path):
    p = run("train.py", ["--help"], tmp_path, timeout=60)
    for group in ("dataset:", "encoder:", "sampler:", "hardware:", "logger:", "loss:"):
        assert group in p.stdout


def test_auto_sampler_scores_every_label_below_its_threshold(tmp_path):
    from test_extending import train
    from xmcneg.data.datamodule import build_datamodule

    for below, scoring in ((1000, "full"), (50, "sampled")):  # 100 labels
        cfg, res = train(tmp_path / scoring, "sampler=auto", f"sampler.full_below_labels={below}",
                         "trainer.max_epochs=1")
        assert res["status"] == "completed" and res["sampler"] == "auto" and res["scoring"] == scoring
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.val_rows) == 80  # 5% of 800 is raised to data.val_min_docs, at most a tenth of train


def test_plateau_of_val_p1_ends_the_run_after_min_steps(tmp_path):
    from test_extending import train

    _, res = train(tmp_path, "sampler=full", "trainer.max_epochs=100", "trainer.early_stop_patience=2",
                   "trainer.early_stop_min_steps=120", "optim.encoder_lr=0.05", "optim.full_label_lr=0.05")
    assert res["status"] == "completed" and 10 <= res["epochs"] < 99  # 12 steps an epoch
