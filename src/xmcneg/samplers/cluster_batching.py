"""NGAME's negative-mining-aware mini-batching (Dahiya et al., WSDM 2023): batches cut from a random permutation
of clusters of similar training documents, so the other documents' positives are hard in-batch negatives.
Clusters come from recursive balanced spherical 2-means (`balanced_spherical_clusters`, one batched computation
per level); `ClusterBatchSampler` cuts the global list of batches (the same on every rank; rank r takes batches
r, r + W, ...) at cluster boundaries; `ClusterCurriculum` is the cluster-size schedule of conf/sampler/ngame.yaml.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler

from xmcneg.errors import ConfigError


@torch.no_grad()
def _split_group(X, idx, gen, max_iter, tol):
    """Balanced 2-means on G segments of equal length L at once. X (N, d) normalised; idx (G, L) row ids.
    Returns idx reordered so that the first ceil(L/2) of each row form one half."""
    G, L = idx.shape
    Xs = X[idx]  # (G, L, d)
    r0 = torch.randint(0, L, (G,), generator=gen)
    r1 = (r0 + 1 + torch.randint(0, L - 1, (G,), generator=gen)) % L
    ar = torch.arange(G)
    c = torch.stack([Xs[ar, r0], Xs[ar, r1]], dim=1)  # (G, 2, d)
    h = (L + 1) // 2
    total = Xs.sum(1)  # (G, d)
    big = L >= 64
    prev = -float("inf")
    order = torch.arange(L).expand(G, L)
    for _ in range(max_iter):
        # bmm for long segments; elementwise products + sums for short ones (bmm is slow on many tiny matrices)
        dc = c[:, 0] - c[:, 1]
        diff = torch.bmm(Xs, dc.unsqueeze(-1)).squeeze(-1) if big else (Xs * dc.unsqueeze(1)).sum(-1)
        order = torch.argsort(diff, dim=1, descending=True, stable=True)
        is_left = torch.zeros(G, L).scatter_(1, order[:, :h], 1.0)
        # (G, d) sum of the members given to c0
        s_left = torch.bmm(is_left.unsqueeze(1), Xs).squeeze(1) if big else (Xs * is_left.unsqueeze(-1)).sum(1)
        s_right = total - s_left
        obj = float((s_left * c[:, 0]).sum() + (s_right * c[:, 1]).sum()) / (G * L)  # mean sim to own centroid
        c = torch.nn.functional.normalize(torch.stack([s_left, s_right], dim=1), dim=-1)
        if obj - prev < tol:
            break
        prev = obj
    return idx.gather(1, order)


@torch.no_grad()
def balanced_spherical_clusters(emb, cluster_size, seed=0, max_iter=10, tol=1e-4):
    """Cluster id of each row of `emb` (N, d): recursive balanced spherical 2-means into 2^L clusters with
    2^L = (N / cluster_size) rounded up to a power of two (at most N). Returns int64 numpy (N,). Runs on one
    intra-op thread per 8M embedding values (at least 1, at most torch's setting): the many small ops of the deep
    levels run far slower with several threads on a busy CPU."""
    X = torch.as_tensor(emb).detach().float().cpu()
    prev = torch.get_num_threads()
    torch.set_num_threads(int(min(prev, max(1, X.numel() // (8 << 20)))))
    try:
        N = X.shape[0]
        if N == 0:
            return np.zeros(0, dtype=np.int64)
        X = torch.nn.functional.normalize(X, dim=1)
        want = max(1, math.ceil(N / max(int(cluster_size), 1)))
        levels = min(max(0, math.ceil(math.log2(want))), int(math.floor(math.log2(N))))
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(N, generator=gen)
        bounds = np.array([0, N], dtype=np.int64)
        for _ in range(levels):
            lens = np.diff(bounds)
            nb = np.zeros(2 * len(lens) + 1, dtype=np.int64)
            for L in np.unique(lens):
                segs = np.flatnonzero(lens == L)
                starts = torch.from_numpy(bounds[segs])
                idx = order[starts.unsqueeze(1) + torch.arange(int(L)).unsqueeze(0)]  # (G, L)
                if L >= 2:
                    idx = _split_group(X, idx, gen, max_iter, tol)
                order[starts.unsqueeze(1) + torch.arange(int(L)).unsqueeze(0)] = idx
                h = (int(L) + 1) // 2
                nb[2 * segs + 1] = bounds[segs] + h
                nb[2 * segs + 2] = bounds[segs] + L
            bounds = nb
        ids = np.empty(N, dtype=np.int64)
        lens = np.diff(bounds)
        ids[order.numpy()] = np.repeat(np.arange(len(lens)), lens)
        return ids
    finally:
        torch.set_num_threads(prev)


class ClusterCurriculum:
    def __init__(self, start_size, doubling_epochs, max_size, start_epoch, refresh_epochs):
        self.start_size, self.max_size = int(start_size), int(max_size)
        self.start_epoch, self.refresh_epochs = int(start_epoch), int(refresh_epochs)
        self.doubling_epochs = sorted(int(e) for e in (doubling_epochs or []))
        for key, v, lo in (("cluster_size_start", self.start_size, 1), ("cluster_size_max", self.max_size, 1),
                           ("refresh_epochs", self.refresh_epochs, 1), ("cluster_start_epoch", self.start_epoch, 0)):
            if v < lo:
                raise ConfigError(f"sampler.{key}", f"must be >= {lo}, got {v}")

    def size(self, epoch):
        n = sum(1 for e in self.doubling_epochs if e <= epoch)
        return int(min(self.max_size, self.start_size * (2 ** n)))

    def active(self, epoch):
        return epoch >= self.start_epoch and self.size(epoch) > 1

    def should_recluster(self, epoch, last_epoch, last_size):
        """Re-cluster at `epoch`? (last_epoch/last_size: when and at which size clusters were last computed)."""
        if not self.active(epoch):
            return False
        if last_epoch is None or last_epoch < 0 or last_size != self.size(epoch):
            return True
        return (epoch - self.start_epoch) % self.refresh_epochs == 0 and epoch != last_epoch


class ClusterBatchSampler(Sampler):
    def __init__(self, num_docs, batch_size, seed=0, rank=0, world_size=1, drop_last=False):
        self.num_docs, self.batch_size, self.seed = int(num_docs), int(batch_size), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.epoch, self.cluster_ids = 0, None

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_clusters(self, cluster_ids):
        """Cluster id per document (length num_docs), or None for random batches."""
        self.cluster_ids = None if cluster_ids is None else np.asarray(cluster_ids, dtype=np.int64).reshape(-1)

    def set_distributed(self, rank, world_size):
        self.rank, self.world_size = int(rank), int(world_size)

    def num_batches(self):
        """M: the number of batches of the whole epoch (all ranks together)."""
        N, B, W = self.num_docs, self.batch_size, self.world_size
        if self.drop_last:
            return (N // B) // W * W
        return math.ceil(math.ceil(N / B) / W) * W if N > 0 else 0

    def _order(self, rng):
        N = self.num_docs
        perm = rng.permutation(N)
        if self.cluster_ids is None:
            return perm, None
        c = self.cluster_ids
        uniq, inv = np.unique(c, return_inverse=True)
        rank_of = rng.permutation(len(uniq))  # random position of each cluster
        key = rank_of[inv[perm]]
        order = perm[np.argsort(key, kind="stable")]
        sizes = np.bincount(rank_of[inv], minlength=len(uniq))  # size of the cluster at each position
        starts = np.concatenate([[0], np.cumsum(sizes)])  # cluster boundaries in `order`
        return order, starts

    def global_batches(self):
        """All M batches of the current epoch (identical on every rank), as int64 arrays."""
        M = self.num_batches()
        N, B = self.num_docs, self.batch_size
        if M == 0:
            return []
        rng = np.random.default_rng([self.seed, self.epoch, 0x4E47])
        order, bounds = self._order(rng)
        if N < M:  # fewer documents than batches: single-document batches, wrapped around
            single = [order[i:i + 1] for i in range(N)]
            return [single[i % N] for i in range(M)]
        if self.drop_last:
            ideal = np.arange(1, M + 1, dtype=np.int64) * B
        else:
            ideal = np.round(np.arange(1, M + 1) * (N / M)).astype(np.int64)
            ideal[-1] = N
        cuts = ideal
        if bounds is not None and not self.drop_last:  # cuts moved to the nearest cluster boundary (ties: the lower)
            j = np.clip(np.searchsorted(bounds, ideal), 1, len(bounds) - 1)
            snapped = np.where(ideal - bounds[j - 1] <= bounds[j] - ideal, bounds[j - 1], bounds[j])
            snapped[-1] = N
            if np.all(np.diff(np.concatenate([[0], snapped])) > 0):
                cuts = snapped
        starts = np.concatenate([[0], cuts[:-1]])
        return [order[s:e] for s, e in zip(starts, cuts)]

    def __iter__(self):
        batches = self.global_batches()  # computed when iteration starts, with the epoch/clusters set by then
        for b in batches[self.rank::self.world_size]:
            yield b.tolist()

    def __len__(self):
        return self.num_batches() // self.world_size
