"""The label-scoring LightningModule shared by the full and the sampled methods.

Score s(x, y) = <f(x), w_y> + b_y, with f the encoder and (w_y, b_y) one row of the label matrix / bias.
- sampler is None (`sampler=full`): all C labels scored every step; dense AdamW on everything.
- otherwise: positives + the sampler's negatives are gathered from `nn.Embedding(sparse=True)` tables, so the
  backward pass yields gradients for the touched rows only, and `SparseRowOptimizer` updates those rows only.
  Under DDP every rank must apply the same row updates, so the tables stay identical across ranks
  (tests/test_ddp.py compares them bit for bit). `hardware.sparse_grad_sync` says how the sparse gradients are
  averaged over the ranks: `ddp` = DistributedDataParallel reduces them as sparse tensors (gloo only: NCCL has no
  sparse all-reduce); `all_gather` = the tables are left out of DDP's reducer and `sync_label_grads` all-gathers
  each rank's touched rows and values with dense collectives (any backend; cost proportional to the rows
  touched); `auto` = `ddp` on gloo, `all_gather` on any other backend (NCCL).

Manual optimisation (two optimisers: dense for the encoder, row-wise for the labels; plus a row-wise Adam for a
BoW encoder's sparse input table, `encoder.sparse_input`, synchronised like the label tables). Evaluation scores all
labels exactly in chunks (`eval.topk.exact_topk`), adds the sampler's prediction-time correction (e.g. log p_n
of the adversarial tree, Bamler & Mandt Theorem 1) when the loss is not logQ-corrected, and logs both the
corrected metrics and the raw ones (`raw/...`).
"""
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from xmcneg.errors import ConfigError, XMCError
from xmcneg.eval.metrics import filter_predictions, xc_metrics
from xmcneg.eval.topk import exact_topk
from xmcneg.methods.losses import check_loss, compute_loss
from xmcneg.methods.sparse_optim import (SparseRowOptimizer, all_gather_sparse_mean, clip_grad_norm_,
                                         encoder_optimizers, sparse_tables)


class NonFiniteLossError(XMCError):
    pass


SPARSE_GRAD_SYNC = ("auto", "ddp", "all_gather")


