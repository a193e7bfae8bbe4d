"""Readers of the XC Repository's LF layout with file:line errors: json(.gz) files of one object per non-blank line
(``title``, optional ``content``, ``target_ind`` label ids; text = title [+ content], whitespace collapsed) and
filter files (``doc_id label_id`` per line)."""
from __future__ import annotations

import json

import numpy as np
import scipy.sparse as sp

from xmcneg.data.formats import decode_line, iter_lines
from xmcneg.errors import DataFormatError

LF_FILES = ("trn.json.gz", "tst.json.gz", "lbl.json.gz")


def _show(v, limit=60) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def _objects(path):
    """Yield (line number, JSON object) for each non-blank line."""
    for k, raw in iter_lines(path):
        if not raw.strip():
            continue
        text = decode_line(path, k, raw)
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise DataFormatError(path, k, f"not a JSON object: {str(e)[:200]}") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, k, f"expected a JSON object {{\"title\": ..., \"target_ind\": [...]}}, got "
                                           f"{_show(obj)}")
        yield k, obj


def _text(path, k, obj, use_content):
    title = obj.get("title")
    if not isinstance(title, str):
        raise DataFormatError(path, k, "missing key 'title'" if title is None else
                              f"'title' must be a string, got {_show(title)}")
    text = title
    if use_content:
        content = obj.get("content")
        if content is not None and not isinstance(content, str):
            raise DataFormatError(path, k, f"'content' must be a string, got {_show(content)}")
        if content:
            text = f"{text} {content}"
    return " ".join(text.split())


def _label_ids(path, k, obj, num_labels):
    tgt = obj.get("target_ind")
    if tgt is None:
        raise DataFormatError(path, k, "missing key 'target_ind'")
    if not isinstance(tgt, list):
        raise DataFormatError(path, k, f"'target_ind' must be a list of integer label ids, got {_show(tgt)}")
    for t in tgt:
        if type(t) is not int:  # noqa: E721  (bool is an int subclass, and not a label id)
            raise DataFormatError(path, k, f"label id {_show(t)} in 'target_ind' is not an integer")
        if t < 0 or (num_labels is not None and t >= num_labels):
            raise DataFormatError(path, k, f"label id {t} out of range (num_labels={num_labels}, the number of "
                                           f"lines of lbl.json.gz)")
    return tgt


def read_lf_json(path, num_labels=None, use_content=False, want_labels=True):
    """Parse an LF json(.gz) file -> (texts, float32 CSR Y (N, num_labels) or None)."""
    texts, counts, labels = [], [], []
    for k, obj in _objects(path):
        texts.append(_text(path, k, obj, use_content))
        if want_labels:
            ids = _label_ids(path, k, obj, num_labels)
            counts.append(len(ids))
            labels.extend(ids)
    Y = None
    if want_labels:
        indptr = np.cumsum([0] + counts, dtype=np.int64)
        Y = sp.csr_matrix((np.ones(len(labels), np.float32), np.asarray(labels, np.int64), indptr),
                          shape=(len(counts), int(num_labels)))
        Y.sum_duplicates()
        Y.data[:] = 1.0
    return texts, Y


def count_lines(path) -> int:
    """Number of non-blank lines."""
    return sum(1 for _, raw in iter_lines(path) if raw.strip())


def read_filter_pairs(path, num_docs, num_labels) -> np.ndarray:
    """``doc_id label_id`` per line (whitespace separated) -> int64 (M, 2); bad lines raise DataFormatError."""
    pairs = []
    for k, line in iter_lines(path):
        t = line.split()
        if not t:
            continue
        if len(t) != 2 or not all(x.isdigit() for x in t):
            raise DataFormatError(path, k, f"expected 'doc_id label_id' (two non-negative integers), got "
                                           f"{line[:60].decode('utf-8', 'replace')!r}")
        d, lab = int(t[0]), int(t[1])
        if d >= num_docs:
            raise DataFormatError(path, k, f"document id {d} out of range ({num_docs} documents)")
        if lab >= num_labels:
            raise DataFormatError(path, k, f"label id {lab} out of range (num_labels={num_labels})")
        pairs.append((d, lab))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)
