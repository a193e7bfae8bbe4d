"""What every method shares: an encoder, a label table, optionally a negative sampler, one optimiser of named
parts, the training step, the NaN/Inf guard, resume state (step counter, RNG, sampler) and the evaluation
buffers. A method subclasses `XMCModule` and writes `training_loss`, `configure_optimizers` and `eval_metrics`
(methods/classifier.py, methods/ngame.py; tests/toy_method.py is a minimal one)."""
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch

from xmcneg.distributed import active_dist, to_device
from xmcneg.errors import ConfigError, XMCError
from xmcneg.methods.label_table import LabelTable, sparse_sync_mode
from xmcneg.methods.optim import CombinedOptimizer, OptimParams, params_of, wrap
from xmcneg.methods.sparse_optim import all_gather_sparse_mean, encoder_optimizers, sparse_tables


class NonFiniteLossError(XMCError):
    pass


@dataclass
class EvalParams:
    """conf/train.yaml `eval`: the keys, their types and checks (values: only in conf/)."""
    k: int
    doc_chunk: int
    label_chunk: int
    search: str
    ann_index: str
    ann_shortlist: int
    target_p1: Optional[float]
    test_ckpt: str

    @classmethod
    def of(cls, d):
        p = params_of(cls, d, "eval")
        if p.search not in ("exact", "ann"):
            raise ConfigError("eval.search", f"must be exact or ann, got {p.search!r}")
        if p.test_ckpt not in ("best", "last"):
            raise ConfigError("eval.test_ckpt", f"expected best or last, got {p.test_ckpt}")
        for key in ("k", "doc_chunk", "label_chunk"):
            if int(getattr(p, key)) <= 0:
                raise ConfigError(f"eval.{key}", f"must be > 0, got {getattr(p, key)}")
        return p


