"""EmbeddingBag over sparse features (weighted sum) -> [GELU, dropout, residual Linear blocks] -> Linear to `dim`."""
import torch
from torch import nn

from xmcneg.encoders.base import Encoder


class BowMLP(Encoder):
    def __init__(self, num_features: int, dim: int = 256, hidden: int = 1024, num_layers: int = 1,
                 dropout: float = 0.2, normalize: bool = False):
        super().__init__()
        self.dim, self.normalize = dim, normalize
        self.bag = nn.EmbeddingBag(num_features, hidden, mode="sum")
        nn.init.normal_(self.bag.weight, std=hidden ** -0.5)
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
