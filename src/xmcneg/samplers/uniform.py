"""Uniform negatives: k label ids per document, each with q(y) = 1/C."""
import math

import torch

from xmcneg.samplers.base import Sampler


class UniformSampler(Sampler):
    name = "uniform"

    def sample(self, batch, doc_emb):
        ids = self.uniform((doc_emb.shape[0], self.num_negatives), doc_emb.device)
        return ids, torch.full(ids.shape, -math.log(self.num_labels), device=doc_emb.device)

    def log_prob(self, batch, doc_emb, label_ids):
        return torch.full(label_ids.shape, -math.log(self.num_labels), device=label_ids.device)
