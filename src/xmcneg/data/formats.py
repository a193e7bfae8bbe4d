"""Strict readers and writers of the XC formats: BoW (``train.txt``: header ``N F C``, lines ``l1,l2 f:v ...``),
XY (``trn_X_Y.txt``: header ``N C``, lines ``label[:value] ...``) and one text per line; ``.gz`` by the name's suffix.
Malformed input raises :class:`DataFormatError` at its 1-based line (header = line 1). Kept, not errors: repeated
labels (once; in XY the largest value), empty rows, trailing blank lines, ``\\r\\n``, a UTF-8 BOM. BoW/XY parse 16 MB
blocks vectorised; a block that fails a check is re-parsed line by line to name its first bad line.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import logging
import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmcneg.errors import DataFormatError, MissingFileError

log = logging.getLogger("xmcneg")

_BLOCK_BYTES = 1 << 24
MAX_LINE_BYTES = 1 << 26  # 64 MiB: a longer line is an error (a missing newline, or not a text file)
_GZIP_MAGIC = b"\x1f\x8b"
MAX_COUNT = 2 ** 31 - 1  # largest num_points / num_features / num_labels a header may give (int32 ids)
_INT_RE = re.compile(r"[0-9]+\Z")


class _BlockError(Exception):
    """Internal: the vectorised parse of a block failed; re-parse it line by line."""


# ----------------------------------------------------------------------------------------------- opening files
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _gzip_error(path, e) -> DataFormatError:
    """The DataFormatError naming the file for one of ``_GZIP_ERRORS``."""
    if isinstance(e, EOFError):
        return DataFormatError(path, None, "gzip data cut short (the compressed stream ends before its end marker: "
                                           "an incomplete copy or download?)")
    if "Not a gzipped file" in str(e):
        return DataFormatError(path, None, f"not gzip data although the file name ends in .gz ({e})")
    return DataFormatError(path, None, f"corrupt gzip data ({e})")


def open_text(path, mode="rt"):
    """Open a plain or ``.gz`` file for reading (``rt``, ``rb``) or writing UTF-8 text (``wt``, ``at``, ``xt``;
    ``\\n`` newlines; gzip without name or time stamp, so same content, same bytes). A plain file that holds gzip
    data raises :class:`DataFormatError`."""
    gz = str(path).endswith(".gz")
    if any(c in mode for c in "wax"):
        if not gz:
            return open(path, mode, encoding="utf-8", newline="\n")
        raw = open(path, mode.replace("t", "") + "b")
        f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
        f.myfileobj = raw  # closed together with the gzip stream
        return io.TextIOWrapper(f, encoding="utf-8", newline="\n")
    f = gzip.GzipFile(path, "rb") if gz else open(path, "rb")
    if not gz and f.peek(2)[:2] == _GZIP_MAGIC:
        f.close()
        raise DataFormatError(path, 1, "gzip-compressed data, but the file name does not end in .gz (rename it "
                                       "to end in .gz, or decompress it)")
    return f if "b" in mode else io.TextIOWrapper(f, encoding="utf-8", newline=None)


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """A file to write ``path`` through (``w``: UTF-8 text, ``wb``): a temporary file next to it, fsynced and renamed
    onto ``path`` when the block ends, removed when the block raises; a reader never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def iter_lines(path):
    """Yield ``(line number, line)`` for each line of a plain or ``.gz`` file: bytes without the ``\\n`` and a
    trailing ``\\r``. A line longer than :data:`MAX_LINE_BYTES` raises :class:`DataFormatError`."""
    with open_text(path, "rb") as f:
        k = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except _GZIP_ERRORS as e:
                raise _gzip_error(path, e) from None
            if not raw:
                return
            k += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > MAX_LINE_BYTES:
                raise DataFormatError(path, k, f"line longer than {MAX_LINE_BYTES} bytes (not a text file of "
                                               f"this format?)")
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            yield k, raw


def resolve_path(path, required=True) -> Path | None:
    """``path`` if it exists, else ``path.gz`` if that exists, else :class:`MissingFileError` (None when not
    ``required``)."""
    for p in (Path(path), Path(f"{path}.gz")):
        if p.exists():
            return p
    if not required:
        return None
    raise MissingFileError(f"{path}: file not found (put it there, or set XMC_DATA_DIR / dataset.dir)")


