"""benchmarks/peers.py plumbing: the missing-extra message, and one library on a tiny synthetic dataset read through
the suite's datamodule and scored with its metrics (skipped when the `.[peers]` extra is not installed)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset=synthetic", "dataset.num_labels=60", "dataset.num_features=300", "dataset.num_train=600",
        "dataset.num_test=200", "dataset.doc_len=20"]


def _load_peers():
    spec = importlib.util.spec_from_file_location("peers_benchmark", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_extra_is_one_line_exit_2(monkeypatch, capsys):
    peers = _load_peers()
    real = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name, *a: None if name == "pecos" else real(name, *a))
    assert peers.main(["dataset=bibtex", "--libraries", "pecos"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "error: pecos not installed: pip install -e .[peers]\n"


def test_napkinxc_on_tiny_synthetic(tmp_path, monkeypatch, capsys):
    pytest.importorskip("napkinxc")
    from xmcneg.eval.metrics import xc_metrics

    monkeypatch.setenv("XMC_CACHE_DIR", str(tmp_path / "cache"))
    peers = _load_peers()
    assert peers.main(TINY + ["--libraries", "napkinxc"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert (line["dataset"], line["library"], line["threads"]) == ("synthetic", "napkinxc", 1)
    # the train file minus the validation split (data.val_min_docs, at most a tenth of the file: 60 of 600)
    assert (line["train_docs"], line["test_docs"]) == (540, 200)
    assert line["params"] == peers.NAPKINXC_PARAMS and line["version"]
    assert line["train_s"] > 0 and line["predict_s"] > 0 and line["peak_rss_mb"] > 0
    # better than always predicting the 5 most frequent training labels, scored the same way
    Xtr, Ytr, Xte, Yte, inv_prop, _ = peers.load_split(TINY)
    top = np.argsort(-np.bincount(Ytr.indices, minlength=Ytr.shape[1]), kind="stable")[:5]
    base = xc_metrics(np.tile(top, (Xte.shape[0], 1)), Yte, inv_prop=inv_prop, recall_ks=())
    assert line["P@1"] > base["P@1"] + 0.1 and line["P@5"] > base["P@5"]
    assert 0 < line["PSP@5"] <= 1 and 0 < line["nDCG@5"] <= 1
    # a bad override: one line, exit 2
    assert peers.main(["dataset=no_such_dataset", "--libraries", "napkinxc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
