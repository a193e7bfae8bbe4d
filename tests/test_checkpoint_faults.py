"""Checkpoints are untrusted input and checkpoint writes can fail:
- a truncated checkpoint, random bytes, a plain torch.save of a dict, or a checkpoint that does not fit the model
  (another label count, another sampler) given to eval.py or train.py ckpt_path= gives one line
  `error: FILE: ...` saying what to do, exit code 2, no traceback;
- a checkpoint write that fails (ENOSPC mid-write, simulated by debug.kill_in=enospc) stops the run with one line and
  leaves the previous checkpoints intact and loadable, with no temp file behind;
- an unwritable run dir gives one line and exit code 2 before anything runs."""
import json

import pytest
import torch

from inprocess import run_in_process
from test_train_e2e import TINY, run
from xmcneg.resume import CheckpointError, read_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckf")
    out = tmp / "run"
    p = run("train.py", [*TINY, "trainer.max_epochs=1", f"hydra.run.dir={out}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, out / "checkpoints" / "last.ckpt"


def bad_checkpoints(good, d):
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "random": bytes(range(256)) * 64, "empty": b""}
    for name, content in files.items():
        (d / f"{name}.ckpt").write_bytes(content)
    torch.save({"weights": torch.zeros(3)}, d / "plain_dict.ckpt")
    torch.save([1, 2, 3], d / "plain_list.ckpt")
    return sorted(d.glob("*.ckpt"))


def test_read_checkpoint_rejects_every_bad_file(trained, tmp_path):
    _, good = trained
    assert "state_dict" in read_checkpoint(good, for_training=True)
    for path in bad_checkpoints(good, tmp_path):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg
        assert "delete it to start over" in msg and "point ckpt_path" in msg


def one_error_line(p, path):
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), p.stderr[-2000:]
    return errors[0]


def test_eval_and_train_report_a_corrupt_checkpoint_in_one_line(trained, tmp_path):
    tmp, good = trained
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    p = run_in_process("eval.py", [*TINY, f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 'ev'}"], tmp)
    assert "truncated, corrupt" in one_error_line(p, truncated)
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(3)}, plain)
    p = run_in_process("train.py", [*TINY, f"ckpt_path={plain}", f"hydra.run.dir={tmp_path / 'tr'}"], tmp)
    assert "not a checkpoint written by xmcneg" in one_error_line(p, plain)


def test_a_checkpoint_that_does_not_fit_the_model_is_named(trained, tmp_path):
    tmp, good = trained
    # eval on a dataset with another label count: the label table's shape differs
    p = run("eval.py", [*TINY, "dataset.num_labels=300", f"ckpt_path={good}", f"hydra.run.dir={tmp_path / 'ev'}"],
            tmp)  # a subprocess: eval.py takes the dataset from the command line only when Hydra says it is there
    line = one_error_line(p, good)
    assert "does not fit this model/dataset" in line and "labels.w.weight (200, " in line
    # resume training with another sampler than the checkpoint was trained with
    p = run_in_process("train.py", [*TINY, "sampler=frequency", f"ckpt_path={good}",
                                    f"hydra.run.dir={tmp_path / 'tr'}"], tmp)
    assert "sampler.name=uniform, this run has sampler.name=frequency" in one_error_line(p, good)


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = run("train.py", [*TINY, "trainer.max_epochs=3", "debug.kill_in=enospc", "debug.kill_epoch=1",
                         f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write the checkpoint (No space left on device)" in errors[0]
    assert "the previous checkpoint is kept" in errors[0]
    ckpts = out / "checkpoints"
    assert sorted(f.name for f in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temp file left behind
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = read_checkpoint(ckpts / name, for_training=True)
        assert ckpt["epoch"] == 0  # written in epoch 0, before the failing write of epoch 1
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and res["error"] == "crash"  # a re-run sweep resumes it


def test_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    p = run("train.py", [*TINY, f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {blocker / 'run'}: cannot write")
