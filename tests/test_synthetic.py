"""Synthetic XMC generator: deterministic, readable by the real readers, skewed, clustered and learnable."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmcneg.data import formats, synthetic
from xmcneg.errors import ConfigError

SMALL = dict(num_labels=300, num_features=2000, num_train=2000, num_test=500, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "d", **SMALL)


def _files(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def test_files_and_meta(small):
    names = set(os.listdir(small))
    assert {"train.txt", "test.txt", "trn_X.txt", "tst_X.txt", "trn_X_Y.txt", "tst_X_Y.txt", "lbl_X.txt",
            "meta.json", "label_cluster.npy"} <= names
    meta = json.loads((small / "meta.json").read_text())
    assert meta["params"]["num_labels"] == 300 and meta["params"]["seed"] == 3
    assert meta["splits"]["train"]["points"] == 2000 and meta["splits"]["test"]["points"] == 500
    assert meta["num_clusters"] == round(300 ** 0.5)
    assert 2.3 < meta["splits"]["train"]["avg_labels"] < 3.5


def test_deterministic(small, tmp_path):
    again = synthetic.generate(tmp_path / "again", **SMALL)
    assert _files(again) == _files(small)
    other = synthetic.generate(tmp_path / "other", **{**SMALL, "seed": 4, "write_text": False})
    assert (other / "train.txt").read_bytes() != (small / "train.txt").read_bytes()
    assert not (other / "trn_X.txt").exists()
    # the test split comes from its own stream: changing it leaves the training split unchanged
    more = synthetic.generate(tmp_path / "more", **{**SMALL, "num_test": 100, "num_val": 50, "write_text": False})
    assert (more / "train.txt").read_bytes() == (small / "train.txt").read_bytes()
    Xv, Yv = formats.read_xc_bow(more / "val.txt", num_features=2000, num_labels=300)
    assert Xv.shape[0] == 50


def test_readable_and_consistent(small):
    X, Y = formats.read_xc_bow(small / "train.txt")
    Xt, Yt = formats.read_xc_bow(small / "test.txt", num_features=X.shape[1], num_labels=Y.shape[1])
    assert X.shape == (2000, 2000) and Y.shape == (2000, 300) and Xt.shape == (500, 2000)
    assert (np.diff(Y.indptr) >= 1).all() and (np.diff(X.indptr) >= 1).all()
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    np.testing.assert_allclose(norms, 1.0, rtol=1e-4)
    assert (formats.read_xy(small / "trn_X_Y.txt", num_labels=300) != Y).nnz == 0
    docs = formats.read_lines(small / "trn_X.txt", expected=2000)
    for i in (0, 1, 777, 1999):  # the words of the text are exactly the features of the BoW row
        assert {int(w[1:]) for w in docs[i].split()} == set(X[i].indices.tolist())
    lbl = formats.read_lines(small / "lbl_X.txt", expected=300)
    assert all(len(t.split()) == 4 and all(w[0] == "w" for w in t.split()) for t in lbl)
    assert len(set(lbl)) > 290


def test_label_frequencies_skewed(small):
    _, Y = formats.read_xc_bow(small / "train.txt")
    freq = np.sort(np.bincount(Y.indices, minlength=300))[::-1]
    top1pct = freq[:3].sum() / freq.sum()
    assert top1pct > 0.08  # 1% of labels, 8x their uniform share
    assert freq[:30].sum() / freq.sum() > 0.35
    assert freq[-30:].sum() / freq.sum() < 0.03


def test_doc_labels_share_clusters(small):
    _, Y = formats.read_xc_bow(small / "train.txt")
    cl = np.load(small / "label_cluster.npy")
    assert cl.shape == (300,)
    same = total = 0
    for r in range(Y.shape[0]):
        c = cl[Y.indices[Y.indptr[r]:Y.indptr[r + 1]]]
        k = len(c)
        if k > 1:
            same += (c[:, None] == c[None, :]).sum() - k
            total += k * (k - 1)
    chance = (np.bincount(cl) / 300.0) ** 2
    assert same / total > 0.5 > 4 * chance.sum()


def test_cluster_mates_are_harder_negatives(small):
    X, Y = formats.read_xc_bow(small / "train.txt")
    cl = np.load(small / "label_cluster.npy")
    cen = (Y.T @ X).toarray()
    cen /= np.maximum(np.linalg.norm(cen, axis=1, keepdims=True), 1e-12)
    sim = cen @ cen.T
    mask_same = (cl[:, None] == cl[None, :]) & ~np.eye(300, dtype=bool)
    mask_diff = cl[:, None] != cl[None, :]
    assert sim[mask_same].mean() > 2 * sim[mask_diff].mean()


def test_learnable(small):
    X, Y = formats.read_xc_bow(small / "train.txt")
    Xt, Yt = formats.read_xc_bow(small / "test.txt")
    cen = sp.csr_matrix(Y.T @ X)
    norms = np.sqrt(np.asarray(cen.multiply(cen).sum(1)).ravel())
    norms[norms == 0] = 1
    scores = (Xt @ sp.diags(1 / norms).dot(cen).T).toarray()
    top = scores.argmax(1)
    p1 = np.asarray(Yt[np.arange(Yt.shape[0]), top]).ravel().mean()
    popular = np.bincount(Y.indices, minlength=300).argmax()
    base = Yt[:, popular].toarray().mean()
    assert p1 > 0.5 and p1 > 2 * base, (p1, base)


def test_ensure_caches_and_hashes(tmp_path, monkeypatch):
    cfg = dict(num_labels=50, num_features=300, num_train=200, num_test=50, gen_seed=1, write_text=False,
               name="synthetic", format="synthetic")  # unknown keys are ignored; gen_seed = seed
    d = synthetic.ensure(cfg, tmp_path)
    assert d.parent == tmp_path and (d / "meta.json").exists()
    assert json.loads((d / "meta.json").read_text())["params"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temp dirs left

    def boom(*a, **k):
        raise AssertionError("should not regenerate")

    monkeypatch.setattr(synthetic, "generate", boom)
    same = dict(cfg, avg_labels=3, seed=1)  # 3 == 3.0 (the default), seed == gen_seed: the same dataset
    same.pop("gen_seed")
    assert synthetic.ensure(same, tmp_path) == d
    with pytest.raises(AssertionError):
        synthetic.ensure(dict(cfg, num_labels=51), tmp_path)


def test_ensure_interrupted_leaves_nothing(tmp_path, monkeypatch):
    real = synthetic.generate

    def dies(out_dir, **kw):
        (out_dir / "train.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", dies)
    cfg = dict(num_labels=50, num_features=300, num_train=100, num_test=20, write_text=False)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "generate", real)
    d = synthetic.ensure(cfg, tmp_path)
    assert (d / "meta.json").exists() and formats.read_xc_bow(d / "train.txt")[0].shape == (100, 300)


@pytest.mark.parametrize("bad", [dict(num_labels=0), dict(avg_labels=0.5), dict(num_clusters=500),
                                 dict(num_train="many")])
def test_bad_parameters(tmp_path, bad):
    with pytest.raises(ConfigError):
        synthetic.generate(tmp_path, **{**SMALL, **bad})


def test_max_train_docs_takes_a_seeded_subset_disjoint_from_validation(tmp_path):
    from hydra import compose, initialize_config_dir

    from xmcneg.data.datamodule import build_datamodule

    root = Path(__file__).resolve().parents[1]
    over = ["dataset.num_labels=50", "dataset.num_train=400", "dataset.num_test=50", "dataset.num_features=100",
            f"paths.cache_dir={tmp_path}", "data.val_size=40"]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        full = compose("train", overrides=over)
        capped = compose("train", overrides=over + ["data.max_train_docs=100"])
        bad = compose("train", overrides=over + ["data.max_train_docs=0"])
    dms = []
    for cfg in (full, capped):
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        dms.append(dm)
    a, b = dms
    assert a.split("train")[0].shape[0] == 360 and b.split("train")[0].shape[0] == 100
    assert set(b.train_rows) <= set(a.train_rows) and not set(b.train_rows) & set(b.val_rows)
    assert list(b.val_rows) == list(a.val_rows)  # the cap never changes the validation split
    dm = build_datamodule(bad)
    dm.prepare_data()
    with pytest.raises(ConfigError, match="data.max_train_docs"):
        dm.setup("fit")
