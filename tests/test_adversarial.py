"""Adversarial (Bamler & Mandt) sampler and its label tree: exact probabilities, sampling, fitting, resume."""
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

from xmcneg.data.datamodule import csr_rows_to_bag
from xmcneg.data.token_cache import TokenRows
from xmcneg.errors import ConfigError
from xmcneg.samplers.adversarial import AdversarialSampler
from xmcneg.samplers.label_tree import fit_label_tree, tree_depth
from train_conf import encoder_args, sampler_args

_spec = importlib.util.spec_from_file_location("sampler_cost", Path(__file__).parents[1] / "benchmarks/sampler_cost.py")
sampler_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sampler_cost)
random_tree, synthetic_pairs = sampler_cost.random_tree, sampler_cost.synthetic_pairs  # random trees, x~-space data


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (severe on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ helpers
def brute_log_p(tree, x, label):
    """Independent path product in float64: walk from the root along the label's leaf bits."""
    W, b = tree.weight.double().numpy(), tree.bias.double().numpy()
    x = np.asarray(x, dtype=np.float64)
    D, leaf = tree.depth, int(tree.label_to_leaf[label])
    g, lp = 0, 0.0
    for l in range(D):
        bit = (leaf >> (D - 1 - l)) & 1
        s = float(W[g] @ x + b[g])
        z = s if bit else -s
        lp += -math.log1p(math.exp(-z)) if z > -30 else z  # log sigmoid(z)
        g = 2 * g + 1 + bit
    return lp


def clustered_bow(num_clusters=5, per_cluster=8, num_docs=600, num_features=200, seed=0):
    """Documents with 1-2 labels from one cluster; words from the cluster's and the labels' own vocabularies."""
    rng = np.random.default_rng(seed)
    C = num_clusters * per_cluster
    cluster = np.repeat(np.arange(num_clusters), per_cluster)
    cl_words = rng.permutation(num_features)[: num_clusters * 20].reshape(num_clusters, 20)
    own = rng.integers(num_features, size=(C, 3))
    X, Y = sp.lil_matrix((num_docs, num_features), dtype=np.float32), sp.lil_matrix((num_docs, C), dtype=np.float32)
    for i in range(num_docs):
        c = rng.integers(num_clusters)
        labs = rng.choice(np.flatnonzero(cluster == c), size=rng.integers(1, 3), replace=False)
        words = np.concatenate([rng.choice(cl_words[c], 6), own[labs].ravel(), rng.integers(num_features, size=2)])
        for w in words:
            X[i, w] += 1.0
        Y[i, labs] = 1.0
    X, Y = X.tocsr(), Y.tocsr()
    X = sp.csr_matrix(sp.diags(1.0 / np.sqrt(X.multiply(X).sum(1).A.ravel())) @ X).astype(np.float32)
    return X, Y, cluster


class FakeDM:
    def __init__(self, X, Y):
        self.X, self.Y = X, Y
        self.num_labels, self.num_features = Y.shape[1], X.shape[1]
        self.train_label_counts = np.bincount(Y.indices, minlength=self.num_labels)

    def split(self, name):
        return self.X, self.Y

    def collate(self, split):
        return lambda rows: self.batch(rows)

    def batch(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        pos = TokenRows(self.Y.indices, self.Y.indptr).padded(rows, pad_id=-1)["input_ids"]  # label ids, -1 padded
        return {"x": csr_rows_to_bag(self.X, rows), "pos": pos, "idx": torch.from_numpy(rows)}


@pytest.fixture(scope="module")
def data():
    X, Y, cluster = clustered_bow()
    return FakeDM(X, Y), cluster


@pytest.fixture(scope="module")
def fitted(data):
    dm, _ = data
    s = AdversarialSampler(**sampler_args("adversarial", num_negatives=16, k=8), seed=3)
    s.setup(dm, None)
    return s


def doc_emb(n):
    return torch.zeros(n, 4)


# ------------------------------------------------------------------------------------------------ tree maths
def test_sample_frequencies_match_path_product():
    tree = random_tree(13, k=3, seed=5, scale=1.5)  # depth 4: 16 leaves, 3 of them padding
    assert tree.depth == 4 and int((tree.leaf_to_label < 0).sum()) == 3
    x = torch.tensor([[0.3, -0.8, 0.5]])
    p = np.exp([brute_log_p(tree, x[0], y) for y in range(13)])
    assert abs(p.sum() - 1) < 1e-9
    n = 200_000
    ids, logq = tree.sample(x, n, torch.Generator().manual_seed(0))
    assert int(ids.min()) >= 0 and int(ids.max()) < 13  # padding leaves never drawn
    counts = np.bincount(ids[0].numpy(), minlength=13)
    assert (p * n).min() > 5
    assert chisquare(counts, p * n).pvalue > 1e-3
    np.testing.assert_allclose(logq[0, :50].numpy(), np.log(p[ids[0, :50].numpy()]), atol=1e-5)


def test_padding_gets_exactly_zero_mass():
    tree = random_tree(5, k=2, seed=1)  # 8 leaves, 3 padding; random parameters everywhere first
    lp = tree.label_log_probs(torch.randn(7, 2))  # the 5 labels hold all the mass: the 3 padding leaves none
    assert torch.allclose(lp.exp().sum(1), torch.ones(7), atol=1e-6)
    ids, _ = tree.sample(torch.randn(50, 2) * 5, 500, torch.Generator().manual_seed(1))
    assert int(ids.min()) >= 0


@pytest.mark.parametrize("budget", [1 << 30, 64])
def test_label_log_probs_sum_to_one_and_match_brute_force(budget):
    tree = random_tree(13, k=3, seed=2)
    x = torch.randn(6, 3)
    full = tree.label_log_probs(x, 0, 13, budget_bytes=budget)  # table strategy
    brute = torch.tensor([[brute_log_p(tree, x[i], y) for y in range(13)] for i in range(6)], dtype=torch.float64)
    assert torch.allclose(full.double(), brute, atol=1e-5)
    assert torch.allclose(full.exp().sum(1), torch.ones(6), atol=1e-5)
    for width in (1, 2):  # single labels use the per-level ancestor strategy
        parts = [tree.label_log_probs(x, a, min(a + width, 13), budget_bytes=budget) for a in range(0, 13, width)]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert torch.allclose(tree.log_prob(x, torch.arange(13).expand(6, 13)), full, atol=1e-5)


@pytest.mark.parametrize("shuffle", [True, False])
def test_blocked_table_matches_paths_on_a_deep_tree(shuffle):
    C = 9000  # depth 14: 16 subtrees of height 10 in 2 groups
    tree = random_tree(C, k=3, seed=4, shuffle=shuffle)
    x = torch.randn(5, 3)
    ref = tree.log_prob(x, torch.arange(C).expand(5, C))  # per-label path gathers
    full = tree.label_log_probs(x, 0, C, budget_bytes=1 << 20)  # forces row chunks
    assert torch.allclose(full, ref, atol=1e-4)
    assert torch.allclose(full.exp().sum(1), torch.ones(5), atol=1e-4)
    assert torch.allclose(tree.label_log_probs(x, 100, 2500), ref[:, 100:2500], atol=1e-4)


# ------------------------------------------------------------------------------------------------ the sampler
def test_probabilities_sum_to_one(fitted, data):
    dm, _ = data
    batch = dm.batch(np.arange(20))
    q = fitted.correction_query(batch, doc_emb(20))
    assert q.shape == (20, 8)
    corr = fitted.score_correction(q, 0, dm.num_labels)
    assert corr.shape == (20, dm.num_labels)
    assert torch.allclose(corr.exp().sum(1), torch.ones(20), atol=1e-4)


def test_sample_log_q_equals_log_prob(fitted, data):
    dm, _ = data
    batch = dm.batch(np.arange(32))
    ids, logq = fitted.sample(batch, doc_emb(32))
    assert ids.shape == logq.shape == (32, 16) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < dm.num_labels
    assert torch.allclose(fitted.log_prob(batch, doc_emb(32), ids), logq, atol=1e-5)


def test_correction_is_the_path_log_probability(fitted, data):
    """Corrected minus raw scores = log p_n(y|x) by the brute-force path product, through exact_topk."""
    from xmcneg.eval.topk import exact_topk

    dm, _ = data
    C = dm.num_labels
    batch = dm.batch(np.arange(10))
    q = fitted.correction_query(batch, doc_emb(10))
    brute = torch.tensor([[brute_log_p(fitted.tree, q[i], y) for y in range(C)] for i in range(10)],
                         dtype=torch.float64)
    for a, b in [(0, C), (0, 7), (7, 30), (30, C)]:
        assert torch.allclose(fitted.score_correction(q, a, b).double(), brute[:, a:b], atol=1e-4)
    g = torch.Generator().manual_seed(0)
    emb, W, bias = torch.randn(10, 6, generator=g), torch.randn(C, 6, generator=g), torch.randn(C, generator=g)
    raw_s, raw_i = exact_topk(emb, W, bias, k=C, label_chunk=16)
    cor_s, cor_i = exact_topk(emb, W, bias, k=C, label_chunk=16,
                              correction=lambda e, a, b: fitted.score_correction(q, a, b))
    raw = torch.empty(10, C).scatter_(1, raw_i, raw_s)
    cor = torch.empty(10, C).scatter_(1, cor_i, cor_s)
    assert torch.allclose((cor - raw).double(), brute, atol=1e-4)


def test_fit_puts_cluster_mates_together(fitted, data):
    dm, cluster = data
    tree, C = fitted.tree, dm.num_labels
    # positives are far more likely under p_n than random labels
    batch = dm.batch(np.arange(200))
    q = fitted.correction_query(batch, doc_emb(200))
    lp = fitted.score_correction(q, 0, C)
    pos = batch["pos"]
    pos_lp = lp.gather(1, pos.clamp(min=0))[pos >= 0].mean()
    assert float(pos_lp) > float(lp.mean()) + 1.5
    assert fitted.fit_info["train_avg_log_p"] > -math.log(C) + 1.0
    # and cluster mates sit closer in the tree (tree distance = depth - common prefix length)
    leaves = tree.label_to_leaf.numpy()
    D = tree.depth
    common = np.zeros((C, C), dtype=int)
    for l in range(1, D + 1):
        common += (leaves[:, None] >> (D - l)) == (leaves[None, :] >> (D - l))
    dist = D - common
    same = cluster[:, None] == cluster[None, :]
    off = ~np.eye(C, dtype=bool)
    assert dist[same & off].mean() + 1.0 < dist[~same].mean()


def test_state_dict_round_trip_reproduces_samples(fitted, data, monkeypatch):
    dm, _ = data
    batch = dm.batch(np.arange(8))
    fitted.sample(batch, doc_emb(8))  # advance the stream
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = AdversarialSampler(**sampler_args("adversarial", num_negatives=16, k=8), seed=3)
    monkeypatch.setattr(other, "fit", lambda *a, **k: pytest.fail("resume must not refit"))
    other.setup(dm, None, state=state)
    a_ids, a_lq = fitted.sample(batch, doc_emb(8))
    b_ids, b_lq = other.sample(batch, doc_emb(8))
    assert torch.equal(a_ids, b_ids) and torch.equal(a_lq, b_lq)
    q = other.correction_query(batch, doc_emb(8))
    assert torch.equal(other.score_correction(q, 0, 40), fitted.score_correction(q, 0, 40))


def test_fit_is_deterministic(data):
    dm, _ = data
    a, b = (AdversarialSampler(**sampler_args("adversarial", k=8), seed=1),
            AdversarialSampler(**sampler_args("adversarial", k=8), seed=1))
    a.setup(dm, None)
    b.setup(dm, None)
    for key in ("weight", "bias", "label_to_leaf"):
        assert torch.equal(a.state_dict()["tree"][key], b.state_dict()["tree"][key])
    assert torch.equal(a.proj.weight, b.proj.weight)


def test_uniform_mix_log_q_is_the_mixture(data):
    dm, _ = data
    m, C = 0.3, dm.num_labels
    s = AdversarialSampler(**sampler_args("adversarial", num_negatives=64, k=8, uniform_mix=m), seed=3)
    s.setup(dm, None)
    batch = dm.batch(np.arange(16))
    ids, logq = s.sample(batch, doc_emb(16))
    xt = s.correction_query(batch, doc_emb(16))
    pn = s.tree.log_prob(xt, ids).exp()
    assert torch.allclose(logq.exp(), (1 - m) * pn + m / C, atol=1e-6)
    assert torch.allclose(s.log_prob(batch, doc_emb(16), ids), logq, atol=1e-6)
    assert torch.allclose(s.score_correction(xt, 0, C).exp().sum(1), torch.ones(16), atol=1e-4)


def test_refit_on_encoder_embeddings(data):
    from xmcneg.encoders.bow_linear import BowLinear

    dm, _ = data
    s = AdversarialSampler(**sampler_args("adversarial", num_negatives=8, k=4, refit_every_epochs=2), seed=0)
    s.setup(dm, None)
    from xmcneg.methods.classifier import XMCClassifier
    from xmcneg.methods.losses import BCE
    from train_conf import section

    enc = BowLinear(dm.num_features, **encoder_args("bow_linear", dim=12))
    module = XMCClassifier(enc, dm.num_labels, BCE(), sampler=s,
                           optim=section("optim"), evaluation=section("eval"))
    s.refresh(5, 1, module)
    assert s.proj.kind == "bag"  # not due
    s.refresh(6, 2, module)
    assert s.proj.kind == "dense" and s.last_refit_epoch == 2 and module.encoder.training
    batch = dm.batch(np.arange(10))
    h = module.encoder(batch["x"]).detach()
    ids, logq = s.sample(batch, h)
    assert torch.allclose(s.log_prob(batch, h, ids), logq, atol=1e-5)
    q = s.correction_query(batch, h)
    assert torch.allclose(s.score_correction(q, 0, dm.num_labels).exp().sum(1), torch.ones(10), atol=1e-4)
    assert s.state_dict()["projection"]["kind"] == "dense"


def test_classifier_uses_the_sampler(fitted, data):
    from xmcneg.encoders.bow_linear import BowLinear
    from xmcneg.methods.classifier import XMCClassifier

    dm, _ = data
    from xmcneg.methods.losses import NegativeSampling
    from train_conf import section

    enc = BowLinear(dm.num_features, **encoder_args("bow_linear", dim=6))
    model = XMCClassifier(enc, dm.num_labels, NegativeSampling(reg_lambda=0.01),
                          sampler=fitted, optim=section("optim"),
                          evaluation=section("eval", k=5, doc_chunk=7, label_chunk=16))
    batch = dm.batch(np.arange(12))
    h = model.encoder(batch["x"])
    loss = model.sampled_loss(h, batch)
    assert torch.isfinite(loss)
    loss.backward()
    q = fitted.correction_query(batch, h)
    s_cor, _ = model.predict_topk(h.detach(), q)
    s_raw, _ = model.predict_topk(h.detach(), None)
    assert s_cor.shape == s_raw.shape == (12, 5)


def test_config_and_validation():
    cfg = OmegaConf.load("conf/sampler/adversarial.yaml")
    assert cfg.name == "adversarial"
    AdversarialSampler(**sampler_args("adversarial"), seed=0)
    with pytest.raises(ConfigError):
        AdversarialSampler(**sampler_args("adversarial", uniform_mix=1.5))
    with pytest.raises(ConfigError):
        AdversarialSampler(**sampler_args("adversarial", node_l2=0))


def test_fit_edge_cases():
    # labels without any training pair, a single label, a power of two
    Z, rows, labels, _ = synthetic_pairs(16, 50, k=3, seed=0)
    keep = labels < 10  # labels 10..15 get no data
    tree, info = fit_label_tree(Z, rows[keep], labels[keep], 16, newton_steps=3)
    lp = tree.label_log_probs(Z[:5])
    assert torch.allclose(lp.exp().sum(1), torch.ones(5), atol=1e-5)
    assert float(lp[:, 10:].exp().sum(1).mean()) < float(lp[:, :10].exp().sum(1).mean())
    tree1, _ = fit_label_tree(Z, rows * 0, labels * 0, 1)
    assert tree_depth(1) == 1 and torch.allclose(tree1.label_log_probs(Z[:3]), torch.zeros(3, 1))
    tree0, info0 = fit_label_tree(Z, rows[:0], labels[:0], 5)  # no pairs at all
    assert torch.allclose(tree0.label_log_probs(Z[:3]).exp().sum(1), torch.ones(3), atol=1e-5)
