"""Resuming runs: checkpoints checked as untrusted input (`CheckpointError`, one line), sweep jobs that continue
from their own last.ckpt, a checkpoint on the preemption signal, and the per-rank RNG state and batch skipping that
make a mid-epoch resume retrace the uninterrupted run.
"""
import itertools
import logging
import os
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from xmcneg.distributed import active_dist
from xmcneg.errors import MissingFileError, XMCError
from xmcneg.records import read_results
from xmcneg.report import select

log = logging.getLogger("xmcneg")

WHAT_TO_DO = "delete it to start over, or point ckpt_path to another checkpoint (e.g. <run dir>/checkpoints/best.ckpt)"
MODEL_GROUPS = ("dataset.name", "encoder._target_", "sampler.name", "loss.name")


class CheckpointError(XMCError):
    """A checkpoint that cannot be used: names the file and says what to do."""

    def __init__(self, path, msg):
        self.path = str(path)
        super().__init__(f"{path}: {msg}")


def _short(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def read_checkpoint(path, for_training=False):
    """The checkpoint dict at `path`, loaded weights-only on the CPU; CheckpointError when it is not a readable
    checkpoint written by xmcneg's train.py (with `for_training`, one that training can resume from)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ckpt_path: {path} not found")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CheckpointError(path, f"cannot read it ({e.strerror or _short(e)})") from None
    try:
        # mmap: the tensors are not read into memory (train.py checks the checkpoint before Lightning loads it)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any failure to decode an untrusted file means it is unusable)
        raise CheckpointError(path, f"not a readable checkpoint: truncated, corrupt or not written by torch.save "
                                    f"({_short(e)}); {WHAT_TO_DO}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "xmcneg_config" not in ckpt:
        raise CheckpointError(path, f"not a checkpoint written by xmcneg's train.py (no model weights with a stored "
                                    f"config); {WHAT_TO_DO}")
    if for_training and not all(k in ckpt for k in ("loops", "optimizer_states", "epoch", "global_step")):
        raise CheckpointError(path, "holds weights only, no training state to resume from; evaluate it with eval.py, "
                                    "or start a new run")
    return ckpt


def check_fits(path, ckpt, module, cfg=None, hint=None):
    """CheckpointError unless the checkpoint's weights have the keys and shapes of `module`'s (and, given this
    run's `cfg`, were trained with the same dataset, encoder, sampler and loss)."""
    hint = hint or ("resume with the overrides it was trained with (its config is stored in it) or start a new "
                    "run dir")
    if cfg is not None:
        stored = ckpt.get("xmcneg_config") or {}
        for key in MODEL_GROUPS:
            a, b = select(stored, key), select(cfg, key)
            if a is not None and b is not None and str(a) != str(b):
                raise CheckpointError(path, f"was trained with {key}={a}, this run has {key}={b}; {hint}")
    state, own = ckpt["state_dict"], module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # an empty vector here is sized by the data at fit start (the wide head's support): the checkpoint's size holds
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
              and tuple(v.shape) != (0,)]
    if missing or unexpected or shapes:
        detail = "; ".join(shapes[:2] + [f"missing {', '.join(missing[:3])}"] * bool(missing)
                           + [f"unexpected {', '.join(unexpected[:3])}"] * bool(unexpected))
        raise CheckpointError(path, f"does not fit this model/dataset ({detail}); {hint}")


def sweep_resume_ckpt(out_dir):
    """Checkpoint a job of a re-run sweep resumes from (its own checkpoints/last.ckpt), or None to start over."""
    out_dir = Path(out_dir)
    last = out_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    res = read_results(out_dir / "results.json")
    if res.get("status") == "failed" and res.get("error") == "input":
        log.info("not resuming %s: its last attempt failed on its input or config (%s); starting over", out_dir,
                 res.get("reason"))
        return None
    try:
        read_checkpoint(last, for_training=True)
    except XMCError as e:
        aside = last.with_name(last.name + ".corrupt")
        os.replace(last, aside)
        log.warning("error: %s -- moved to %s; this job starts over", e, aside.name)
        return None
    return str(last)


def preempt_signal():
    """The signal submitit asks SLURM to send before a time limit / on preemption (USR2 unless overridden)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, "SIG" + name, signal.SIGUSR2)


class PreemptionCheckpoint(pl.Callback):
    """On the preemption signal: save `path` at the end of the current training batch (every rank, same step),
    then hand the signal on to the previous handler (submitit requeues the job) or its default action."""

    def __init__(self, path, signum=None):
        self.path, self.signum = str(path), signum or preempt_signal()
        self._received, self._previous, self._installed = False, None, False

    def _handler(self, signum, frame):
        self._received = True  # acted on at the next training batch end (a save needs every rank)

    def on_fit_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)
            self._installed = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # under DDP the ranks agree on the step (any rank signalled), so they all take part in the save
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        trainer.save_checkpoint(self.path)
        log.info("preemption signal: saved %s at epoch %d, step %d", self.path, trainer.current_epoch,
                 trainer.global_step)
        self._hand_on()

    def on_train_end(self, trainer, pl_module):
        if self._received:  # signalled after the last training batch: the epoch-end last.ckpt is there
            self._hand_on()
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception):
        self._uninstall()

    def _uninstall(self):
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _hand_on(self):
        self._received = False
        previous = self._previous
        self._uninstall()
        if callable(previous):
            previous(self.signum, None)
        elif previous in (None, signal.SIG_DFL):
            os.kill(os.getpid(), self.signum)  # the default action (ends the process), now with the checkpoint saved


class RankStates(pl.Callback):
    """Writes every rank's RNG streams (the global RNGs and the sampler's generator) into the checkpoint
    (`rank_states`, a list indexed by rank)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        from xmcneg.methods.base import get_rng_state

        states = [{"rng": get_rng_state()}]
        gen = getattr(getattr(pl_module, "sampler", None), "generator", None)
        if isinstance(gen, torch.Generator):
            states[0]["sampler_generator"] = gen.get_state()
        dist = active_dist()
        if dist is not None:
            local, states = states[0], [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
        checkpoint["rank_states"] = states


def select_rank_state(ckpt):
    """Put this rank's own RNG streams in the places the modules restore them from (in place)."""
    states = ckpt.pop("rank_states", None) if isinstance(ckpt, dict) else None
    if not states:
        return ckpt
    dist = active_dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    if len(states) != world:
        log.warning("checkpoint written by %d processes, resumed by %d: every rank continues rank 0's RNG streams "
                    "until the next epoch", len(states), world)
        return ckpt
    own = states[rank]
    if isinstance(ckpt.get("rng_state"), dict):
        ckpt["rng_state"] = own["rng"]
    if isinstance(ckpt.get("sampler_state"), dict) and own.get("sampler_generator") is not None:
        ckpt["sampler_state"]["generator"] = own["sampler_generator"]
    return ckpt


class SkipFirstBatches(torch.utils.data.Sampler):
    """A batch sampler that skips the first `skip` batches of its first iteration (then passes everything)."""

    def __init__(self, batch_sampler, skip):
        self.batch_sampler, self.skip = batch_sampler, int(skip)
        self.sampler = getattr(batch_sampler, "sampler", None)  # Lightning calls set_epoch on it

    def set_epoch(self, epoch):
        if callable(getattr(self.batch_sampler, "set_epoch", None)):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.batch_sampler)  # Lightning counts the skipped batches as done already

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batch_sampler), skip, None)


