"""Label texts (line i of ``dataset.label_text_file``) in the documents' BoW feature space, so one BoW encoder
embeds documents and labels (NGAME): through ``dataset.vocab_file`` (``term<TAB>train df``, line i = feature i) with
idf log(N_train / df), or, without one (synthetic data), token ``w{i}`` = feature i with the generator's idf.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmcneg.data import formats
from xmcneg.data.tfidf import smooth_idf, tfidf_l2
from xmcneg.errors import ConfigError, DataFormatError, MissingFileError

log = logging.getLogger("xmcneg")

TOKEN_ALPHA = r"[a-z][a-z-]*[a-z]"                 # EURLEX57K's BoW
TOKEN_ALNUM = r"[a-z0-9]+(?:['-][a-z0-9]+)*"       # CookingStackExchange's BoW
_SYNTH = re.compile(r"w(\d+)\Z")


def _cfg_get(dm, key, default=None):
    v = (getattr(dm, "dcfg", None) or {}).get(key)
    return default if v is None else v


def label_text_file(dm) -> Path:
    """The resolved label-text path, or a one-line error saying what is missing."""
    path = getattr(dm, "label_text_path", None)
    if path is not None:
        return Path(path)
    name = _cfg_get(dm, "label_text_file")
    ds = getattr(dm, "name", "?")
    if not name:
        raise ConfigError("dataset.label_text_file",
                          f"dataset '{ds}' has no label texts; NGAME embeds label texts: set it to the file with "
                          "one text per label (e.g. lbl_X.txt, or Y.txt for CookingStackExchange)")
    raise MissingFileError(f"dataset '{ds}': label-text file {Path(dm.dataset_dir()) / name} not found "
                           "(NGAME needs one text per label; set dataset.label_text_file)")


def read_label_texts(path, num_labels) -> list[str]:
    texts = formats.read_lines(path, expected=num_labels)
    if texts and all("\t" in t for t in texts if t):
        texts = [t.split("\t", 1)[1] if "\t" in t else t for t in texts]
    return texts


def read_vocab(path, num_features):
    """(term -> feature id, df array) from `term<TAB>df` lines (line i = feature i; a missing df counts as 1; a
    repeated term keeps its first id); df must be a finite number >= 0."""
    lines = formats.read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != num_features:
        raise DataFormatError(path, max(len(lines), 1), f"has {len(lines)} terms, the documents have "
                                                        f"{num_features} features (line i must be feature i)")
    vocab, df = {}, np.zeros(num_features, dtype=np.float64)
    for i, ln in enumerate(lines):
        parts = ln.split("\t")
        try:
            df[i] = float(parts[1]) if len(parts) == 2 else 1.0 if len(parts) == 1 else np.nan
        except ValueError:
            df[i] = np.nan
        if not (np.isfinite(df[i]) and df[i] >= 0):
            raise DataFormatError(path, i + 1, f"expected 'term<TAB>document frequency' (a number >= 0), got "
                                               f"{ln[:60]!r}")
        vocab.setdefault(parts[0].strip(), i)
    return vocab, df


def tokenize(text, pattern, vocab):
    """Feature ids of the in-vocabulary tokens of `text` (hyphenated out-of-vocabulary tokens -> their parts)."""
    out = []
    for m in re.finditer(pattern, text.lower()):
        tok = m.group(0)
        j = vocab.get(tok)
        if j is not None:
            out.append(j)
        elif "-" in tok or "'" in tok:
            out.extend(vocab[p] for p in re.split(r"['-]", tok) if p in vocab)
    return out


def _weighted_rows(rows, idf, num_features):
    """CSR of (1 + log tf) * idf per row, L2-normalised; rows = list of feature-id lists."""
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    cols = np.fromiter((j for r in rows for j in r), dtype=np.int64, count=int(lens.sum()))
    rid = np.repeat(np.arange(len(rows)), lens)
    tf = sp.csr_matrix((np.ones(len(cols), dtype=np.float64), (rid, cols)), shape=(len(rows), num_features))
    tf.sum_duplicates()
    X = tfidf_l2(tf, idf, log_tf=True, dtype=np.float64)
    X.eliminate_zeros()
    X.sort_indices()
    return X


def bow_label_features(dm) -> sp.csr_matrix:
    """(C, F) float32 CSR: label i's text in the documents' feature space, after `dm.transform`."""
    path = label_text_file(dm)
    C, F = int(dm.num_labels), int(dm.num_features)
    texts = read_label_texts(path, C)
    vocab_file = Path(dm.dataset_dir()) / _cfg_get(dm, "vocab_file", "vocab.txt")
    vocab_path = formats.resolve_path(vocab_file, required=False)
    if vocab_path is not None:
        vocab, df = read_vocab(vocab_path, F)
        pattern = _cfg_get(dm, "label_token_pattern") or (
            TOKEN_ALNUM if any(re.search(r"[0-9']", t) for t in vocab) else TOKEN_ALPHA)
        rows = [tokenize(t, pattern, vocab) for t in texts]
        idf = np.log(max(dm.full_train_Y.shape[0], 1) / np.maximum(df, 1.0))
    else:
        rows = []
        for i, t in enumerate(texts):
            ids = []
            for tok in t.split():
                m = _SYNTH.match(tok)
                if m is None or int(m.group(1)) >= F:
                    raise MissingFileError(
                        f"{path}:{i + 1}: token '{tok[:30]}' is not a feature id w<i> (i < {F}); real label texts "
                        f"need the vocabulary {vocab_file} (term<TAB>df, line i = feature i), or set "
                        "dataset.vocab_file")
                ids.append(int(m.group(1)))
            rows.append(ids)
        # document frequencies over the train file's rows (the train and validation splits)
        df = sum(np.bincount(dm.split(s)[0].indices, minlength=F)[:F] for s in ("train", "val"))
        idf = smooth_idf(df.astype(np.float64), dm.full_train_Y.shape[0])
    X = _weighted_rows(rows, idf, F)
    empty = int((np.diff(X.indptr) == 0).sum())
    if empty:
        log.warning("label texts: %d of %d labels have no in-vocabulary token (empty feature rows)", empty, C)
    return dm.transform(X)
