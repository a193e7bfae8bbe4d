"""XC metrics against a hand-computed example (xclib conventions)."""

from math import log, log2

import numpy as np
import pytest
import scipy.sparse as sp

from xmcneg.errors import ConfigError
from xmcneg.eval.metrics import filter_predictions, inverse_propensities, propensities, xc_metrics


def _csr(rows, C):
    r = [i for i, labs in enumerate(rows) for _ in labs]
    c = [l for labs in rows for l in labs]
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), C))


# 4 points, 6 labels.
TRUE = [[0, 2], [1], [3, 4, 5, 0], []]
TOPK = np.array([
    [2, 1, 0, 5, -1],   # hits: 1 0 1 0 0
    [3, 4, 5, 0, 1],    # hits: 0 0 0 0 1
    [3, -1, 2, 4, 5],   # hits: 1 0 0 1 1   (-1 = no prediction, wrong)
    [0, 1, 2, 3, 4],    # no true labels: contributes 0, still counted in N = 4
], dtype=np.int64)
INV_PROP = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # label l -> l + 1

# position discounts 1/log2(j+2)
D1, D2, D3, D4, D5 = 1.0, 1 / log2(3), 1 / log2(4), 1 / log2(5), 1 / log2(6)


def test_hand_example():
    m = xc_metrics(TOPK, _csr(TRUE, 6), inv_prop=INV_PROP, ks=(1, 3, 5), recall_ks=(3, 5, 10))
    # P@k = mean over the 4 points of hits@k / k
    assert m["P@1"] == pytest.approx((1 + 0 + 1 + 0) / 4)                    # 0.5
    assert m["P@3"] == pytest.approx((2 / 3 + 0 + 1 / 3 + 0) / 4)            # 0.25
    assert m["P@5"] == pytest.approx((2 / 5 + 1 / 5 + 3 / 5 + 0) / 4)        # 0.3
    # nDCG@1: doc0 1/1, doc2 1/1
    assert m["nDCG@1"] == pytest.approx(2 / 4)
    # nDCG@3: doc0 DCG = D1 + D3 (hits at positions 1 and 3), only 2 true labels -> IDCG = D1 + D2
    #         doc2 DCG = D1, 4 true labels -> IDCG = D1 + D2 + D3
    ndcg3 = ((D1 + D3) / (D1 + D2) + 0 + D1 / (D1 + D2 + D3) + 0) / 4
    assert m["nDCG@3"] == pytest.approx(ndcg3)                               # ~0.34725
    # nDCG@5: doc0 same as @3 (IDCG over min(5,2)=2 positions); doc1 hit at 5 -> D5 / D1;
    #         doc2 hits at 1,4,5 -> (D1+D4+D5) / (D1+D2+D3+D4) (min(5,4)=4 ideal positions)
    ndcg5 = ((D1 + D3) / (D1 + D2) + D5 / D1 + (D1 + D4 + D5) / (D1 + D2 + D3 + D4) + 0) / 4
    assert m["nDCG@5"] == pytest.approx(ndcg5)                               # ~0.50403
    # PSP@k = sum of inv_prop over hits in top k / sum of best achievable (top-min(k,#true) inv_prop of true labels)
    # @1: hits: doc0 label 2 (3), doc2 label 3 (4) -> 7;  best: doc0 3, doc1 2, doc2 6, doc3 0 -> 11
    assert m["PSP@1"] == pytest.approx(7 / 11)
    # @3: hits: doc0 labels 2,0 (3+1), doc2 label 3 (4) -> 8;  best: doc0 3+1, doc1 2, doc2 6+5+4 -> 21
    assert m["PSP@3"] == pytest.approx(8 / 21)
    # @5: hits: doc0 4, doc1 label 1 (2), doc2 labels 3,4,5 (4+5+6) -> 21;  best: 4 + 2 + (6+5+4+1) -> 22
    assert m["PSP@5"] == pytest.approx(21 / 22)
    # PSnDCG@3: num doc0 3*D1 + 1*D3, doc2 4*D1; ideal doc0 3*D1 + 1*D2, doc1 2*D1, doc2 6*D1 + 5*D2 + 4*D3
    assert m["PSnDCG@3"] == pytest.approx((3 * D1 + D3 + 4 * D1) / (3 * D1 + D2 + 2 * D1 + 6 * D1 + 5 * D2 + 4 * D3))
    # R@k = mean over the 3 points with labels of hits@k / #true
    assert m["R@3"] == pytest.approx((2 / 2 + 0 / 1 + 1 / 4) / 3)            # 0.41667
    assert m["R@5"] == pytest.approx((2 / 2 + 1 / 1 + 3 / 4) / 3)            # 0.91667
    assert "R@10" not in m                                                    # 10 > K = 5


def test_without_propensities_and_short_predictions():
    m = xc_metrics(TOPK[:, :2], _csr(TRUE, 6), ks=(1, 3))
    assert "PSP@1" not in m
    # K = 2 < 3: the missing third position counts as wrong: doc0 1 hit, doc2 1 hit
    assert m["P@3"] == pytest.approx((1 / 3 + 1 / 3) / 4)
    assert m["nDCG@3"] == pytest.approx((D1 / (D1 + D2) + D1 / (D1 + D2 + D3)) / 4)


def test_row_blocks_match(monkeypatch):
    import xmcneg.eval.metrics as M

    rng = np.random.default_rng(0)
    Y = sp.random(500, 40, density=0.08, random_state=1, format="csr")
    Y.data[:] = 1
    topk = np.argsort(-rng.random((500, 40)), axis=1)[:, :10]
    inv = 1 / propensities(Y)
    full = xc_metrics(topk, Y, inv)
    monkeypatch.setattr(M, "_ROW_BLOCK", 7)
    blocked = xc_metrics(topk, Y, inv)
    assert full.keys() == blocked.keys()
    for key in full:
        assert blocked[key] == pytest.approx(full[key])


def test_propensities():
    # N = 10 training points; label 0 in all 10, label 1 in 1, label 2 in none
    Y = _csr([[0, 1]] + [[0]] * 9, 3)
    a, b = 0.55, 1.5
    c = (log(10) - 1) * (b + 1) ** a
    expected = [1 / (1 + c * (n + b) ** -a) for n in (10, 1, 0)]
    p = propensities(Y, a, b)
    assert p.dtype == np.float64 and p.shape == (3,)
    assert p == pytest.approx(expected)
    assert p[0] > p[1] > p[2]                      # rarer labels: lower propensity
    assert inverse_propensities(Y) == pytest.approx(1 / p)
    with pytest.raises(ConfigError, match="dataset.propensity_a"):
        propensities(Y, a=0)
    with pytest.raises(ConfigError, match="dataset.propensity_b"):
        propensities(Y, b=-1)


def test_filter_predictions():
    topk = np.array([[1, 2, 3], [4, 5, 6]])
    scores = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    pairs = np.array([[0, 2], [1, 4], [1, 6], [5, 1], [0, 9]])  # (5,1) and (0,9) match nothing
    ids, sc = filter_predictions(topk, scores, pairs)
    assert ids.tolist() == [[1, 3, -1], [5, -1, -1]]
    assert sc[0, :2].tolist() == [0.9, 0.7] and sc[1, 0] == 0.5
    assert np.isneginf(sc[0, 2]) and np.isneginf(sc[1, 1:]).all()
    assert topk.tolist() == [[1, 2, 3], [4, 5, 6]]  # input untouched
    ids2, none = filter_predictions(topk, None, np.zeros((0, 2), dtype=np.int64))
    assert none is None and ids2.tolist() == topk.tolist()
