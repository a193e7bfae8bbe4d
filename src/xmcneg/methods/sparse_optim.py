"""Row-wise optimisers for tables with sparse row gradients (`nn.Embedding(sparse=True)`): each step updates the
touched rows in place, at a cost proportional to their number, never to C; untouched rows stay bit-identical.
- `SparseRowOptimizer` (label table): rowwise_adagrad (one accumulator per row, as in DLRM/FBGEMM:
  G_r += mean(g_r^2); w_r -= lr g_r / (sqrt(G_r) + eps)), adagrad (one per element) or sgd.
- `RowAdam`: lazy AdamW of the BoW encoders' sparse input tables; `encoder_optimizers` pairs it with a dense AdamW
  (or trains the input tables with plain SGD).
- `all_gather_sparse_mean` averages such gradients over DDP ranks with dense collectives.
"""
import math

import torch
from torch import nn

from xmcneg.errors import ConfigError

KINDS = ("rowwise_adagrad", "adagrad", "sgd")


def coalesced(grad):
    """`grad.coalesce()` for a sparse row gradient. On the CPU, rows already strictly increasing are only
    re-flagged, others are sorted once and summed by an EmbeddingBag with one bag per distinct row (about twice as
    fast as torch's CPU coalesce; the same sums in another float order). Elsewhere torch's coalesce."""
    if grad.is_coalesced():
        return grad
    rows, values = grad._indices()[0], grad._values()
    if grad.device.type != "cpu" or grad.sparse_dim() != 1 or values.dim() != 2 or rows.numel() == 0:
        return grad.coalesce()
    if not bool((rows[1:] > rows[:-1]).all()):
        rows, order = torch.sort(rows, stable=True)
        rows, counts = torch.unique_consecutive(rows, return_counts=True)
        values = torch.nn.functional.embedding_bag(order, values, torch.cumsum(counts, 0) - counts, mode="sum")
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape, is_coalesced=True, check_invariants=False)


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
                grad = coalesced(grad)
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


class RowAdam(torch.optim.Optimizer):
    """Lazy AdamW (`torch.optim.SparseAdam` with decoupled weight decay, on gathered rows): only the touched rows
    and their moments are updated, with t = the table's step count (a CPU scalar tensor, as in torch)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr <= 0:
            raise ConfigError("optim.encoder_lr", f"must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._scratch_bufs = {}  # per table: two (capacity, d) scratch tensors reused across steps

    def _scratch(self, p, n):
        """Two n-row scratch views for table p, from buffers that only grow (x1.5), not allocated every step."""
        bufs = self._scratch_bufs.get(p)
        if bufs is None or bufs[0].shape[0] < n:
            cap = max(n, int(1.5 * bufs[0].shape[0]) if bufs is not None else n)
            bufs = self._scratch_bufs[p] = [p.new_empty((min(cap, p.shape[0]), *p.shape[1:])) for _ in range(2)]
        return [b[:n] for b in bufs]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowAdam expects sparse gradients (encoder.sparse_input=true)")
                grad = coalesced(p.grad)
                rows, g = grad.indices()[0], grad.values()
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                n = rows.numel()
                if n == 0:
                    continue
                t = float(state["step"])
                m, v = self._scratch(p, n)
                torch.index_select(state["exp_avg"], 0, rows, out=m).lerp_(g, 1 - b1)
                torch.index_select(state["exp_avg_sq"], 0, rows, out=v).mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                m.div_(v.sqrt_().div_(math.sqrt(1 - b2 ** t)).add_(eps)).mul_(lr / (1 - b1 ** t))
                if wd:
                    m.add_(torch.index_select(p, 0, rows, out=v), alpha=lr * wd)
                p.index_add_(0, rows, m, alpha=-1.0)
        return None


def sparse_tables(module):
    """The weights of `module`'s sparse-gradient embedding tables (Embedding / EmbeddingBag with sparse=True)."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]


def adamw(params, lr, weight_decay):
    """torch's AdamW over dense `params`: fused on CPU / CUDA, else foreach."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **{"fused" if fused else "foreach": True})


def encoder_optimizers(encoder, lr, weight_decay, input_optimizer="adamw", input_lr=None, input_weight_decay=0.0):
    """{"dense": `adamw` over the encoder's dense parameters, "rows": RowAdam over its sparse input tables}, each
    only if the encoder has such parameters (a linear BoW encoder with a sparse table has no dense one).
    `input_optimizer="sgd"`: the BoW input tables (`nn.EmbeddingBag` weights, dense or sparse) get plain SGD at
    `input_lr` and the L2 penalty `input_weight_decay` instead ("input"), the rest as above."""
    if input_optimizer not in ("adamw", "sgd"):
        raise ConfigError("optim.input_optimizer", f"expected adamw or sgd, got {input_optimizer!r}")
    sgd = [m.weight for m in encoder.modules() if isinstance(m, nn.EmbeddingBag)] if input_optimizer == "sgd" else []
    sparse = [p for p in sparse_tables(encoder) if all(p is not q for q in sgd)]
    ids = {id(p) for p in sparse + sgd}
    dense = [p for p in encoder.parameters() if id(p) not in ids]
    opts = {"dense": adamw(dense, lr, weight_decay)} if dense else {}
    if sparse:
        opts["rows"] = RowAdam(sparse, lr=lr, weight_decay=weight_decay)
    if sgd:
        if input_weight_decay and any(p is q for p in sparse_tables(encoder) for q in sgd):
            raise ConfigError("optim.input_weight_decay", "needs a dense input table (encoder.sparse_input=false): "
                                                          "the penalty moves every row at every step")
        opts["input"] = torch.optim.SGD(sgd, lr=input_lr, weight_decay=input_weight_decay)
    return opts


@torch.no_grad()
def clip_grad_norm_(params, max_norm):
    """`torch.nn.utils.clip_grad_norm_` that also takes sparse row gradients (counted by their coalesced rows)."""
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


@torch.no_grad()
def all_gather_sparse_mean(params, dist):
    """Replace the sparse `.grad` of each of `params` by its average over the ranks (DDP's semantics, up to float
    summation order) with dense collectives only (NCCL has no sparse all-reduce): the ranks exchange their nnz
    counts, then all-gather each table's rows and values padded to the largest count. Cost O(world size x rows
    touched x d), never O(C). A None gradient counts as empty; call on every rank."""
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
        if max(n) == 0:
            p.grad = None
            continue
        rows, vals = _gather_padded(idx, n, dist), _gather_padded(val, n, dist).div_(W)
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, p.shape, check_invariants=False).coalesce()


def _gather_padded(x, n, dist):
    """all_gather of x, which has n[r] rows on rank r, padded to max(n) rows: the ranks' rows concatenated."""
    pad = x.new_zeros((max(n), *x.shape[1:]))
    pad[: x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in n]
    dist.all_gather(out, pad)
    return torch.cat([o[:k] for o, k in zip(out, n)])
