"""In-batch negatives: the distinct positives of all documents in the batch, shared by every document
(each document's own positives are masked by the method). q(y) is estimated by the label's share of train
positives, so loss=softmax can apply the logQ correction."""
import numpy as np
import torch

from xmcneg.samplers.base import Sampler


class InBatchSampler(Sampler):
    name = "in_batch"
    fixed_k = False  # num_negatives is only a cap on the distinct in-batch labels

    def __init__(self, max_negatives: int, seed: int = 0):
        super().__init__(max_negatives, seed)

    def setup(self, datamodule, model=None, state=None):
        c = np.asarray(datamodule.train_label_counts, dtype=np.float64) + 1.0
        self.log_p = torch.from_numpy(np.log(c / c.sum())).float()
        super().setup(datamodule, model, state)

    def sample(self, batch, doc_emb):
        pos = batch["pos"]
        ids = torch.unique(pos[pos >= 0])
        if ids.numel() > self.num_negatives:
            keep = torch.randperm(ids.numel(), generator=self.generator)[: self.num_negatives]
            ids = ids[keep.to(ids.device)].sort().values
        return ids, self.log_p.to(ids.device)[ids]
