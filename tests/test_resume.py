"""Interrupted runs lose nothing: SIGKILL mid-epoch, during validation or during a checkpoint save, or the
preemption signal mid-epoch (a mid-epoch checkpoint), then resume with ckpt_path=last in the same run dir; the
result equals an uninterrupted run with the same seed."""
import json
import signal

import pytest

from test_train_e2e import TINY, run

EPOCHS = ["trainer.max_epochs=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    p = run("train.py", [*TINY, *EPOCHS, f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, json.loads((tmp / "run" / "results.json").read_text())


def kill_and_resume(point, tmp_path, cache_tmp):
    out = tmp_path / "run"
    p = run("train.py", [*TINY, *EPOCHS, f"debug.kill_in={point}", "debug.kill_epoch=1", f"hydra.run.dir={out}"],
            cache_tmp)
    assert p.returncode == (-signal.SIGUSR2 if point == "preempt" else -9), p.stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").exists()
    p = run("train.py", [*TINY, *EPOCHS, "ckpt_path=last", f"hydra.run.dir={out}"], cache_tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1, 2, 3]  # one row per epoch, none lost or doubled
    return res


def check_matches(res, ref):
    assert res["status"] == "completed" and res["epochs"] == 4
    # RNG streams, optimiser and sampler states are restored: the resumed run retraces the uninterrupted one
    assert res["test"] == ref["test"] and res["global_step"] == ref["global_step"]
    assert res["train_time_s"] > 0


def test_resume_after_kill_mid_epoch(reference, tmp_path):
    cache_tmp, ref = reference
    res = kill_and_resume("train", tmp_path, cache_tmp)
    assert res["resumed_from"]["epoch"] == 0  # the epoch-end checkpoint before the kill
    check_matches(res, ref)


def test_preemption_signal_saves_mid_epoch_and_resume_is_exact(reference, tmp_path):
    """SIGUSR2 (submitit's preemption signal) in batch 2 of epoch 1: last.ckpt is saved after that batch, the
    process then ends (the signal's default action); the resume skips the 3 batches already done in epoch 1."""
    cache_tmp, ref = reference
    res = kill_and_resume("preempt", tmp_path, cache_tmp)
    per_epoch = ref["global_step"] // 4  # global_step counts training batches (one combined optimiser step each)
    assert res["resumed_from"]["epoch"] == 1 and res["resumed_from"]["global_step"] == per_epoch + 3
    check_matches(res, ref)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["val", "ckpt"])
def test_resume_after_kill_in_validation_or_checkpoint_save(point, reference, tmp_path):
    cache_tmp, ref = reference
    check_matches(kill_and_resume(point, tmp_path, cache_tmp), ref)


def test_preemption_checkpoint_saves_then_hands_the_signal_to_submitit():
    """Under the SLURM launcher the signal's previous handler is submitit's (it requeues the job): it gets the
    signal after the checkpoint is saved, and is the handler again afterwards."""
    import os
    from types import SimpleNamespace

    from xmcneg.resume import PreemptionCheckpoint

    events = []

    def submitit_handler(signum, frame):
        events.append(("requeue", signum))

    old = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        cb = PreemptionCheckpoint("run/checkpoints/last.ckpt", signal.SIGUSR2)
        trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d),
                                  save_checkpoint=lambda path: events.append(("save", path)),
                                  current_epoch=1, global_step=7)
        cb.on_fit_start(trainer, None)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert events == []  # no signal yet
        os.kill(os.getpid(), signal.SIGUSR2)
        assert events == []  # the handler only takes note; the save waits for the batch end
        cb.on_train_batch_end(trainer, None, None, None, 1)
        assert events == [("save", "run/checkpoints/last.ckpt"), ("requeue", signal.SIGUSR2)]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, old)


NGAME = [*TINY, "sampler=ngame", "trainer.max_epochs=3", "sampler.phase1_epochs=2"]


def _final_weights(out):
    import torch

    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("epoch, extra", [
    (1, []),  # phase 1, clustered batches (the bank is partly rewritten at the signal)
    (2, ["sampler.phase2_ann_negatives=10"]),  # phase 2, with the HNSW training shortlist
])
def test_ngame_preempted_mid_epoch_resumes_exactly(epoch, extra, tmp_path):
    """NGAME preempted in the middle of an epoch, then resumed: its epoch set-up (batch sampler epoch and
    clusters, positive draws, shortlist index), skipped by Lightning on a mid-epoch restart, is redone from the
    checkpoint, so the run ends with the uninterrupted run's weights, test metrics and step count."""
    import torch

    args = [*NGAME, *extra]
    ref, out = tmp_path / "ref", tmp_path / "run"
    p = run("train.py", [*args, f"hydra.run.dir={ref}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run("train.py", [*args, "debug.kill_in=preempt", f"debug.kill_epoch={epoch}", f"hydra.run.dir={out}"],
            tmp_path)
    assert p.returncode == -signal.SIGUSR2, p.stderr[-2000:]
    p = run("train.py", [*args, "ckpt_path=last", f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    per_epoch = a["global_step"] // 3
    assert b["resumed_from"]["epoch"] == epoch and b["resumed_from"]["global_step"] == epoch * per_epoch + 3
    assert b["test"] == a["test"] and b["global_step"] == a["global_step"]
    wa, wb = _final_weights(ref), _final_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
