"""Build everything from the Hydra config, train, test, and write the run records."""
import ctypes
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from xmcneg.errors import ConfigError, MissingFileError, XMCError
from xmcneg.records import peak_rss_mb, read_results, time_to_target, write_json
from xmcneg.sweep_guard import check_multirun

log = logging.getLogger("xmcneg")


def keep_freed_memory():
    """glibc: serve large blocks from the heap and keep freed memory there (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD
    2 GiB), so the F- and C-sized buffers of each training step reuse mapped pages instead of faulting in new ones."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-4, 0), mallopt(-1, 2 ** 31 - 1)


def is_multirun():
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def build_loggers(cfg, out_dir):
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    if cfg.logger.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        finish_wandb()  # a run left open in this process (a reused sweep worker) must not absorb this job
        name = cfg.logger.run_name or f"{cfg.sampler.name}-seed{cfg.seed}"
        wl = WandbLogger(project=cfg.logger.project, group=cfg.logger.group, name=name, save_dir=str(out_dir),
                         config=OmegaConf.to_container(cfg, resolve=True))
        wl.experiment.define_metric("train_time_s")
        wl.experiment.define_metric("val/*", step_metric="train_time_s")
        loggers.append(wl)
    return loggers


def finish_wandb(exit_code=None):
    """Close this process's wandb run, if any. Lightning's WandbLogger leaves it open after fit, and the joblib
    launcher runs several jobs in one worker process: without this, the next job logs into the previous run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def resolve_ckpt(cfg, out_dir):
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path  # None, or a path (resume.read_checkpoint says when it is missing)
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise MissingFileError(f"ckpt_path=last: {last} not found (resume with hydra.run.dir=<the run's dir>)")
    return str(last)


