"""The bag-of-words input layer of the BoW encoders: h_b = sum_j w_j E[i_j] over the features of document b.

`InputBag` is an `nn.EmbeddingBag` (mode "sum") whose gradient with ``sparse=True`` is a coalesced sparse COO
tensor of the rows the batch touches, computed directly in that form (an EmbeddingBag over dL/dh with one bag per
touched feature: no F-sized work, no coalescing), for the row-wise optimiser (methods/sparse_optim.py); DDP
treats it like the sparse label tables. `resolve_sparse` turns the encoders' `sparse_input` (auto | true | false)
into the mode: auto = sparse from `SPARSE_MIN_FEATURES` features up.
"""
import torch
import torch.nn.functional as F
from torch import nn

from xmcneg.errors import ConfigError

# the dense step is still ~10% faster at F = 10,000, the sparse one many times faster from F = 100,000
# (an EURLEX57K-like batch; benchmarks/step_cost.py --features ... --sparse-input true|false)
SPARSE_MIN_FEATURES = 20_000


def resolve_sparse(sparse_input, num_features):
    if sparse_input in ("auto", None):
        return int(num_features) >= SPARSE_MIN_FEATURES
    if isinstance(sparse_input, bool):
        return sparse_input
    raise ConfigError("encoder.sparse_input", f"expected auto, true or false, got {sparse_input!r}")


class _SparseRowsBag(torch.autograd.Function):
    """Weighted-sum EmbeddingBag whose backward returns the table's gradient as coalesced sparse rows."""

    @staticmethod
    def forward(ctx, weight, indices, offsets, per_sample_weights):
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        ctx.table_shape = weight.shape
        return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=per_sample_weights)

    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, psw = ctx.saved_tensors
        shape = ctx.table_shape
        n = indices.numel()
        if n == 0:
            empty = torch.zeros(1, 0, dtype=torch.long, device=indices.device)
            return (torch.sparse_coo_tensor(empty, grad_out.new_zeros((0, shape[1])), shape, is_coalesced=True,
                                            check_invariants=False),
                    None, None, None)
        # bag (document) of every non-zero: offsets hold the bags' starts
        lengths = torch.diff(offsets, append=offsets.new_tensor([n]))
        bag = torch.repeat_interleave(torch.arange(offsets.numel(), device=indices.device), lengths, output_size=n)
        rows, order = torch.sort(indices, stable=True)
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        w = None if psw is None else psw[order].to(grad_out.dtype)
        values = F.embedding_bag(bag[order], grad_out, starts, mode="sum", per_sample_weights=w)
        grad = torch.sparse_coo_tensor(uniq.unsqueeze(0), values, shape, is_coalesced=True,
                                       check_invariants=False)
        return grad, None, None, None


class InputBag(nn.EmbeddingBag):
    """`nn.EmbeddingBag(num_features, dim, mode="sum")`, weights N(0, dim^-1/2), sparse gradients as above."""

    def __init__(self, num_features: int, dim: int, sparse: bool = False):
        super().__init__(int(num_features), int(dim), mode="sum", sparse=bool(sparse))
        nn.init.normal_(self.weight, std=int(dim) ** -0.5)

    def forward(self, indices, offsets, per_sample_weights=None):
        if not self.sparse or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.embedding_bag(indices, self.weight, offsets, mode="sum", per_sample_weights=per_sample_weights)
        if per_sample_weights is not None and per_sample_weights.requires_grad:
            raise RuntimeError("InputBag(sparse=True) takes fixed per-sample weights (no gradient for them)")
        return _SparseRowsBag.apply(self.weight, indices, offsets, per_sample_weights)