def active_dist():
    """torch.distributed when a process group of more than one rank is running, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def get_rng_state():
    """Global RNG states as tensors/lists only (checkpoints are loaded weights-only)."""
    import random

    py = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state):
    import random

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


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


class XMCClassifier(pl.LightningModule):
    def __init__(self, encoder, num_labels, sampler=None, loss_cfg=None, optim_cfg=None, eval_cfg=None,
                 inv_prop=None, check_finite=True):
        super().__init__()
        self.automatic_optimization = False
        self.encoder = encoder
        self.sampler = sampler
        self.loss_cfg, self.optim_cfg, self.eval_cfg = loss_cfg, optim_cfg, eval_cfg
        check_loss(loss_cfg.name)
        if sampler is None and loss_cfg.name == "ns":
            raise ConfigError("loss.name", "'ns' needs sampled negatives; use bce or softmax with sampler=full")
        if sampler is not None and sampler.fixed_k and sampler.num_negatives >= num_labels:
            raise ConfigError("sampler.num_negatives",
                              f"{sampler.num_negatives} negatives must be fewer than the {num_labels} labels")
        self.num_labels = num_labels
        sparse = sampler is not None
        d = encoder.dim
        self.label_w = nn.Embedding(num_labels, d, sparse=sparse)
        self.label_b = nn.Embedding(num_labels, 1, sparse=sparse)
        nn.init.normal_(self.label_w.weight, std=0.01)
        nn.init.zeros_(self.label_b.weight)
        self.inv_prop = inv_prop
        self.check_finite = check_finite
        self._nonfinite = None  # accelerator: device-side "a loss since the last check was NaN/Inf" flag
        self._nonfinite_from = 0  # first step covered by that flag
        self.fault_step = None  # test hook: inject a NaN loss at this global step
        self._sampler_state = None
        self.train_steps = 0  # training batches done (Lightning's global_step counts optimizer steps)
        self.test_metrics = {}
        self._eval = None
        self.sparse_grad_sync = "auto"  # hardware.sparse_grad_sync (train.py sets it)
        self._label_sync = None  # resolved in setup(): None (one process), "ddp" or "all_gather"

    # ------------------------------------------------------------------ lifecycle
    def label_sync_mode(self, dist=None):
        """How the sparse label-table gradients are averaged over the ranks: None (no process group / one
        process), "ddp" or "all_gather" (hardware.sparse_grad_sync; `auto`: ddp on gloo, all_gather otherwise)."""
        mode = str(self.sparse_grad_sync)
        if mode not in SPARSE_GRAD_SYNC:
            raise ConfigError("hardware.sparse_grad_sync", f"expected one of {', '.join(SPARSE_GRAD_SYNC)}, got {mode}")
        dist = dist if dist is not None else active_dist()
        if dist is None:
            return None
        if not sparse_tables(self):  # sampler=full with a dense encoder: DDP reduces everything
            return "ddp"
        if mode == "auto":
            return "ddp" if dist.get_backend() == "gloo" else "all_gather"
        return mode

    def setup(self, stage):
        # runs after the process group is initialised and before the strategy wraps the module in DDP: with
        # all_gather the label tables are left out of DDP's reducer (and its initial broadcast)
        self._label_sync = self.label_sync_mode()
        if self._label_sync == "all_gather":
            self._ddp_params_and_buffers_to_ignore = [name for name, _ in self._gathered_tables()]
        elif hasattr(self, "_ddp_params_and_buffers_to_ignore"):
            del self._ddp_params_and_buffers_to_ignore

    def _gathered_tables(self):
        """(name, weight) of the sparse-gradient tables, whose gradients sync_label_grads all-gathers: the label
        tables of the sampled methods and the encoder's sparse input tables (encoder.sparse_input)."""
        sparse = {id(p) for p in sparse_tables(self)}
        return [(n, p) for n, p in self.named_parameters() if id(p) in sparse]

    def sync_label_grads(self):
        """sparse_grad_sync=all_gather: average the label tables' sparse gradients over the ranks (after
        backward, before the label optimiser steps; on every rank). A no-op otherwise."""
        dist = active_dist()
        if self._label_sync == "all_gather" and dist is not None:
            all_gather_sparse_mean([p for _, p in self._gathered_tables()], dist)

    def _broadcast_label_tables(self):
        """all_gather mode: DDP no longer broadcasts the tables from rank 0 when it wraps the module; do it here
        (once per fit), so the ranks start from the same tables whatever their RNGs did."""
        dist = active_dist()
        if self._label_sync == "all_gather" and dist is not None:
            with torch.no_grad():
                for _, p in self._gathered_tables():
                    dist.broadcast(p.data, src=0)

    def on_fit_start(self):
        self._broadcast_label_tables()
        if self.sampler is not None:
            self.sampler.setup(self.trainer.datamodule, self, state=self._sampler_state)
            self._sampler_state = None
        # resume: the global RNG (data order, dropout) continues where the checkpointed run was (the resumed
        # epoch's data iterator is created right after this hook)
        if getattr(self, "_rng_state", None) is not None:
            set_rng_state(self._rng_state)
            self._rng_state = None

    def on_train_epoch_start(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.current_epoch)  # the (seed, rank, epoch) stream of this epoch

    def debug_state(self):
        """State that must agree across DDP ranks beyond the weights (debug.record_train_rows)."""
        state = self.sampler.debug_state() if self.sampler is not None else {}
        return {**state, "label_sync": self._label_sync}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["train_steps"] = self.train_steps
        checkpoint["rng_state"] = get_rng_state()
        if getattr(self, "run_config", None) is not None:
            checkpoint["xmcneg_config"] = self.run_config  # plain dict: lets eval.py rebuild the model
        if self.sampler is not None:
            checkpoint["sampler_state"] = self.sampler.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.train_steps = int(checkpoint.get("train_steps", 0))
        self._sampler_state = checkpoint.get("sampler_state")
        self._rng_state = checkpoint.get("rng_state")

    # ------------------------------------------------------------------ scoring
    def score_candidates(self, h, ids):
        """Scores of label ids for each document: ids (B,n) per document -> (B,n); ids (n,) shared -> (B,n)."""
        if ids.dim() == 1:
            return h @ self.label_w(ids).T + self.label_bias(ids)
        w = self.label_w(ids)  # (B,n,d)
        return torch.bmm(w, h.unsqueeze(-1)).squeeze(-1) + self.label_bias(ids)

    def label_bias(self, ids):
        """label_b(ids) without its last (width-1) dimension. With sparse_grad_sync=ddp the gradient flowing into
        the lookup is copied first: the values of nn.Embedding's sparse gradient are a view of that gradient, which
        for the width-1 bias added to the scores is the scores' own gradient buffer, still to be used for label_w
        and the encoder, and DDP's reducer divides a sparse gradient in place by the world size as soon as it is
        ready; without the copy the encoder's and label_w's gradients were divided by the world size twice."""
        b = self.label_b(ids)
        if self._label_sync == "ddp" and self.label_b.sparse and b.requires_grad:
            b.register_hook(lambda g: g.clone())
        return b.squeeze(-1)

    def sampled_loss(self, h, batch):
        pos = batch["pos"]
        pos_mask = pos >= 0
        pos_ids = pos.clamp(min=0)
        neg, log_q_neg = self.sampler.sample(batch, h.detach())
        neg_mask = mask_positives(neg, pos)
        if neg.dim() == 2:  # per-document negatives may be padded with -1 (variable-size candidate sets)
            neg_mask &= neg >= 0
            neg = neg.clamp(min=0)
        if neg.dim() == 1:  # shared negatives: one (B,U) matmul
            s_pos = self.score_candidates(h, pos_ids)
            s_neg = self.score_candidates(h, neg)
            log_q_neg = log_q_neg.unsqueeze(0).expand_as(s_neg)
        else:  # per-document negatives: one gather and one bmm for positives and negatives together
            s = self.score_candidates(h, torch.cat([pos_ids, neg], dim=1))
            s_pos, s_neg = s[:, : pos.shape[1]], s[:, pos.shape[1]:]
        log_q_pos = None
        if self.loss_cfg.name == "ns" and float(self.loss_cfg.get("reg_lambda", 0.0)) > 0:
            log_q_pos = self.sampler.log_prob(batch, h.detach(), pos_ids)
        return compute_loss(self.loss_cfg, s_pos, pos_mask.float(), s_neg, neg_mask.float(), log_q_neg, log_q_pos)

    def full_loss(self, h, batch):
        logits = h @ self.label_w.weight.T + self.label_b.weight.T  # (B, C)
        pos = batch["pos"]
        pos_mask = pos >= 0
        target = torch.zeros_like(logits, dtype=torch.bool)
        rows = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)
        target[rows[pos_mask], pos[pos_mask]] = True
        if self.loss_cfg.name == "bce":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        # decoupled softmax: other positives never enter the denominator
        s_pos = logits.gather(1, pos.clamp(min=0))
        neg_lse = torch.logsumexp(logits.masked_fill(target, float("-inf")), dim=1, keepdim=True)
        denom = torch.logaddexp(s_pos, neg_lse.expand_as(s_pos))
        return ((denom - s_pos) * pos_mask).sum() / pos_mask.sum().clamp(min=1)

    # ------------------------------------------------------------------ training
    finite_check_every = 50  # accelerator steps between reads of the NaN/Inf flag (the CPU checks every step)
    defer_finite_check = False  # tests: use the accelerator's deferred check on the CPU too

    def guard_finite(self, loss, what="training loss"):
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
                raise NonFiniteLossError(
                    f"non-finite {what} ({loss.item()}) at step {self.train_steps} (epoch {self.current_epoch}); "
                    "the last good checkpoint is kept; lower the learning rates or check the data")
            return
        if self._nonfinite is None:
            self._nonfinite, self._nonfinite_from = bad, self.train_steps
        else:
            self._nonfinite |= bad
        if (self.train_steps + 1) % self.finite_check_every == 0:
            self.check_nonfinite_flag(what)

    def check_nonfinite_flag(self, what="training loss"):
        flag, self._nonfinite = self._nonfinite, None
        if flag is not None and bool(flag):
            raise NonFiniteLossError(
                f"non-finite {what} between steps {self._nonfinite_from} and {self.train_steps} (epoch "
                f"{self.current_epoch}); the last good checkpoint is kept; lower the learning rates or check the data")

    def on_train_epoch_end(self):
        self.check_nonfinite_flag()

    def training_step(self, batch, batch_idx):
        if self.sampler is not None:
            self.sampler.refresh(self.train_steps, self.current_epoch, self)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        h = self.encoder(batch["x"])
        loss = self.full_loss(h, batch) if self.sampler is None else self.sampled_loss(h, batch)
        if self.fault_step is not None and self.train_steps == self.fault_step:
            loss = loss * float("nan")
        self.guard_finite(loss)
        self.manual_backward(loss)
        self.sync_label_grads()
        if self.optim_cfg.get("grad_clip") and self.optim_cfg.grad_clip > 0:
            clip_grad_norm_(self.encoder.parameters(), float(self.optim_cfg.grad_clip))  # sparse input too
        for opt in opts:
            opt.step()
        scheds = self.lr_schedulers()
        for sch in scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []:
            sch.step()
        self.train_steps += 1
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=h.shape[0])
        return loss.detach()

    def configure_optimizers(self):
        o = self.optim_cfg
        if float(o.encoder_lr) <= 0:
            raise ConfigError("optim.encoder_lr", f"must be > 0, got {o.encoder_lr}")
        lr = getattr(self.encoder, "lr", None) or float(o.encoder_lr)  # an encoder may carry its own (transformers)
        # AdamW on the dense encoder parameters (+ a row-wise Adam on sparse input tables: enc_rows)
        enc, *enc_rows = encoder_optimizers(self.encoder, float(lr), float(o.weight_decay))
        warm = int(o.get("warmup_steps", 0))
        scheds = []
        if warm > 0:
            scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
                      for opt in (enc, *enc_rows)]
        if self.sampler is None:
            if float(o.full_label_lr) <= 0:
                raise ConfigError("optim.full_label_lr", f"must be > 0, got {o.full_label_lr}")
            enc.add_param_group({"params": [self.label_w.weight, self.label_b.weight], "lr": float(o.full_label_lr),
                                 "weight_decay": 0.0})
            opts = [enc, *enc_rows]
            return (opts, scheds) if scheds else (opts if enc_rows else enc)
        lab = SparseRowOptimizer([self.label_w.weight, self.label_b.weight], lr=float(o.label_lr),
                                 kind=o.label_optimizer)
        return ([enc, *enc_rows, lab], scheds) if scheds else [enc, *enc_rows, lab]

    # ------------------------------------------------------------------ evaluation
    def use_correction(self):
        return self.sampler is not None and self.loss_cfg.name in ("bce", "ns")

    def _eval_start(self):
        self._eval = {"emb": [], "query": [], "idx": []}

    def _eval_step(self, batch):
        h = self.encoder(batch["x"])
        self._eval["emb"].append(h.float())
        self._eval["idx"].append(batch["idx"])
        if self.use_correction():
            q = self.sampler.correction_query(batch, h)
            if q is not None:
                self._eval["query"].append(q)

    def predict_topk(self, emb, query=None, k=None):
        """Top-k (scores, ids) over all labels for document embeddings `emb`; with `query` (from the sampler's
        correction_query) the sampler's score correction is added.

        eval.search=exact: all labels scored exactly, chunked over documents and labels.
        eval.search=ann: a faiss `LabelIndex` (eval.ann_index) over label matrix + bias, built once per set of
        weights, retrieves eval.ann_shortlist labels per document, which are re-scored exactly (+ the correction,
        computed for the shortlisted labels only via the sampler's optional `score_correction_ids(query, ids)`);
        the shortlist is retrieved by the uncorrected score. A sampler whose correction only supports label
        ranges (`score_correction(query, start, end)`) falls back to exact search (logged, and
        `<stage>/ann_fallback_exact` = 1). During validation/test, `<stage>/ann_recall@5` (recall of the ANN
        top-5 against the exact top-5, first <= 1000 documents) is logged; `raw/...` for the uncorrected pass.
        """
        k = min(int(k or self.eval_cfg.k), self.num_labels)
        if str(self.eval_cfg.get("search", "exact")) == "ann":
            out = self._ann_predict_topk(emb, query, k)
            if out is not None:
                return out
        elif str(self.eval_cfg.get("search", "exact")) != "exact":
            raise ConfigError("eval.search", f"must be exact or ann, got {self.eval_cfg.search!r}")
        return self._exact_predict_topk(emb, query, k)

    def _exact_predict_topk(self, emb, query, k):
        chunk = int(self.eval_cfg.doc_chunk)
        w, b = self.label_w.weight, self.label_b.weight.squeeze(-1)
        out_s, out_i = [], []
        for i in range(0, emb.shape[0], chunk):
            correction = None
            if query is not None:
                q = query[i: i + chunk]
                correction = lambda _e, start, end, q=q: self.sampler.score_correction(q, start, end)
            s, ids = exact_topk(emb[i: i + chunk], w, b, k=k, doc_chunk=chunk,
                                label_chunk=int(self.eval_cfg.label_chunk), correction=correction)
            out_s.append(s)
            out_i.append(ids)
        return torch.cat(out_s), torch.cat(out_i)

    def _eval_stage(self):
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.validating or trainer.sanity_checking:
            return "val"
        return "test" if trainer.testing else None

    def _ann_label_index(self):
        """The eval LabelIndex, rebuilt only when the label matrix or bias changed (tensor version counters)."""
        import logging
        import time

        from xmcneg.eval.ann import LabelIndex

        kind = str(self.eval_cfg.get("ann_index", "hnsw"))
        w, b = self.label_w.weight, self.label_b.weight
        key = (kind, tuple(w.shape), w.data_ptr(), w._version, b.data_ptr(), b._version, self.train_steps)
        cache = getattr(self, "_ann_cache", None)
        if cache is None or cache[0] != key:
            t0 = time.perf_counter()
            index = LabelIndex(kind=kind).build(w.detach().float().cpu(), b.detach().reshape(-1).float().cpu())
            logging.getLogger(__name__).info("eval ANN index (%s) over %d labels built in %.2fs", kind,
                                             w.shape[0], time.perf_counter() - t0)
            self._ann_cache = cache = (key, index)
        return cache[1]

    @torch.no_grad()
    def _ann_predict_topk(self, emb, query, k):
        """eval.search=ann; returns None when it must fall back to exact search."""
        import logging

        from xmcneg.eval.ann import ann_topk, recall_against_exact

        stage = self._eval_stage()
        corr_ids = None
        if query is not None:
            corr_ids = getattr(self.sampler, "score_correction_ids", None)
            if corr_ids is None:
                if not getattr(self, "_ann_fallback_warned", False):
                    logging.getLogger(__name__).info(
                        "eval.search=ann: sampler '%s' gives its score correction for label ranges only; "
                        "using exact search for the corrected scores", getattr(self.sampler, "name", "?"))
                    self._ann_fallback_warned = True
                if stage is not None:
                    self.log(f"{stage}/ann_fallback_exact", 1.0)
                if isinstance(self._eval, dict):
                    self._eval["_ann_corrected_done"] = True  # the raw pass that follows logs raw/ann_recall@5
                return None
        index = self._ann_label_index()
        shortlist = int(self.eval_cfg.get("ann_shortlist", 200))
        chunk = int(self.eval_cfg.doc_chunk)
        w, b = self.label_w.weight, self.label_b.weight.reshape(-1)
        if corr_ids is None:
            scores, ids = ann_topk(emb, w, b, k, index, shortlist=shortlist, query_chunk=chunk)
        else:
            scores, ids = self._ann_rescore(emb, query, k, index, shortlist, corr_ids)
        if stage is not None and emb.shape[0] > 0:
            n, kk = min(1000, emb.shape[0]), min(5, k)
            _, exact_ids = self._exact_predict_topk(emb[:n], None if query is None else query[:n], kk)
            recall = recall_against_exact(ids[:n, :kk], exact_ids)
            buf = self._eval if isinstance(self._eval, dict) else {}
            name = "raw/ann_recall@5" if (query is None and buf.get("_ann_corrected_done")) else "ann_recall@5"
            if query is not None:
                buf["_ann_corrected_done"] = True
            self.ann_recall = {**getattr(self, "ann_recall", {}), f"{stage}/{name}": recall}
            self.log(f"{stage}/{name}", float(recall))
        return scores, ids

    def _ann_rescore(self, emb, query, k, index, shortlist, corr_ids):
        """Shortlist from `index`, exact re-scoring + the sampler's correction for the shortlisted ids."""
        W, B = self.label_w.weight, self.label_b.weight.reshape(-1)
        S = min(max(shortlist, k), self.num_labels)
        chunk = int(self.eval_cfg.doc_chunk)
        out_s, out_i = [], []
        for i in range(0, emb.shape[0], chunk):
            q = emb[i: i + chunk]
            _, cand = index.search(q, S)
            cand = torch.from_numpy(cand).to(q.device)
            valid, safe = cand >= 0, cand.clamp(min=0)
            sc = torch.bmm(W[safe.to(W.device)].to(q.device, q.dtype), q.unsqueeze(2)).squeeze(2)
            sc = sc + B[safe.to(B.device)].to(q.device, q.dtype)
            sc = sc + corr_ids(query[i: i + chunk], safe).to(q.device, q.dtype)
            sc = sc.masked_fill(~valid, float("-inf"))
            ts, at = torch.topk(sc, min(k, sc.shape[1]), dim=1)
            ti = torch.gather(safe, 1, at).masked_fill(torch.isneginf(ts), -1)
            if ts.shape[1] < k:
                pad = k - ts.shape[1]
                ts = torch.cat([ts, ts.new_full((ts.shape[0], pad), float("-inf"))], 1)
                ti = torch.cat([ti, ti.new_full((ti.shape[0], pad), -1)], 1)
            out_s.append(ts)
            out_i.append(ti)
        return torch.cat(out_s), torch.cat(out_i)

    def gather_eval(self):
        """Concatenate this rank's evaluation buffers; under DDP gather all ranks' and drop the duplicates the
        evaluation shards are padded with (`xmcneg.data.datamodule.shard_rows`), so metrics are computed once on the
        whole split."""
        buf = self._eval
        emb = torch.cat(buf["emb"])
        idx = torch.cat(buf["idx"])
        query = torch.cat(buf["query"]) if buf["query"] else None
        if self.trainer is not None and self.trainer.world_size > 1:
            emb = self.all_gather(emb).flatten(0, 1)
            idx = self.all_gather(idx).flatten(0, 1)
            if query is not None:
                query = self.all_gather(query).flatten(0, 1)
            _, first = np.unique(idx.cpu().numpy(), return_index=True)
            keep = torch.from_numpy(first).to(idx.device)
            emb, idx = emb[keep], idx[keep]
            query = query[keep] if query is not None else None
        return emb, idx.cpu().numpy(), query

    def _eval_end(self, split):
        emb, idx, query = self.gather_eval()
        Y = self.trainer.datamodule.split(split)[1][idx]
        dm = self.trainer.datamodule
        pairs = dm.filter_pairs(split, idx=idx) if hasattr(dm, "filter_pairs") else None  # LF benchmarks
        _, ids = self.predict_topk(emb, query)
        ids = ids.cpu().numpy()
        if pairs is not None:
            ids, _ = filter_predictions(ids, None, pairs)
        metrics = xc_metrics(ids, Y, self.inv_prop)
        if query is not None:
            _, raw_ids = self.predict_topk(emb, None)
            raw_ids = raw_ids.cpu().numpy()
            if pairs is not None:
                raw_ids, _ = filter_predictions(raw_ids, None, pairs)
            raw = xc_metrics(raw_ids, Y, self.inv_prop)
            metrics.update({f"raw/{k}": v for k, v in raw.items()})
        self._eval = None
        return metrics

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        for k, v in self._eval_end("val").items():
            self.log(f"val/{k}", float(v), sync_dist=True)  # identical on every rank: the mean is the value

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self.test_metrics = {k: float(v) for k, v in self._eval_end("test").items()}
        for k, v in self.test_metrics.items():
            self.log(f"test/{k}", v, sync_dist=True)