def _iter_blocks(path):
    """Yield lists of raw lines (bytes, without ``\\n``, trailing ``\\r`` stripped), ~16 MB at a time."""
    with open_text(path, "rb") as f:
        carry = b""
        lines_done = 0
        while True:
            try:
                block = f.read(_BLOCK_BYTES)
            except _GZIP_ERRORS as e:
                raise _gzip_error(path, e) from None
            if not block:
                break
            block = carry + block if carry else block
            cut = block.rfind(b"\n")
            if cut < 0:
                carry = block
                if len(carry) > MAX_LINE_BYTES:
                    raise DataFormatError(path, lines_done + 1, f"line longer than {MAX_LINE_BYTES} bytes (not a "
                                                                f"text file of this format?)")
                continue
            carry = block[cut + 1:]
            lines = block[:cut].split(b"\n")
            if b"\r" in block:
                lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
            lines_done += len(lines)
            yield lines
        if carry:
            yield [carry[:-1] if carry.endswith(b"\r") else carry]


def decode_line(path, lineno, raw: bytes) -> str:
    """``raw`` as UTF-8 text; :class:`DataFormatError` at ``path:lineno`` when it is not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, lineno, f"not valid UTF-8 text ({e.reason} at byte {e.start})") from None


def _txt(b: bytes, limit=60) -> str:
    s = b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b)
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _read_header(path, blocks, names):
    """Parse the header line: ``len(names)`` integers. Returns (values, first block's remaining lines)."""
    first = []
    for first in blocks:
        if first:
            break
    if not first:
        raise DataFormatError(path, 1, f"empty file: expected a header '{' '.join(names)}'")
    line = first[0].removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM
    toks = line.split()
    want = f"expected '{' '.join(names)}' ({len(names)} integers)"
    if len(toks) != len(names) or not all(_INT_RE.match(t.decode("latin-1")) for t in toks):
        raise DataFormatError(path, 1, f"bad header {_txt(line)}: {want}")
    vals = [int(t) for t in toks]
    for name, v in zip(names, vals):
        if v < 1 and name != "num_points":
            raise DataFormatError(path, 1, f"bad header {_txt(line)}: {name} must be >= 1, got {v}")
        if v > MAX_COUNT:
            raise DataFormatError(path, 1, f"bad header {_txt(line)}: {name}={v} is beyond {MAX_COUNT}")
    return vals, first[1:]


def _check_given(path, name, given, header):
    if given is not None and int(given) != header:
        raise DataFormatError(path, 1, f"header says {name}={header} but {int(given)} was expected "
                                       f"(it must match the training split / config)")


def _iter_data(path, blocks, rest, n_points):
    """Yield (first_lineno, lines) for the ``n_points`` data lines; checks the line count."""
    seen = 0
    lineno = 2  # line number of the next data line
    for lines in itertools.chain([rest], blocks):
        if not lines:
            continue
        take = lines
        if seen + len(lines) > n_points:
            keep = n_points - seen
            take = lines[:keep]
            for j, extra in enumerate(lines[keep:]):
                if extra.strip():
                    raise DataFormatError(
                        path, lineno + keep + j,
                        f"more data lines than the header's num_points={n_points} (line is {_txt(extra)})")
        if take:
            yield lineno, take
            seen += len(take)
        lineno += len(lines)
    if seen < n_points:
        last = seen + 1  # the header plus the data lines present
        raise DataFormatError(path, last, f"file ends after {seen} data lines, but the header says "
                                          f"num_points={n_points} (truncated file?)")


def _read_blocks(path, given, parse_block):
    """(header counts after num_points, each checked against ``given``; ``parse_block`` of each data block)."""
    path = resolve_path(path)
    blocks = _iter_blocks(path)
    (N, *counts), rest = _read_header(path, blocks, ("num_points", *given))
    for (name, want), v in zip(given.items(), counts):
        _check_given(path, name, want, v)
    return counts, [parse_block(path, lineno, lines, *counts) for lineno, lines in _iter_data(path, blocks, rest, N)]


# ------------------------------------------------------------------------------------------- vectorised helpers
def _fromstring(s: bytes, dtype, sep: str) -> np.ndarray:
    """``np.fromstring``; _BlockError where it fails or warns (a token it cannot parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return np.fromstring(s, dtype=dtype, sep=sep)
    except (ValueError, DeprecationWarning):
        raise _BlockError from None


def _fast_ints(joined: bytes, count: int, sep: bytes) -> np.ndarray:
    """Parse ``count`` non-negative ints separated by single ``sep`` bytes; _BlockError if not exactly that."""
    b = np.frombuffer(joined, dtype=np.uint8)
    if not np.all(((b >= 48) & (b <= 57)) | (b == sep[0])):
        raise _BlockError
    out = _fromstring(joined, np.int64, sep.decode())
    if len(out) != count:
        raise _BlockError
    return out


def _fast_pairs(s: bytes, T: int) -> tuple[np.ndarray, np.ndarray]:
    """``s`` = ``T`` tokens ``b'i:v'`` separated by runs of spaces -> (int64 indices, float32 values); _BlockError
    unless every token is a non-negative decimal integer, one ``:``, and a number finite in float32."""
    s = s.strip(b" ")
    if T == 0:
        if s:
            raise _BlockError
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    b = np.frombuffer(s, dtype=np.uint8)
    spc = b == 32
    sepm = b == 58
    sepm[1:] |= spc[1:] & ~spc[:-1]  # first space of each run of spaces
    seps = b[sepm]
    if len(seps) != 2 * T - 1 or not (np.all(seps[0::2] == 58) and np.all(seps[1::2] == 32)):
        raise _BlockError
    seg = np.cumsum(sepm, dtype=np.int32)
    ib = b[~sepm & ~spc & ((seg & 1) == 0)]
    if not np.all((ib >= 48) & (ib <= 57)):
        raise _BlockError
    nums = _fromstring(s.replace(b":", b" "), np.float64, " ")
    if len(nums) != 2 * T:
        raise _BlockError
    idx = nums[0::2]
    if np.any(idx > 2 ** 53):
        raise _BlockError
    with np.errstate(over="ignore", invalid="ignore"):
        vals = nums[1::2].astype(np.float32)
    if not np.all(np.isfinite(vals)):
        raise _BlockError
    return idx.astype(np.int64), vals


def _csr(counts, indices, data, ncols) -> sp.csr_matrix:
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    itype = np.int32 if max(indptr[-1], ncols) < 2 ** 31 else np.int64
    M = sp.csr_matrix((np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=itype),
                       indptr.astype(itype)), shape=(len(counts), ncols))
    M.sort_indices()
    return M


def _has_dups(M: sp.csr_matrix) -> bool:
    """Whether a row (indices sorted) repeats a column index."""
    row_start = np.zeros(M.nnz + 1, dtype=bool)
    row_start[M.indptr] = True
    return bool(np.any((M.indices[1:] == M.indices[:-1]) & ~row_start[1:-1]))


def _dedupe(M: sp.csr_matrix, binary: bool) -> sp.csr_matrix:
    """Drop repeated column indices within rows (sorted); keeps the max value (or 1.0 when binary)."""
    if not _has_dups(M):
        if binary:
            M.data[:] = 1.0
        return M
    C = sp.coo_matrix(M)
    key = C.row.astype(np.int64) * M.shape[1] + C.col
    order = np.lexsort((-C.data, key))  # by key, largest value first
    key_s = key[order]
    first = np.ones(len(key_s), dtype=bool)
    first[1:] = key_s[1:] != key_s[:-1]
    keep = order[first]
    data = np.ones(len(keep), np.float32) if binary else C.data[keep]
    out = sp.csr_matrix((data, (C.row[keep], C.col[keep])), shape=M.shape, dtype=np.float32)
    out.sort_indices()
    return out


def _stack(parts, ncols) -> sp.csr_matrix:
    if not parts:
        return sp.csr_matrix((0, ncols), dtype=np.float32)
    if len(parts) == 1:
        return parts[0]
    M = sp.vstack(parts, format="csr", dtype=np.float32)
    M.sort_indices()
    return M


# ------------------------------------------------------------------------------------------------- XC BoW
def _bow_block_fast(lines, F, C):
    parts = [ln.partition(b" ") for ln in lines]
    labs = [p[0] for p in parts]
    feats = [p[2] for p in parts]
    n = len(lines)
    lab_counts = np.fromiter((a.count(b",") + 1 if a else 0 for a in labs), dtype=np.int64, count=n)
    lab = _fast_ints(b",".join([a for a in labs if a]), int(lab_counts.sum()), b",")
    if len(lab) and lab.max() >= C:
        raise _BlockError
    f_counts = np.fromiter((f.count(b":") for f in feats), dtype=np.int64, count=n)
    idx, vals = _fast_pairs(b" ".join(feats), int(f_counts.sum()))
    if len(idx) and idx.max() >= F:
        raise _BlockError
    X = _csr(f_counts, idx, vals, F)
    if _has_dups(X):
        raise _BlockError
    Y = _dedupe(_csr(lab_counts, lab, np.ones(len(lab), np.float32), C), binary=True)
    return X, Y


def _parse_int(tok: str):
    return int(tok) if _INT_RE.match(tok) else None


def _parse_pair_slow(path, lineno, tok: str, n_index: int, what: str, value_optional=False):
    """One ``index:value`` token, checked; returns (index, float32 value)."""
    idx_s, colon, val_s = tok.partition(":")
    if not colon:
        if not value_optional:
            raise DataFormatError(path, lineno, f"{what} token {tok!r} has no ':' (expected index:value)")
        val_s = None
    if idx_s == "":
        raise DataFormatError(path, lineno, f"{what} token {tok!r} has no index before ':'")
    i = _parse_int(idx_s)
    if i is None:
        if idx_s.lstrip("+-").isdigit() and idx_s.startswith("-"):
            raise DataFormatError(path, lineno, f"negative {what} index {idx_s} in token {tok!r}")
        raise DataFormatError(path, lineno, f"{what} index {idx_s!r} in token {tok!r} is not a non-negative integer")
    if i >= n_index:
        raise DataFormatError(path, lineno, f"{what} index {i} out of range (num_{what}s={n_index}) in token {tok!r}")
    if val_s is None:
        return i, np.float32(1.0)
    if val_s == "":
        raise DataFormatError(path, lineno, f"{what} token {tok!r} has no value after ':'")
    try:
        v = float(val_s)
    except ValueError:
        raise DataFormatError(path, lineno, f"{what} value {val_s!r} in token {tok!r} is not a number") from None
    with np.errstate(over="ignore"):
        v32 = np.float32(v)
    if not np.isfinite(v32):
        raise DataFormatError(path, lineno, f"non-finite {what} value in token {tok!r}"
                                            f"{' (beyond float32 range)' if np.isfinite(v) else ''}")
    return i, v32


def _bow_line_slow(path, lineno, line: bytes, F, C):
    lab_s, _, feat_s = decode_line(path, lineno, line).partition(" ")
    labels = []
    if lab_s:
        for t in lab_s.split(","):
            if t == "":
                raise DataFormatError(path, lineno, f"empty label id in {lab_s!r} (stray comma?)")
            i = _parse_int(t)
            if i is None:
                if t.startswith("-") and t[1:].isdigit():
                    raise DataFormatError(path, lineno, f"negative label id {t} (label ids are 0-based)")
                raise DataFormatError(path, lineno, f"label id {t!r} is not a non-negative integer"
                                      + (" (a line without labels must start with a space)" if ":" in t else ""))
            if i >= C:
                raise DataFormatError(path, lineno, f"label id {i} out of range (num_labels={C})")
            labels.append(i)
    pairs, seen = [], set()
    for tok in feat_s.split():
        i, v = _parse_pair_slow(path, lineno, tok, F, "feature")
        if i in seen:
            raise DataFormatError(path, lineno, f"duplicate feature index {i} on the line")
        seen.add(i)
        pairs.append((i, v))
    return labels, pairs


def _pairs_csr(rows, ncols) -> sp.csr_matrix:
    """CSR of one list of (index, value) pairs per row."""
    return _csr([len(r) for r in rows], [i for r in rows for i, _ in r], [v for r in rows for _, v in r], ncols)


def _bow_block(path, first_lineno, lines, F, C):
    try:
        return _bow_block_fast(lines, F, C)
    except _BlockError:
        pass
    parsed = [_bow_line_slow(path, first_lineno + k, line, F, C) for k, line in enumerate(lines)]
    X = _pairs_csr([pairs for _, pairs in parsed], F)
    return X, _dedupe(_pairs_csr([[(i, 1.0) for i in labels] for labels, _ in parsed], C), binary=True)


def read_xc_bow(path, num_features=None, num_labels=None):
    """Read an XC BoW file -> ``(X, Y)``: float32 CSR matrices of shape (N, F) and (N, C), Y holding 1.0 per
    label, indices sorted within rows. ``num_features`` / ``num_labels``, when given, must equal the header."""
    (F, C), parts = _read_blocks(path, {"num_features": num_features, "num_labels": num_labels}, _bow_block)
    return _stack([X for X, _ in parts], F), _stack([Y for _, Y in parts], C)


# ------------------------------------------------------------------------------------------------------ XY
def _xy_block_fast(lines, C):
    split = [ln.split() for ln in lines]
    counts = np.fromiter((len(t) for t in split), dtype=np.int64, count=len(lines))
    toks = [t for ts in split for t in ts]
    if sum(t.count(b":") for t in toks) != len(toks):
        toks = [t if b":" in t else t + b":1" for t in toks]
    idx, vals = _fast_pairs(b" ".join(toks), len(toks))
    if len(idx) and idx.max() >= C:
        raise _BlockError
    return _dedupe(_csr(counts, idx, vals, C), binary=False)


def _xy_block(path, first_lineno, lines, C):
    try:
        return _xy_block_fast(lines, C)
    except _BlockError:
        pass
    rows = [[_parse_pair_slow(path, first_lineno + k, tok, C, "label", value_optional=True)
             for tok in decode_line(path, first_lineno + k, line).split()] for k, line in enumerate(lines)]
    return _dedupe(_pairs_csr(rows, C), binary=False)


def read_xy(path, num_labels=None):
    """Read an ``*_X_Y.txt`` file -> float32 CSR (N, C) holding each label's value (1.0 when omitted)."""
    (C,), parts = _read_blocks(path, {"num_labels": num_labels}, _xy_block)
    return _stack(parts, C)


# --------------------------------------------------------------------------------------------------- lines
def read_lines(path, expected=None) -> list[str]:
    """One string per line (newline and a trailing ``\\r`` stripped; only ``\\n`` ends a line). With
    ``expected``, blank lines beyond it at the end are ignored and any other count mismatch is an error."""
    path = resolve_path(path)
    out = [decode_line(path, k, raw) for k, raw in iter_lines(path)]
    if expected is not None:
        expected = int(expected)
        n = len(out)
        if n > expected and not any(s.strip() for s in out[expected:]):
            del out[expected:]
        if len(out) != expected:
            raise DataFormatError(path, max(n, 1), f"has {n} lines, expected {expected} (one per point/label)")
    return out


# --------------------------------------------------------------------------------------------------- writers
def _row_strings(M: sp.csr_matrix, values=True) -> list[str]:
    """Each row of a CSR matrix as 'i:v i:v ...' (values with 6 significant digits), or as 'i,i,...'."""
    toks = ([f"{i}:{v:.6g}" for i, v in zip(M.indices.tolist(), M.data.astype(np.float64).tolist())] if values
            else [str(i) for i in M.indices.tolist()])
    ptr = (M.indptr - M.indptr[0]).tolist()
    return [(" " if values else ",").join(toks[ptr[r]:ptr[r + 1]]) for r in range(M.shape[0])]


def _as_csr(M, name) -> sp.csr_matrix:
    M = sp.csr_matrix(M, dtype=np.float32)
    M.sum_duplicates()
    M.sort_indices()
    if not np.all(np.isfinite(M.data)):
        raise ValueError(f"{name} holds non-finite values")
    return M


_ROWS_PER_WRITE = 20000


def write_rows(path, header, n_rows, make_lines):
    """Write ``header`` (unless None), then the lines ``make_lines(lo, hi)`` returns for ranges of the ``n_rows``
    rows, a chunk of rows at a time (so a large file is never held as one list of strings)."""
    with open_text(path, "wt") as f:
        if header is not None:
            f.write(header + "\n")
        for lo in range(0, n_rows, _ROWS_PER_WRITE):
            chunk = make_lines(lo, min(n_rows, lo + _ROWS_PER_WRITE))
            if chunk:
                f.write("\n".join(chunk))
                f.write("\n")


def write_xc_bow(path, X, Y):
    """Write X (N, F) and Y (N, C) in XC BoW format (values with 6 significant digits; labels sorted).
    Each line is ``labels + ' ' + features`` (so a point without labels starts with a space)."""
    X, Y = _as_csr(X, "X"), _as_csr(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")

    def make(lo, hi):
        return [f"{a} {b}" for a, b in zip(_row_strings(Y[lo:hi], values=False), _row_strings(X[lo:hi]))]

    write_rows(path, f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}", X.shape[0], make)


def write_xy(path, Y):
    """Write Y (N, C) as ``num_points num_labels`` + ``label:value ...`` lines."""
    Y = _as_csr(Y, "Y")
    write_rows(path, f"{Y.shape[0]} {Y.shape[1]}", Y.shape[0], lambda lo, hi: _row_strings(Y[lo:hi]))


def write_lines(path, lines):
    """Write one string per line; a string may not contain a line break."""
    lines = [str(s) for s in lines]
    for k, s in enumerate(lines):
        if "\n" in s or "\r" in s:
            raise ValueError(f"line {k + 1} to write to {path} contains a line break")
    write_rows(path, None, len(lines), lambda lo, hi: lines[lo:hi])


# ---------------------------------------------------------------------------------------------------- cache
def save_cache(path, arrays):
    """``np.savez`` written through :func:`atomic_file`; logs instead of failing when the cache dir is not writable."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        log.warning("could not write cache %s: %s", path, e)


def load_npz(path, keys):
    """The arrays ``keys`` of a cache file, or None when it is missing, unreadable, fails its CRC check or lacks
    one of the keys (the caller then rebuilds the entry)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except Exception:  # noqa: BLE001  (missing / corrupt / partial / foreign cache entry: re-make it)
        return None


_CSR_KEYS = ("data", "indices", "indptr", "shape")


def save_csr(path, **mats):
    """Cache CSR matrices (keyword = name) in one ``.npz`` file (:func:`save_cache`)."""
    save_cache(path, {f"{name}_{k}": np.array(M.shape) if k == "shape" else getattr(M, k)
                      for name, M in mats.items() for k in _CSR_KEYS})


def load_csr(path, *names):
    """The matrices ``names`` of a :func:`save_csr` file, or None unless each is a float32 CSR matrix of finite
    values and valid structure (the zip CRCs catch damaged bytes; this, a foreign or inconsistent entry)."""
    z = load_npz(path, [f"{name}_{k}" for name in names for k in _CSR_KEYS])
    if z is None:
        return None
    try:
        mats = [sp.csr_matrix((z[f"{n}_data"], z[f"{n}_indices"], z[f"{n}_indptr"]), shape=tuple(z[f"{n}_shape"]))
                for n in names]
        for M in mats:
            M.check_format(full_check=True)
            if M.dtype != np.float32 or not np.all(np.isfinite(M.data)):
                return None
    except Exception:  # noqa: BLE001  (a foreign or inconsistent entry)
        return None
    return mats


def load_bow_cached(path, cache_dir, num_features=None, num_labels=None):
    """:func:`read_xc_bow`, with the parsed matrices cached as ``.npz`` in ``cache_dir`` (keyed by the file's
    absolute path, size and mtime), so later loads skip parsing. An unreadable cache entry is re-made."""
    path = resolve_path(path)
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    cf = Path(cache_dir) / f"{path.name.removesuffix('.gz')}.{key}.npz"
    XY = load_csr(cf, "X", "Y")
    if XY is None or XY[0].shape[0] != XY[1].shape[0]:
        XY = read_xc_bow(path)
        save_csr(cf, X=XY[0], Y=XY[1])
    X, Y = XY
    _check_given(path, "num_features", num_features, X.shape[1])
    _check_given(path, "num_labels", num_labels, Y.shape[1])
    return X, Y