def get_rng_state():
    """Global RNG states as tensors/lists only (checkpoints are loaded weights-only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
        except Exception:  # noqa: BLE001  (a different number of devices)
            pass


def mask_positives(neg, pos):
    """Boolean mask, True where a negative is NOT one of the document's positives.
    neg (B,k) per document or (U,) sorted & shared; pos (B,P) padded with -1."""
    if neg.dim() == 2:
        return ~(neg.unsqueeze(-1) == pos.unsqueeze(1)).any(-1)
    B, U = pos.shape[0], neg.shape[0]
    mask = torch.ones(B, U, dtype=torch.bool, device=neg.device)
    if U == 0:
        return mask
    at = torch.searchsorted(neg, pos.clamp(min=0)).clamp_(max=U - 1)
    hit = (pos >= 0) & (neg[at] == pos)
    rows = torch.arange(B, device=neg.device).unsqueeze(1).expand_as(pos)
    mask[rows[hit], at[hit]] = False
    return mask


class XMCModule(pl.LightningModule):
    """Manual optimisation. One training step (`training_step`): zero the gradients of the parts this step
    trains (`trained_parts`), `training_loss(batch)` -> (loss, batch size), the NaN/Inf guard, backward, the label
    table's gradient sync, one step of those parts, the step counter, the log. Evaluation collects the encoder
    outputs of the split (all ranks under DDP) and hands them to `eval_metrics(split, emb, idx, query)`.

    `sparse_grad_sync` (hardware.sparse_grad_sync) is set by the caller before fit; `fault_step` injects a NaN
    loss at that step (debug.nan_at_step); `run_config` (a plain dict) is stored in every checkpoint so that
    eval.py can rebuild the model."""

    finite_check_every = 50  # accelerator steps between reads of the NaN/Inf flag (the CPU checks every step)
    defer_finite_check = False  # tests: use the accelerator's deferred check on the CPU too
    # True: DDP's reducer averages no gradient; the module averages them all after backward (`backward_and_sync`).
    # For a method that trains its parts in turn: the reducer would wait for gradients of the parts it skips.
    outside_ddp = False

    def __init__(self, encoder, num_labels: int, sparse_labels: bool, evaluation=None, inv_prop=None,
                 sampler=None, check_finite: bool = True, optim=None):
        super().__init__()
        self.automatic_optimization = False
        self.encoder, self.num_labels, self.sampler = encoder, int(num_labels), sampler
        self.labels = LabelTable(self.num_labels, encoder.dim, sparse=sparse_labels)
        self.evaluation, self.inv_prop, self.check_finite = EvalParams.of(evaluation), inv_prop, check_finite
        self.optim = None if optim is None else OptimParams.of(optim)  # conf/train.yaml `optim` (encoder_optimizer)
        self.sparse_grad_sync, self.fault_step, self.run_config = "auto", None, None
        self.input_sync = None  # how the encoder's sparse input tables are synced under DDP (setup)
        self.train_steps, self.test_metrics, self._eval = 0, {}, None  # train_steps: training batches done
        self.budget_used = None  # share of the training budget spent (xmcneg.budget.TrainBudget)
        # accelerator: device-side "a loss since the last check was NaN/Inf" flag, and its first step
        self._nonfinite, self._nonfinite_from = None, 0
        self._sampler_state, self._rng_state = None, None  # restored from a checkpoint, applied at fit start

    # ------------------------------------------------------------------ what a method writes
    def training_loss(self, batch):
        """(loss, batch size) of one training batch."""
        raise NotImplementedError

    def trained_parts(self):
        """Names of the optimiser parts this step trains (None = all)."""
        return None

    def eval_metrics(self, split, emb, idx, query):
        """Metrics dict for the evaluation split from all its encoder outputs `emb` (rows `idx` of the split)."""
        raise NotImplementedError

    def correction_query(self, batch, h):
        """Per-document input of the sampler's prediction-time correction, kept during evaluation (None: none)."""
        return None

    # ------------------------------------------------------------------ narrow view for samplers
    @torch.no_grad()
    def weights(self):
        """(W (C, d), b (C,)) of the label table, detached."""
        w, b = self.labels.weights()
        return w.detach(), b.detach()

    @torch.no_grad()
    def embed(self, x):
        """Encoder outputs for the encoder input `x`, in eval mode, without gradients."""
        was = self.encoder.training
        self.encoder.eval()
        try:
            return self.encoder(to_device(x, self.device))
        finally:
            self.encoder.train(was)

    def embed_split(self, split, batch_size=2048, datamodule=None):
        """(N, d) float32 encoder outputs of every document of a datamodule split, in eval mode."""
        dm = datamodule if datamodule is not None else self.trainer.datamodule
        n = dm.split(split)[1].shape[0]
        collate = dm.collate(split)
        out = [self.embed(collate(np.arange(i, min(n, i + batch_size)))["x"]).float()
               for i in range(0, n, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.encoder.dim, device=self.device)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage):
        # after the process group exists, before the strategy wraps the module in DDP: with all_gather the label
        # tables are left out of DDP's reducer (and its initial broadcast)
        # (the encoder's sparse input tables, encoder.sparse_input, are synced like the label tables)
        ignore, mode = [], "all_gather" if self.outside_ddp else self.sparse_grad_sync
        if self.labels.resolve_sync(mode) == "all_gather":
            ignore += ["labels.w.weight", "labels.b.weight"]
        self.input_sync = sparse_sync_mode(mode, bool(self.input_tables()))
        if self.input_sync == "all_gather":
            ignore += [name for name, _ in self.input_tables()]
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        if stage == "fit" and ignore and active_dist() and trainable <= set(ignore):  # DDP wraps for fit only
            raise ConfigError("encoder.sparse_input", "under DDP with all-gathered tables the model needs a dense "
                                                      "parameter: set encoder.sparse_input=false or use encoder=bow_mlp")
        if ignore:
            self._ddp_params_and_buffers_to_ignore = ignore
        elif hasattr(self, "_ddp_params_and_buffers_to_ignore"):
            del self._ddp_params_and_buffers_to_ignore

    def input_tables(self):
        """(name, weight) of the encoder's sparse-gradient input tables (encoder.sparse_input)."""
        ids = {id(p) for p in sparse_tables(self.encoder)}
        return [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters() if id(p) in ids]

    def backward_and_sync(self, loss):
        """Backward, then average over the ranks the gradients DDP's reducer does not: the label table's and the
        input tables' with all_gather, and with `outside_ddp` the dense encoder parameters' too (one all-reduce)."""
        dist = active_dist()
        if not (self.outside_ddp and dist is not None):
            self.manual_backward(loss)
        else:
            with self.trainer.strategy.block_backward_sync():
                self.manual_backward(loss)
            grads = [p.grad for p in self.encoder.parameters() if p.grad is not None and not p.grad.is_sparse]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(avg.view_as(g))
        self.labels.sync_grads()
        if self.input_sync == "all_gather" and dist is not None:
            all_gather_sparse_mean([p for _, p in self.input_tables()], dist)

    def on_fit_start(self):
        self.labels.broadcast()
        dist = active_dist()
        if self.input_sync == "all_gather" and dist is not None:  # out of DDP: no initial broadcast by DDP
            with torch.no_grad():
                for _, p in self.input_tables():
                    dist.broadcast(p.data, src=0)
        if self.sampler is not None:
            self.sampler.setup(self.trainer.datamodule, self, state=self._sampler_state)
            self._sampler_state = None
        # resume: the global RNG (data order, dropout) continues where the checkpointed run was (the resumed
        # epoch's data iterator is created right after this hook)
        if self._rng_state is not None:
            set_rng_state(self._rng_state)
            self._rng_state = None

    def on_train_epoch_start(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.current_epoch)  # the (seed, rank, epoch) stream of this epoch

    def on_train_epoch_end(self):
        self.check_nonfinite_flag()

    def debug_state(self):
        """State that must agree across DDP ranks beyond the weights (debug.record_train_rows)."""
        state = self.sampler.debug_state() if self.sampler is not None else {}
        return {**state, "label_sync": self.labels.sync}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["train_steps"] = self.train_steps
        checkpoint["rng_state"] = get_rng_state()
        if self.run_config is not None:
            checkpoint["xmcneg_config"] = self.run_config
        if self.sampler is not None:
            checkpoint["sampler_state"] = self.sampler.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.train_steps = int(checkpoint.get("train_steps", 0))
        self._sampler_state = checkpoint.get("sampler_state")
        self._rng_state = checkpoint.get("rng_state")

    # ------------------------------------------------------------------ training
    def input_optimizer_kind(self):
        """optim.input_optimizer, with `auto` resolved: plain SGD when every label is scored (no sampler) and there
        are fewer than optim.input_sgd_below_labels labels, else AdamW."""
        kind, below = self.optim.input_optimizer, self.optim.input_sgd_below_labels
        if kind != "auto":
            return kind
        return "sgd" if self.sampler is None and below is not None and self.num_labels < int(below) else "adamw"

    def encoder_optimizer(self, warmup=None, lr=None, input_optimizer=None):
        """The encoder's optimiser part: a fused AdamW over its dense parameters (+ a row-wise lazy AdamW over its
        sparse input tables) at `lr` (None: the encoder's own, e.g. a transformer's, else optim.encoder_lr) and
        optim.weight_decay, its BoW input tables by `input_optimizer` (None: optim.input_optimizer, at
        optim.input_lr), with the warm-up factor function `warmup` and the clip optim.grad_clip."""
        o = self.optim
        lr = lr if lr is not None else (getattr(self.encoder, "lr", None) or o.encoder_lr)
        parts = encoder_optimizers(self.encoder, float(lr), float(o.weight_decay),
                                   input_optimizer or self.input_optimizer_kind(), float(o.input_lr),
                                   float(o.input_weight_decay))
        enc = CombinedOptimizer(parts) if len(parts) > 1 else next(iter(parts.values()))
        return wrap(enc, warmup=warmup, clip=o.grad_clip)

    def loss_name(self):
        return "training loss"

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        parts = self.trained_parts()
        opt.zero_grad(set_to_none=True, parts=parts)
        loss, n = self.training_loss(batch)
        if self.fault_step is not None and self.train_steps == self.fault_step:
            loss = loss * float("nan")
        self.guard_finite(loss)
        if loss.requires_grad:
            self.backward_and_sync(loss)
            opt.step(parts=parts)
        self.train_steps += 1
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        return loss.detach()

    def log_stats(self, stats):
        """Log a sampler's per-step statistics (e.g. index build/query time)."""
        if stats and self._trainer is not None:
            for k, v in stats.items():
                self.log(k, float(v), on_step=True, on_epoch=False, batch_size=1)

    def guard_finite(self, loss):
        """Stop the run on a NaN/Inf loss, naming the step. On the CPU it is checked at every step. On an
        accelerator the check would be a device-to-host sync per step, so the step's finiteness is folded into a
        device-side flag that is read every `finite_check_every` steps and at every epoch end (before the epoch's
        checkpoint is written: a checkpoint never holds weights from after a bad step), and the error names the
        window of steps."""
        if not self.check_finite:
            return
        bad = ~torch.isfinite(loss.detach())
        if loss.device.type == "cpu" and not self.defer_finite_check:
            if bad:
                raise self._nonfinite_error(f"({loss.item()}) at step {self.train_steps}")
            return
        if self._nonfinite is None:
            self._nonfinite, self._nonfinite_from = bad, self.train_steps
        else:
            self._nonfinite |= bad
        if (self.train_steps + 1) % self.finite_check_every == 0:
            self.check_nonfinite_flag()

    def check_nonfinite_flag(self):
        flag, self._nonfinite = self._nonfinite, None
        if flag is not None and bool(flag):
            raise self._nonfinite_error(f"between steps {self._nonfinite_from} and {self.train_steps}")

    def _nonfinite_error(self, when):
        return NonFiniteLossError(f"non-finite {self.loss_name()} {when} (epoch {self.current_epoch}); the last good "
                                  "checkpoint is kept; lower the learning rates or check the data")

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self):
        self._eval = {"emb": [], "query": [], "idx": []}

    def validation_step(self, batch, batch_idx):
        h = self.encoder(batch["x"])
        self._eval["emb"].append(h.float())
        self._eval["idx"].append(batch["idx"])
        q = self.correction_query(batch, h)
        if q is not None:
            self._eval["query"].append(q)

    on_test_epoch_start, test_step = on_validation_epoch_start, validation_step

    def gather_eval(self):
        """This rank's evaluation buffers concatenated; under DDP all ranks' gathered, without the duplicates the
        evaluation shards are padded with (`xmcneg.data.datamodule.shard_rows`), so metrics are computed once on
        the whole split."""
        buf, self._eval = self._eval, None
        emb, idx = torch.cat(buf["emb"]), torch.cat(buf["idx"])
        query = torch.cat(buf["query"]) if buf["query"] else None
        if self.trainer is not None and self.trainer.world_size > 1:
            emb, idx, query = (t if t is None else self.all_gather(t).flatten(0, 1) for t in (emb, idx, query))
            _, first = np.unique(idx.cpu().numpy(), return_index=True)
            keep = torch.from_numpy(first).to(idx.device)
            emb, idx, query = (t if t is None else t[keep] for t in (emb, idx, query))
        return emb, idx.cpu().numpy(), query

    def eval_stage(self):
        """"val" or "test" while the trainer evaluates that split, else None."""
        t = self._trainer
        return None if t is None else "val" if t.validating or t.sanity_checking else "test" if t.testing else None

    def on_validation_epoch_end(self):
        for k, v in self.eval_metrics("val", *self.gather_eval()).items():
            self.log(f"val/{k}", float(v), sync_dist=True)  # identical on every rank: the mean is the value

    def on_test_epoch_end(self):
        self.test_metrics = {k: float(v) for k, v in self.eval_metrics("test", *self.gather_eval()).items()}
        for k, v in self.test_metrics.items():
            self.log(f"test/{k}", v, sync_dist=True)
