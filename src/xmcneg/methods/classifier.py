"""The label-scoring method of the full and the sampled samplers (conf/method/classifier.yaml): s(x, y) =
<f(x), w_y> + b_y. `sampler=None` (`sampler=full`) scores every label every step (dense AdamW on the table), and
with a BoW encoder adds the wide head's scores (methods/wide_head.py, `wide.*`: a sparse linear model on the input);
otherwise positives + the sampler's negatives are looked up in sparse tables updated row-wise. Evaluation scores
all labels exactly (eval/topk.py) or re-scores a faiss shortlist (eval.search=ann), adds the sampler's correction
when the loss is not logQ-corrected, and logs the corrected metrics and the raw ones (`raw/...`).
"""
import logging
import time

import torch

from xmcneg.data.inputs import csr_rows_to_bag
from xmcneg.distributed import to_device
from xmcneg.errors import ConfigError
from xmcneg.eval.ann import LabelIndex, ann_topk, recall_against_exact
from xmcneg.eval.metrics import split_metrics
from xmcneg.eval.topk import exact_topk
from xmcneg.methods.base import XMCModule, mask_positives
from xmcneg.methods.optim import CombinedOptimizer, linear_warmup, wrap
from xmcneg.methods.sparse_optim import SparseRowOptimizer, adamw
from xmcneg.methods.wide_head import WideHead, WideParams, bag_rows

log = logging.getLogger(__name__)


