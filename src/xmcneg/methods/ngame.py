"""NGAME (Dahiya et al., WSDM 2023) as one module: phase 1 trains the encoder as a Siamese model on documents and
label texts (in-batch negatives from batches of clustered documents, clustered from a memory bank of their
embeddings); phase 2 trains the label vectors on the frozen encoder; predictions fuse both. Its keys:
conf/sampler/ngame.yaml; phases, bank, resume and DDP: docs/architecture.md, "NGAME".
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from xmcneg.distributed import active_dist, to_device
from xmcneg.errors import ConfigError
from xmcneg.eval.ann import LabelIndex, candidate_scores, topk_of_candidates
from xmcneg.eval.metrics import xc_metrics
from xmcneg.eval.topk import exact_topk
from xmcneg.methods.base import XMCModule, mask_positives
from xmcneg.methods.optim import CombinedOptimizer, params_of
from xmcneg.methods.sparse_optim import SparseRowOptimizer
from xmcneg.records import tensor_digest
from xmcneg.samplers.cluster_batching import ClusterBatchSampler, ClusterCurriculum, balanced_spherical_clusters
from xmcneg.samplers.in_batch import InBatchSampler

log = logging.getLogger("xmcneg")


@dataclass
class NGAMESettings:
    """The keys of conf/sampler/ngame.yaml (documented there), typed and checked; no defaults here."""
    name: str
    phase1_epochs: int
    phase1_share: Optional[float]
    loss: str
    margin: float
    num_hard: int
    temperature: float
    weighted: bool
    phase1_lr: Optional[float]
    phase1_warmup_steps: int
    phase1_lr_decay: str
    clustering: bool
    cluster_size_start: int
    cluster_doubling_epochs: List[int]
    cluster_size_max: int
    cluster_start_epoch: int
    refresh_epochs: int
    cluster_iters: int
    phase2_cluster_size: int
    phase2_lr: float
    phase2_optimizer: str
    phase2_margin: float
    phase2_num_pos: int
    phase2_num_neg: int
    phase2_temperature: float
    phase2_dropout: float
    phase2_ann_negatives: int
    phase2_max_shortlist: int
    inference: str
    ann_M: int
    ann_ef_search: int
    ann_ef_construction: int
    ann_shortlist: int
    fusion_alphas: List[float]
    fusion_metric: str
    label_batch: int
    drop_last: bool

    @classmethod
    def of(cls, d):
        s = params_of(cls, d, "sampler")
        choices = {"loss": ("triplet", "infonce"), "inference": ("ann", "exact"),
                   "phase1_lr_decay": ("linear", "constant")}
        for key, ok in choices.items():
            if getattr(s, key) not in ok:
                raise ConfigError(f"sampler.{key}", f"unknown '{getattr(s, key)}', expected one of {', '.join(ok)}")
        least = {"phase1_epochs": 0, "phase2_ann_negatives": 0, "num_hard": 1, "phase2_num_pos": 1,
                 "phase2_num_neg": 1, "phase2_cluster_size": 1, "ann_shortlist": 1, "label_batch": 1,
                 "cluster_iters": 1, "phase2_max_shortlist": 1}
        for key, lo in least.items():
            if int(getattr(s, key)) < lo:
                raise ConfigError(f"sampler.{key}", f"must be >= {lo}, got {getattr(s, key)}")
        for key in ("temperature", "phase2_temperature", "phase2_lr", "phase1_lr"):
            if getattr(s, key) is not None and not float(getattr(s, key)) > 0:
                raise ConfigError(f"sampler.{key}", f"must be > 0, got {getattr(s, key)}")
        if s.phase1_share is not None and not 0 <= float(s.phase1_share) <= 1:
            raise ConfigError("sampler.phase1_share", f"must be in [0, 1] or null, got {s.phase1_share}")
        if not 0 <= float(s.phase2_dropout) < 1:
            raise ConfigError("sampler.phase2_dropout", f"must be in [0, 1), got {s.phase2_dropout}")
        s.fusion_alphas = [float(a) for a in (s.fusion_alphas or [])]
        if not s.fusion_alphas or any(not 0 <= a <= 1 for a in s.fusion_alphas):
            raise ConfigError("sampler.fusion_alphas",
                              f"must be a non-empty list of values in [0, 1], got {s.fusion_alphas}")
        return s


# ------------------------------------------------------------------------------------------------------ losses
def _row_mean(per_row, row_mask=None):
    """Mean of `per_row` (B,) over the rows where `row_mask` (B,) is True (all rows when None)."""
    m = torch.ones_like(per_row) if row_mask is None else row_mask.float()
    return (per_row * m).sum() / m.sum().clamp(min=1)


def triplet_ohnm_loss(S, pos_col, neg_mask, margin=0.3, num_hard=10, temperature=0.1, weighted=True,
                      row_mask=None):
    """NGAME phase-1 loss. S (B, U) cosine scores; pos_col (B,) column of each row's positive; neg_mask (B, U)
    True where the column may serve as a negative (False for every positive of the row); row_mask (B,) rows
    that count. Per row: the `num_hard` highest-scoring negatives n, hinge max(0, S[n] - S[pos] + margin),
    weighted by softmax(S[n] / temperature) over the violators (weights detached) or averaged."""
    s_pos = S.gather(1, pos_col.view(-1, 1))
    k = min(int(num_hard), S.shape[1])
    s_neg, _ = S.masked_fill(~neg_mask, float("-inf")).topk(k, dim=1)
    valid = torch.isfinite(s_neg)
    s_neg = torch.where(valid, s_neg, torch.zeros_like(s_neg))
    hinge = F.relu(s_neg - s_pos + margin) * valid
    if weighted:
        viol = hinge > 0
        logits = (s_neg.detach() / temperature).masked_fill(~viol, float("-inf"))
        w = torch.softmax(logits, dim=1).nan_to_num(0.0)
        per_row = (hinge * w).sum(1)
    else:
        per_row = hinge.sum(1) / valid.sum(1).clamp(min=1)
    return _row_mean(per_row, row_mask)


def infonce_loss(S, pos_col, neg_mask, temperature=0.1, row_mask=None):
    """Softmax cross-entropy over the row at `temperature`; the row's other positives leave the denominator."""
    keep = neg_mask.clone()
    keep[torch.arange(S.shape[0], device=S.device), pos_col] = True
    logits = (S / temperature).masked_fill(~keep, float("-inf"))
    return _row_mean(F.cross_entropy(logits, pos_col, reduction="none"), row_mask)


