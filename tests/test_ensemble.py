"""Ensembles at prediction time (xmcneg.eval.ensemble, eval.py ckpt_path=[...]): the concatenated form ranks
labels as the sum of the members' per-document standardised scores (so one model ranks as it does alone); eval.py
tests and predicts with a list of checkpoints and refuses members of different label sets in one line."""
import json

import pytest
import torch

from inprocess import run_in_process
from test_train_e2e import run
from xmcneg.eval.ensemble import combine, standardised

SMALL = ["dataset.num_labels=120", "dataset.num_train=700", "dataset.num_test=200", "dataset.num_features=400",
         "logger=none", "trainer.enable_progress_bar=false", "data.batch_size=128", "sampler=full",
         "encoder=bow_linear", "encoder.dim=16", "data.val_min_docs=0", "trainer.max_epochs=2"]


def _z(s):
    return (s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True)


def test_standardised_scores_are_the_z_scores_up_to_a_constant_per_document():
    g = torch.Generator().manual_seed(0)
    emb, w, b = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g), torch.randn(50, generator=g) + 3
    docs, labels = standardised(emb, w, b)
    diff = docs @ labels.T - _z(emb @ w.T + b)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-4, rtol=0)
    emb2, w2 = torch.randn(7, 3, generator=g) * 40, torch.randn(50, 3, generator=g)  # another scale, no bias
    docs, labels = combine([(emb, w, b), (emb2, w2, None)])
    diff = docs @ labels.T - (_z(emb @ w.T + b) + _z(emb2 @ w2.T))
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    for name, extra in (("softmax", []), ("hinge", ["loss=sq_hinge", "seed=1"])):
        p = run("train.py", [*SMALL, *extra, f"hydra.run.dir={tmp / name}"], tmp)
        assert p.returncode == 0, p.stderr[-3000:]
    return tmp, [tmp / n / "checkpoints" / "best.ckpt" for n in ("softmax", "hinge")]


def test_eval_tests_and_predicts_with_an_ensemble(two_models, tmp_path):
    tmp, (a, b) = two_models
    p = run("eval.py", [*SMALL, f"ckpt_path=[{a},{b}]", f"hydra.run.dir={tmp_path / 'ab'}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "ab" / "results.json").read_text())
    assert [m["loss"] for m in res["ensemble"]] == ["softmax", "sq_hinge"] and res["ckpt_path"] == [str(a), str(b)]
    members = [json.loads((tmp / n / "results.json").read_text())["test"]["P@1"] for n in ("softmax", "hinge")]
    assert res["test"]["P@1"] >= min(members) > 0.05  # not a mix-up of label ids (that would be ~0.01)
    pred = tmp_path / "pred.txt"
    data_dir = next((tmp / "cache" / "synthetic").glob("synthetic-*"))
    p = run("eval.py", [*SMALL, "mode=predict", f"ckpt_path=[{a},{b}]", f"input={data_dir / 'test.txt'}",
                        f"output={pred}", "k=3", f"hydra.run.dir={tmp_path / 'pr'}"], tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = pred.read_text().splitlines()
    assert len(lines) == 200 and all(len(line.split()) == 3 for line in lines)


def test_members_of_different_label_sets_are_refused(two_models, tmp_path):
    tmp, (a, _) = two_models
    ckpt = torch.load(a, map_location="cpu", weights_only=True)  # the same model, as if trained on another dataset
    ckpt["xmcneg_config"]["dataset"]["name"] = "other"
    b = tmp_path / "other.ckpt"
    torch.save(ckpt, b)
    p = run_in_process("eval.py", ["logger=none", f"ckpt_path=[{a},{b}]", f"hydra.run.dir={tmp_path / 'ev'}"], tmp)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: config key 'ckpt_path':") and "one label set" in err[-1], p.stderr[-2000:]
