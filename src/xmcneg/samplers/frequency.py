"""Frequency negatives: q(y) ∝ (train count of y + 1)^alpha, drawn by binary search in a precomputed CDF
(O(log C) per negative, no O(C) work per step). Prediction adds log q(y) (Bamler & Mandt's correction)."""
import numpy as np
import torch

from xmcneg.errors import ConfigError
from xmcneg.samplers.base import Sampler


class FrequencySampler(Sampler):
    name = "frequency"

    def __init__(self, num_negatives: int, alpha: float, seed: int = 0):
        super().__init__(num_negatives, seed)
        if not 0.0 <= alpha <= 2.0:
            raise ConfigError("sampler.alpha", f"must be in [0, 2], got {alpha}")
        self.alpha = float(alpha)

    def setup(self, datamodule, model=None, state=None):
        w = (np.asarray(datamodule.train_label_counts, dtype=np.float64) + 1.0) ** self.alpha
        p = w / w.sum()
        self.log_p = torch.from_numpy(np.log(p)).float()
        cdf = np.cumsum(p)
        cdf[-1] = 1.0
        self.cdf = torch.from_numpy(cdf)
        super().setup(datamodule, model, state)

    def log_prob(self, batch, doc_emb, label_ids):
        return self.log_p.to(label_ids.device)[label_ids]

    def sample(self, batch, doc_emb):
        shape = (doc_emb.shape[0], self.num_negatives)
        u = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        ids = torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.num_labels - 1)
        return ids.to(doc_emb.device), self.log_p[ids].to(doc_emb.device)

    def score_correction(self, query, start, end):
        return self.log_p[start:end].to(query.device).expand(query.shape[0], -1)

    def correction_query(self, batch, doc_emb):
        return doc_emb[:, :0]  # only the batch size is needed
