"""A sparse linear map of bag-of-words features to `dim` dims: h = x W (an EmbeddingBag weighted sum, `InputBag`)."""
from xmcneg.encoders.base import Encoder
from xmcneg.encoders.sparse_bag import InputBag, resolve_sparse


class BowLinear(Encoder):
    def __init__(self, num_features: int, dim: int, normalize: bool, sparse_input):
        super().__init__()
        self.dim, self.normalize = dim, normalize
        self.bag = InputBag(num_features, dim, sparse=resolve_sparse(sparse_input, num_features))

    def forward(self, x):
        return self.finish(self.bag(x["indices"], x["offsets"], per_sample_weights=x["weights"]))