def triplet_multi_loss(S, is_pos, margin=0.2, num_pos=3, num_neg=5, temperature=0.1):
    """NGAME phase-2 loss. S (B, U) scores over a shared shortlist, is_pos (B, U). Per row: the `num_pos`
    lowest-scoring positives x the `num_neg` highest-scoring negatives, hinge max(0, s_n - s_p + margin),
    weighted by a softmax over the violating hinge values (temperature; weights detached). Rows without a
    positive in the shortlist do not count."""
    B, U = S.shape
    kp, kn = min(int(num_pos), U), min(int(num_neg), U)
    s_p, _ = S.masked_fill(~is_pos, float("inf")).topk(kp, dim=1, largest=False)
    s_n, _ = S.masked_fill(is_pos, float("-inf")).topk(kn, dim=1)
    vp, vn = torch.isfinite(s_p), torch.isfinite(s_n)
    s_p = torch.where(vp, s_p, torch.zeros_like(s_p))
    s_n = torch.where(vn, s_n, torch.zeros_like(s_n))
    valid = vp.unsqueeze(2) & vn.unsqueeze(1)  # (B, kp, kn)
    hinge = (F.relu(s_n.unsqueeze(1) - s_p.unsqueeze(2) + margin) * valid).reshape(B, -1)
    viol = hinge > 0
    w = torch.softmax((hinge.detach() / temperature).masked_fill(~viol, float("-inf")), dim=1).nan_to_num(0.0)
    return _row_mean((hinge * w).sum(1), vp.any(1))


