"""The wide head (wide.features): its support, its scores against a dense computation, its checkpoint, and a run
through train.py / eval.py."""
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from inprocess import run_in_process
from xmcneg.data.inputs import csr_rows_to_bag
from xmcneg.methods.wide_head import WideHead, bag_rows, top_features

from test_train_e2e import TINY


def _data(seed=0, n=40, F=30, C=12):
    rng = np.random.default_rng(seed)
    X = sp.random(n, F, density=0.2, random_state=seed, format="csr", dtype=np.float32)
    Y = sp.csr_matrix((rng.random((n, C)) < 0.2).astype(np.float32))
    return X, Y


def test_support_is_each_labels_top_features_by_summed_value():
    X, Y = _data()
    feat, lab = top_features(X, Y, 3)
    M = (Y.T @ X).toarray()
    for c in range(Y.shape[1]):
        got = set(feat[lab == c].tolist())
        nz = np.flatnonzero(M[c])
        assert len(got) == min(3, len(nz))
        if len(nz):  # every kept feature sums at least as much as every dropped one
            dropped = set(nz.tolist()) - got
            assert not dropped or min(M[c, list(got)]) >= max(M[c, list(dropped)])


def _random_head(X, Y, features):
    """A head with its support fixed on (X, Y) and random weights and biases."""
    head = WideHead(X.shape[1], Y.shape[1], features=features)
    head.set_support(X, Y)
    with torch.no_grad():
        head.values.normal_()
        head.bias.normal_()
    return head


def test_scores_equal_the_dense_linear_model_on_the_support():
    X, Y = _data()
    head = _random_head(X, Y, 4)
    V = np.zeros((X.shape[1], Y.shape[1]), dtype=np.float32)
    ptr, lab = head.ptr.numpy(), head.label.numpy()
    for f in range(X.shape[1]):
        V[f, lab[ptr[f]:ptr[f + 1]]] = head.values.detach().numpy()[ptr[f]:ptr[f + 1]]
    expected = X @ V + head.bias.detach().numpy()
    x = csr_rows_to_bag(X, np.arange(X.shape[0]))
    np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    # a block of documents scores as those rows of the whole
    np.testing.assert_allclose(head(bag_rows(x, 5, 17)).detach().numpy(), expected[5:17], rtol=1e-5, atol=1e-5)
    # the gradient reaches the support's weights only through the features a document has
    head.zero_grad()
    head(bag_rows(x, 0, 1)).sum().backward()
    touched = np.zeros(head.size, dtype=bool)
    for f in X[0].indices:
        touched[ptr[f]:ptr[f + 1]] = True
    assert np.all((head.values.grad.numpy() != 0) <= touched)


def test_a_fresh_head_loads_a_trained_ones_state():
    X, Y = _data()
    head = _random_head(X, Y, 5)
    fresh = WideHead(X.shape[1], Y.shape[1], features=5)  # empty support, as when eval.py rebuilds a model
    fresh.load_state_dict(head.state_dict())
    x = csr_rows_to_bag(X, np.arange(X.shape[0]))
    assert torch.equal(fresh(x), head(x))


def test_train_and_eval_with_a_wide_head(tmp_path):
    args = [*TINY, "sampler=full", "loss=softmax", "wide.features=8", "trainer.max_epochs=2"]
    out = tmp_path / "r"
    p = run_in_process("train.py", [*args, f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["P@1"] > 0.3
    ckpt = out / "checkpoints" / f"{res['tested']}.ckpt"
    values = torch.load(ckpt, weights_only=True)["state_dict"]["wide.values"]
    assert 200 < values.numel() <= 200 * 8 and values.abs().sum() > 0  # trained weights on the support
    p = run_in_process("eval.py", [*args, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'ev'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["test"]["P@1"] == pytest.approx(res["test"]["P@1"], abs=1e-6)
    # an ensemble of the model with itself ranks as the model does (its members' scores, wide head included,
    # standardised and summed batch by batch)
    p = run_in_process("eval.py", [*args, f"ckpt_path=[{ckpt},{ckpt}]", f"hydra.run.dir={tmp_path / 'ens'}"],
                       tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ens = json.loads((tmp_path / "ens" / "results.json").read_text())
    assert ens["test"]["P@1"] == pytest.approx(res["test"]["P@1"], abs=1e-6)
    assert ens["test"]["P@5"] == pytest.approx(res["test"]["P@5"], abs=1e-6)


def test_wide_head_follows_wide_enabled():
    """auto: with a BoW encoder and every label scored; false: never; true without full scoring: an error."""
    from train_conf import encoder_args, section
    from xmcneg.encoders.bow_linear import BowLinear
    from xmcneg.errors import ConfigError
    from xmcneg.methods.classifier import XMCClassifier
    from xmcneg.methods.losses import SampledSoftmax
    from xmcneg.samplers.uniform import UniformSampler

    def model(sampler=None, **wide):
        return XMCClassifier(BowLinear(10, **encoder_args("bow_linear", dim=8)), 6, SampledSoftmax(), sampler=sampler,
                             optim=section("optim"), evaluation=section("eval"), wide=section("wide", **wide),
                             num_features=10)

    assert section("wide")["enabled"] == "auto"
    m = model()
    assert m.wide is not None and "wide" in m.configure_optimizers().parts
    assert model(enabled=False).wide is None
    uniform = UniformSampler(num_negatives=2)
    assert model(uniform).wide is None  # auto, sampled negatives: none
    with pytest.raises(ConfigError, match="wide.enabled"):
        model(uniform, enabled=True)


def test_a_killed_run_with_a_wide_head_resumes_exactly(tmp_path):
    """SIGKILL mid-epoch, then ckpt_path=last: the support is rebuilt from the same rows and the checkpoint's
    weights and Adagrad state are restored, so the resumed run retraces the uninterrupted one."""
    from test_train_e2e import run

    args = [*TINY, "sampler=full", "trainer.max_epochs=3"]
    p = run("train.py", [*args, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "run"
    p = run("train.py", [*args, "debug.kill_in=train", "debug.kill_epoch=1", f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == -9, p.stderr[-2000:]
    p = run("train.py", [*args, "ckpt_path=last", f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ref, res = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "ref", out))
    assert "wide head:" in (out / "train.log").read_text()
    assert res["resumed_from"]["epoch"] == 0 and res["test"] == ref["test"]
