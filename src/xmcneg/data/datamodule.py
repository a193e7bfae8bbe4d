"""The LightningDataModule of every dataset: splits (validation carved from train, seeded), batches
``{"x": encoder inputs, "pos": (B, P) label ids padded with -1, "idx": (B,) split rows}``, and its own DDP sharding
(the Trainer runs with use_distributed_sampler=False): disjoint training batches with the same count on every rank
(:func:`rank_batches`), evaluation rows dealt round-robin (:func:`shard_rows`)."""
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from xmcneg.data import formats, synthetic
from xmcneg.data.inputs import FeatureTransform, csr_rows_to_bag, make_inputs  # noqa: F401 (re-exported)
from xmcneg.data.lf_json import read_filter_pairs
from xmcneg.data.token_cache import TokenRows
from xmcneg.errors import ConfigError


# ------------------------------------------------------------------------------------------------ sharding
def rank_batches(order, batch_size, rank=0, world_size=1):
    """Rank `rank`'s batches of one epoch, cut from `order` (the epoch's global row order, the same on every rank):
    at each step of batch_size x world_size rows rank r takes the r-th block of batch_size rows. A tail of
    R >= world_size rows is split into world_size near-equal parts, one more batch per rank; 0 < R < world_size
    rows go one each to the last batches of ranks 0 .. R-1. So the ranks' batches are disjoint, hold every row once,
    and every rank gets `num_rank_batches` of them, none empty. Fewer rows than ranks: ValueError."""
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
    """Evaluation shard of rank `rank`: rows rank, rank + W, ... of `rows`, padded by wrapping around so every rank
    gets as many rows (the duplicates are dropped by `idx` when the predictions are gathered)."""
    rows, W = np.asarray(rows, dtype=np.int64), int(world_size)
    return np.resize(rows, math.ceil(len(rows) / W) * W)[rank::W]


