"""A new method is one class and one config: this one and tests/conf/method/toy.yaml (tests/test_extending.py).
It reuses the shared pieces of src/xmcneg/methods/: the base module (training step, guard, resume, evaluation
buffers), the label table, the row-wise optimiser and the combined optimiser; only the loss is new."""
import torch
import torch.nn.functional as F

from xmcneg.eval.metrics import xc_metrics
from xmcneg.eval.topk import exact_topk
from xmcneg.methods.base import XMCModule, mask_positives
from xmcneg.methods.optim import CombinedOptimizer
from xmcneg.methods.sparse_optim import SparseRowOptimizer


class HingeClassifier(XMCModule):
    """Pairwise hinge max(0, margin - s_pos + s_neg) over every (positive, sampled negative) pair."""

    def __init__(self, encoder, num_labels, sampler, margin: float, lr: float, label_lr: float, evaluation,
                 inv_prop=None):
        super().__init__(encoder, num_labels, sparse_labels=True, evaluation=evaluation, inv_prop=inv_prop,
                         sampler=sampler)
        self.save_hyperparameters(ignore=["encoder", "sampler", "inv_prop"])
        self.margin, self.lr, self.label_lr = float(margin), float(lr), float(label_lr)

    def training_loss(self, batch):
        h, pos = self.encoder(batch["x"]), batch["pos"]
        neg, _ = self.sampler.sample(batch, h.detach())
        s_pos, s_neg = self.labels.score(h, pos.clamp(min=0)), self.labels.score(h, neg)
        pairs = (pos >= 0).unsqueeze(2) & mask_positives(neg, pos).unsqueeze(1)
        hinge = F.relu(self.margin - s_pos.unsqueeze(2) + s_neg.unsqueeze(1))
        return (hinge * pairs).sum() / pairs.sum().clamp(min=1), h.shape[0]

    def configure_optimizers(self):
        return CombinedOptimizer({"encoder": torch.optim.AdamW(self.encoder.parameters(), lr=self.lr),
                                  "labels": SparseRowOptimizer(self.labels.parameters(), lr=self.label_lr)})

    def eval_metrics(self, split, emb, idx, query):
        w, b = self.weights()
        _, ids = exact_topk(emb, w, b, k=min(self.evaluation.k, self.num_labels))
        return xc_metrics(ids.cpu().numpy(), self.trainer.datamodule.split(split)[1][idx], self.inv_prop)

    def predict_topk(self, emb, query=None, k=None):
        w, b = self.weights()
        return exact_topk(emb, w, b, k=min(int(k or self.evaluation.k), self.num_labels))
