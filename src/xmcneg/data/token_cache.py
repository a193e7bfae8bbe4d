"""Ragged token rows and their on-disk cache (``.npz`` entries and word vocabularies, written atomically, checked
when read; an entry that fails a check is rebuilt)."""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import torch

from xmcneg.data.formats import atomic_file, load_npz

log = logging.getLogger("xmcneg")


class TokenRows:
    """Ragged rows of token ids: ``ids`` (flat int32) and ``indptr`` (int64, N + 1). ``rows[idx]`` gives a
    TokenRows of those rows; ``shape`` = (N, longest row)."""

    def __init__(self, ids, indptr):
        self.ids = np.ascontiguousarray(ids, dtype=np.int32)
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        self.lengths = np.diff(self.indptr)

    @property
    def shape(self):
        return (len(self.lengths), int(self.lengths.max()) if len(self.lengths) else 0)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, rows):
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        indptr = np.concatenate(([0], np.cumsum(lens)))
        src = np.repeat(self.indptr[:-1][rows] - indptr[:-1], lens) + np.arange(indptr[-1])
        return TokenRows(self.ids[src], indptr)

    def padded(self, rows, pad_id=0):
        """``{"input_ids", "attention_mask"}`` (B, L) LongTensors, L = the longest of these rows (>= 1)."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        L = max(int(lens.max()) if len(lens) else 0, 1)
        pos = np.arange(L)
        mask = pos[None, :] < lens[:, None]
        at = np.minimum(self.indptr[:-1][rows][:, None] + pos[None, :], max(len(self.ids) - 1, 0))
        ids = np.where(mask, self.ids[at] if len(self.ids) else pad_id, pad_id).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}

    @classmethod
    def from_lists(cls, seqs):
        """TokenRows of a list of id lists."""
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        indptr = np.concatenate(([0], np.cumsum(lens)))
        ids = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(indptr[-1]))
        return cls(ids, indptr)


# ------------------------------------------------------------------------------------------------ files
_SHA_MEMO: dict = {}


def file_sha1(path) -> str:
    """sha1 of the file's bytes (memoised by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha1()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def load_token_rows(path, num_rows=None, vocab_size=None):
    """Cached :class:`TokenRows`, or None when the entry is missing or not a consistent set of rows (integer
    ids in [0, vocab_size), row pointers from 0 to the number of ids, never decreasing, ``num_rows`` rows)."""
    z = load_npz(path, ("ids", "indptr"))
    if z is None:
        return None
    ids, ptr = z["ids"], z["indptr"]
    ok = (ids.ndim == 1 and ptr.ndim == 1 and ids.dtype.kind in "iu" and ptr.dtype.kind in "iu" and len(ptr) >= 1
          and ptr[0] == 0 and ptr[-1] == len(ids) and not np.any(np.diff(ptr) < 0)
          and (num_rows is None or len(ptr) - 1 == num_rows)
          and not (len(ids) and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size))))
    return TokenRows(ids, ptr) if ok else None


_VOCAB_WORD = re.compile(r"\w+(?:['-]\w+)*\Z")


def load_vocab(path):
    """A cached word vocabulary (one word per line), or None when missing or not a list of distinct words."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    vocab = text.split("\n") if text else []
    if len(set(vocab)) != len(vocab) or not all(_VOCAB_WORD.match(w) for w in vocab):
        return None
    return vocab


def save_vocab(path, vocab):
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write("\n".join(vocab))
    except OSError as e:
        log.warning("could not write vocabulary cache %s: %s", path, e)


class TextSource:
    """One split's text: the file it comes from (its content keys the cache) and how to read it (memoised)."""

    def __init__(self, name, path, read, variant=""):
        self.name, self.path, self._read, self.variant = name, Path(path), read, variant
        self._texts = None

    @property
    def key(self):
        """The file's content and how it is decoded (gzip or not, which fields)."""
        return file_sha1(self.path) + ("-gz" if self.path.name.endswith(".gz") else "") + self.variant

    def texts(self):
        if self._texts is None:
            self._texts = self._read()
        return self._texts

    def release(self):
        self._texts = None