# ------------------------------------------------------------------------------------------------------ module
class NGAME(XMCModule):
    outside_ddp = True  # phase 1 trains the encoder only, phase 2 the label table only

    def __init__(self, encoder, num_labels: int, datamodule, settings, optim=None, evaluation=None, inv_prop=None,
                 seed: int = 0, batch_size: int = 256):
        s = NGAMESettings.of(settings)
        super().__init__(encoder, num_labels, sparse_labels=True, evaluation=evaluation, inv_prop=inv_prop,
                         sampler=InBatchSampler(int(s.phase2_max_shortlist), seed), optim=optim)
        self.save_hyperparameters(ignore=["encoder", "datamodule", "inv_prop"])
        datamodule.label_inputs(np.arange(min(1, num_labels)))  # label texts present? (one-line error otherwise)
        self.s = s
        self.seed = int(seed)
        self.num_train = int(datamodule.split("train")[1].shape[0])
        # batches of clustered documents: the datamodule's training batch sampler
        self.batch_sampler = ClusterBatchSampler(self.num_train, int(batch_size), seed=self.seed,
                                                 drop_last=bool(s.drop_last))
        datamodule.train_batch_sampler = self.batch_sampler
        self._dm = datamodule
        self.curriculum = ClusterCurriculum(s.cluster_size_start, s.cluster_doubling_epochs,
                                            s.cluster_size_max, s.cluster_start_epoch, s.refresh_epochs)
        # phase and alpha live in a buffer, so a plain load_state_dict (eval.py) restores them too
        # [phase, alpha (-1 = not picked)]
        self.register_buffer("ngame_state", torch.tensor([1.0, -1.0], dtype=torch.float64))
        self.bank = torch.zeros(self.num_train, encoder.dim)
        self.bank_written = torch.zeros(self.num_train, dtype=torch.bool)
        self.cluster_ids, self.cluster_size, self.last_cluster_epoch = None, 1, -1  # ids: int64 numpy (num_train,)
        self.cluster_log = []  # [epoch, phase, size, num_clusters, seconds]
        self.cluster_history = []  # [epoch, digest of the cluster ids] of this process's clusterings
        self._label_emb = None  # cached label-text embeddings (phase 2: the encoder is frozen)
        self._index_cache = {}  # HNSW indexes for inference, by "knn" / "clf"
        self._clf_index = None  # phase-2 training shortlist index (phase2_ann_negatives)
        self._clf_index_weights = None  # the label vectors it was built from (at the epoch start)
        self._pick_u, self._t_epoch, self._cluster_s = None, None, 0.0

    # ------------------------------------------------------------------ helpers
    @property
    def phase(self):
        return int(self.ngame_state[0].item())

    @phase.setter
    def phase(self, value):
        self.ngame_state[0] = float(value)

    @property
    def alpha(self):
        a = float(self.ngame_state[1].item())
        return None if a < 0 else a

    @alpha.setter
    def alpha(self, value):
        self.ngame_state[1] = -1.0 if value is None else float(value)

    @property
    def dm(self):
        if self._trainer is not None and getattr(self.trainer, "datamodule", None) is not None:
            return self.trainer.datamodule
        return self._dm

    def _set_epoch(self, epoch):
        """The epoch's batch sampler (order, clusters) and, for phase 1, which positive each document takes."""
        self.batch_sampler.set_epoch(epoch)
        self.batch_sampler.set_clusters(self.cluster_ids if self.s.clustering else None)
        self._pick_u = np.random.default_rng([self.seed, epoch, 0x5EED]).random(self.num_train)

    def _normalize(self, h):
        return F.normalize(h.float(), dim=-1)

    def _encode(self, x):
        return self._normalize(self.encoder(to_device(x, self.device)))

    def _label_embeddings(self, refresh=False):
        """(C, d) normalised label-text embeddings (eval mode, no grad); cached in phase 2."""
        if self._label_emb is None or refresh:
            n, ids = int(self.s.label_batch), np.arange(self.num_labels)
            self._label_emb = torch.cat([self._normalize(self.embed(self.dm.label_inputs(ids[i: i + n])))
                                         for i in range(0, len(ids), n)])
        return self._label_emb

    def _encode_split(self, split):
        return self._normalize(self.embed_split(split, datamodule=self.dm))

    def _make_index(self):
        return LabelIndex(kind="hnsw", M=int(self.s.ann_M), ef_search=int(self.s.ann_ef_search),
                          ef_construction=int(self.s.ann_ef_construction), seed=self.seed)

    def _recluster(self, size, epoch):
        t0 = time.perf_counter()
        ids = None
        if self.global_rank == 0:
            ids = balanced_spherical_clusters(self.bank, size, seed=self.seed * 1_000_003 + epoch,
                                              max_iter=int(self.s.cluster_iters))
        if self._trainer is not None and self.trainer.world_size > 1:
            ids = self.trainer.strategy.broadcast(ids, src=0)
        dt = time.perf_counter() - t0
        self.cluster_ids, self.cluster_size, self.last_cluster_epoch = ids, int(size), int(epoch)
        self.cluster_history.append([int(epoch), tensor_digest(torch.from_numpy(np.ascontiguousarray(ids)))])
        k = int(ids.max()) + 1 if len(ids) else 0
        self.cluster_log.append([int(epoch), int(self.phase), int(size), k, round(dt, 4)])
        self._cluster_s += dt
        log.info("ngame: epoch %d phase %d: %d clusters of ~%d documents in %.2f s", epoch, self.phase, k, size, dt)

    # ------------------------------------------------------------------ lifecycle
    def debug_state(self):
        return {"clusters": self.cluster_history, "phase": self.phase, "alpha": self.alpha,
                "label_sync": self.labels.sync}

    def on_fit_start(self):
        super().on_fit_start()  # the in-batch shortlist sampler (state restored on resume)
        if self.phase == 2:
            self.encoder.requires_grad_(False)
        me = self.trainer.max_epochs
        if self.s.phase1_share is None and me is not None and me >= 0 and int(self.s.phase1_epochs) >= me:
            log.warning("ngame: sampler.phase1_epochs=%d >= trainer.max_epochs=%d: phase 2 (classifiers) will not "
                        "run; predictions use the label-text embeddings only", int(self.s.phase1_epochs), me)

    def on_train_start(self):
        # Lightning skips on_train_epoch_start when it resumes in the middle of an epoch: set up that epoch's batch
        # sampler, positive draws and shortlist index here (the loops, hence current_epoch, are restored by now;
        # at on_fit_start they are not yet)
        self._set_epoch(int(self.current_epoch))
        self._t_epoch, self._cluster_s = time.perf_counter(), 0.0
        if self.phase == 2 and self._clf_index_weights is not None and self.trainer.fit_loop.restarting:
            self._build_clf_index(self._clf_index_weights)

    def _build_clf_index(self, weights):
        """The phase-2 training shortlist index over the normalised label vectors `weights` (kept for the
        checkpoint: a resume in the middle of the epoch rebuilds the same index)."""
        self._clf_index_weights = weights
        self._clf_index = self._make_index().build(weights)

    def _phase_of(self, epoch):
        if self.s.phase1_share is not None:
            if self.budget_used is None:
                raise ConfigError("sampler.phase1_share", "needs trainer.train_budget_s or trainer.max_steps")
            return 1 if self.budget_used < float(self.s.phase1_share) else 2
        return 1 if epoch < int(self.s.phase1_epochs) else 2

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # the shortlist sampler's stream of this epoch
        e = int(self.current_epoch)
        self._t_epoch, self._cluster_s = time.perf_counter(), 0.0
        if self.phase == 1 and self._phase_of(e) == 2:
            self._enter_phase2(e)
        elif self.phase == 1 and self.s.clustering:
            if self.curriculum.should_recluster(e, self.last_cluster_epoch, self.cluster_size):
                self._recluster(self.curriculum.size(e), e)
            elif not self.curriculum.active(e):
                self.cluster_ids, self.cluster_size = None, 1
        if self.phase == 2 and int(self.s.phase2_ann_negatives) > 0:
            self._build_clf_index(F.normalize(self.labels.w.weight.detach().float(), dim=-1).cpu())
        self._set_epoch(e)

    @torch.no_grad()
    def _enter_phase2(self, epoch):
        t0 = time.perf_counter()
        self.phase = 2
        self.encoder.requires_grad_(False)
        emb = self._encode_split("train")
        Z = self._label_embeddings(refresh=True)
        self.labels.w.weight.data.copy_(Z.to(self.labels.w.weight.device, self.labels.w.weight.dtype))
        self.labels.b.weight.data.zero_()
        if self._trainer is not None:  # fresh classifier optimiser (state and lr from the config)
            clf_opt = self.optimizers().optimizer.parts["labels"]
            clf_opt.state.clear()
            for g in clf_opt.param_groups:
                g["lr"] = float(self.s.phase2_lr)
        self.bank = emb.cpu()
        self.bank_written.zero_()
        self._index_cache = {}
        log.info("ngame: epoch %d: phase 2 (classifier on the frozen encoder); embedded %d documents and %d "
                 "labels in %.2f s", epoch, emb.shape[0], Z.shape[0], time.perf_counter() - t0)
        size = int(self.s.phase2_cluster_size)
        if self.s.clustering and size > 1:
            self._recluster(size, epoch)
        else:
            self.cluster_ids, self.cluster_size = None, 1

    def on_train_epoch_end(self):
        self.check_nonfinite_flag()
        if self.phase == 1:  # every rank's rows of the epoch
            self.bank, _ = self._merged_bank()
            self.bank_written.zero_()
        dt = time.perf_counter() - self._t_epoch if self._t_epoch is not None else 0.0
        e = int(self.current_epoch)
        log.info("ngame: epoch %d phase %d: %.1f s (clustering %.2f s = %.1f%%), cluster size %d", e, self.phase,
                 dt, self._cluster_s, 100.0 * self._cluster_s / max(dt, 1e-9), self.cluster_size)
        for k, v in (("phase", self.phase), ("cluster_size", self.cluster_size), ("cluster_time_s", self._cluster_s)):
            self.log(f"ngame/{k}", float(v), on_epoch=True, rank_zero_only=True)

    def _merged_bank(self):
        """(bank, written): the bank with the rows written this epoch on any rank (under DDP averaged over the
        ranks that wrote them, normalised), and those rows."""
        dist = active_dist()
        if dist is None:
            return self.bank, self.bank_written
        dev = self.device if dist.get_backend() != "gloo" else torch.device("cpu")
        w = self.bank_written.to(dev, torch.float32)
        b = (self.bank * self.bank_written.unsqueeze(1)).to(dev)
        dist.all_reduce(w)
        dist.all_reduce(b)
        rows = (w > 0).cpu()
        bank = self.bank.clone()
        bank[rows] = F.normalize((b[w > 0] / w[w > 0].unsqueeze(1)).cpu(), dim=-1)
        return bank, rows

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        bank, written = self._merged_bank()  # every rank's rows of the epoch so far (a collective under DDP)
        checkpoint["ngame"] = {  # (the phase and alpha are the buffer ngame_state)
            "bank": bank.clone(), "bank_written": written.clone(),
            "clf_index_weights": self._clf_index_weights if self.phase == 2 else None,
            "cluster_ids": None if self.cluster_ids is None else torch.from_numpy(np.asarray(self.cluster_ids)),
            "cluster_size": int(self.cluster_size), "last_cluster_epoch": int(self.last_cluster_epoch),
            "cluster_log": [list(r) for r in self.cluster_log],
        }

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        st = checkpoint.get("ngame")
        if st is None:
            return
        self.bank, self.bank_written = st["bank"].float().cpu().clone(), st["bank_written"].bool().cpu().clone()
        self._clf_index_weights, c = st["clf_index_weights"], st["cluster_ids"]
        self.cluster_ids = None if c is None else c.cpu().numpy().astype(np.int64)
        self.cluster_size, self.last_cluster_epoch = int(st["cluster_size"]), int(st["last_cluster_epoch"])
        self.cluster_log = [list(r) for r in st["cluster_log"]]
        self._label_emb, self._index_cache = None, {}

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        clf = SparseRowOptimizer(self.labels.parameters(), lr=float(self.s.phase2_lr), kind=self.s.phase2_optimizer)
        # the Siamese phase trains the whole encoder, input table included, by AdamW at phase1_lr
        return CombinedOptimizer({"encoder": self.encoder_optimizer(lambda _t: self._phase1_lr(), self.s.phase1_lr,
                                                                    "adamw"),
                                  "labels": clf})

    def _phase1_lr(self):
        """lr factor of phase-1 step t: linear warm-up over phase1_warmup_steps, capped at a tenth of phase 1's
        steps (a short run, e.g. a transformer on a small budget, would otherwise never leave the warm-up), then
        (phase1_lr_decay=linear) linear decay to ~0 at the end of phase 1."""
        t, warm, total = self.train_steps, int(self.s.phase1_warmup_steps), None
        if self._trainer is not None:
            nb = self.trainer.num_training_batches
            if isinstance(nb, (int, float)) and math.isfinite(nb) and nb > 0:
                total = int(self.s.phase1_epochs) * int(nb)
        if warm > 0 and total:
            warm = min(warm, max(1, total // 10))
        f = min(1.0, (t + 1) / warm) if warm > 0 else 1.0
        if self.s.phase1_lr_decay == "linear" and self.s.phase1_share is not None:
            return min(f, max(0.0, 1.0 - self.budget_used / max(float(self.s.phase1_share), 1e-9)) + 1e-3)
        if self.s.phase1_lr_decay == "linear" and total:
            f = min(f, max(0.0, 1.0 - t / max(total, 1)) + 1e-3)
        return f

    def trained_parts(self):
        return ["encoder"] if self.phase == 1 else ["labels"]

    def loss_name(self):
        return f"NGAME phase-{self.phase} loss"

    def training_loss(self, batch):
        return self._phase1_loss(batch) if self.phase == 1 else self._phase2_loss(batch)

    def _phase1_loss(self, batch):
        pos, idx = batch["pos"], batch["idx"]
        B = pos.shape[0]
        npos = (pos >= 0).sum(1)
        has = npos > 0
        u = torch.from_numpy(self._pick_u[idx.cpu().numpy()]).to(pos.device)
        col = torch.minimum((u * npos.clamp(min=1)).long(), (npos - 1).clamp(min=0))
        picked = pos.gather(1, col.view(-1, 1)).squeeze(1)
        h = self._encode(batch["x"])
        self.bank[idx.cpu()] = h.detach().float().cpu()
        self.bank_written[idx.cpu()] = True
        if not bool(has.any()):
            return h.sum() * 0.0, B
        lab_u, inv = torch.unique(picked[has], return_inverse=True)
        z = self._encode(self.dm.label_inputs(lab_u.cpu().numpy()))
        S = h @ z.T  # (B, U)
        pos_col = torch.zeros(B, dtype=torch.long, device=S.device)
        pos_col[has] = inv.to(S.device)
        lab_u = lab_u.to(S.device)
        neg_mask = ~(pos.unsqueeze(2) == lab_u.view(1, 1, -1)).any(1)
        if self.s.loss == "infonce":
            return infonce_loss(S, pos_col, neg_mask, float(self.s.temperature), row_mask=has), B
        return triplet_ohnm_loss(S, pos_col, neg_mask, float(self.s.margin), int(self.s.num_hard),
                                 float(self.s.temperature), bool(self.s.weighted), row_mask=has), B

    def _phase2_loss(self, batch):
        pos, idx = batch["pos"], batch["idx"]
        h = self.bank[idx.cpu()].to(self.device)
        p = float(self.s.phase2_dropout)
        if p > 0:
            h = F.normalize(F.dropout(h, p, training=True), dim=-1)
        short, _ = self.sampler.sample(batch, h)
        if self._clf_index is not None and int(self.s.phase2_ann_negatives) > 0:
            _, cand = self._clf_index.search(h, int(self.s.phase2_ann_negatives))
            cand = torch.from_numpy(cand[cand >= 0]).to(short.device)
            short = torch.unique(torch.cat([short, cand]))
        if short.numel() == 0:  # a zero loss through the table: every rank joins the gradient sync
            z = torch.zeros(1, dtype=torch.long, device=self.labels.w.weight.device)
            return self.labels.w(z).sum() * 0.0, pos.shape[0]
        w = F.normalize(self.labels.w(short.to(self.labels.w.weight.device)), dim=-1)
        S = h @ w.T
        is_pos = ~mask_positives(short.to(pos.device), pos)
        return triplet_multi_loss(S, is_pos.to(S.device), float(self.s.phase2_margin), int(self.s.phase2_num_pos),
                                  int(self.s.phase2_num_neg), float(self.s.phase2_temperature)), pos.shape[0]

    # ------------------------------------------------------------------ inference
    def _ann_candidates(self, emb, mats, reuse):
        """Union of the HNSW top-`ann_shortlist` of each matrix, per document; duplicates/missing = -1.
        reuse: keys whose cached index may be used (built from the same matrix before)."""
        S = min(max(int(self.s.ann_shortlist), int(self.evaluation.k)), self.num_labels)
        parts = []
        for key, M in mats:
            index = self._index_cache.get(key) if key in reuse else None
            if index is None:
                index = self._index_cache[key] = self._make_index().build(M)
            parts.append(index.search(emb, S)[1])
        cand = np.sort(np.concatenate(parts, axis=1), axis=1)
        dup = np.zeros_like(cand, dtype=bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        cand[dup] = -1
        return torch.from_numpy(cand)

    def _ranked(self, emb, alphas, k=None, fresh=True):
        """{alpha: (scores, ids)} top-k of alpha*clf + (1-alpha)*knn for normalised `emb` (phase 1: {0.0: knn}).
        fresh: recompute the label embeddings / indexes that may have changed (evaluation); False reuses the
        cached ones (prediction in batches)."""
        k = min(int(k or self.evaluation.k), self.num_labels)
        Z = self._label_embeddings(refresh=fresh and self.phase == 1)
        if self.phase == 1:
            alphas = [0.0]
        W = F.normalize(self.labels.w.weight.detach().float(), dim=-1) if self.phase == 2 else None
        out = {}
        if self.s.inference == "exact":
            for a in alphas:
                M = Z if a == 0 else (W if a == 1 else a * W + (1 - a) * Z)
                out[a] = exact_topk(emb, M, None, k=k, doc_chunk=int(self.evaluation.doc_chunk),
                                    label_chunk=int(self.evaluation.label_chunk))
            return out
        reuse = ({"knn"} if self.phase == 2 else set()) if fresh else {"knn", "clf"}
        mats = [("knn", Z)] + ([("clf", W)] if W is not None else [])
        cand = self._ann_candidates(emb, mats, reuse)
        # 512 documents per chunk: the gathered (chunk, candidates, d) label rows stay ~100 MB
        s_knn = candidate_scores(emb, Z, cand, chunk=512)
        s_clf = candidate_scores(emb, W, cand, chunk=512) if W is not None else None
        for a in alphas:
            sc = s_knn if s_clf is None or a == 0 else (s_clf if a == 1 else a * s_clf + (1 - a) * s_knn)
            out[a] = topk_of_candidates(sc, cand, k)
        return out

    @torch.no_grad()
    def predict_topk(self, emb, query=None, k=None):
        """Top-k (scores, ids) for encoder outputs `emb` with the trained model (eval.py predict): fused scores
        in phase 2 (alpha from validation, 0.5 if none was picked), label-text kNN in phase 1."""
        a = 0.0 if self.phase == 1 else (self.alpha if self.alpha is not None else 0.5)
        return self._ranked(self._normalize(emb), [a], k=k, fresh=False)[a]

    def _select_alpha(self, ranked, Y):
        """The alpha of `ranked` ({alpha: (scores, ids)}) with the best fusion_metric on the labels Y (the first of
        equals)."""
        metric, values = self.s.fusion_metric, {}
        for a, (_, ids) in ranked.items():
            values[a] = xc_metrics(ids.cpu().numpy(), Y, None).get(metric)
            if values[a] is None:
                raise ConfigError("sampler.fusion_metric", f"unknown metric '{metric}' (e.g. P@1, P@5, nDCG@5)")
        return max(values, key=values.get)

    def eval_metrics(self, split, emb, idx, query):
        emb = self._normalize(emb)
        Y = self.dm.split(split)[1][idx]
        if self.phase == 1:
            ids = self._ranked(emb, [0.0])[0.0][1]
            metrics = xc_metrics(ids.cpu().numpy(), Y, self.inv_prop)
            metrics.update({f"knn/{k}": v for k, v in metrics.items() if k in ("P@1", "P@3", "P@5", "nDCG@5")})
            metrics["alpha"] = 0.0
            return metrics
        alphas = sorted(set(self.s.fusion_alphas) | {0.0, 1.0})
        if split == "val":
            ranked = self._ranked(emb, alphas)
            self.alpha = self._select_alpha({a: ranked[a] for a in self.s.fusion_alphas}, Y)
        else:
            if self.alpha is None:  # no validation in phase 2: pick alpha on the validation split now
                val_emb = self._encode_split("val")
                self.alpha = (self._select_alpha(self._ranked(val_emb, self.s.fusion_alphas), self.dm.split("val")[1])
                              if val_emb.shape[0] > 0 else 0.5)
            ranked = self._ranked(emb, sorted(set(alphas) | {self.alpha}))
        metrics = xc_metrics(ranked[self.alpha][1].cpu().numpy(), Y, self.inv_prop)
        for name, a in (("knn", 0.0), ("clf", 1.0)):
            m = xc_metrics(ranked[a][1].cpu().numpy(), Y, None)
            metrics.update({f"{name}/{k}": m[k] for k in ("P@1", "P@3", "P@5", "nDCG@5")})
        metrics["alpha"] = float(self.alpha)
        return metrics
