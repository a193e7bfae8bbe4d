"""Adversarial negatives (Bamler & Mandt): draws from the label tree of label_tree.py with exact log p_n, which
prediction adds to every label's score; `uniform_mix` m gives log q = log((1 - m) p_n + m / C). Under DDP rank 0
fits and broadcasts the tree."""
import logging
import math
import time

import torch

from xmcneg.distributed import active_dist, is_rank0
from xmcneg.errors import ConfigError
from xmcneg.samplers.base import Sampler
from xmcneg.samplers.label_tree import (LabelTree, Projection, csr_pairs, fit_label_tree, fit_projection_dense,
                                        fit_projection_sparse)

log = logging.getLogger("xmcneg")


class AdversarialSampler(Sampler):
    name = "adversarial"

    def __init__(self, num_negatives: int, k: int, node_l2: float, newton_steps: int, hessian_every: int,
                 resplit: bool, refit_every_epochs: int, uniform_mix: float, svd_iters: int, encode_batch_size: int,
                 seed: int = 0):
        super().__init__(num_negatives, seed)
        checks = [("k", int(k) >= 1, k), ("node_l2", float(node_l2) > 0, node_l2),
                  ("newton_steps", int(newton_steps) >= 0, newton_steps),
                  ("hessian_every", int(hessian_every) >= 0, hessian_every),
                  ("refit_every_epochs", int(refit_every_epochs) >= 0, refit_every_epochs),
                  ("uniform_mix", 0.0 <= float(uniform_mix) <= 1.0, uniform_mix),
                  ("svd_iters", int(svd_iters) >= 0, svd_iters),
                  ("encode_batch_size", int(encode_batch_size) >= 1, encode_batch_size)]
        for key, ok, val in checks:
            if not ok:
                raise ConfigError(f"sampler.{key}", f"invalid value {val!r}")
        self.k, self.node_l2 = int(k), float(node_l2)
        self.newton_steps, self.hessian_every, self.resplit = int(newton_steps), int(hessian_every), bool(resplit)
        self.refit_every_epochs, self.uniform_mix = int(refit_every_epochs), float(uniform_mix)
        self.svd_iters, self.encode_batch_size = int(svd_iters), int(encode_batch_size)
        self.tree = self.proj = self._dm = None
        self.last_refit_epoch, self.fit_info, self._cache = 0, {}, {}

    def setup(self, datamodule, model=None, state=None):
        self._dm = datamodule
        super().setup(datamodule, model, state)

    def _fit_tree(self, proj, Z, Y):
        """Fit the tree on projected inputs Z and the train labels Y, install it with `proj`; returns its info."""
        tree, info = fit_label_tree(Z, *csr_pairs(Y), self.num_labels, l2=self.node_l2, newton_steps=self.newton_steps,
                                    hessian_every=self.hessian_every, resplit=self.resplit, seed=self.seed)
        self._set(tree, proj)
        return info

    def fit(self, datamodule, model=None):
        if is_rank0():  # under DDP the other ranks get rank 0's tree from _sync_ranks
            X, Y = datamodule.split("train")
            t0 = time.perf_counter()
            proj = fit_projection_sparse(X, self.k, seed=self.seed, n_iter=self.svd_iters)
            Z = proj.csr(X)
            t1 = time.perf_counter()
            info = self._fit_tree(proj, Z, Y)
            self.fit_info = {"svd_s": t1 - t0, "tree_fit_s": info["fit_s"], "fit_s": time.perf_counter() - t0,
                             "pairs": info["pairs"], "depth": info["depth"], "train_avg_log_p": info["train_avg_log_p"]}
            log.info("adversarial sampler: tree over %d labels (depth %d) fitted on %d pairs in %.1fs "
                     "(svd %.1fs); train avg log p_n = %.3f (uniform: %.3f)", info["num_labels"], info["depth"],
                     info["pairs"], self.fit_info["fit_s"], self.fit_info["svd_s"], info["train_avg_log_p"],
                     -math.log(info["num_labels"]))
        self._sync_ranks()

    def refresh(self, step: int, epoch: int, model=None):
        """Every `refit_every_epochs` epochs: refit projection + tree on the encoder's embeddings (rank 0 under DDP)."""
        n = self.refit_every_epochs
        if n > 0 and model is not None and epoch > 0 and epoch % n == 0 and epoch != self.last_refit_epoch:
            if is_rank0():
                self._refit_on_encoder(model, epoch)
            self._sync_ranks()

    @torch.no_grad()
    def _refit_on_encoder(self, model, epoch: int):
        t0 = time.perf_counter()
        H = model.embed_split("train", self.encode_batch_size, datamodule=self._dm).cpu()
        proj = fit_projection_dense(H, self.k)
        info = self._fit_tree(proj, proj.dense(H), self._dm.split("train")[1])
        self.last_refit_epoch = int(epoch)
        self.fit_info = {**self.fit_info, "refit_s": time.perf_counter() - t0, "refit_epoch": int(epoch),
                         "refit_train_avg_log_p": info["train_avg_log_p"]}
        log.info("adversarial sampler: refitted on encoder embeddings at epoch %d in %.1fs (train avg log p_n %.3f)",
                 epoch, self.fit_info["refit_s"], info["train_avg_log_p"])

    def _set(self, tree, proj):
        if self.num_labels is not None and tree.num_labels != self.num_labels:
            raise ConfigError("sampler", f"the adversarial tree covers {tree.num_labels} labels, the data has "
                                         f"{self.num_labels} (checkpoint from another dataset?)")
        self.tree, self.proj = tree, proj
        self._cache = {}

    def _sync_ranks(self):
        """Under DDP, broadcast rank 0's tree and projection to the other ranks."""
        dist = active_dist()
        if dist is None:
            return
        obj = [self._model_state() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(obj, src=0)
        if dist.get_rank() != 0:
            self._load_model_state(obj[0])

    def _on(self, device):
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.tree.to(device), self.proj.to(device))
        return self._cache[key]

    def project(self, batch, doc_emb):
        """x~ (B, k) on doc_emb's device: from the sparse features, or from doc_emb after an encoder refit."""
        tree, proj = self._on(doc_emb.device)
        if proj.kind == "dense":
            return proj.dense(doc_emb.detach())
        x = batch.get("x") if isinstance(batch, dict) else None
        if not isinstance(x, dict) or "indices" not in x:
            raise ConfigError("sampler", "the adversarial sampler needs bag-of-words inputs (batch['x'] with "
                                         "indices/offsets/weights)")
        return proj.bag(x)

    def _mix(self, logp):
        m = self.uniform_mix
        if m <= 0:
            return logp
        if m >= 1:
            return torch.full_like(logp, -math.log(self.num_labels))
        return torch.logaddexp(logp + math.log1p(-m), torch.full_like(logp, math.log(m / self.num_labels)))

    def sample(self, batch, doc_emb):
        tree, _ = self._on(doc_emb.device)
        xt = self.project(batch, doc_emb)
        ids, logp = tree.sample(xt, self.num_negatives, self.generator)
        if self.uniform_mix > 0:
            mix = (torch.rand(ids.shape, generator=self.generator) < self.uniform_mix).to(ids.device)
            uni = self.uniform(ids.shape, ids.device)
            ids = torch.where(mix, uni, ids)
            logp = self._mix(torch.where(mix, tree.log_prob(xt, uni), logp))
        return ids, logp

    def log_prob(self, batch, doc_emb, label_ids):
        tree, _ = self._on(doc_emb.device)
        return self._mix(tree.log_prob(self.project(batch, doc_emb), label_ids.clamp(min=0)))

    def correction_query(self, batch, doc_emb):
        return self.project(batch, doc_emb)

    def score_correction(self, query, start, end):
        tree, _ = self._on(query.device)
        return self._mix(tree.label_log_probs(query, int(start), int(end)))

    def debug_state(self):
        return {k: v for k, v in self._model_state().items() if k != "fit_info"}

    def _model_state(self):
        return {"tree": self.tree.state_dict(), "projection": self.proj.state_dict(),
                "last_refit_epoch": int(self.last_refit_epoch),
                "fit_info": {k: v for k, v in self.fit_info.items() if isinstance(v, (int, float))}}

    def _load_model_state(self, st):
        self._set(LabelTree.from_state_dict(st["tree"]), Projection.from_state_dict(st["projection"]))
        self.last_refit_epoch = int(st.get("last_refit_epoch", 0))
        self.fit_info = dict(st.get("fit_info", {}))

    def state_dict(self):
        return {**super().state_dict(), **self._model_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._load_model_state(state)
        if self.proj.kind == "bag" and self._dm is not None and hasattr(self._dm, "num_features") \
                and self.proj.weight.shape[0] != self._dm.num_features:
            raise ConfigError("sampler", f"the adversarial projection expects {self.proj.weight.shape[0]} features, "
                                         f"the data has {self._dm.num_features}")
