"""Dropout whose CPU mask costs a quarter of a random draw per element.

torch's CPU dropout draws one Bernoulli sample per element, which costs as much as the B x 1024 x 1024 matmul
of the BoW MLP. Here the mask comes from 64-bit random integers read as four 16-bit uniform integers each:
an element is kept when its integer is at least p's 16-bit threshold (keep probability 1 - p to within 2^-16),
and kept elements are scaled by 1 / (1 - p), as in `torch.nn.Dropout`. Gradients flow through the same mask.
On other devices (and in eval mode, or with p = 0) it is `torch.nn.functional.dropout`.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        n = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        r = bits.view(torch.int16)[:n].view(x.shape)
        keep = r >= int(round(self.p * 65536)) - 32768
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self):
        return f"p={self.p}"
