"""LightningDataModule for bag-of-words XC data (real benchmarks and the synthetic generator).

Splits: train/test from the files; validation carved from train (seeded, `data.val_size`). Batches are dicts:
  x:   {"indices", "offsets", "weights"}  sparse feature rows in EmbeddingBag form
  pos: LongTensor (B, P) positive label ids, padded with -1
  idx: LongTensor (B,) row ids within the split
"""
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from xmcneg.data import formats, synthetic
from xmcneg.errors import ConfigError, MissingFileError

TRANSFORMS = ("none", "l2", "tfidf_l2")


def csr_rows_to_bag(X: sp.csr_matrix, rows):
    """EmbeddingBag inputs (indices, offsets, per-sample weights) for the given rows of a CSR matrix."""
    sub = X[rows]
    return {
        "indices": torch.from_numpy(sub.indices.astype(np.int64)),
        "offsets": torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
        "weights": torch.from_numpy(sub.data.astype(np.float32)),
    }


def pad_label_rows(Y: sp.csr_matrix, rows):
    """(B, P) LongTensor of each row's label ids, padded with -1."""
    sub = Y[rows]
    lens = np.diff(sub.indptr)
    width = max(int(lens.max()) if len(lens) else 0, 1)
    out = np.full((len(lens), width), -1, dtype=np.int64)
    col = np.arange(sub.indptr[-1]) - np.repeat(sub.indptr[:-1], lens)
    out[np.repeat(np.arange(len(lens)), lens), col] = sub.indices
    return torch.from_numpy(out)


