"""Bamler & Mandt's auxiliary model: a balanced binary tree of logistic regressions over the labels, on a whitened
PCA ``x~`` of the inputs (`Projection`). Nodes in heap order (children of g: 2g+1 left, 2g+2 right); node g goes
right with probability ``sigmoid(w_g . x~ + b_g)``; a node with one empty subtree has ``w = 0, b = +-PAD_LOGIT``, so
padding leaves have probability exactly 0. `fit_label_tree` fits level by level (balanced split, batched Newton
steps, optional capacity-constrained re-split); `LabelTree.sample` draws ancestrally with exact log p_n.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

PAD_LOGIT = 1000.0
_PAIR_CHUNK = 1 << 19
_CORRECTION_BUDGET_BYTES = 256 << 20
_MAX_STEP = 4.0
_LEAF_BLOCK = 8192  # leaves per subtree group in label_log_probs (cache-sized working set)


def tree_depth(num_labels: int) -> int:
    return max(1, int(math.ceil(math.log2(max(int(num_labels), 1)))))


class Projection:
    """x~ = x @ weight - offset (whitened PCA) of "bag" inputs (sparse features) or "dense" ones (embeddings)."""

    def __init__(self, weight: torch.Tensor, offset: torch.Tensor, kind: str = "bag"):
        self.weight = weight.float().contiguous()
        self.offset = offset.float().contiguous()
        self.kind = kind

    def to(self, device):
        return Projection(self.weight.to(device), self.offset.to(device), self.kind)

    def bag(self, x):
        """x: {"indices", "offsets", "weights"} (EmbeddingBag inputs) -> (B, k)."""
        w = self.weight
        out = F.embedding_bag(x["indices"].to(w.device), w, x["offsets"].to(w.device), mode="sum",
                              per_sample_weights=x["weights"].to(w.device, w.dtype))
        return out - self.offset

    def dense(self, h):
        return h.to(self.weight.dtype) @ self.weight - self.offset

    def csr(self, X):
        """All rows of a scipy CSR matrix -> (N, k) float32 tensor (on CPU)."""
        return torch.from_numpy(np.asarray(X @ self.weight.cpu().numpy(), dtype=np.float32)) - self.offset.cpu()

    def state_dict(self):
        return {"weight": self.weight.cpu(), "offset": self.offset.cpu(), "kind": self.kind}

    @classmethod
    def from_state_dict(cls, st):
        return cls(st["weight"], st["offset"], st["kind"])


def _whiten(V, s, mu, n_rows, k, eps=1e-8):
    """(F, r) right singular vectors, (r,) singular values -> whitened (weight, offset) with k columns."""
    r = min(k, V.shape[1])
    V, s = V[:, :r], s[:r]
    # sign convention (deterministic across BLAS builds): the largest-|.| entry of each component is positive
    big = np.argmax(np.abs(V), axis=0)
    V = V * np.where(V[big, np.arange(r)] < 0, -1.0, 1.0)
    std = s / math.sqrt(max(n_rows - 1, 1))
    keep = std > eps * max(float(std.max()) if r else 0.0, 1e-30)
    W = np.zeros((V.shape[0], k), dtype=np.float64)
    W[:, :r] = np.where(keep, V / np.where(keep, std, 1.0), 0.0)
    return torch.from_numpy(W.astype(np.float32)), torch.from_numpy((mu @ W).astype(np.float32))


def fit_projection_sparse(X: sp.spmatrix, k: int = 16, seed: int = 0, n_iter: int = 4,
                          oversample: int = 10) -> Projection:
    """Whitened PCA of a sparse (N, F) matrix by randomized SVD of the implicitly centred matrix X - 1 mu^T
    (Halko et al., normalised power iterations; float64; seeded)."""
    X = sp.csr_matrix(X)
    N, Fdim = X.shape
    mu = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    XT = X.T.tocsr()
    ones = np.ones(N)

    def A(M):  # (X - 1 mu^T) @ M
        return np.asarray(X @ M, dtype=np.float64) - np.outer(ones, mu @ M)

    def AT(M):  # (X - 1 mu^T)^T @ M
        return np.asarray(XT @ M, dtype=np.float64) - np.outer(mu, M.sum(axis=0))

    r = min(k + oversample, N, Fdim)
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(A(rng.standard_normal((Fdim, r))))
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(AT(Q))
        Q, _ = np.linalg.qr(A(Q))
    B = AT(Q).T  # (r, F) = Q^T (X - 1 mu^T)
    _, s, Vt = np.linalg.svd(B, full_matrices=False)
    W, off = _whiten(Vt.T, s, mu, N, k)
    return Projection(W, off, "bag")


def fit_projection_dense(H: torch.Tensor, k: int = 16) -> Projection:
    """Whitened PCA of dense rows (e.g. encoder embeddings, (N, d)) via the d x d covariance (float64)."""
    H = H.detach().to("cpu", torch.float64)
    mu = H.mean(0)
    Hc = H - mu
    cov = Hc.T @ Hc
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    W, off = _whiten(evecs.numpy(), np.sqrt(evals.numpy()), mu.numpy(), H.shape[0], k)
    return Projection(W, off, "dense")


class LabelTree:
    """Node parameters ``weight (M, k)``, ``bias (M,)`` with M = 2^D - 1 (heap order), ``label_to_leaf (C,)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, label_to_leaf: torch.Tensor, depth: int,
                 num_labels: int):
        self.depth, self.num_labels = int(depth), int(num_labels)
        M = (1 << self.depth) - 1
        if weight.shape[0] != M or bias.shape != (M,):
            raise ValueError(f"tree of depth {depth} needs {M} nodes, got weight {tuple(weight.shape)}, "
                             f"bias {tuple(bias.shape)}")
        if label_to_leaf.shape != (self.num_labels,):
            raise ValueError(f"label_to_leaf must have shape ({num_labels},), got {tuple(label_to_leaf.shape)}")
        self.label_to_leaf = label_to_leaf.long().contiguous()
        dev = self.label_to_leaf.device
        self.leaf_to_label = torch.full((1 << self.depth,), -1, dtype=torch.long, device=dev)
        self.leaf_to_label[self.label_to_leaf] = torch.arange(self.num_labels, device=dev)
        if int((self.leaf_to_label >= 0).sum()) != self.num_labels:
            raise ValueError("label_to_leaf is not one-to-one")
        # one (M, k+1) table [w | b]: one gather per level fetches a node's whole parameter row
        self.wb = torch.cat([weight.float(), bias.float().unsqueeze(1)], dim=1).contiguous()
        self._enforce_padding()

    @property
    def weight(self):
        return self.wb[:, :-1]

    @property
    def bias(self):
        return self.wb[:, -1]

    def _enforce_padding(self):
        """Nodes with exactly one inhabited child: w = 0, b = +-PAD_LOGIT towards it (padding mass exactly 0)."""
        D = self.depth
        occ = (self.leaf_to_label >= 0).to(torch.int64)  # occupancy of the level-D "nodes" (the leaves)
        for l in range(D - 1, -1, -1):
            pairs = occ.view(-1, 2)
            left, right = pairs[:, 0] > 0, pairs[:, 1] > 0
            base = (1 << l) - 1
            rows = self.wb[base: base + (1 << l)]
            one_sided = left ^ right
            rows[one_sided, :-1] = 0.0
            rows[one_sided, -1] = torch.where(right[one_sided], PAD_LOGIT, -PAD_LOGIT)
            occ = pairs.sum(1)

    def to(self, device):
        return LabelTree(self.weight.to(device), self.bias.to(device), self.label_to_leaf.to(device), self.depth,
                         self.num_labels)

    def state_dict(self):
        return {"weight": self.weight.cpu().contiguous(), "bias": self.bias.cpu().contiguous(),
                "label_to_leaf": self.label_to_leaf.cpu(), "depth": self.depth, "num_labels": self.num_labels}

    @classmethod
    def from_state_dict(cls, st):
        return cls(st["weight"], st["bias"], st["label_to_leaf"], st["depth"], st["num_labels"])

    def _with_one(self, xt):
        """[x~, 1] (n, k+1) on the tree's device and dtype: one dot product with a [w | b] row gives w . x~ + b."""
        xt = xt.to(self.wb.device, self.wb.dtype)
        return torch.cat([xt, torch.ones_like(xt[:, :1])], 1)

    def path(self, labels: torch.Tensor):
        """(..., ) label ids -> node ids (..., D) and branch bits (..., D) (bool, True = right)."""
        D = self.depth
        leaves = self.label_to_leaf[labels]
        lv = torch.arange(D, device=leaves.device)
        nodes = (leaves.unsqueeze(-1) >> (D - lv)) + ((1 << lv) - 1)  # heap index of the level-l ancestor
        bits = ((leaves.unsqueeze(-1) >> (D - 1 - lv)) & 1).bool()
        return nodes, bits

    def log_prob(self, xt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p_n(labels | x) for xt (B, k) and labels (B, P) (or (B,)) along their known paths: (B, P)."""
        squeeze = labels.dim() == 1
        if squeeze:
            labels = labels.unsqueeze(1)
        B, P = labels.shape
        nodes, bits = self.path(labels)  # (B, P, D)
        x1 = self._with_one(xt)
        prm = F.embedding(nodes.reshape(B, P * self.depth), self.wb)
        s = torch.linalg.vecdot(prm, x1.unsqueeze(1)).view(B, P, self.depth)  # w . x~ + b of every path node
        out = F.logsigmoid(torch.where(bits, s, -s)).sum(-1)
        return out.squeeze(1) if squeeze else out

    def sample(self, xt: torch.Tensor, num: int, generator: torch.Generator = None, u: torch.Tensor = None):
        """Ancestral sampling of `num` labels per row of xt (B, k): per level, go right iff u < sigmoid(s), with
        uniforms `u` (D, B, num) drawn on the CPU from `generator` unless given. Returns (labels, log p_n) (B, num)."""
        B, D = xt.shape[0], self.depth
        dev = self.wb.device
        if u is None:
            u = torch.rand((D, B, num), generator=generator)
        u = u.to(dev, non_blocking=True).view(D, B * num)
        xr = self._with_one(xt).repeat_interleave(num, dim=0)  # (B*num, k+1)
        node = torch.zeros(B * num, dtype=torch.long, device=dev)
        S = torch.empty((D, B * num), dtype=self.wb.dtype, device=dev)
        R = torch.empty((D, B * num), dtype=torch.bool, device=dev)
        for l in range(D):
            s = torch.linalg.vecdot(F.embedding(node, self.wb), xr, out=S[l])  # w . x~ + b of the current nodes
            right = torch.lt(u[l], torch.sigmoid(s), out=R[l])
            node = node.mul_(2).add_(right).add_(1)
        logp = F.logsigmoid(torch.where(R, S, -S)).sum(0)
        leaves = node - ((1 << D) - 1)
        return self.leaf_to_label[leaves].view(B, num), logp.view(B, num)

    def _descend(self, x1, lp, level, first, count, levels):
        """Log-probs (R, count * 2^levels) of the descendants, `levels` levels down, of nodes [first, first + count)
        of `level` with log-probs lp (R, count): per level one GEMM, then child = parent + log sigmoid(+-s)."""
        R = x1.shape[0]
        for d in range(levels):
            lo = (1 << (level + d)) - 1 + (first << d)
            S = x1 @ self.wb[lo: lo + (count << d)].T  # (R, count * 2^d)
            right = F.logsigmoid(S)
            left = right - S  # log sigmoid(-s) = log sigmoid(s) - s
            lp = torch.stack((lp + left, lp + right), dim=2).reshape(R, -1)
        return lp

    def label_log_probs(self, xt: torch.Tensor, start: int = 0, end: int = None,
                        budget_bytes: int = _CORRECTION_BUDGET_BYTES) -> torch.Tensor:
        """log p_n(y|x) for labels [start, end) and every row of xt (n, k) -> (n, end-start), exact, with about
        `budget_bytes` of temporaries: by subtree groups of ~8192 leaves, or for few labels by their ancestors."""
        end = self.num_labels if end is None else int(end)
        start = int(start)
        L, n, D = end - start, xt.shape[0], self.depth
        dev = self.wb.device
        xt = xt.to(dev, self.wb.dtype)
        out = torch.empty((n, L), dtype=self.wb.dtype, device=dev)
        if L == 0 or n == 0:
            return out
        labels = torch.arange(start, end, device=dev)
        x1 = self._with_one(xt)
        if L * 2 * D >= (1 << D):
            h = min(D, 10)
            T = D - h
            g = max(1, _LEAF_BLOCK >> h)  # subtrees per group
            rows = max(1, min(n, 256, budget_bytes // (4 * (L + 6 * (g << h)))))
            leaves = self.label_to_leaf[labels]
            order = torch.argsort(leaves)
            sleaves = leaves[order]
            bounds = torch.searchsorted(sleaves >> h, torch.arange(0, (1 << T) + g, g, device=dev)).tolist()
            for i in range(0, n, rows):
                xi = x1[i: i + rows]
                # labels x rows: each label's values land as one contiguous row, then one transpose into `out`
                buf_t = torch.empty((L, xi.shape[0]), dtype=xt.dtype, device=dev)
                top = self._descend(xi, torch.zeros((xi.shape[0], 1), dtype=xi.dtype, device=dev), 0, 0, 1, T)
                for j, a in enumerate(range(0, 1 << T, g)):
                    p, q = bounds[j], bounds[j + 1]
                    if p == q:
                        continue
                    cnt = min(g, (1 << T) - a)
                    lp = self._descend(xi, top[:, a: a + cnt], T, a, cnt, h)  # leaves [a 2^h, (a + cnt) 2^h)
                    buf_t.index_copy_(0, order[p:q], lp.T.contiguous().index_select(0, sleaves[p:q] - (a << h)))
                out[i: i + rows] = buf_t.T
            return out
        nodes, bits = self.path(labels)  # (L, D)
        per_level = []
        for l in range(D):
            uniq, inv = torch.unique(nodes[:, l], return_inverse=True)
            sign = bits[:, l].to(xt.dtype) * 2 - 1
            per_level.append((self.wb.index_select(0, uniq).T.contiguous(), inv, sign))
        rows = max(1, min(n, budget_bytes // (4 * 3 * L)))
        for i in range(0, n, rows):
            xi = x1[i: i + rows]
            acc = torch.zeros((xi.shape[0], L), dtype=xt.dtype, device=dev)
            for wbT, inv, sign in per_level:
                acc += F.logsigmoid((xi @ wbT).index_select(1, inv) * sign)
            out[i: i + rows] = acc
        return out


def _rank_within(node: np.ndarray, key: np.ndarray, num_nodes: int):
    """Ascending rank of each item's key among the items of the same node (stable: ties by item id)."""
    order = np.lexsort((key, node))
    counts = np.bincount(node, minlength=num_nodes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(node), dtype=np.int64)
    rank[order] = np.arange(len(node)) - starts[node[order]]
    return rank


class _Segments:
    """Items grouped by a segment id in [0, nn); weighted segment sums as one sparse (nn x n) CSR matmul (several
    times faster than index_add_ on CPU). `presorted`: the ids are non-decreasing."""

    def __init__(self, seg: torch.Tensor, nn: int, presorted: bool = False):
        self.seg, self.nn, self.n = seg, nn, seg.numel()
        self.counts = torch.bincount(seg, minlength=nn)
        self.crow = torch.zeros(nn + 1, dtype=torch.long)
        torch.cumsum(self.counts, 0, out=self.crow[1:])
        self.order = None if presorted else torch.argsort(seg, stable=True)

    def sum(self, data: torch.Tensor, weights: torch.Tensor = None) -> torch.Tensor:
        if self.n == 0:
            return torch.zeros((self.nn,) + tuple(data.shape[1:]), dtype=data.dtype)
        if weights is None:
            vals = torch.ones(self.n, dtype=data.dtype)
        else:
            vals = (weights if self.order is None else weights[self.order]).to(data.dtype)
        cols = torch.arange(self.n) if self.order is None else self.order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            S = torch.sparse_csr_tensor(self.crow, cols, vals, (self.nn, self.n))
        return S @ data.contiguous()


def _directions(cls: torch.Tensor, node: torch.Tensor, lseg: _Segments, gen, iters: int):
    """Each class's centred projection on the dominant eigenvector of its node's class-embedding covariance (power
    iteration batched over the nodes); zeros when no node holds more than two classes (any split is the same)."""
    nn, k = lseg.nn, cls.shape[1]
    v = torch.randn(nn, k, generator=gen, dtype=cls.dtype)  # drawn in all cases: the stream stays aligned
    if int(lseg.counts.max()) <= 2:
        return torch.zeros(cls.shape[0], dtype=cls.dtype)
    mean = lseg.sum(cls) / lseg.counts.clamp(min=1).unsqueeze(1).to(cls.dtype)
    ec = cls - mean[node]
    v /= v.norm(dim=1, keepdim=True)
    for _ in range(iters):
        vn = lseg.sum(ec, _rowdot(ec, v[node]))
        norm = vn.norm(dim=1, keepdim=True)
        v = torch.where(norm > 1e-12, vn / norm.clamp(min=1e-30), v)
    return _rowdot(ec, v[node])


def _rowdot(a, b):
    """Row-wise dot products (n, d) x (n, d) -> (n,) as a batched matmul (faster than (a * b).sum(1) on CPU)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _label_grams(Xp: torch.Tensor, labels: torch.Tensor, C: int, chunk: int = 1 << 16):
    """Upper triangles of per-label Gram matrices sum_{pairs of y} x x^T: (C, K(K+1)/2) float32 (computed once)."""
    K = Xp.shape[1]
    iu = torch.triu_indices(K, K)
    G = torch.zeros(C, iu.shape[1], dtype=torch.float32)
    for s in range(0, Xp.shape[0], chunk):
        x = Xp[s: s + chunk]
        G.index_add_(0, labels[s: s + chunk], x[:, iu[0]] * x[:, iu[1]])
    return G


def _inverse_hessians(G_lab, curv, lseg: _Segments, K, lam, node_chunk=1 << 16):
    """(nn, K, K) float32 inverses of H_v = sum_{y in v} curv_y G_y + lam I (float64 batched Cholesky): the Newton
    Hessian with each pair's curvature replaced by its label's mean (exact at theta = 0)."""
    nn = lseg.nn
    Hn = lseg.sum(G_lab, curv)
    iu = torch.triu_indices(K, K)  # `sym` expands a packed upper triangle (K(K+1)/2,) into a symmetric (K*K,)
    sym = torch.zeros(K, K, dtype=torch.long)
    sym[iu[0], iu[1]] = sym[iu[1], iu[0]] = torch.arange(iu.shape[1])
    sym = sym.reshape(-1)
    Hinv = torch.empty(nn, K, K, dtype=torch.float32)
    for a in range(0, nn, node_chunk):  # float64 factorisation, node-chunked; inverses kept in float32
        H = Hn[a: a + node_chunk].double()[:, sym].view(-1, K, K)
        H.diagonal(dim1=1, dim2=2).add_(lam)
        L, info = torch.linalg.cholesky_ex(H)
        if bool((info != 0).any()):  # float32 round-off made a Gram slightly indefinite: add jitter there
            bad = info != 0
            jitter = 1e-6 * H[bad].diagonal(dim1=1, dim2=2).amax(1) + lam
            H[bad] += torch.eye(K, dtype=H.dtype) * jitter[:, None, None]
            L, _ = torch.linalg.cholesky_ex(H)
        Hinv[a: a + node_chunk] = torch.cholesky_inverse(L).float()
    return Hinv


def _pair_scores(Xp, pnode, theta, chunk=_PAIR_CHUNK):
    th32 = theta.float()
    out = torch.empty(Xp.shape[0], dtype=torch.float32)
    for s in range(0, Xp.shape[0], chunk):
        out[s: s + chunk] = _rowdot(Xp[s: s + chunk], th32.index_select(0, pnode[s: s + chunk]))
    return out


def _newton(Xp, pseg, plabels, target, theta, lam, steps, hessian_every, G_lab, lseg, label_count,
            max_step=_MAX_STEP, Hinv=None):
    """`steps` Newton steps of every node's L2-regularised logistic regression at once (step norm clipped at
    `max_step`) on pair inputs Xp (E, K) = [x~, 1] sorted by node and targets (E,) in {0, 1}. The inverse Hessian
    is rebuilt at step 0 (unless `Hinv` is given) and every `hessian_every` steps. Returns (theta, Hinv)."""
    C = G_lab.shape[0]
    for it in range(steps):
        need_h = Hinv is None or (hessian_every > 0 and it > 0 and it % hessian_every == 0)
        p = torch.sigmoid(_pair_scores(Xp, pseg.seg, theta))
        g = pseg.sum(Xp, p - target)
        if need_h:
            curv = torch.bincount(plabels, weights=p * (1 - p), minlength=C).float() / label_count
            Hinv = _inverse_hessians(G_lab, curv, lseg, Xp.shape[1], lam)
        step = torch.bmm(Hinv, (g.double() + lam * theta).float().unsqueeze(2)).squeeze(2).double()
        norm = step.norm(dim=1, keepdim=True)
        theta = theta - step * torch.clamp(max_step / norm.clamp(min=1e-30), max=1.0)
    return theta, Hinv


def fit_label_tree(Z, rows, labels, num_labels: int, l2: float = 0.1, newton_steps: int = 6, hessian_every: int = 3,
                   resplit: bool = True, seed: int = 0, power_iters: int = 8):
    """Fit the tree on points Z (N, k) (whitened inputs x~) and (point, label) pairs (rows (E,), labels (E,)) ->
    (LabelTree, info); info["train_avg_log_p"] is the mean over the pairs of log p_n(label | point)."""
    t0 = time.perf_counter()
    C = int(num_labels)
    D = tree_depth(C)
    Z = torch.as_tensor(Z).float()
    rows, labels = torch.as_tensor(rows).long(), torch.as_tensor(labels).long()
    k, E, lam = Z.shape[1], labels.numel(), float(l2)
    K = k + 1
    gen = torch.Generator().manual_seed(int(seed) * 7_919 + 1)

    # pairs sorted by label; from then on kept sorted by node (stable refinement, level by level)
    order = torch.argsort(labels, stable=True)
    labels = labels[order]
    Xp = torch.cat([Z[rows[order]], torch.ones(E, 1)], 1).contiguous()  # (E, K)
    del order
    by_label = _Segments(labels, C, presorted=True)
    cls = by_label.sum(Xp[:, :k])  # class embeddings e_y = sum of the class's x~ (float32)
    label_count = by_label.counts.clamp(min=1).float()
    G_lab = _label_grams(Xp, labels, C)

    wb = torch.zeros((1 << D) - 1, K, dtype=torch.float32)
    node = torch.zeros(C, dtype=torch.long)  # each label's node (index within the level)
    total_ll = 0.0
    for l in range(D):
        nn, cap = 1 << l, 1 << (D - l - 1)
        lseg = _Segments(node, nn)
        pseg = _Segments(node[labels], nn, presorted=True)
        cnt_np, node_np = lseg.counts.numpy(), node.numpy()
        # (2) balanced initial split along the dominant direction of the class embeddings
        rank = _rank_within(node_np, _directions(cls, node, lseg, gen, power_iters).numpy(), nn)
        right = torch.from_numpy(rank >= cnt_np[node_np] - cnt_np[node_np] // 2)
        # (3) all nodes' logistic regressions at once
        fit = dict(lam=lam, steps=newton_steps, hessian_every=hessian_every, G_lab=G_lab, lseg=lseg,
                   label_count=label_count)
        theta, Hinv = _newton(Xp, pseg, labels, right[labels].float(), torch.zeros(nn, K, dtype=torch.float64),
                              **fit)
        if resplit:  # (4) capacity-constrained re-split by the score sums, then refit (warm start)
            delta = torch.bincount(labels, weights=_pair_scores(Xp, pseg.seg, theta), minlength=C).numpy()
            many = (cnt_np >= 2).astype(np.int64)
            n_pos = np.bincount(node_np, weights=(delta > 0), minlength=nn).astype(np.int64)
            n_right = np.clip(n_pos, np.maximum(cnt_np - cap, many), np.minimum(cap, cnt_np - many))
            rank = _rank_within(node_np, delta, nn)
            new_right = torch.from_numpy(rank >= cnt_np[node_np] - n_right[node_np])
            if bool((new_right != right).any()):
                right = new_right
                theta, _ = _newton(Xp, pseg, labels, right[labels].float(), theta, Hinv=Hinv, **fit)
        # (5) nodes with an empty child
        n_r = torch.bincount(node[right], minlength=nn)
        n_l = lseg.counts - n_r
        theta[(n_r == 0) | (n_l == 0)] = 0.0
        theta[(n_r == 0) & (n_l > 0), k] = -PAD_LOGIT
        theta[(n_l == 0) & (n_r > 0), k] = PAD_LOGIT
        base = (1 << l) - 1
        wb[base: base + nn] = theta.float()
        if E:
            s = _pair_scores(Xp, pseg.seg, theta)
            total_ll += float(F.logsigmoid(torch.where(right[labels], s, -s)).double().sum())
        node = 2 * node + right.long()
        if l + 1 < D:  # keep the pairs sorted by their node at the next level
            perm = torch.argsort(node[labels], stable=True)
            Xp, labels = Xp[perm], labels[perm]
    tree = LabelTree(wb[:, :k], wb[:, k], node, D, C)
    info = {"fit_s": time.perf_counter() - t0, "pairs": int(E), "depth": D, "num_labels": C,
            "train_avg_log_p": total_ll / max(E, 1)}
    return tree, info


def csr_pairs(Y: sp.spmatrix):
    """(point, label) pairs of a CSR label matrix: rows (E,), labels (E,) int64."""
    Y = sp.csr_matrix(Y)
    rows = np.repeat(np.arange(Y.shape[0], dtype=np.int64), np.diff(Y.indptr))
    return rows, Y.indices.astype(np.int64)

