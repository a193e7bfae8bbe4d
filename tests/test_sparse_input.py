"""The BoW encoders' sparse input layer (xmcneg.encoders.sparse_bag) and its row-wise Adam
(xmcneg.methods.sparse_optim.RowAdam): gradients equal the dense layer's, untouched rows never change, the
optimiser state round-trips through a checkpoint (a resumed run retraces the uninterrupted one)."""
import copy

import pytest
import torch

from train_conf import encoder_args
from xmcneg.encoders.bow_linear import BowLinear
from xmcneg.encoders.bow_mlp import BowMLP
from xmcneg.encoders.sparse_bag import SPARSE_MIN_FEATURES, InputBag, resolve_sparse
from xmcneg.errors import ConfigError
from xmcneg.methods.sparse_optim import RowAdam, coalesced, encoder_optimizers

F_, H = 60, 8


def _batch(seed, B=5, nnz=7):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, F_ // 2, (B * nnz,), generator=g)  # repeats, and rows >= F/2 never touched
    idx[3] = idx[4] = idx[9]  # a feature twice in a document and in another one
    return {"indices": idx, "offsets": torch.arange(0, B * nnz, nnz), "weights": torch.rand(B * nnz, generator=g)}


def _pair(cls, **kw):
    torch.manual_seed(0)
    dense = cls(F_, **encoder_args({BowMLP: "bow_mlp", BowLinear: "bow_linear"}[cls], sparse_input=False, **kw))
    sparse = copy.deepcopy(dense)
    for m in sparse.modules():
        if isinstance(m, InputBag):
            m.sparse = True
    return dense, sparse


@pytest.mark.parametrize("cls,kw", [(BowMLP, {"dim": 4, "hidden": H, "dropout": 0.0}), (BowLinear, {"dim": H})])
def test_sparse_gradient_equals_dense(cls, kw):
    dense, sparse = _pair(cls, **kw)
    x = _batch(1)
    target = torch.randn(5, dense.dim)
    for enc in (dense, sparse):
        ((enc(x) - target) ** 2).sum().backward()
    gd, gs = dense.bag.weight.grad, sparse.bag.weight.grad
    assert not gd.is_sparse and gs.is_sparse
    rows = coalesced(gs).indices()[0]
    assert torch.equal(rows, x["indices"].unique())  # exactly the touched rows
    torch.testing.assert_close(gs.to_dense(), gd, atol=1e-6, rtol=1e-5)
    for (n, pd), (_, ps) in zip(dense.named_parameters(), sparse.named_parameters()):
        if n != "bag.weight":
            torch.testing.assert_close(ps.grad, pd.grad, atol=1e-6, rtol=1e-5)


def test_empty_documents_and_no_grad():
    bag = InputBag(F_, H, sparse=True)
    x = {"indices": torch.tensor([2, 5, 2]), "offsets": torch.tensor([0, 0, 3])}  # docs 0 and 2 are empty
    out = bag(x["indices"], x["offsets"])
    assert out.shape == (3, H) and torch.all(out[0] == 0) and torch.all(out[2] == 0)
    out.sum().backward()
    g = coalesced(bag.weight.grad)
    assert g.indices()[0].tolist() == [2, 5]
    torch.testing.assert_close(g.values(), torch.tensor([[2.0] * H, [1.0] * H]))
    with torch.no_grad():
        assert torch.equal(bag(x["indices"], x["offsets"]), out.detach())


def _step(enc, opts, x, target):
    for o in opts:
        o.zero_grad(set_to_none=True)
    ((enc(x) - target) ** 2).sum().backward()
    for o in opts:
        o.step()


def test_linear_encoder_with_a_sparse_table_gets_only_the_row_optimiser():
    """bow_linear has no dense parameter once its table is sparse: no empty dense AdamW (torch refuses one)."""
    dense, sparse = _pair(BowLinear, dim=4)
    assert list(encoder_optimizers(sparse, lr=1e-2, weight_decay=0.0)) == ["rows"]
    assert list(encoder_optimizers(dense, lr=1e-2, weight_decay=0.0)) == ["dense"]