def run(cfg: DictConfig):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xmcneg.budget import PlateauStop, TrainBudget
    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.diagnostics import NegativeDiagnostics
    from xmcneg.factory import build_module
    from xmcneg.methods.label_table import SPARSE_GRAD_SYNC
    from xmcneg.records import AtomicCheckpointIO, KillSwitch, RankDebugRecorder, RunRecorder
    from xmcneg import resume

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"sampler": cfg.sampler.name, "dataset": cfg.dataset.name,
               "encoder": str(cfg.encoder._target_).rsplit(".", 1)[-1], "seed": int(cfg.seed),
               "status": "running"}
    recorder = None
    t_start = time.perf_counter()
    sweep_job = is_multirun() and not cfg.ckpt_path
    if sweep_job:
        done = read_results(out_dir / "results.json")
        if done.get("status") == "completed":  # re-running a sweep only runs the jobs not yet completed
            log.info("skipping %s: results.json says completed", out_dir)
            return done.get("test", {}).get("P@1")
    try:
        check_multirun(cfg)
        # a re-run sweep job resumes from its own last.ckpt; checkpoints are checked before anything is built
        ckpt_path = resume.sweep_resume_ckpt(out_dir) if sweep_job else resolve_ckpt(cfg, out_dir)
        resume_ckpt = resume.read_checkpoint(ckpt_path, for_training=True) if ckpt_path else None
        if cfg.hardware.num_threads:
            torch.set_num_threads(int(cfg.hardware.num_threads))
        keep_freed_memory()
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        module = build_module(cfg, dm)
        # stored in every checkpoint for eval.py; the method's ${...} stay unresolved, so that eval.py's own `eval`,
        # `data` and `hardware` sections (model_config in xmcneg/evaluate.py) reach the rebuilt method
        module.run_config = {**OmegaConf.to_container(cfg, resolve=True),
                             "method": OmegaConf.to_container(cfg.method, resolve=False)}
        sync = str(cfg.hardware.sparse_grad_sync)
        if sync not in SPARSE_GRAD_SYNC:  # checked here, before any DDP process starts
            raise ConfigError("hardware.sparse_grad_sync", f"expected one of {', '.join(SPARSE_GRAD_SYNC)}, got {sync}")
        module.sparse_grad_sync = sync  # the module resolves auto once the process group exists (its setup hook)
        if cfg.debug.nan_at_step is not None:
            module.fault_step = int(cfg.debug.nan_at_step)
        results["num_labels"] = int(dm.num_labels)
        results["scoring"] = "full" if getattr(module, "sampler", 0) is None else "sampled"
        if resume_ckpt is not None:
            resume.check_fits(ckpt_path, resume_ckpt, module, cfg)
            at = {"epoch": int(resume_ckpt["epoch"]), "global_step": int(resume_ckpt["global_step"])}
            results["resumed_from"] = {"ckpt": ckpt_path, **at}
            log.info("resuming from %s (epoch %d, step %d)", ckpt_path, at["epoch"], at["global_step"])
            resume_ckpt = None
        validates = dm.split("val")[0].shape[0] > 0
        if not validates:
            log.info("data.val_size=0: no validation split; training on every training point until "
                     "trainer.max_epochs or max_time (no plateau stop), then testing the last weights")
        recorder = RunRecorder(out_dir, resume=ckpt_path is not None, validates=validates)
        # one rolling checkpoint, checkpoints/last.ckpt, replaced atomically at every epoch end
        ckpt = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), filename="last", save_top_k=1, monitor=None,
                               enable_version_counter=False, every_n_epochs=1, save_on_train_epoch_end=True)
        best = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), filename="best", monitor="val/P@1", mode="max",
                               save_top_k=1, enable_version_counter=False)
        callbacks = [recorder, ckpt, best, resume.RankStates(), resume.SkipDoneBatches(),
                     resume.PreemptionCheckpoint(out_dir / "checkpoints" / "last.ckpt")]
        kill_in = cfg.debug.kill_in
        if kill_in is not None:
            if kill_in not in KillSwitch.POINTS:
                raise ConfigError("debug.kill_in", f"expected one of {', '.join(KillSwitch.POINTS)}, got {kill_in}")
            callbacks.append(KillSwitch(kill_in, cfg.debug.kill_epoch))
        if cfg.debug.record_train_rows:
            callbacks.append(RankDebugRecorder(out_dir))
        t, d = cfg.trainer, cfg.diagnostics
        callbacks += [TrainBudget(recorder, t.train_budget_s), NegativeDiagnostics(recorder, **d, seed=cfg.seed)]
        if t.early_stop_patience is not None:
            for key, least in (("early_stop_patience", 1), ("early_stop_min_steps", 0)):
                if not isinstance(t[key], int) or t[key] < least:
                    raise ConfigError(f"trainer.{key}", f"expected an integer >= {least}, got {t[key]!r}")
            callbacks.append(PlateauStop(t.early_stop_patience, t.early_stop_min_steps))
        trainer = pl.Trainer(
            accelerator=cfg.hardware.accelerator, devices=cfg.hardware.devices, num_nodes=cfg.hardware.num_nodes,
            strategy=cfg.hardware.strategy, precision=cfg.hardware.precision,
            max_epochs=int(t.max_epochs), max_steps=int(t.max_steps), max_time=t.max_time,
            check_val_every_n_epoch=t.check_val_every_n_epoch, val_check_interval=t.val_check_interval
            if t.val_every_s is None else timedelta(seconds=float(t.val_every_s)),
            log_every_n_steps=int(t.log_every_n_steps), enable_progress_bar=bool(t.enable_progress_bar),
            limit_train_batches=t.limit_train_batches, num_sanity_val_steps=0,
            logger=build_loggers(cfg, out_dir) or False, callbacks=callbacks,
            default_root_dir=str(out_dir), deterministic=False, enable_model_summary=False,
            plugins=[AtomicCheckpointIO()],
            # the datamodule shards every split itself; Lightning's DistributedSampler would pad it with duplicates
            use_distributed_sampler=False,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        fit_wall = time.perf_counter() - t_start
        # snapshot the run's accounting now: testing the best checkpoint restores the recorder's state from it
        train_time, samples, rows = recorder.train_time, recorder.samples, list(recorder.rows)
        t_test = time.perf_counter()
        use_best = module.evaluation.test_ckpt == "best" and best.best_model_path and Path(best.best_model_path).exists()
        trainer.test(module, datamodule=dm, verbose=True, ckpt_path=best.best_model_path if use_best else None,
                     weights_only=True)
        test_s = time.perf_counter() - t_test
        results.update({
            "test": {k: round(v, 6) for k, v in module.test_metrics.items()},
            "train_time_s": round(train_time, 3),
            "eval_time_s": round(max(fit_wall - train_time, 0.0) + test_s, 3),
            "samples_per_s": round(samples / max(train_time, 1e-9), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "time_to_target_s": time_to_target(rows, cfg.eval.target_p1),
            "epochs": int(trainer.current_epoch),
            "tested": "best" if use_best else "last",
            "global_step": int(trainer.global_step),
            "status": "interrupted" if trainer.interrupted else "completed",
        })
        if trainer.is_global_zero:
            write_json(out_dir / "results.json", results)
        log.info("results: %s", out_dir / "results.json")
        # the value a sweeper (Optuna) maximises: the best validation P@1, never a test metric
        vals = [r["val/P@1"] for r in rows if isinstance(r.get("val/P@1"), float)]
        return max(vals) if vals else None
    except BaseException as e:
        # "input": bad input or config, which a re-run sweep does not resume from (see xmcneg.resume)
        kind = "input" if isinstance(e, XMCError) and not getattr(e, "resumable", False) else "crash"
        results.update({"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0], "error": kind,
                        "peak_rss_mb": round(peak_rss_mb(), 1)})
        if recorder is not None:
            results.update({"train_time_s": round(recorder.elapsed(), 3), "epochs_logged": len(recorder.rows)})
        if rank_zero_only.rank == 0:
            write_json(out_dir / "results.json", results)
        raise
    finally:
        finish_wandb(exit_code=0 if results.get("status") == "completed" else 1)


def cli(fn, cfg):
    """Run an entry point: bad input gives one `error: ...` line on stderr and exit code 2 (a traceback only with
    HYDRA_FULL_ERROR=1); in a multirun a failing job is recorded in its results.json and the sweep goes on."""
    logging.getLogger("xmcneg").setLevel(logging.INFO)
    multirun = is_multirun()
    try:
        return fn(cfg)
    except XMCError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        if not multirun:
            raise
        log.exception("job failed: %s", e)
        return None


def main(cfg: DictConfig):
    """Entry point of train.py."""
    return cli(run, cfg)