class EpochPermutation(Sampler):
    """The epoch's global training order: a permutation of n rows seeded by (seed, epoch), the same on every rank;
    Lightning calls `set_epoch` at every epoch start, so a resumed run replays the uninterrupted run's order."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


class RankBatchSampler(Sampler):
    """Training batches of one DDP rank (:func:`rank_batches`) from the global order of `sampler`
    (:class:`EpochPermutation` or :class:`LengthGroupedSampler`)."""

    def __init__(self, sampler, batch_size, rank=0, world_size=1):
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        if len(sampler) < self.world_size:
            raise ConfigError("hardware.devices", f"{len(sampler)} training points cannot be split over "
                                                  f"{self.world_size} processes")

    def __len__(self):
        return num_rank_batches(len(self.sampler), self.batch_size, self.world_size)

    def __iter__(self):
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        for b in rank_batches(order, self.batch_size, self.rank, self.world_size):
            yield b.tolist()


class LengthGroupedSampler(EpochPermutation):
    """Training order with little padding: each epoch, shuffle all rows, sort windows of ``window x batch_size``
    rows by length, cut them into batches and shuffle the batches (:class:`RankBatchSampler` takes consecutive
    ``batch_size`` indices as one batch). The epoch advances on every pass (or via ``set_epoch``)."""

    def __init__(self, lengths, batch_size, window=50, seed=0):
        super().__init__(len(lengths), seed)
        self.lengths = np.asarray(lengths)
        self.batch_size, self.window = int(batch_size), int(window)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        perm = rng.permutation(len(self.lengths))
        w = self.window * self.batch_size
        chunks = [perm[i: i + w] for i in range(0, len(perm), w)]
        order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]) if chunks else perm
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        rng.shuffle(batches)  # full batches in random order; a short one stays last (batch boundaries kept)
        if last is not None:
            batches.append(last)
        return iter(np.concatenate(batches).tolist() if batches else [])


class XCDataModule(pl.LightningDataModule):
    """Splits, batches and the hooks methods use (``label_inputs``, ``text_inputs``, ``filter_pairs``,
    ``encoder_kwargs``); ``encoder_cfg`` says which inputs to build (:func:`xmcneg.data.inputs.make_inputs`)."""

    _FILTER_FILES = {"filter_test_file": "filter_labels_test.txt", "filter_train_file": "filter_labels_train.txt"}

    def __init__(self, dataset_cfg, data_cfg, paths_cfg, encoder_cfg=None, seed: int = 0):
        super().__init__()
        self.dcfg, self.cfg, self.paths, self.seed = dataset_cfg, data_cfg, paths_cfg, seed
        self.name = dataset_cfg.name
        self._loaded = False
        self.train_batch_sampler = None  # a method may install its own (e.g. NGAME's clustered batches)
        if int(data_cfg.batch_size) <= 0:
            raise ConfigError("data.batch_size", f"must be > 0, got {data_cfg.batch_size}")
        self.inputs = make_inputs(dataset_cfg, paths_cfg, encoder_cfg)
        self.reads_text = self.inputs.reads_text
        self._label_X, self._filters = None, {}

    # ---------------------------------------------------------------- loading
    def dataset_dir(self) -> Path:
        if self.dcfg["format"] == "synthetic":  # generation parameters: the keys of synthetic.generate
            return Path(synthetic.ensure(self.dcfg, Path(self.paths.cache_dir) / "synthetic"))
        d = Path(self.dcfg.dir)
        self.inputs.check_dir(self.name, d)
        return d

    def prepare_data(self):
        self.dataset_dir()  # generates synthetic data once (rank 0 under DDP)

    def setup(self, stage=None):
        if self._loaded:
            return
        Xtr, Ytr, Xte, Yte = self.inputs.load(self.dataset_dir())
        self.num_features = self.inputs.num_features
        self.label_text_path = self.inputs.label_text_path
        self.transform = self.inputs.transform  # the BoW feature transform fitted on train (for new BoW inputs)
        self.tokenizer = getattr(self.inputs, "tokenizer", None)
        self.token_cache = getattr(self.inputs, "token_cache", {})  # text inputs: {"train": "hit" | "miss", ...}
        self._set_splits(Xtr, Ytr, Xte, Yte)
        self._loaded = True

    def _set_splits(self, Xtr, Ytr, Xte, Yte):
        """Carve the seeded validation split out of train (`data.val_size`: a fraction is raised to
        `data.val_min_docs`, at most a tenth of train; at most `data.val_max_docs` scored) and set `splits`,
        `num_labels`, `full_train_Y`, `train_label_counts`, `train_rows` / `val_rows` (rows of the training file)."""
        self.num_labels = Ytr.shape[1]
        self.full_train_Y = Ytr
        n = Xtr.shape[0]
        vs = float(self.cfg.val_size)
        n_val = int(round(vs * n)) if vs < 1 else int(vs)
        if 0 < vs < 1:  # a fraction: raised to data.val_min_docs, at most a tenth of train
            n_val = max(n_val, min(int(self.cfg.get("val_min_docs") or 0), n // 10))
        if not 0 <= n_val < n:
            raise ConfigError("data.val_size", f"gives {n_val} validation points out of {n} training points")
        perm = np.random.default_rng(self.seed).permutation(n)
        val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_rows = val_rows[: int(self.cfg.val_max_docs)]
        cap = self.cfg["max_train_docs"]
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
        both; NGAME)."""
        if self._label_X is None:
            self._label_X = self.inputs.label_rows(self)
        return self.inputs.x(self._label_X, np.asarray(label_ids, dtype=np.int64))

    def text_inputs(self, texts):
        """Encoder inputs for new texts, one batch; a ConfigError for a model that reads XC BoW features."""
        return self.inputs.text_inputs(texts)

    def encoder_kwargs(self) -> dict:
        """What the encoder needs from the data (the vocabulary size; nothing for a pretrained tokenizer)."""
        return self.inputs.encoder_kwargs()

    def filter_pairs(self, split, idx=None):
        """(doc, label) pairs to drop from ``split``'s predictions before scoring, int64 (M, 2), or None when
        the dataset has none (test: ``dataset.filter_test_file``; val: the rows of ``dataset.filter_train_file``
        in the validation split). Doc ids are rows of the split, or with ``idx`` (the evaluated rows, in order)
        positions in ``idx``, ready for :func:`xmcneg.eval.metrics.filter_predictions`."""
        if split not in self._filters:
            self._filters[split] = self._read_filter(split)
        pairs = self._filters[split]
        if pairs is None or idx is None:
            return pairs
        return _rows_to_positions(pairs, idx, self.splits[split][1].shape[0])

    def _read_filter(self, split):  # split: "val" or "test"
        key = "filter_test_file" if split == "test" else "filter_train_file"
        p = formats.resolve_path(self.dataset_dir() / (self.dcfg.get(key) or self._FILTER_FILES[key]), required=False)
        if p is None:
            return None
        if split == "test":
            return read_filter_pairs(p, self.splits["test"][1].shape[0], self.num_labels)
        pairs = read_filter_pairs(p, self.full_train_Y.shape[0], self.num_labels)
        return _rows_to_positions(pairs, self.val_rows, self.full_train_Y.shape[0])

    # ---------------------------------------------------------------- batches
    def split(self, name):
        return self.splits[name]

    def collate(self, split):
        X, Y = self.splits[split]
        x, labels = self.inputs.x, TokenRows(Y.indices, Y.indptr)

        def fn(rows):
            rows = np.asarray(rows, dtype=np.int64)
            return {"x": x(X, rows), "pos": labels.padded(rows, pad_id=-1)["input_ids"], "idx": torch.from_numpy(rows)}

        return fn

    def rank_and_world(self):
        """(global rank, world size) of this process: from the trainer when attached, else (0, 1)."""
        t = getattr(self, "trainer", None)
        return (int(t.global_rank), int(t.world_size)) if t is not None else (0, 1)

    def train_order(self):
        """The epoch's global training order: :class:`LengthGroupedSampler` for token inputs with
        `encoder.text.sort_window` > 0, otherwise :class:`EpochPermutation`."""
        X = self.splits["train"][0]
        lengths = self.inputs.lengths(X)
        window = int(self.inputs.text_key("sort_window")) if lengths is not None else 0
        if window > 0:
            return LengthGroupedSampler(lengths, int(self.cfg.batch_size), window=window, seed=self.seed)
        return EpochPermutation(X.shape[0], self.seed)

    def eval_order(self, split):
        """Rows of an evaluation split in batch order (before sharding); token inputs sorted by length (less
        padding; the evaluation reads each batch's `idx`)."""
        lengths = self.inputs.lengths(self.splits[split][0])
        return np.arange(self.splits[split][0].shape[0]) if lengths is None else np.argsort(-lengths, kind="stable")

    def _dataloader(self, split, **kwargs):
        nw = int(self.cfg.num_workers)
        return DataLoader(range(self.splits[split][0].shape[0]), collate_fn=self.collate(split), num_workers=nw,
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


def _rows_to_positions(pairs, idx, n_rows):
    """(row, label) pairs -> (position of row in idx, label), dropping rows not in idx."""
    idx = np.asarray(idx, dtype=np.int64)
    pos = np.full(n_rows, -1, dtype=np.int64)
    pos[idx] = np.arange(len(idx))
    mapped = np.stack([pos[pairs[:, 0]], pairs[:, 1]], axis=1) if len(pairs) else pairs
    return mapped[mapped[:, 0] >= 0] if len(mapped) else mapped


def build_datamodule(cfg):
    """The datamodule for cfg.dataset + cfg.encoder (the encoder decides which inputs it builds)."""
    return XCDataModule(cfg.dataset, cfg.data, cfg.paths, cfg.get("encoder") or {}, seed=int(cfg.seed))