class SkipDoneBatches(pl.Callback):
    """After a mid-epoch resume, the training DataLoader skips the batches already trained on in that epoch; the
    global RNGs are set back to the checkpoint's after its iterator has drawn its seed from them."""

    def __init__(self):
        self._rng_state = None
        self._skipped = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._rng_state = checkpoint.get("rng_state")

    def setup(self, trainer, pl_module, stage):
        dm = trainer.datamodule
        if stage != "fit" or dm is None or getattr(dm, "_skip_done_batches", False):
            return
        make = dm.train_dataloader

        def train_dataloader():
            dl = make()
            fit_loop = trainer.fit_loop
            done = fit_loop.epoch_loop.batch_progress.current.processed if fit_loop.restarting else 0
            if not isinstance(dl, DataLoader) or dl.batch_sampler is None or not 0 < done < len(dl.batch_sampler):
                return dl
            log.info("mid-epoch resume: skipping the %d training batches of epoch %d done before the checkpoint",
                     done, trainer.current_epoch)
            self._skipped = True
            return DataLoader(dl.dataset, batch_sampler=SkipFirstBatches(dl.batch_sampler, done),
                              collate_fn=dl.collate_fn, num_workers=dl.num_workers, pin_memory=dl.pin_memory,
                              persistent_workers=dl.persistent_workers, worker_init_fn=dl.worker_init_fn)

        dm.train_dataloader = train_dataloader
        dm._skip_done_batches = True

    def on_train_start(self, trainer, pl_module):
        from xmcneg.methods.base import set_rng_state

        if self._skipped and isinstance(self._rng_state, dict):
            set_rng_state(self._rng_state)
        self._rng_state = None
