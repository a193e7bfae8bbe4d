"""Shared encoder contract: `forward(x) -> (B, dim)` where `x` is the input dict a datamodule's collate builds."""
from torch import nn
import torch.nn.functional as F


class Encoder(nn.Module):
    dim: int
    input_kind = "bow"  # which inputs the datamodule must build: "bow" (sparse features) or "tokens"

    def finish(self, h):
        return F.normalize(h, dim=-1) if self.normalize else h
