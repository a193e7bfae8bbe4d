"""The negative-sampling engine: masking, losses, logQ, sparse row-wise updates, sampler streams."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from xmcneg.encoders.bow_linear import BowLinear
from xmcneg.errors import ConfigError
from train_conf import encoder_args, sampler_args, section
from xmcneg.methods.base import mask_positives
from xmcneg.methods.classifier import XMCClassifier
from xmcneg.methods.losses import BCE, NegativeSampling, SampledSoftmax, SquaredHinge, bce_loss, ns_loss, sampled_softmax_loss
from xmcneg.methods.sparse_optim import SparseRowOptimizer
from xmcneg.samplers.frequency import FrequencySampler
from xmcneg.samplers.in_batch import InBatchSampler
from xmcneg.samplers.uniform import UniformSampler

OPTIM = section("optim", label_lr=0.1)
EVAL = section("eval", k=5, doc_chunk=4, label_chunk=7)
LOSSES = {"bce": BCE(), "softmax": SampledSoftmax(), "ns": NegativeSampling(), "sq_hinge": SquaredHinge()}


def fake_dm(C, counts=None):
    return SimpleNamespace(num_labels=C, train_label_counts=np.ones(C) if counts is None else counts)


def tiny_batch(B=4, F=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    nnz = 3
    return {"x": {"indices": torch.randint(0, F, (B * nnz,), generator=g),
                  "offsets": torch.arange(0, B * nnz, nnz), "weights": torch.rand(B * nnz, generator=g)},
            "pos": torch.tensor([[1, 2, -1], [0, -1, -1], [3, 4, 5], [2, -1, -1]])[:B],
            "idx": torch.arange(B)}


def test_mask_positives_per_document_and_shared():
    pos = torch.tensor([[1, 2, -1], [0, -1, -1]])
    neg = torch.tensor([[2, 3, 1], [0, 0, 5]])
    assert mask_positives(neg, pos).tolist() == [[False, True, False], [False, False, True]]
    shared = torch.tensor([0, 1, 3, 7])  # sorted, unique
    assert mask_positives(shared, pos).tolist() == [[True, False, True, True], [False, True, True, True]]


def test_masked_negatives_do_not_count():
    pos, pm = torch.tensor([[0.5]]), torch.tensor([[1.0]])
    neg = torch.tensor([[100.0, -1.0]])
    nm = torch.tensor([[0.0, 1.0]])  # the 100.0 logit belongs to a positive: masked
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-1.0))) / 2
    assert bce_loss(pos, pm, neg, nm).item() == pytest.approx(expected, rel=1e-6)
    assert ns_loss(pos, pm, neg, nm).item() == pytest.approx(2 * expected, rel=1e-6)


def test_logq_correction_values():
    # one positive (s=1), two negatives (s=0, s=2) drawn with q=0.25 and q=0.5, k=2 draws:
    # corrected negatives s - log(k q) = 0 - log(0.5), 2 - log(1.0)
    pos, pm = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    neg, nm = torch.tensor([[0.0, 2.0]]), torch.ones(1, 2)
    log_q = torch.log(torch.tensor([[0.25, 0.5]]))
    denom = math.exp(1.0) + math.exp(0.0 - math.log(0.5)) + math.exp(2.0 - math.log(1.0))
    expected = -(1.0 - math.log(denom))
    assert sampled_softmax_loss(pos, pm, neg, nm, log_q).item() == pytest.approx(expected, rel=1e-6)


def make_module(C=12, sampler=None, loss="bce", d=6, F=10):
    torch.manual_seed(0)
    enc = BowLinear(F, **encoder_args("bow_linear", dim=d))
    return XMCClassifier(enc, C, LOSSES[loss], sampler=sampler, optim=OPTIM, evaluation=EVAL)


@pytest.mark.parametrize("loss", ["softmax", "sq_hinge"])
def test_sampled_loss_with_all_labels_equals_full_loss(loss):
    C = 12
    full = make_module(C, None, loss)
    batch = tiny_batch()
    h = full.encoder(batch["x"])
    full_val = full.full_loss(h, batch)
    pos = batch["pos"]
    s_pos = full.labels.b.weight.T.expand(4, -1).gather(1, pos.clamp(min=0)) + (
        h.unsqueeze(1) @ full.labels.w(pos.clamp(min=0)).transpose(1, 2)).squeeze(1)
    neg = torch.arange(C).expand(4, C)
    s_neg = h @ full.labels.w.weight.T + full.labels.b.weight.T
    log_q = torch.full((4, C), -math.log(C))
    sampled = full.loss(s_pos, (pos >= 0).float(), s_neg, mask_positives(neg, pos).float(), log_q)
    assert sampled.item() == pytest.approx(full_val.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adagrad", "sgd"])
def test_sparse_update_leaves_untouched_rows_bit_identical(kind):
    C = 50
    sampler = UniformSampler(num_negatives=5, seed=0)
    m = make_module(C, sampler, "bce")
    sampler.setup(fake_dm(C))
    before = m.labels.w.weight.detach().clone(), m.labels.b.weight.detach().clone()
    batch = tiny_batch()
    h = m.encoder(batch["x"])
    torch.manual_seed(1)
    neg, _ = sampler.sample(batch, h)
    sampler.set_epoch(0)  # replay the same draws inside the loss
    loss = m.sampled_loss(h, batch)
    loss.backward()
    assert m.labels.w.weight.grad.is_sparse
    opt = SparseRowOptimizer([m.labels.w.weight, m.labels.b.weight], lr=0.1, kind=kind)
    opt.step()
    touched = torch.unique(torch.cat([batch["pos"][batch["pos"] >= 0], neg.flatten()]))
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(m.labels.w.weight[untouched], before[0][untouched])
    assert torch.equal(m.labels.b.weight[untouched], before[1][untouched])
    assert not torch.equal(m.labels.w.weight[touched], before[0][touched])


def test_per_document_scores_same_by_matmul_and_by_bmm(monkeypatch):
    from xmcneg.methods import label_table
    torch.manual_seed(0)
    table = label_table.LabelTable(30, 8, sparse=True)
    with torch.no_grad():
        table.b.weight.normal_()
    h, ids = torch.randn(5, 8), torch.randint(0, 30, (5, 7))
    out = {}
    for name, limit in (("bmm", 0), ("matmul", 100)):  # ids have <= 30 distinct values: the matmul when limit >= 5
        monkeypatch.setattr(label_table, "UNIQUE_MATMUL", limit)
        table.zero_grad(set_to_none=True)
        s = table.score(h, ids)
        (s * torch.arange(7.0)).sum().backward()
        out[name] = s.detach(), table.w.weight.grad.to_dense(), table.b.weight.grad.to_dense()
    for a, b in zip(out["bmm"], out["matmul"]):
        assert torch.allclose(a, b, atol=1e-6)
    assert table.w.weight.grad.is_sparse and table.w.weight.grad._indices().shape[1] == torch.unique(ids).numel()


def test_uniform_streams_reproducible_and_rank_dependent():
    a, b = UniformSampler(8, seed=3), UniformSampler(8, seed=3)
    a.setup(fake_dm(1000)), b.setup(fake_dm(1000))
    h = torch.zeros(4, 2)
    assert torch.equal(a.sample(None, h)[0], b.sample(None, h)[0])
    c = UniformSampler(8, seed=3)
    c.setup(fake_dm(1000), SimpleNamespace(global_rank=1, _trainer=object()))
    a.setup(fake_dm(1000))  # re-seed rank 0's stream
    assert not torch.equal(c.sample(None, h)[0], a.sample(None, h)[0])


def test_frequency_sampler_matches_its_distribution():
    counts = np.array([100, 10, 1, 0, 50])
    s = FrequencySampler(num_negatives=2000, alpha=1.0, seed=0)
    s.setup(fake_dm(5, counts))
    ids, log_q = s.sample(None, torch.zeros(50, 1))
    freq = np.bincount(ids.flatten().numpy(), minlength=5) / ids.numel()
    p = (counts + 1) / (counts + 1).sum()
    assert np.allclose(freq, p, atol=0.01)
    assert torch.allclose(log_q, torch.log(torch.tensor(p, dtype=torch.float32))[ids])
    with pytest.raises(ConfigError, match="sampler.alpha"):
        FrequencySampler(**sampler_args("frequency", alpha=-1))


def test_in_batch_negatives_are_the_batch_positives():
    s = InBatchSampler(max_negatives=100)
    s.setup(fake_dm(12))
    batch = tiny_batch()
    ids, log_q = s.sample(batch, torch.zeros(4, 2))
    assert ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert ids.shape == log_q.shape


def test_num_negatives_must_be_below_num_labels():
    with pytest.raises(ConfigError, match="sampler.num_negatives"):
        make_module(10, UniformSampler(num_negatives=10))