@pytest.mark.parametrize("sparse", [False, True])
def test_sgd_input_table_moves_by_lr_times_gradient(sparse):
    """optim.input_optimizer=sgd: the input table alone gets plain SGD (dense or sparse rows), the rest AdamW."""
    enc = _pair(BowMLP, dim=4, hidden=H, dropout=0.0)[int(sparse)]
    opts = encoder_optimizers(enc, lr=1e-2, weight_decay=0.0, input_optimizer="sgd", input_lr=0.5)
    assert list(opts) == ["dense", "input"] and opts["input"].param_groups[0]["params"] == [enc.bag.weight]
    before = enc.bag.weight.detach().clone()
    _step(enc, list(opts.values()), _batch(2), torch.randn(5, 4))
    grad = enc.bag.weight.grad.to_dense() if sparse else enc.bag.weight.grad
    torch.testing.assert_close(enc.bag.weight.detach(), before - 0.5 * grad)
    with pytest.raises(ConfigError, match="optim.input_optimizer"):
        encoder_optimizers(enc, lr=1e-2, weight_decay=0.0, input_optimizer="adam")


def test_input_weight_decay_is_an_l2_penalty_of_the_dense_sgd_table():
    dense, sparse = _pair(BowLinear, dim=H)
    opts = encoder_optimizers(dense, lr=1e-2, weight_decay=0.0, input_optimizer="sgd", input_lr=0.5,
                              input_weight_decay=0.1)
    before = dense.bag.weight.detach().clone()
    _step(dense, list(opts.values()), _batch(2), torch.randn(5, H))
    torch.testing.assert_close(dense.bag.weight.detach(), before - 0.5 * (dense.bag.weight.grad + 0.1 * before))
    with pytest.raises(ConfigError, match="optim.input_weight_decay.*dense input table"):
        encoder_optimizers(sparse, lr=1e-2, weight_decay=0.0, input_optimizer="sgd", input_lr=0.5,
                           input_weight_decay=0.1)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_untouched_rows_bit_identical_and_touched_rows_move(wd):
    _, enc = _pair(BowMLP, dim=4, hidden=H, dropout=0.0)
    opts = list(encoder_optimizers(enc, lr=1e-2, weight_decay=wd).values())
    assert [type(o) for o in opts] == [torch.optim.AdamW, RowAdam]
    before = enc.bag.weight.detach().clone()
    x = _batch(2)
    _step(enc, opts, x, torch.randn(5, 4))
    touched = torch.zeros(F_, dtype=torch.bool)
    touched[x["indices"]] = True
    w = enc.bag.weight.detach()
    assert torch.equal(w[~touched], before[~touched])
    assert (w[touched] != before[touched]).all(dim=1).all()
    state = opts[1].state[enc.bag.weight]
    assert torch.equal(state["exp_avg"][~touched], torch.zeros_like(w[~touched]))