class FeatureTransform:
    """none | l2 (row L2 normalisation) | tfidf_l2 (idf from the train split, then L2); fitted on train only."""

    def __init__(self, name):
        if name not in TRANSFORMS:
            raise ConfigError("dataset.feature_transform",
                              f"unknown '{name}', expected one of {', '.join(TRANSFORMS)}")
        self.name, self.idf = name, None

    def fit(self, X_train):
        if self.name == "tfidf_l2":
            df = np.bincount(X_train.indices, minlength=X_train.shape[1]).astype(np.float64)
            self.idf = (np.log((1.0 + X_train.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def __call__(self, X):
        X = sp.csr_matrix(X, dtype=np.float32)
        if self.name == "none":
            return X
        if self.idf is not None:
            X = sp.csr_matrix(X @ sp.diags(self.idf))
        norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags((1.0 / norms).astype(np.float32)) @ X)


class _Rows(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class XCDataModule(pl.LightningDataModule):
    def __init__(self, dataset_cfg, data_cfg, paths_cfg, seed: int = 0):
        super().__init__()
        self.dcfg, self.cfg, self.paths, self.seed = dataset_cfg, data_cfg, paths_cfg, seed
        self.name = dataset_cfg.name
        self._loaded = False
        self.train_batch_sampler = None  # a method may install its own (e.g. NGAME's clustered batches)
        if int(data_cfg.batch_size) <= 0:
            raise ConfigError("data.batch_size", f"must be > 0, got {data_cfg.batch_size}")

    # ---------------------------------------------------------------- loading
    def dataset_dir(self) -> Path:
        if self.dcfg.format == "synthetic":
            params = {k: self.dcfg[k] for k in ("num_labels", "num_features", "num_train", "num_test",
                                                 "avg_labels", "zipf_a", "doc_len")}
            params["seed"] = self.dcfg.gen_seed
            return Path(synthetic.ensure(params, Path(self.paths.cache_dir) / "synthetic"))
        d = Path(self.dcfg.dir)
        if not d.is_dir():
            raise MissingFileError(
                f"dataset '{self.name}': directory {d} not found; put {self.dcfg.train_file} and "
                f"{self.dcfg.test_file} there (set XMC_DATA_DIR or dataset.dir)")
        return d

    def prepare_data(self):
        self.dataset_dir()  # generates synthetic data once (rank 0 under DDP)

    def setup(self, stage=None):
        if self._loaded:
            return
        d = self.dataset_dir()
        cache = Path(self.paths.cache_dir) / "parsed"
        train_file = self.dcfg.get("train_file", "train.txt")
        test_file = self.dcfg.get("test_file", "test.txt")
        Xtr, Ytr = formats.load_bow_cached(formats.resolve_path(d / train_file), cache)
        Xte, Yte = formats.load_bow_cached(formats.resolve_path(d / test_file), cache,
                                           num_features=Xtr.shape[1], num_labels=Ytr.shape[1])
        self.transform = FeatureTransform(self.dcfg.get("feature_transform", "none")).fit(Xtr)
        Xtr, Xte = self.transform(Xtr), self.transform(Xte)
        self.num_features = Xtr.shape[1]
        self._set_splits(Xtr, Ytr, Xte, Yte)
        label_file = self.dcfg.get("label_text_file")
        self.label_text_path = None
        if label_file:
            try:
                self.label_text_path = formats.resolve_path(d / label_file)
            except MissingFileError:
                self.label_text_path = None
        self._loaded = True

    def _set_splits(self, Xtr, Ytr, Xte, Yte):
        """Carve the seeded validation split out of train (`data.val_size`, capped at `data.val_max_docs`) and set
        `splits`, `num_labels`, `full_train_Y`, `train_label_counts`, and `train_rows` / `val_rows` (rows of the
        training file in each split). X may be any row-indexable object with `.shape` (CSR features here, token
        rows in the text datamodule)."""
        self.num_labels = Ytr.shape[1]
        self.full_train_Y = Ytr
        n = Xtr.shape[0]
        vs = float(self.cfg.val_size)
        n_val = int(round(vs * n)) if vs < 1 else int(vs)
        if not 0 <= n_val < n:
            raise ConfigError("data.val_size", f"gives {n_val} validation points out of {n} training points")
        perm = np.random.default_rng(self.seed).permutation(n)
        val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_rows = val_rows[: int(self.cfg.val_max_docs)]
        cap = self.cfg.get("max_train_docs")
        if cap is not None:  # a seeded subset of the training split (short-budget runs of slow encoders)
            if int(cap) < 1:
                raise ConfigError("data.max_train_docs", f"must be >= 1 or null, got {cap}")
            train_rows = np.sort(perm[n_val:][: int(cap)])
        self.train_rows, self.val_rows = train_rows, val_rows
        self.splits = {
            "train": (Xtr[train_rows], Ytr[train_rows]),
            "val": (Xtr[val_rows], Ytr[val_rows]),
            "test": (Xte, Yte),
        }
        self.train_label_counts = np.bincount(self.splits["train"][1].indices, minlength=self.num_labels)

    def label_inputs(self, label_ids):
        """Encoder inputs for the texts of the given labels, in the documents' input form (so one encoder embeds
        both), for methods that embed labels (NGAME). Built once from the dataset's label texts."""
        from xmcneg.data.label_text import bow_label_features

        if getattr(self, "_label_X", None) is None:
            self._label_X = bow_label_features(self)
        return csr_rows_to_bag(self._label_X, np.asarray(label_ids, dtype=np.int64))

    # ---------------------------------------------------------------- batches
    def split(self, name):
        return self.splits[name]

    def collate(self, split):
        X, Y = self.splits[split]

        def fn(rows):
            rows = np.asarray(rows, dtype=np.int64)
            return {"x": csr_rows_to_bag(X, rows), "pos": pad_label_rows(Y, rows), "idx": torch.from_numpy(rows)}

        return fn

    def _loader(self, split, shuffle):
        nw = int(self.cfg.num_workers)
        return DataLoader(_Rows(self.splits[split][0].shape[0]), batch_size=int(self.cfg.batch_size),
                          shuffle=shuffle, collate_fn=self.collate(split), num_workers=nw,
                          persistent_workers=nw > 0, pin_memory=torch.cuda.is_available(), drop_last=False)

    def train_dataloader(self):
        if self.train_batch_sampler is not None:
            nw = int(self.cfg.num_workers)
            return DataLoader(_Rows(self.splits["train"][0].shape[0]), batch_sampler=self.train_batch_sampler,
                              collate_fn=self.collate("train"), num_workers=nw, persistent_workers=nw > 0,
                              pin_memory=torch.cuda.is_available())
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


def build_datamodule(cfg):
    """The datamodule for cfg.dataset + cfg.encoder. Text layouts (`format: text | lf_json`) always get the
    TextDataModule; a `bow` / `synthetic` dataset gets it too when the encoder reads text (its class has
    `input_kind = "tokens"`, or its config has a `text:` section, as encoder=text_bow), reading the dataset's
    text files (`train_text_file`, ...); otherwise the BoW XCDataModule. See xmcneg.data.text."""
    from xmcneg.data.text import TEXT_FORMATS, TextDataModule, wants_text

    fmt = cfg.dataset.get("format", "bow")
    if fmt in TEXT_FORMATS or (fmt in ("bow", "synthetic") and wants_text(cfg.get("encoder") or {})):
        return TextDataModule(cfg.dataset, cfg.data, cfg.paths, cfg.get("encoder") or {}, seed=int(cfg.seed))
    if fmt in ("bow", "synthetic"):
        return XCDataModule(cfg.dataset, cfg.data, cfg.paths, seed=int(cfg.seed))
    raise ConfigError("dataset.format", f"unknown format '{fmt}', expected bow, synthetic, text or lf_json")