class XMCClassifier(XMCModule):
    def __init__(self, encoder, num_labels: int, loss, sampler=None, optim=None, evaluation=None, inv_prop=None,
                 check_finite: bool = True, wide=None, num_features=None):
        super().__init__(encoder, num_labels, sparse_labels=sampler is not None, evaluation=evaluation,
                         inv_prop=inv_prop, sampler=sampler, check_finite=check_finite, optim=optim)
        self.save_hyperparameters(ignore=["encoder", "loss", "sampler", "inv_prop"])
        self.loss = loss
        if sampler is None and not hasattr(loss, "full"):
            raise ConfigError("loss.name", f"'{loss.name}' needs sampled negatives; use bce, softmax or sq_hinge "
                                           "with sampler=full")
        if sampler is not None and sampler.fixed_k and sampler.num_negatives >= num_labels:
            raise ConfigError("sampler.num_negatives",
                              f"{sampler.num_negatives} negatives must be fewer than the {num_labels} labels")
        self._ann_cache = None
        self.fixed_labels = sampler is None and self.optim is not None and float(self.optim.full_label_lr) == 0
        if self.fixed_labels:  # full_label_lr 0: random unit label vectors, never trained (with dim >= C nearly
            with torch.no_grad():  # orthogonal: the encoder alone is the classifier, as a linear model's weights)
                self.labels.w.weight.copy_(torch.nn.functional.normalize(self.labels.w.weight, dim=1))
            self.labels.requires_grad_(False)
        self.wide_params = None if wide is None else WideParams.of(wide)
        self.wide = None
        if self.wide_params is not None and self.wide_params.enabled is not False:
            why_not = ("needs every label scored: sampler=full (or sampler=auto below its full_below_labels)"
                       if sampler is not None else "reads bag-of-words features: use a BoW encoder (bow_linear, "
                       "bow_mlp)" if encoder.input_kind != "bow" or num_features is None else None)
            if why_not is None:
                self.wide = WideHead(num_features, num_labels, self.wide_params.features)
            elif self.wide_params.enabled is True:
                raise ConfigError("wide.enabled", f"the wide head {why_not}")

    def setup(self, stage):
        if self.wide is not None and stage == "fit" and self.wide.size == 0:  # a fresh run: fix the support
            t0 = time.perf_counter()
            self.wide.set_support(*self.trainer.datamodule.split("train"))
            log.info("wide head: %d label-feature weights (up to %d features per label) in %.1fs", self.wide.size,
                     self.wide.features, time.perf_counter() - t0)
        super().setup(stage)

    def on_fit_start(self):
        if self.optim is not None and self.optim.label_init == "centroid" and self.train_steps == 0 \
                and not self.fixed_labels:  # a fresh run (a resumed one has trained vectors)
            self.init_labels_from_centroids()
        super().on_fit_start()

    def init_labels_from_centroids(self):
        """optim.label_init=centroid: the label vectors start at the centroids of their training documents'
        encoder outputs (LabelTable.set_centroids): one encoder pass over the training split, on every rank."""
        t0 = time.perf_counter()
        n = self.labels.set_centroids(self.embed_split("train"), self.trainer.datamodule.split("train")[1])
        log.info("label vectors initialised at the centroids of %d labels in %.1fs", n, time.perf_counter() - t0)

    def training_loss(self, batch):
        h = self.encoder(batch["x"])
        if self.sampler is None:
            return self.full_loss(h, batch), h.shape[0]
        self.log_stats(self.sampler.refresh(self.train_steps, self.current_epoch, self))
        return self.sampled_loss(h, batch), h.shape[0]

    def sampled_loss(self, h, batch):
        pos = batch["pos"]
        pos_mask = pos >= 0
        pos_ids = pos.clamp(min=0)
        neg, log_q_neg = self.sampler.sample(batch, h.detach())
        neg_mask = mask_positives(neg, pos)
        if neg.dim() == 1:  # shared negatives: one (B,U) matmul
            s_pos = self.labels.score(h, pos_ids)
            s_neg = self.labels.score(h, neg)
            log_q_neg = log_q_neg.unsqueeze(0).expand_as(s_neg)
        else:  # per-document negatives, maybe padded with -1: one gather and one bmm together with the positives
            neg_mask &= neg >= 0
            s = self.labels.score(h, torch.cat([pos_ids, neg.clamp(min=0)], dim=1))
            s_pos, s_neg = s[:, : pos.shape[1]], s[:, pos.shape[1]:]
        needs_log_q_pos = getattr(self.loss, "needs_log_q_pos", False)
        log_q_pos = self.sampler.log_prob(batch, h.detach(), pos_ids) if needs_log_q_pos else None
        return self.loss(s_pos, pos_mask.float(), s_neg, neg_mask.float(), log_q_neg, log_q_pos)

    def full_loss(self, h, batch):
        logits = self.labels.score_all(h)  # (B, C)
        wide = None if self.wide is None else self.wide(batch["x"])
        if wide is not None and self.wide_params.loss == "joint":  # one loss on the summed scores
            logits, wide = logits + wide, None
        pos = batch["pos"]
        pos_mask = pos >= 0
        target = torch.zeros_like(logits, dtype=torch.bool)
        rows = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)
        target[rows[pos_mask], pos[pos_mask]] = True
        loss = self.loss.full(logits, target, pos)
        return loss if wide is None else loss + self.loss.full(wide, target, pos)  # separate: a loss for each part

    def configure_optimizers(self):
        o = self.optim
        warm = linear_warmup(int(o.warmup_steps)) if int(o.warmup_steps) > 0 else None
        if o.input_optimizer == "auto":
            log.info("optim.input_optimizer=auto: %s on the input table (%s scoring, %d labels, sgd below %s)",
                     self.input_optimizer_kind(), "sampled" if self.sampler is not None else "full",
                     self.num_labels, o.input_sgd_below_labels)
        parts = {"encoder": self.encoder_optimizer(warm)}
        if self.sampler is not None:
            parts["labels"] = SparseRowOptimizer(self.labels.parameters(), lr=float(o.label_lr), kind=o.label_optimizer)
        elif not self.fixed_labels:  # dense table: AdamW, warmed up like the encoder
            parts["labels"] = wrap(adamw(self.labels.parameters(), float(o.full_label_lr),
                                         float(o.label_weight_decay)), warmup=warm)
        if self.wide is not None:
            parts["wide"] = torch.optim.Adagrad(self.wide.parameters(), lr=float(self.wide_params.lr))
        return CombinedOptimizer(parts)

    def correction_query(self, batch, h):
        if self.sampler is None or self.loss.logq_corrected:  # a logQ-corrected loss needs no correction
            return None
        return self.sampler.correction_query(batch, h)

    def eval_metrics(self, split, emb, idx, query):
        metrics = {}
        x = None if self.wide is None else csr_rows_to_bag(self.trainer.datamodule.split(split)[0], idx)
        for prefix, q in ((("", query),) if query is None else (("", query), ("raw/", None))):
            self._eval_prefix = prefix  # names the ANN recall logged by predict_topk
            ids = self.predict_topk(emb, q, x=x)[1].cpu().numpy()
            m = split_metrics(self.trainer.datamodule, split, idx, ids, self.inv_prop)
            metrics.update({f"{prefix}{k}": v for k, v in m.items()})
        return metrics

    def predict_topk(self, emb, query=None, k=None, x=None):
        """Top-k (scores, ids) over all labels for document embeddings `emb` (+ the sampler's score correction for
        `query`, + the wide head's scores of the same documents' BoW input `x`). eval.search=ann re-scores a faiss
        shortlist with the sampler's `score_correction_ids` (without it, or with a wide head: exact search) and logs
        `<stage>/ann_recall@5` against exact search on the first 1000 documents."""
        k = min(int(k or self.evaluation.k), self.num_labels)
        if self.wide is not None:
            if x is None:
                raise ValueError("a model with a wide head scores documents from their BoW input too (x=...)")
            if self.evaluation.search == "ann" and not getattr(self, "_ann_fallback_warned", False):
                log.info("eval.search=ann: the wide head's scores are not in the label index; using exact search")
                self._ann_fallback_warned = True
            return self._exact_predict_topk(emb, query, k, x)
        if self.evaluation.search == "ann":
            out = self._ann_predict_topk(emb, query, k)
            if out is not None:
                return out
        return self._exact_predict_topk(emb, query, k)

    def _exact_predict_topk(self, emb, query, k, x=None):
        chunk = int(self.evaluation.doc_chunk)
        w, b = self.labels.weights()
        out_s, out_i = [], []
        for i in range(0, emb.shape[0], chunk):
            correction = None
            if query is not None:
                q = query[i: i + chunk]
                correction = lambda _e, start, end, q=q: self.sampler.score_correction(q, start, end)
            elif x is not None:  # the wide head's (n, C) scores of these documents, sliced per label block
                s_wide = self.wide(to_device(bag_rows(x, i, min(i + chunk, emb.shape[0])), emb.device))
                correction = lambda _e, start, end, s=s_wide: s[:, start:end]
            s, ids = exact_topk(emb[i: i + chunk], w, b, k=k, doc_chunk=chunk,
                                label_chunk=int(self.evaluation.label_chunk), correction=correction)
            out_s.append(s)
            out_i.append(ids)
        return torch.cat(out_s), torch.cat(out_i)

    def _ann_label_index(self):
        """The eval LabelIndex, rebuilt only when the label matrix or bias changed (tensor version counters)."""
        kind = str(self.evaluation.ann_index)
        w, b = self.labels.w.weight, self.labels.b.weight
        key = (kind, tuple(w.shape), w.data_ptr(), w._version, b.data_ptr(), b._version, self.train_steps)
        if self._ann_cache is None or self._ann_cache[0] != key:
            t0 = time.perf_counter()
            index = LabelIndex(kind=kind).build(w.detach().float().cpu(), b.detach().reshape(-1).float().cpu())
            log.info("eval ANN index (%s) over %d labels built in %.2fs", kind, w.shape[0], time.perf_counter() - t0)
            self._ann_cache = (key, index)
        return self._ann_cache[1]

    @torch.no_grad()
    def _ann_predict_topk(self, emb, query, k):
        """eval.search=ann; returns None when it must fall back to exact search."""
        stage = self.eval_stage()
        extra = None
        if query is not None:
            corr_ids = getattr(self.sampler, "score_correction_ids", None)
            if corr_ids is None:
                if not getattr(self, "_ann_fallback_warned", False):
                    log.info("eval.search=ann: sampler '%s' gives its score correction for label ranges only; "
                             "using exact search for the corrected scores", getattr(self.sampler, "name", "?"))
                    self._ann_fallback_warned = True
                if stage is not None:
                    self.log(f"{stage}/ann_fallback_exact", 1.0)
                return None
            extra = lambda rows, ids: corr_ids(query[rows], ids)  # noqa: E731
        w, b = self.labels.weights()
        scores, ids = ann_topk(emb, w, b, k, self._ann_label_index(), shortlist=int(self.evaluation.ann_shortlist),
                               query_chunk=int(self.evaluation.doc_chunk), extra=extra)
        if stage is not None and emb.shape[0] > 0:
            n, kk = min(1000, emb.shape[0]), min(5, k)
            _, exact_ids = self._exact_predict_topk(emb[:n], None if query is None else query[:n], kk)
            recall = recall_against_exact(ids[:n, :kk], exact_ids)
            self.log(f"{stage}/{getattr(self, '_eval_prefix', '')}ann_recall@5", float(recall))
        return scores, ids
