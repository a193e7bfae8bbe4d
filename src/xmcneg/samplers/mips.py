"""MIPS hard negatives + uniform negatives (Qaraei & Babbar); options in conf/sampler/mips.yaml.

Document i with p_i positives gets n_i = max(num_candidates - p_i, num_hard) negatives: h_i hard ones (the top
non-positive labels of a faiss index over the label table) and the rest exactly uniform over the other labels. Rows
are [hard | uniform | -1]; log_q per slot: -log W for hard y, log(u_i / (W (C - m_i))) for uniform y (u_i uniform
slots, m_i = p_i + h_i). Index rebuilds are deterministic, so all DDP ranks hold the same index.
"""
import logging
import math
import time

import torch

from xmcneg.errors import ConfigError
from xmcneg.samplers.base import Sampler

log = logging.getLogger(__name__)

MODES = ("mix", "mips_only", "uniform_only")
INDEX_KINDS = ("flat", "ivf", "hnsw")
# index bookkeeping saved in checkpoints, with its value for a checkpoint without it
SAVED = {"index_version": 0, "last_refresh_step": -1, "index_epoch": -1, "build_s": 0.0, "query_s": 0.0, "step_s": 0.0}


class MIPSSampler(Sampler):
    name = "mips"
    fixed_k = True  # num_negatives = num_candidates bounds the width; it must be below C

    def __init__(self, num_hard: int, num_candidates: int, index: str, refresh_steps: int, warmup_epochs: int,
                 mode: str, index_args: dict, seed: int = 0):
        super().__init__(num_negatives=num_candidates, seed=seed)
        if mode not in MODES:
            raise ConfigError("sampler.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        if index not in INDEX_KINDS:
            raise ConfigError("sampler.index", f"must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
        if int(num_candidates) < 1:
            raise ConfigError("sampler.num_candidates", f"must be >= 1, got {num_candidates}")
        if not 0 <= int(num_hard) <= int(num_candidates):
            raise ConfigError("sampler.num_hard", f"must be in [0, num_candidates={num_candidates}], got {num_hard}")
        if int(warmup_epochs) < 0:
            raise ConfigError("sampler.warmup_epochs", f"must be >= 0, got {warmup_epochs}")
        self.num_hard, self.num_candidates, self.index_kind = int(num_hard), int(num_candidates), index
        self.refresh_steps, self.warmup_epochs, self.mode = int(refresh_steps), int(warmup_epochs), mode
        self.index_args = dict(index_args or {})
        self.index, self.index_version, self.hard_active = None, 0, False  # the index is rebuilt, never saved
        self.last_refresh_step, self.index_epoch = -1, -1  # train step and epoch of the last build
        self.refresh_steps_log = []     # steps at which this process (re)built the index
        self.build_s, self.query_s, self.step_s = 0.0, 0.0, 0.0  # timing
        self._prev_call = None          # (step, epoch, perf_counter) of the previous refresh call

    def setup(self, datamodule, model=None, state=None):
        if self.num_candidates >= datamodule.num_labels:
            raise ConfigError("sampler.num_candidates",
                              f"{self.num_candidates} must be fewer than the {datamodule.num_labels} labels")
        super().setup(datamodule, model, state)

    def hard_wanted(self, epoch: int) -> bool:
        return self.mode != "uniform_only" and epoch >= self.warmup_epochs

    def due(self, step: int, epoch: int) -> bool:
        """Whether the index must be (re)built before this step."""
        if not self.hard_wanted(epoch):
            return False
        if self.index is None or epoch != self.index_epoch:
            return True
        return self.refresh_steps > 0 and step % self.refresh_steps == 0 and step != self.last_refresh_step

    def rebuild(self, model, step: int, epoch: int):
        from xmcneg.eval.ann import LabelIndex

        t0 = time.perf_counter()
        w, b = model.weights()
        if self.index is None:
            try:  # LabelIndex builds deterministically by default: the same index on every DDP rank
                self.index = LabelIndex(kind=self.index_kind, **self.index_args)
            except TypeError as e:
                raise ConfigError("sampler.index_args", str(e)) from None
        self.index.build(w.float().cpu(), b.float().cpu())
        self.build_s += time.perf_counter() - t0
        self.index_version += 1
        self.last_refresh_step, self.index_epoch = int(step), int(epoch)
        self.refresh_steps_log.append(int(step))
        log.debug("MIPS index v%d (%s) built at step %d, epoch %d", self.index_version, self.index_kind, step, epoch)

    def refresh(self, step: int, epoch: int, model=None):
        now = time.perf_counter()
        if self._prev_call is not None:
            ps, pe, pt = self._prev_call
            if step == ps + 1 and epoch == pe:
                self.step_s += now - pt
        self._prev_call = (int(step), int(epoch), now)
        if self.due(step, epoch):
            self.rebuild(model, step, epoch)
        self.hard_active = self.hard_wanted(epoch) and self.index is not None
        return self.stats()

    def stats(self):
        spent = self.build_s + self.query_s
        return {"time/index_build_s": self.build_s, "time/index_query_s": self.query_s,
                "time/index_share": spent / self.step_s if self.step_s > 0 else 0.0,
                "sampler/index_version": float(self.index_version)}

    def query(self, doc_emb, kq):
        t0 = time.perf_counter()
        q = doc_emb.detach().to("cpu", torch.float32).numpy()
        _, ids = self.index.search(q, kq)
        self.query_s += time.perf_counter() - t0
        return torch.from_numpy(ids)

    def sample(self, batch, doc_emb):
        device = doc_emb.device
        pos = batch["pos"].detach().cpu()
        B = pos.shape[0]
        C = self.num_labels
        p = (pos >= 0).sum(1)                                           # (B,) positives per document
        n = torch.clamp(self.num_candidates - p, min=self.num_hard)     # valid negatives per document
        h_target = n if self.mode == "mips_only" else torch.full_like(n, self.num_hard)  # hard negatives wanted
        h_target = h_target if self.hard_active else torch.zeros_like(n)
        W = int(n.max()) if B > 0 else 0

        # --- hard negatives: first h_target[i] index neighbours that are not positives
        hard = torch.full((B, max(int(h_target.max()) if B else 0, 0)), -1, dtype=torch.long)
        h = torch.zeros(B, dtype=torch.long)
        if hard.shape[1] > 0:
            kq = min(int((h_target + p).max()), C)
            cand = self.query(doc_emb, kq)                              # (B, kq), -1 = missing
            ok = (cand >= 0) & ~(cand.unsqueeze(-1) == pos.unsqueeze(1)).any(-1)
            rank = ok.long().cumsum(1) - 1
            take = ok & (rank < h_target.unsqueeze(1))
            rows = torch.arange(B).unsqueeze(1).expand_as(cand)
            hard[rows[take], rank[take]] = cand[take]
            h = take.sum(1)

        # --- uniform negatives from the labels outside positives and hard negatives, exactly (rank shift)
        u = n - h
        excl = torch.cat([pos, hard], 1)
        big = C + (1 << 40)
        # distinct ids: positives are unique, hard negatives are index answers that are not positives
        excl = torch.where(excl >= 0, excl, torch.full_like(excl, big)).sort(1).values
        m = (excl < big).sum(1)                                         # (B,) excluded labels per row
        free = (C - m).clamp(min=0)
        u = torch.where(free > 0, u, torch.zeros_like(u))                # nothing left to draw from
        r = torch.rand((B, W), generator=self.generator, dtype=torch.float64)
        draw = (r * free.unsqueeze(1).double()).long().clamp(max=(free - 1).clamp(min=0).unsqueeze(1))
        shifted = excl - torch.arange(excl.shape[1]).unsqueeze(0)       # e_j - j: non-decreasing per row
        uni = draw + torch.searchsorted(shifted.contiguous(), draw.contiguous(), right=True)

        # --- compose [hard | uniform | -1]
        col = torch.arange(W).unsqueeze(0)
        out = torch.full((B, W), -1, dtype=torch.long)
        is_uni = (col >= h.unsqueeze(1)) & (col < (h + u).unsqueeze(1))
        out[:, :hard.shape[1]] = hard  # row i: its h_i hard negatives, then -1 (h_target <= n, so width <= W)
        out = torch.where(is_uni, uni, out)
        log_q = torch.full((B, W), -math.log(max(W, 1)), dtype=torch.float32)
        lq_uni = (torch.log(u.double().clamp(min=1)) - math.log(max(W, 1)) - torch.log(free.double().clamp(min=1)))
        log_q = torch.where(is_uni, lq_uni.float().unsqueeze(1).expand(B, W), log_q)
        log_q = log_q.masked_fill(out < 0, 0.0)  # padding (masked by the method); finite for the ns regulariser
        return out.to(device, non_blocking=True), log_q.to(device, non_blocking=True)

    def debug_state(self):
        """Index builds and the current index's answers to a fixed probe: identical on every DDP rank when every
        rank rebuilt at the same steps from the same weights."""
        out = {"index_version": int(self.index_version), "builds": list(self.refresh_steps_log)}
        if self.index is not None:
            probe = torch.randn(32, self.index.dim, generator=torch.Generator().manual_seed(0))
            scores, ids = self.index.search(probe.numpy(), min(10, self.num_labels))
            out["index_answers"] = [torch.as_tensor(ids), torch.as_tensor(scores)]
        return out

    def state_dict(self):
        return {**super().state_dict(), **{k: type(d)(getattr(self, k)) for k, d in SAVED.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for k, d in SAVED.items():
            setattr(self, k, type(d)(state.get(k, d)))
        self.index = None          # rebuilt at the first refresh after load (when hard negatives are active)
        self.hard_active = False
        self._prev_call = None
