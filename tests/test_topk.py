"""Exact chunked top-k and faiss ANN top-k."""

import numpy as np
import pytest
import torch

from xmcneg.errors import ConfigError
from xmcneg.eval.ann import LabelIndex, ann_topk, recall_against_exact
from xmcneg.eval.topk import exact_topk


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Many tiny chunks: with 2 OpenMP threads on a busy 2-core machine every op can wait a scheduler tick.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _data(N=37, C=503, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, d, generator=g, dtype=dtype), torch.randn(C, d, generator=g, dtype=dtype),
            torch.randn(C, generator=g, dtype=dtype))


def _structured(C=2000, d=32, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(45, d, generator=g), dim=1)
    W = centres[torch.randint(0, 45, (C,), generator=g)] + 0.8 * torch.randn(C, d, generator=g) / d ** 0.5
    W = torch.nn.functional.normalize(W, dim=1)
    b = 0.01 * torch.randn(C, generator=g)
    Q = W[torch.randint(0, C, (n,), generator=g)] + 0.8 * torch.randn(n, d, generator=g) / d ** 0.5
    return torch.nn.functional.normalize(Q, dim=1), W, b


@pytest.mark.parametrize("use_bias", [False, True])
def test_exact_topk_matches_dense_across_chunks(use_bias):
    X, W, b = _data()
    bias = b if use_bias else None
    dense = X @ W.T + (b if use_bias else 0)
    ref_s, ref_i = torch.topk(dense, 7, dim=1)
    # chunks that do not divide N = 37 or C = 503, and a label chunk smaller than k
    for dc, lc in [(10, 100), (37, 503), (20, 5), (64, 3)]:
        s, i = exact_topk(X, W, bias, k=7, doc_chunk=dc, label_chunk=lc)
        assert i.dtype == torch.long and s.shape == (37, 7)
        assert torch.equal(i, ref_i), (dc, lc)
        assert torch.allclose(s, ref_s)


def test_exact_topk_correction():
    X, W, b = _data()
    g = torch.Generator().manual_seed(1)
    aux = torch.randn(X.shape[0], W.shape[0], generator=g, dtype=X.dtype)
    row = {"start": 0}
    calls = []

    def correction(doc_chunk, start, end):
        calls.append((doc_chunk.shape[0], start, end))
        rs = row["start"]
        return aux[rs: rs + doc_chunk.shape[0], start:end]

    # doc_chunk = N so that the row offset of every chunk is 0 (the callable only sees the chunk)
    ref_s, ref_i = torch.topk(X @ W.T + b + aux, 5, dim=1)
    s, i = exact_topk(X, W, b, k=5, doc_chunk=X.shape[0], label_chunk=64, correction=correction)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s)
    assert calls[0] == (37, 0, 64) and calls[-1] == (37, 448, 503)

    # doc-chunked: the correction depends on the document embedding itself
    def emb_correction(doc_chunk, start, end):
        return doc_chunk[:, :1] * W[start:end, 1].unsqueeze(0)

    ref_s, ref_i = torch.topk(X @ W.T + b + X[:, :1] * W[:, 1].unsqueeze(0), 5, dim=1)
    s, i = exact_topk(X, W, b, k=5, doc_chunk=8, label_chunk=50, correction=emb_correction)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s)


def test_exact_topk_k_too_large():
    X, W, b = _data(C=4)
    with pytest.raises(ConfigError, match="eval.k"):
        exact_topk(X, W, b, k=5)
    s, i = exact_topk(X, W, b, k=4)
    assert sorted(i[0].tolist()) == [0, 1, 2, 3]


def test_flat_index_with_bias_equals_exact():
    X, W, b = _data(N=50, C=300, d=12, dtype=torch.float32)
    ref_s, ref_i = exact_topk(X, W, b, k=5)
    index = LabelIndex("flat", use_gpu=False).build(W.numpy(), b.numpy())
    s, i = index.search(X.numpy(), 5)
    assert np.array_equal(i, ref_i.numpy())
    assert np.allclose(s, ref_s.numpy(), atol=1e-5)
    s2, i2 = ann_topk(X, W, b, 5, index, shortlist=20)
    assert torch.equal(i2, ref_i) and torch.allclose(s2, ref_s, atol=1e-5)
    assert recall_against_exact(i2, ref_i) == 1.0


def test_hnsw_and_ivf_recall_on_structured_data():
    Q, W, b = _structured()
    _, ref_i = exact_topk(Q, W, b, k=5)
    hnsw = LabelIndex("hnsw", M=16, ef_search=64, ef_construction=64)
    _, i = ann_topk(Q, W, b, 5, hnsw, shortlist=50)          # builds the never-built index
    assert hnsw.version == 1
    assert recall_against_exact(i, ref_i) >= 0.95
    ivf = LabelIndex("ivf", nprobe=8, use_gpu=False)
    ivf.build(W.numpy(), b.numpy())
    assert ivf.nlist_used == round(2000 ** 0.5)
    _, i = ann_topk(Q, W, b, 5, ivf, shortlist=20)
    assert recall_against_exact(i, ref_i) >= 0.95
    # scores returned by the index are inner products + bias
    s, ids = hnsw.search(Q.numpy(), 5)
    exact = (Q.numpy()[:, None, :] * W.numpy()[ids]).sum(-1) + b.numpy()[ids]
    assert np.allclose(s, exact, atol=1e-4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_rebuild_gives_identical_neighbours(kind):
    Q, W, b = _structured(C=1500, seed=3)
    kw = dict(M=12, ef_search=32, ef_construction=40) if kind == "hnsw" else dict(nlist=30, nprobe=3)
    a = LabelIndex(kind, use_gpu=False, **kw)
    a.build(W.numpy(), b.numpy())
    s1, i1 = a.search(Q.numpy(), 10)
    a.build(W.numpy(), b.numpy())
    assert a.version == 2
    s2, i2 = a.search(Q.numpy(), 10)
    s3, i3 = LabelIndex(kind, use_gpu=False, **kw).build(W.numpy(), b.numpy()).search(Q.numpy(), 10)
    assert np.array_equal(i1, i2) and np.array_equal(i1, i3)
    assert np.array_equal(s1, s3)


def test_recall_against_exact():
    exact = np.array([[1, 2, 3], [4, 5, -1]])
    ann = np.array([[3, 9, 1], [7, 8, 9]])
    assert recall_against_exact(ann, exact) == pytest.approx((2 / 3 + 0 / 2) / 2)


def test_label_index_config_errors():
    with pytest.raises(ConfigError):
        LabelIndex("annoy")
    with pytest.raises(ConfigError):
        LabelIndex("ivf", nprobe=0)
