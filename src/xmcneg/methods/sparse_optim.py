"""Row-wise optimisers for the label matrix: cost proportional to the rows touched in a step, never to C.

Gradients come from `nn.Embedding(sparse=True)` (uncoalesced sparse COO). After coalescing, each touched row r
with gradient g_r is updated in place with index_add_; no dense C x d temporaries and no per-step work over
untouched rows (their values stay bit-identical).
- rowwise_adagrad: one accumulator per row (as in DLRM/FBGEMM): G_r += mean(g_r^2); w_r -= lr g_r / (sqrt(G_r)+eps)
- adagrad:         one accumulator per element:                  G   += g^2;        w   -= lr g   / (sqrt(G)+eps)
- sgd:             w_r -= lr g_r
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
