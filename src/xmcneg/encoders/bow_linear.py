"""A sparse linear map of bag-of-words features to `dim` dims: h = x W (an EmbeddingBag weighted sum)."""
from torch import nn

from xmcneg.encoders.base import Encoder


class BowLinear(Encoder):
    def __init__(self, num_features: int, dim: int = 256, normalize: bool = False):
        super().__init__()
        self.dim, self.normalize = dim, normalize
        self.bag = nn.EmbeddingBag(num_features, dim, mode="sum")
        nn.init.normal_(self.bag.weight, std=dim ** -0.5)

    def forward(self, x):
        return self.finish(self.bag(x["indices"], x["offsets"], per_sample_weights=x["weights"]))
