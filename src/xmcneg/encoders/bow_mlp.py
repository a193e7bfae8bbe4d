"""EmbeddingBag over sparse features (`InputBag`) -> [GELU, dropout, residual Linear blocks] -> Linear to `dim`."""
import torch
from torch import nn

from xmcneg.encoders.base import Encoder
from xmcneg.encoders.sparse_bag import InputBag, resolve_sparse


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask is one uniform draw per element (`torch.rand_like(x) >= p`): on the CPU about half
    the cost of torch's Bernoulli draws."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * torch.rand_like(x).ge_(self.p).mul_(1 / (1 - self.p))


class BowMLP(Encoder):
    def __init__(self, num_features: int, dim: int, hidden: int, num_layers: int, dropout: float, normalize: bool,
                 sparse_input):
        super().__init__()
        self.dim, self.normalize = dim, normalize
        self.bag = InputBag(num_features, hidden, sparse=resolve_sparse(sparse_input, num_features))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), Dropout(dropout))
            for _ in range(num_layers))
        self.drop = Dropout(dropout)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.drop(torch.nn.functional.gelu(
            self.bag(x["indices"], x["offsets"], per_sample_weights=x["weights"]) + self.bias))
        for block in self.blocks:
            h = h + block(h)
        return self.finish(self.out(h))
