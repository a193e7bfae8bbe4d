"""Row-wise optimisers for the label matrix: cost proportional to the rows touched in a step, never to C.

Gradients come from `nn.Embedding(sparse=True)` (uncoalesced sparse COO). After coalescing, each touched row r
with gradient g_r is updated in place with index_add_; no dense C x d temporaries and no per-step work over
untouched rows (their values stay bit-identical).
- rowwise_adagrad: one accumulator per row (as in DLRM/FBGEMM): G_r += mean(g_r^2); w_r -= lr g_r / (sqrt(G_r)+eps)
- adagrad:         one accumulator per element:                  G   += g^2;        w   -= lr g   / (sqrt(G)+eps)
- sgd:             w_r -= lr g_r

`all_gather_sparse_mean` averages such gradients over DDP ranks with dense collectives (hardware.sparse_grad_sync).
"""
import torch

from xmcneg.errors import ConfigError

KINDS = ("rowwise_adagrad", "adagrad", "sgd")


class SparseRowOptimizer(torch.optim.Optimizer):
    def __init__(self, params, lr=0.05, kind="rowwise_adagrad", eps=1e-8, initial_accumulator=0.0):
        if kind not in KINDS:
            raise ConfigError("optim.label_optimizer", f"unknown '{kind}', expected one of {', '.join(KINDS)}")
        if lr <= 0:
            raise ConfigError("optim.label_lr", f"must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, kind=kind, eps=eps, initial_accumulator=initial_accumulator))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, kind, eps = group["lr"], group["kind"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise RuntimeError("SparseRowOptimizer expects sparse gradients (nn.Embedding(sparse=True))")
                grad = grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if kind == "sgd":
                    p.index_add_(0, rows, values, alpha=-lr)
                    continue
                if "sum" not in state:
                    shape = p.shape[:1] if kind == "rowwise_adagrad" else p.shape
                    state["sum"] = torch.full(shape, group["initial_accumulator"], dtype=p.dtype, device=p.device)
                acc = state["sum"]
                if kind == "rowwise_adagrad":
                    acc.index_add_(0, rows, values.pow(2).mean(dim=1))
                    scale = acc.index_select(0, rows).sqrt_().add_(eps).unsqueeze(1)
                else:
                    acc.index_add_(0, rows, values.pow(2))
                    scale = acc.index_select(0, rows).sqrt_().add_(eps)
                p.index_add_(0, rows, values / scale, alpha=-lr)
        return None


@torch.no_grad()
def all_gather_sparse_mean(params, dist):
    """Replace the sparse COO `.grad` of each of `params` by its average over the ranks, with dense collectives
    only (NCCL has no sparse all-reduce): every rank coalesces its gradient, the ranks exchange their nnz counts
    (one small all_gather and one host read), then per table the row indices and values, padded to the largest
    count, are all-gathered; the padding is stripped and the rank-ordered concatenation, divided by the world
    size, is coalesced (duplicate rows summed). That is DistributedDataParallel's semantics (each rank's gradient
    divided by the world size, then summed), so the result equals DDP's sparse all-reduce up to float summation
    order. Cost O(world size x most rows touched on a rank x d), never O(C). A None gradient counts as empty on
    that rank (every rank runs the same collectives); it stays None when no rank has one. Call on every rank."""
    W = dist.get_world_size()
    dev = params[0].device
    local = []
    for p in params:
        g = p.grad
        if g is None:
            local.append((torch.zeros(0, dtype=torch.long, device=dev), p.new_zeros((0, *p.shape[1:]))))
            continue
        if not g.is_sparse:
            raise RuntimeError("sparse_grad_sync=all_gather expects sparse gradients (nn.Embedding(sparse=True))")
        g = g.coalesce()
        local.append((g.indices()[0], g.values()))
    counts = torch.tensor([idx.numel() for idx, _ in local], dtype=torch.long, device=dev)
    gathered = [torch.empty_like(counts) for _ in range(W)]
    dist.all_gather(gathered, counts)
    counts = torch.stack(gathered).cpu().tolist()  # [rank][table]
    for t, (p, (idx, val)) in enumerate(zip(params, local)):
        n = [counts[r][t] for r in range(W)]
        m = max(n)
        if m == 0:
            p.grad = None
            continue
        pad_idx = idx.new_zeros(m)
        pad_idx[: idx.numel()] = idx
        pad_val = val.new_zeros((m, *val.shape[1:]))
        pad_val[: val.shape[0]] = val
        all_idx = [torch.empty_like(pad_idx) for _ in range(W)]
        all_val = [torch.empty_like(pad_val) for _ in range(W)]
        dist.all_gather(all_idx, pad_idx)
        dist.all_gather(all_val, pad_val)
        rows = torch.cat([all_idx[r][: n[r]] for r in range(W)])
        vals = torch.cat([all_val[r][: n[r]] for r in range(W)]).div_(W)
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, p.shape, check_invariants=False).coalesce()
