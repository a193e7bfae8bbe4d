"""The label table: one vector w_y and one bias b_y per label, with its gradient synchronisation under DDP."""
import torch
from torch import nn

from xmcneg.distributed import active_dist
from xmcneg.methods.sparse_optim import all_gather_sparse_mean

SPARSE_GRAD_SYNC = ("auto", "ddp", "all_gather")
# per-document scoring: one (B, U) matmul over the U distinct ids beats the (B, n, d) gather + bmm up to U ~ 64 n
# (1 thread, B = d = 256; benchmarks/label_scoring.py)
UNIQUE_MATMUL = 64


def sparse_sync_mode(mode, sparse):
    """How a table's gradients are averaged over the process group: None (one process), `ddp` (DDP's reducer) or
    `all_gather` (sparse tables left out of DDP). `mode` (hardware.sparse_grad_sync) `auto` = ddp on gloo, else
    all_gather (NCCL has no sparse all-reduce); dense tables always use ddp."""
    dist = active_dist()
    if dist is None:
        return None
    if not sparse:
        return "ddp"
    return ("ddp" if dist.get_backend() == "gloo" else "all_gather") if mode == "auto" else mode


class LabelTable(nn.Module):
    """Scores s(x, y) = <h, w_y> + b_y. `sparse=True`: `nn.Embedding(sparse=True)` tables whose gradients hold the
    looked-up rows only, for a row-wise optimiser (methods/sparse_optim.py); under DDP they are averaged as
    `resolve_sync` decides (`sync_grads` does the all_gather mode)."""

    def __init__(self, num_labels: int, dim: int, sparse: bool):
        super().__init__()
        self.w = nn.Embedding(num_labels, dim, sparse=sparse)
        self.b = nn.Embedding(num_labels, 1, sparse=sparse)
        nn.init.normal_(self.w.weight, std=0.01)
        nn.init.zeros_(self.b.weight)
        self.sparse = bool(sparse)
        self.sync = None  # None (one process), "ddp" or "all_gather"; set by resolve_sync

    @torch.no_grad()
    def set_centroids(self, h, Y, norm=1.0):
        """w_y = the direction of the summed rows of `h` (N, d: documents' encoder outputs) of label y's documents
        (Y: (N, C) scipy sparse), of length `norm` / (the median row norm of h); b_y = 0. Scores then start as a
        nearest-centroid classifier's: `norm` x cosine to the centroid x the document's relative norm. Labels
        without a document keep their vectors. Returns the number of labels set."""
        sums = torch.from_numpy(Y.T.tocsr().astype("float32") @ h.detach().float().cpu().numpy())
        norms = sums.norm(dim=1)
        has = norms > 0
        scale = norm / h.norm(dim=1).median().clamp(min=1e-12).item()
        w = self.w.weight
        w[has.to(w.device)] = (sums[has] * (scale / norms[has]).unsqueeze(1)).to(w)
        self.b.weight.zero_()
        return int(has.sum())

    def resolve_sync(self, mode="auto"):
        """Set and return the sync mode for the running process group (None without one)."""
        self.sync = sparse_sync_mode(mode, self.sparse)
        return self.sync

    def weights(self):
        """(W (C, d), b (C,)): the parameters themselves (detach before using them outside the loss)."""
        return self.w.weight, self.b.weight.reshape(-1)

    def score(self, h, ids):
        """Scores of label ids for each document: ids (B,n) per document -> (B,n); ids (n,) shared -> (B,n).
        Per-document ids with at most UNIQUE_MATMUL x n distinct labels are scored like shared ones (one matmul
        over the distinct ids, whose row gradients come out coalesced), others by one gather and one bmm."""
        if ids.dim() == 1:
            return h @ self.w(ids).T + self.bias(ids)
        uniq, inv = torch.unique(ids, return_inverse=True)
        if uniq.numel() <= UNIQUE_MATMUL * ids.shape[1]:
            return self.score(h, uniq).gather(1, inv)
        return torch.bmm(self.w(ids), h.unsqueeze(-1)).squeeze(-1) + self.bias(ids)

    def score_all(self, h):
        """(B, C) scores of every label (dense tables)."""
        return h @ self.w.weight.T + self.b.weight.T

    def bias(self, ids):
        """b(ids) without its width-1 dimension. With sync=ddp the gradient flowing into the lookup is copied first:
        the sparse gradient's values are a view of the scores' own gradient, which DDP's reducer divides in place by
        the world size; without the copy w's and the encoder's gradients would be divided twice."""
        b = self.b(ids)
        if self.sync == "ddp" and self.sparse and b.requires_grad:
            b.register_hook(lambda g: g.clone())
        return b.squeeze(-1)

    def sync_grads(self):
        """sync=all_gather: average the sparse gradients over the ranks (after backward, before the optimiser
        steps; on every rank). A no-op otherwise."""
        dist = active_dist()
        if self.sync == "all_gather" and dist is not None:
            all_gather_sparse_mean([self.w.weight, self.b.weight], dist)

    @torch.no_grad()
    def broadcast(self):
        """sync=all_gather: broadcast rank 0's tables (DDP does not, for tables it does not wrap)."""
        dist = active_dist()
        if self.sync == "all_gather" and dist is not None:
            for p in (self.w.weight, self.b.weight):
                dist.broadcast(p.data, src=0)
