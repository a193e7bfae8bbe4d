"""EmbeddingBag over sparse features (`InputBag`) -> [GELU, dropout, residual Linear blocks] -> Linear to `dim`."""
import torch
from torch import nn

from xmcneg.encoders.base import Encoder
from xmcneg.encoders.sparse_bag import InputBag, resolve_sparse


class BowMLP(Encoder):
    def __init__(self, num_features: int, dim: int, hidden: int, num_layers: int, dropout: float, normalize: bool,
                 sparse_input):
        super().__init__()
        self.dim, self.normalize = dim, normalize
        self.bag = InputBag(num_features, hidden, sparse=resolve_sparse(sparse_input, num_features))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
            for _ in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.drop(torch.nn.functional.gelu(
            self.bag(x["indices"], x["offsets"], per_sample_weights=x["weights"]) + self.bias))
        for block in self.blocks:
            h = h + block(h)
        return self.finish(self.out(h))
