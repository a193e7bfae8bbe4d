"""LightningDataModule for bag-of-words XC data (real benchmarks and the synthetic generator).

Splits: train/test from the files; validation carved from train (seeded, `data.val_size`). Batches are dicts:
  x:   {"indices", "offsets", "weights"}  sparse feature rows in EmbeddingBag form
  pos: LongTensor (B, P) positive label ids, padded with -1
  idx: LongTensor (B,) row ids within the split

Distribution (DDP): the datamodule shards every split itself (the Trainer runs with use_distributed_sampler=False).
Training: :class:`RankBatchSampler` deals out the epoch's global row order (seeded by (seed, epoch), identical on
every rank) so that the ranks' batches are disjoint, every row is used exactly once per epoch and every rank runs
the same number of steps (see :func:`rank_batches` for the tail rule). Validation / test: :func:`shard_rows`, each
rank every world_size-th row, padded by wrapping around (the evaluation drops the duplicates by `idx`).
"""
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


# ------------------------------------------------------------------------------------------------ sharding
def rank_batches(order, batch_size, rank=0, world_size=1):
    """Rank `rank`'s batches of one epoch, cut from `order` (the epoch's global row order, the same on every rank).

    The order is cut into steps of batch_size x world_size rows; at each step rank r takes the r-th block of
    batch_size rows. The tail (R < batch_size x world_size rows) is split into world_size contiguous parts of
    sizes differing by at most one, one more batch per rank, if R >= world_size; if 0 < R < world_size (a part
    would be empty) the R rows are instead appended one each to the last batches of ranks 0 .. R-1. So the ranks'
    batches are disjoint, together hold every row exactly once, and every rank gets the same number of batches
    (`num_rank_batches`), none empty. world_size 1: consecutive batches of batch_size, the last one shorter, as a
    plain DataLoader. Fewer rows than ranks cannot be split: ValueError."""
    order = np.asarray(order, dtype=np.int64)
    N, B, W = len(order), int(batch_size), int(world_size)
    full, R = divmod(N, B * W)
    if N < W:
        raise ValueError(f"{N} training rows cannot be split over {W} processes")
    batches = [order[s * B * W + rank * B: s * B * W + (rank + 1) * B] for s in range(full)]
    tail = order[full * B * W:]
    if R >= W:
        batches.append(np.array_split(tail, W)[rank])
    elif rank < R:  # 0 < R < W: too few rows for a batch on every rank
        batches[-1] = np.append(batches[-1], tail[rank])
    return batches


def num_rank_batches(num_rows, batch_size, world_size=1):
    """Batches per rank of :func:`rank_batches`."""
    full, R = divmod(int(num_rows), int(batch_size) * int(world_size))
    return full + (1 if R >= int(world_size) else 0)


def shard_rows(rows, rank=0, world_size=1):
    """Evaluation shard of rank `rank`: rows rank, rank + W, ... of `rows`, padded by wrapping around to a multiple
    of W so every rank gets the same number of rows (and batches); the padding duplicates are dropped by `idx`
    when the predictions are gathered."""
    rows = np.asarray(rows, dtype=np.int64)
    W = int(world_size)
    if W == 1 or len(rows) == 0:
        return rows
    return np.resize(rows, math.ceil(len(rows) / W) * W)[rank::W]


class EpochPermutation(Sampler):
    """The global training order of an epoch: a permutation of n rows seeded by (seed, epoch), the same on every
    rank. Lightning calls `set_epoch` at every epoch start (on the batch sampler's `sampler`), so a resumed run
    replays the uninterrupted run's order."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


class RankBatchSampler(Sampler):
    """Training batches of one DDP rank (see :func:`rank_batches`) from the global order given by `sampler` (an
    index sampler with `set_epoch`, identical on every rank: :class:`EpochPermutation`, or the text datamodule's
    length-grouped order)."""

    def __init__(self, sampler, batch_size, rank=0, world_size=1):
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if len(sampler) < self.world_size:
            raise ConfigError("hardware.devices", f"{len(sampler)} training points cannot be split over "
                                                  f"{self.world_size} processes")

    def __len__(self):
        return num_rank_batches(len(self.sampler), self.batch_size, self.world_size)

    def __iter__(self):
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        for b in rank_batches(order, self.batch_size, self.rank, self.world_size):
            yield b.tolist()


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

    def rank_and_world(self):
        """(global rank, world size) of this process: from the trainer when attached, else (0, 1)."""
        t = getattr(self, "trainer", None)
        return (int(t.global_rank), int(t.world_size)) if t is not None else (0, 1)

    def train_order(self):
        """Index sampler of the epoch's global training order (identical on every rank; it has `set_epoch`)."""
        return EpochPermutation(self.splits["train"][0].shape[0], self.seed)

    def eval_order(self, split):
        """Rows of an evaluation split in the order they are batched (before sharding)."""
        return np.arange(self.splits[split][0].shape[0])

    def _dataloader(self, split, **kwargs):
        nw = int(self.cfg.num_workers)
        return DataLoader(_Rows(self.splits[split][0].shape[0]), collate_fn=self.collate(split), num_workers=nw,
                          persistent_workers=nw > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self):
        rank, world = self.rank_and_world()
        bs = self.train_batch_sampler
        if bs is None:
            bs = RankBatchSampler(self.train_order(), int(self.cfg.batch_size), rank, world)
        elif hasattr(bs, "set_distributed"):  # a method's own rank-aware batch sampler (NGAME's clusters)
            bs.set_distributed(rank, world)
        return self._dataloader("train", batch_sampler=bs)

    def _eval_loader(self, split):
        rank, world = self.rank_and_world()
        rows = shard_rows(self.eval_order(split), rank, world)
        return self._dataloader(split, batch_size=int(self.cfg.batch_size), sampler=rows.tolist(), drop_last=False)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

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
