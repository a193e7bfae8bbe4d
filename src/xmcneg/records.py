"""Run records (README.md, "Run records"): the train-time clock, metrics.csv (a row per validation), results.json,
atomic checkpoints and the test hooks that kill a run or record its ranks' state.

The clock runs from fit start (a sampler's one-time fitting counts as training time) and pauses during validation;
its state is in the checkpoints. Files are written atomically (temp file + os.replace).
"""
import csv
import errno
import hashlib
import io
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.experimental.callback import Callback as HydraCallback
from pytorch_lightning.plugins.io import TorchCheckpointIO

from xmcneg.data.formats import atomic_file
from xmcneg.errors import XMCError


def atomic_write_text(path, text):
    with atomic_file(path) as f:
        f.write(text)


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class CheckpointWriteError(XMCError):
    """A checkpoint could not be written (disk full, unwritable dir): the previous checkpoint is kept."""

    resumable = True  # a re-run sweep resumes the job from its previous checkpoint

    def __init__(self, path, err):
        reason = err.strerror or str(err) if isinstance(err, OSError) else str(err)
        super().__init__(f"{path}: cannot write the checkpoint ({reason}); the previous checkpoint is kept and "
                         f"loadable: free space or make {Path(path).parent} writable, then resume with ckpt_path=last "
                         f"and the same hydra.run.dir")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced, then renamed: a kill never leaves a corrupt checkpoint, and a
    failed write (OSError: disk full, unwritable dir) removes the temp file, keeps the previous checkpoint and stops
    the run with CheckpointWriteError. Loading picks this rank's RNG streams (xmcneg.resume.select_rank_state)."""

    kill_before_rename = False  # test hook (debug.kill_in=ckpt): die between writing and renaming
    fail_write = False  # test hook (debug.kill_in=enospc): the write fails with ENOSPC after some bytes

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as f:
                if self.fail_write:
                    f.write(b"\x80\x02" * 512)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
                torch.save(checkpoint, f)
                if self.kill_before_rename:
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
        except OSError as e:
            raise CheckpointWriteError(path, e) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        from xmcneg.resume import select_rank_state

        return select_rank_state(super().load_checkpoint(path, map_location=map_location, weights_only=weights_only))


class KillSwitch(pl.Callback):
    """Test hook (debug.kill_in / debug.kill_epoch), in epoch `kill_epoch` of a run that was not resumed: SIGKILL
    mid-epoch (`train`), at a validation's start (`val`) or during a checkpoint save (`ckpt`); send the preemption
    signal mid-epoch (`preempt`); or make the epoch-end checkpoint write fail with ENOSPC (`enospc`)."""

    POINTS = ("train", "val", "ckpt", "preempt", "enospc")

    def __init__(self, point, epoch):
        self.point, self.epoch, self.armed = point, int(epoch), True

    def _die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def on_fit_start(self, trainer, pl_module):
        self.armed = trainer.ckpt_path is None  # a resumed run is not killed again

    def _now(self, trainer, point):
        return self.armed and self.point == point and trainer.current_epoch == self.epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._now(trainer, "train") and batch_idx == 2:
            self._die()
        if self._now(trainer, "preempt") and batch_idx == 2:
            from xmcneg.resume import preempt_signal

            os.kill(os.getpid(), preempt_signal())

    def on_validation_start(self, trainer, pl_module):
        if self._now(trainer, "val"):
            self._die()

    def on_train_epoch_start(self, trainer, pl_module):
        if self._now(trainer, "ckpt"):
            trainer.strategy.checkpoint_io.kill_before_rename = True
        if self._now(trainer, "enospc"):
            trainer.strategy.checkpoint_io.fail_write = True


class OutputDirCheck(HydraCallback):
    """Hydra callback (conf/train.yaml hydra.callbacks): before Hydra writes into the run dir (the sweep dir for
    -m), check that it can be created and written; if not, one line `error: DIR: ...` and exit code 2."""

    def on_run_start(self, config, **kwargs):
        check_writable_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs):
        check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def check_writable_dir(d, key):
    d = Path(str(d))
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(f"error: {d}: cannot write the run's output there ({e.strerror or e}); set {key} to a writable dir",
              file=sys.stderr)
        sys.exit(2)


