"""trainer.train_budget_s: a training-time budget, measured by the run's train-time clock (records.RunRecorder:
validation, diagnostics and testing excluded), the same for every method of a race."""
import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping


class TrainBudget(pl.Callback):
    """Stops training once the clock reaches `seconds` (the last batch ends, then a final validation), and keeps
    `pl_module.budget_used`: the share of the budget spent (of trainer.max_steps when `seconds` is None and
    max_steps > 0; None without either). NGAME's sampler.phase1_share reads it."""

    def __init__(self, recorder, seconds=None):
        self.recorder, self.seconds = recorder, None if seconds is None else float(seconds)

    def _update(self, trainer, pl_module):
        if self.seconds is not None:
            used = self.recorder.elapsed() / self.seconds
        else:
            used = trainer.global_step / trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        pl_module.budget_used = used = trainer.strategy.broadcast(used)  # one decision for all DDP ranks
        return used

    def on_train_epoch_start(self, trainer, pl_module):
        self._update(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seconds is not None and self._update(trainer, pl_module) >= 1.0:
            trainer.should_stop = True


class PlateauStop(EarlyStopping):
    """trainer.early_stop_patience: stops training after `patience` validations without a new best val/P@1,
    counting only validations after `min_steps` training steps (a slow start on tiny data is no plateau)."""

    def __init__(self, patience, min_steps):
        super().__init__("val/P@1", mode="max", patience=patience, check_finite=False,
                         check_on_train_epoch_end=False)  # checked after each validation
        self.min_steps = min_steps

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step >= self.min_steps:
            super().on_validation_end(trainer, pl_module)
