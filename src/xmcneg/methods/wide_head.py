"""A sparse linear model on the bag-of-words input, beside the embedding model (`wide.features`): s_wide(x, y) =
sum_f x_f V[f, y] + c_y, where each label y has weights only on its `features` features with the largest summed
tf-idf over its training documents (the support, fixed when training starts). The embedding model scores labels
through a `dim`-dimensional bottleneck; the wide head gives every label its own weights on its own features, as the
linear XMC models do, at a cost per document of (its non-zeros x the labels each of its features supports), not of
the label count. Its weights are trained by Adagrad (`wide.lr`)."""
from dataclasses import dataclass
from typing import Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from xmcneg.errors import ConfigError
from xmcneg.methods.optim import params_of


@dataclass
class WideParams:
    """conf/train.yaml `wide`: the keys, their types and checks (values: only in conf/)."""
    enabled: Union[str, bool]
    features: int
    lr: float
    loss: str

    @classmethod
    def of(cls, d):
        p = params_of(cls, d, "wide")
        if p.enabled not in ("auto", True, False):
            raise ConfigError("wide.enabled", f"expected auto, true or false, got {p.enabled!r}")
        if not isinstance(p.features, int) or p.features <= 0:
            raise ConfigError("wide.features", f"expected an integer > 0, got {p.features!r}")
        if not float(p.lr) > 0:
            raise ConfigError("wide.lr", f"must be > 0, got {p.lr}")
        if p.loss not in ("joint", "separate"):
            raise ConfigError("wide.loss", f"expected joint or separate, got {p.loss!r}")
        return p


def top_features(X, Y, k):
    """(feature ids, label ids) of the support: for each label, the `k` features with the largest sum of the
    feature's values over the label's rows (X (N, F) and Y (N, C) scipy sparse); labels without rows get none."""
    M = (sp.csr_matrix(Y, dtype=np.float32).T.tocsr() @ sp.csr_matrix(X, dtype=np.float32)).tocsr()
    M.eliminate_zeros()
    label = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    order = np.lexsort((-M.data, label))  # by label, then by decreasing value
    rank = np.arange(len(order)) - M.indptr[label[order]]
    keep = order[rank < k]
    return M.indices[keep].astype(np.int64), label[keep].astype(np.int64)


def bag_rows(x, lo, hi):
    """Documents lo..hi-1 of an EmbeddingBag input dict (indices, offsets, weights)."""
    offsets, n = x["offsets"], x["indices"].numel()
    start = int(offsets[lo]) if lo < offsets.numel() else n
    end = int(offsets[hi]) if hi < offsets.numel() else n
    return {"indices": x["indices"][start:end], "offsets": offsets[lo:hi] - start, "weights": x["weights"][start:end]}


class WideHead(nn.Module):
    def __init__(self, num_features: int, num_labels: int, features: int):
        super().__init__()
        self.num_features, self.num_labels, self.features = int(num_features), int(num_labels), int(features)
        # the support, feature-major (CSR over features): the labels of feature f are label[ptr[f]:ptr[f + 1]]
        self.register_buffer("ptr", torch.zeros(self.num_features + 1, dtype=torch.long))
        self.register_buffer("label", torch.zeros(0, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(0))
        self.bias = nn.Parameter(torch.zeros(self.num_labels))

    @property
    def size(self):
        return self.label.numel()

    @torch.no_grad()
    def set_support(self, X, Y):
        """Fix the support from the training rows (X tf-idf, Y labels) and zero the weights."""
        feat, lab = top_features(X, Y, self.features)
        order = np.lexsort((lab, feat))
        feat, lab = feat[order], lab[order]
        ptr = np.zeros(self.num_features + 1, dtype=np.int64)
        np.add.at(ptr, feat + 1, 1)
        self.ptr.copy_(torch.from_numpy(np.cumsum(ptr)))
        self.label = torch.from_numpy(lab).to(self.ptr.device)
        self.values.data = torch.zeros(len(lab), device=self.bias.device)
        self.bias.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the support's size depends on the data: take the checkpoint's before loading it
        for name in ("label", "values"):
            t = state_dict.get(prefix + name)
            if t is not None and getattr(self, name).shape != t.shape:
                getattr(self, name).data = torch.zeros(t.shape, dtype=t.dtype, device=self.ptr.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def spans(self, idx):
        """(first support position, number of labels) of each feature id in `idx`."""
        start = self.ptr[idx]
        return start, self.ptr[idx + 1] - start

    def forward(self, x):
        """(B, C) scores of every label for the documents of the EmbeddingBag input `x`."""
        idx, offsets, w = x["indices"], x["offsets"], x["weights"]
        B, C, n = offsets.numel(), self.num_labels, idx.numel()
        doc = torch.repeat_interleave(torch.arange(B, device=idx.device),
                                      torch.diff(offsets, append=offsets.new_tensor([n])), output_size=n)
        start, lens = self.spans(idx)
        E = int(lens.sum())
        # every (document, feature) non-zero times every label its feature supports
        first = torch.cumsum(lens, 0) - lens
        pos = torch.repeat_interleave(start - first, lens, output_size=E) + torch.arange(E, device=idx.device)
        key = torch.repeat_interleave(doc, lens, output_size=E) * C + self.label[pos]
        contrib = torch.repeat_interleave(w.to(self.values.dtype), lens, output_size=E) * self.values[pos]
        out = torch.zeros(B * C, dtype=self.values.dtype, device=idx.device).index_add(0, key, contrib)
        return out.view(B, C) + self.bias
