"""A new sampler is one class and one config: this one and tests/conf/sampler/toy.yaml (tests/test_extending.py)."""
import math

import torch

from xmcneg.samplers.base import Sampler


class NeighbourSampler(Sampler):
    """Negatives = the `num_negatives` label ids following each document's first positive (mod C): a fixed,
    deterministic proposal, log q = -log C as if uniform."""
    name = "toy"

    def sample(self, batch, doc_emb):
        first = batch["pos"][:, :1].clamp(min=0)
        ids = (first + torch.arange(1, self.num_negatives + 1, device=first.device)) % self.num_labels
        return ids, torch.full(ids.shape, -math.log(self.num_labels), device=ids.device)