def tensor_digest(t) -> str:
    """sha1 of a tensor's dtype, shape and bytes: a bit-exact fingerprint for comparing processes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digests(obj):
    """`obj` (nested dicts / lists of tensors and scalars) with every tensor replaced by its digest."""
    if isinstance(obj, torch.Tensor):
        return tensor_digest(obj)
    if isinstance(obj, dict):
        return {str(k): state_digests(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [state_digests(v) for v in obj]
    return obj if obj is None or isinstance(obj, (bool, int, float, str)) else repr(obj)


class RankDebugRecorder(pl.Callback):
    """Test hook (debug.record_train_rows), for checking DDP: every rank writes to <run dir>/debug/ its training
    batches' row ids per epoch (train_rows_e<epoch>_r<rank>.json) and, at fit end, digests of its module and
    optimiser states and of `pl_module.debug_state()` (fit_end_r<rank>.json)."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir) / "debug"
        self.rows = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(batch["idx"].tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / f"train_rows_e{trainer.current_epoch}_r{trainer.global_rank}.json", self.rows)

    def on_fit_end(self, trainer, pl_module):
        out = {"rank": trainer.global_rank, "world_size": trainer.world_size,
               "global_step": trainer.global_step, "epoch": trainer.current_epoch,
               "state_dict": state_digests(pl_module.state_dict()),
               "optimizers": [state_digests(opt.state_dict()) for opt in trainer.optimizers],
               "debug_state": state_digests(pl_module.debug_state())}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / f"fit_end_r{trainer.global_rank}.json", out)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_results(path):
    """results.json as a dict ({} when missing or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_metrics_csv(path):
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v):
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v


def time_to_target(rows, target, key="val/P@1"):
    """First train_time_s at which `key` reached `target` (None if never or no target)."""
    hits = (r["train_time_s"] for r in rows if isinstance(r.get(key), float) and r[key] >= target)
    return None if target is None else next(hits, None)


class RunRecorder(pl.Callback):
    """Keeps the train-time clock and writes metrics.csv rows (one per validation; without a validation split,
    `validates=False`, one per epoch end, without val/ metrics); logs train_time_s to every logger."""

    def __init__(self, out_dir, resume=True, validates=True):
        self.csv_path, self.validates = Path(out_dir) / "metrics.csv", validates
        self.train_time, self.samples, self._started = 0.0, 0, None
        # a resumed run keeps the rows up to its checkpoint (load_state_dict); a fresh one starts a new file
        self.rows = read_metrics_csv(self.csv_path) if resume else []

    def start(self):
        if self._started is None:
            self._started = time.perf_counter()

    def pause(self):
        if self._started is not None:
            self.train_time += time.perf_counter() - self._started
            self._started = None

    def elapsed(self):
        return self.train_time + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_fit_start(self, trainer, pl_module):
        self.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples += int(batch["idx"].shape[0]) * trainer.world_size

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.pause()

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._add_row(trainer, pl_module, {k: float(v) for k, v in trainer.callback_metrics.items()
                                           if k.startswith("val/")})
        self.start()

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.validates:
            self._add_row(trainer, pl_module, {})

    def _add_row(self, trainer, pl_module, val):
        t = self.elapsed()
        step = getattr(pl_module, "train_steps", trainer.global_step)
        self.rows.append({"epoch": trainer.current_epoch, "step": step, "train_time_s": round(t, 3), **val})
        if trainer.is_global_zero:
            self._write_csv()
            for lg in trainer.loggers:
                lg.log_metrics({"train_time_s": t, **val}, step=step)

    def on_train_end(self, trainer, pl_module):
        self.pause()

    def on_exception(self, trainer, pl_module, exception):
        self.pause()

    def _write_csv(self):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in self.rows for k in r)))
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def state_dict(self):
        return {"train_time": self.elapsed(), "samples": self.samples, "rows": len(self.rows)}

    def load_state_dict(self, state):
        self.train_time, self.samples, self._started = float(state["train_time"]), int(state["samples"]), None
        self.rows = self.rows[: int(state["rows"])]  # drop rows logged after the checkpoint