def test_rowadam_matches_adamw_when_every_row_is_touched():
    """With every row in every batch, lazy Adam is AdamW (decoupled weight decay included)."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 3)
    grads = [torch.randn(6, 3) for _ in range(4)]
    ref, lazy = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    o_ref = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1)
    o_lazy = RowAdam([lazy], lr=0.05, weight_decay=0.1)
    for g in grads:
        ref.grad = g.clone()
        lazy.grad = g.to_sparse(1)
        o_ref.step()
        o_lazy.step()
    torch.testing.assert_close(lazy.detach(), ref.detach(), atol=1e-6, rtol=1e-5)


def test_optimizer_state_round_trip_resume_retraces(tmp_path):
    """Train 3 steps, checkpoint (weights + optimiser state dicts through torch.save/load, weights only), train 3
    more; a fresh model restored from the checkpoint retraces the last 3 steps bit for bit."""
    batches = [(_batch(10 + i), torch.randn(5, 4, generator=torch.Generator().manual_seed(i))) for i in range(6)]

    def fresh():
        _, enc = _pair(BowMLP, dim=4, hidden=H, dropout=0.0)
        return enc, list(encoder_optimizers(enc, lr=1e-2, weight_decay=0.0).values())

    enc, opts = fresh()
    for x, t in batches[:3]:
        _step(enc, opts, x, t)
    torch.save({"model": enc.state_dict(), "opts": [o.state_dict() for o in opts]}, tmp_path / "c.pt")
    for x, t in batches[3:]:
        _step(enc, opts, x, t)

    enc2, opts2 = fresh()
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    enc2.load_state_dict(ck["model"])
    for o, s in zip(opts2, ck["opts"]):
        o.load_state_dict(s)
    assert opts2[1].state[enc2.bag.weight]["step"].device.type == "cpu"
    for x, t in batches[3:]:
        _step(enc2, opts2, x, t)
    for (n, a), (_, b) in zip(enc.state_dict().items(), enc2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opts[1].state[enc.bag.weight], opts2[1].state[enc2.bag.weight]
    assert all(torch.equal(s1[k], s2[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_coalesced_sums_duplicate_rows():
    g = torch.sparse_coo_tensor(torch.tensor([[4, 1, 4, 0, 1]]), torch.arange(10.0).view(5, 2), (6, 2))
    c = coalesced(g)
    ref = g.coalesce()
    assert c.is_coalesced() and torch.equal(c.indices(), ref.indices()) and torch.equal(c.values(), ref.values())


def test_bow_mlp_dropout_keeps_the_expected_fraction_and_scales():
    from xmcneg.encoders.bow_mlp import Dropout
    torch.manual_seed(0)
    d = Dropout(0.3)
    x = torch.ones(400, 500, requires_grad=True)
    y = d(x)
    assert abs((y != 0).float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient through the same mask and scale
    assert torch.equal(d.eval()(x), x)


def test_resolve_sparse_and_bad_value():
    assert resolve_sparse("auto", SPARSE_MIN_FEATURES) and not resolve_sparse("auto", SPARSE_MIN_FEATURES - 1)
    assert resolve_sparse(True, 10) and not resolve_sparse(False, 10 ** 6)
    with pytest.raises(ConfigError, match="encoder.sparse_input"):
        resolve_sparse("yes", 10)


# ------------------------------------------------------------------------------------- through train.py, 2 ranks
DDP_DATA = ["dataset.num_labels=200", "dataset.num_train=601", "dataset.num_test=100", "dataset.num_features=500",
            "data.batch_size=64", "encoder=bow_mlp", "encoder.sparse_input=true", "optim.input_optimizer=adamw",
            "sampler=uniform", "trainer.max_epochs=2", "hardware=ddp_cpu", "logger=none",
            "trainer.enable_progress_bar=false", "debug.record_train_rows=true"]  # RowAdam on the sparse input table


def _ddp_run(sync, tmp_path):
    import json

    from test_train_e2e import run

    out = tmp_path / sync
    p = run("train.py", [*DDP_DATA, f"hardware.sparse_grad_sync={sync}", f"hydra.run.dir={out}"], tmp_path,
            timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    s0, s1 = (json.loads((out / "debug" / f"fit_end_r{r}.json").read_text()) for r in (0, 1))
    assert s0["state_dict"] == s1["state_dict"] and s0["optimizers"] == s1["optimizers"]  # bit-identical ranks
    assert "encoder.bag.weight" in s0["state_dict"]
    ck = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    def states(d):  # every per-parameter state of the (combined, nested) optimiser state dicts
        if isinstance(d, dict):
            yield from (d["state"].values() if isinstance(d.get("state"), dict) else ())
            for v in d.values():
                yield from states(v)

    assert any(st.get("exp_avg") is not None and st["exp_avg"].shape[0] == 500
               for o in ck["optimizer_states"] for st in states(o))  # RowAdam state checkpointed
    return ck["state_dict"]


def test_ddp_sparse_input_all_gather(tmp_path):
    """sparse_grad_sync=all_gather (the NCCL path): the input table is all-gathered like the label tables and both
    ranks end bit-identical."""
    _ddp_run("all_gather", tmp_path)


@pytest.mark.slow
def test_ddp_sparse_input_all_gather_equals_sparse_allreduce(tmp_path):
    a, b = _ddp_run("all_gather", tmp_path), _ddp_run("auto", tmp_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_clip_grad_norm_with_sparse_input_equals_dense():
    from xmcneg.methods.sparse_optim import clip_grad_norm_

    dense, sparse = _pair(BowMLP, dim=4, hidden=H, dropout=0.0)
    x, target = _batch(3), torch.randn(5, 4)
    norms = []
    for enc in (dense, sparse):
        ((enc(x) - target) ** 2).sum().backward()
        norms.append(clip_grad_norm_(enc.parameters(), 0.01))
    torch.testing.assert_close(norms[1], norms[0], atol=1e-5, rtol=1e-5)
    assert norms[0] > 0.01  # clipping happened
    torch.testing.assert_close(sparse.bag.weight.grad.to_dense(), dense.bag.weight.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(sparse.out.weight.grad, dense.out.weight.grad, atol=1e-7, rtol=1e-5)
