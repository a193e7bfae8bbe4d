"""Fuzzed readers: every mutant of a small valid file either gives a clean error (an XMCError naming the file) or
parses to exactly what a small, independent reference parser of the same format gives.

Formats: XC BoW, XY, text lines, label texts, vocabulary (term<TAB>df), LF json, filter pairs, the token cache and
the BoW parse cache; plus the text layout through the datamodule (files that disagree) and a few mutants through
the real CLI. Mutations: byte flips, inserted / deleted bytes, truncation at a random offset, deleted / duplicated
/ swapped lines, swapped fields, random tokens, JSON type changes, CRLF, a BOM; each mutant is stored plain, as
gzip, as damaged gzip, as plain data under a .gz name or as gzip data under a plain name. The readers' block size
and line-length limit are drawn small too, so block boundaries and over-long lines are exercised.

Profiles: CI runs ``XMC_FUZZ_EXAMPLES`` (default 40) examples per format, derandomised; the ``slow`` tests run
2,000 per format (``python -m pytest -q -s -m slow tests/test_fuzz_readers.py``) and print the counts per format:
mutants tried, clean errors, clean parses, failures (``XMC_FUZZ_REPORT=file.json`` also writes them).
"""
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from xmcneg.data import formats, label_text, lf_json, token_cache
from xmcneg.errors import DataFormatError, XMCError

N_CI = int(os.environ.get("XMC_FUZZ_EXAMPLES", "40"))
N_SLOW = 2000
COUNTS = defaultdict(Counter)
BOM = b"\xef\xbb\xbf"
NASTY = ["", " ", "-1", "0", "00", "+1", "1e999", "-1e999", "nan", "inf", "1:", ":1", ":", "1:2:3", "1,", ",",
         "0x1f", "1_0", "\uff11", "3.5", "99999999999999999999", "2147483648", "\t", "\r", "\x00", "\xff", "é",
         "{", "}", "[", "]", '"', "null", "true", "1.0", "-0", "1e-50", "4e38", "a:b", "1:nan", "0:1 0:2"]
ID_VALUES = [1.5, 1.0, True, "1", [1], None, -1, 2 ** 70, 1e308]  # in place of one label id
JSON_VALUES = [1.5, True, False, "3", [[1]], None, {}, [1.0], ["1"], [True], 2 ** 70, -1, [2 ** 64], [-1], "",
               [None], 0, [0, 0], "x" * 3, 1e308]


class RefError(Exception):
    """The reference parser rejects the file."""


# ------------------------------------------------------------------------------------------------ mutation
def _lines(b):
    return b.split(b"\n")


KINDS = ["flip", "insert", "delete", "truncate", "del_line", "dup_line", "swap_lines", "swap_fields", "token", "crlf",
         "bom"]


def mutate(draw, data: bytes, json_lines=False) -> bytes:
    """0-3 random mutations of ``data`` (JSON lines: half of them JSON type changes)."""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(KINDS + ["json"] * (len(KINDS) if json_lines else 0)))
        n = len(data)
        if kind == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif kind == "insert":
            i = draw(st.integers(0, n))
            data = data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
        elif kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + data[i + draw(st.integers(1, 4)):]
        elif kind == "truncate":
            data = data[:draw(st.integers(0, n))]
        elif kind in ("del_line", "dup_line", "swap_lines"):
            ls = _lines(data)
            i, j = draw(st.integers(0, len(ls) - 1)), draw(st.integers(0, len(ls) - 1))
            if kind == "del_line":
                del ls[i]
            elif kind == "dup_line":
                ls.insert(j, ls[i])
            else:
                ls[i], ls[j] = ls[j], ls[i]
            data = b"\n".join(ls)
        elif kind in ("swap_fields", "token"):
            ls = _lines(data)
            i = draw(st.integers(0, len(ls) - 1))
            f = re.split(rb"([ ,:\t])", ls[i])
            if kind == "swap_fields":
                a, b = draw(st.integers(0, len(f) - 1)), draw(st.integers(0, len(f) - 1))
                f[a], f[b] = f[b], f[a]
            else:
                f[draw(st.integers(0, len(f) - 1))] = draw(st.sampled_from(NASTY)).encode("utf-8", "surrogatepass")
            ls[i] = b"".join(f)
            data = b"\n".join(ls)
        elif kind == "crlf":
            data = data.replace(b"\n", b"\r\n")
        elif kind == "bom":
            data = BOM + data
        elif kind == "json":
            ls = _lines(data)
            i = draw(st.integers(0, len(ls) - 1))
            try:
                obj = json.loads(ls[i])
            except ValueError:
                continue
            if isinstance(obj, dict) and obj:
                key = draw(st.sampled_from(sorted(obj) + ["target_ind"] * len(obj)))
                if isinstance(obj.get(key), list) and obj[key] and draw(st.booleans()):
                    obj[key][draw(st.integers(0, len(obj[key]) - 1))] = draw(st.sampled_from(ID_VALUES))
                else:
                    obj[key] = draw(st.sampled_from(JSON_VALUES))
                ls[i] = json.dumps(obj).encode()
                data = b"\n".join(ls)
    return data


def store(draw, data: bytes, name: str):
    """(file name, bytes on disk): plain, gzip, damaged gzip, plain under .gz, gzip under a plain name."""
    how = draw(st.sampled_from(["plain", "plain", "plain", "gz", "bad_gz", "plain_as_gz", "gz_as_plain"]))
    if how == "plain":
        return name, data
    gz = gzip.compress(data, mtime=0)
    if how == "gz":
        return name + ".gz", gz
    if how == "bad_gz":
        i = draw(st.integers(0, len(gz)))
        if draw(st.booleans()) and i < len(gz):
            return name + ".gz", gz[:i] + bytes([gz[i] ^ draw(st.integers(1, 255))]) + gz[i + 1:]
        return name + ".gz", gz[:i]
    if how == "plain_as_gz":
        return name + ".gz", data
    return name, gz


def ref_bytes(name, raw):
    """What the file holds, as the reference sees it."""
    if name.endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise RefError(f"gzip: {e}") from None
    return raw


def ref_split(b):
    """Lines: only \\n ends a line, a trailing \\r is dropped, a final \\n does not start a line."""
    ls = b.split(b"\n")
    if ls[-1] == b"":
        ls.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in ls]


def ref_text(ln):
    try:
        return ln.decode("utf-8")
    except UnicodeDecodeError:
        raise RefError("utf-8") from None


def ref_int(t, bound):
    if not re.fullmatch(r"[0-9]+", t) or int(t) >= bound:
        raise RefError(f"id {t!r}")
    return int(t)


def ref_value(t):
    try:
        v = float(t)
    except ValueError:
        raise RefError(f"value {t!r}") from None
    with np.errstate(over="ignore"):
        v32 = np.float32(v)
    if not np.isfinite(v32):
        raise RefError("non-finite")
    return v32


# ------------------------------------------------------------------------------------------------ references
def ref_header(lines, n):
    if not lines:
        raise RefError("empty")
    head = lines[0][3:] if lines[0].startswith(BOM) else lines[0]
    toks = head.split()
    if len(toks) != n or not all(re.fullmatch(rb"[0-9]+", t) for t in toks):
        raise RefError("header")
    vals = [int(t) for t in toks]
    if any(v < 1 for v in vals[1:]) or any(v > 2 ** 31 - 1 for v in vals):
        raise RefError("header values")
    data = lines[1:]
    if len(data) < vals[0] or any(ln.strip() for ln in data[vals[0]:]):
        raise RefError("line count")
    return vals, data[:vals[0]]


def ref_csr(rows, ncols):
    indptr = np.cumsum([0] + [len(r) for r in rows])
    idx = [i for r in rows for i in sorted(r)]
    val = [r[i] for r in rows for i in sorted(r)]
    return sp.csr_matrix((np.array(val, np.float32), np.array(idx, np.int64), indptr), shape=(len(rows), ncols))


def ref_bow(b):
    (N, F, C), data = ref_header(ref_split(b), 3)
    xs, ys = [], []
    for ln in data:
        lab, _, feat = ref_text(ln).partition(" ")
        ys.append({ref_int(t, C): np.float32(1) for t in lab.split(",")} if lab else {})
        row = {}
        for tok in feat.split():
            i, sep, v = tok.partition(":")
            if not sep or ref_int(i, F) in row:
                raise RefError("feature token")
            row[int(i)] = ref_value(v)
        xs.append(row)
    return ref_csr(xs, F), ref_csr(ys, C)


def ref_xy(b):
    (N, C), data = ref_header(ref_split(b), 2)
    ys = []
    for ln in data:
        row = {}
        for tok in ref_text(ln).split():
            i, sep, v = tok.partition(":")
            v = ref_value(v) if sep else np.float32(1)
            i = ref_int(i, C)
            row[i] = max(row.get(i, v), v)
        ys.append(row)
    return ref_csr(ys, C)


def ref_lines(b):
    return [ref_text(ln) for ln in ref_split(b)]


def ref_label_texts(b, C):
    ls = ref_lines(b)
    if len(ls) > C and not any(s.strip() for s in ls[C:]):
        ls = ls[:C]
    if len(ls) != C:
        raise RefError("count")
    if ls and all("\t" in t for t in ls if t):
        ls = [t.split("\t", 1)[1] if "\t" in t else t for t in ls]
    return ls


def ref_vocab(b, F):
    ls = ref_lines(b)
    while ls and not ls[-1].strip():
        ls.pop()
    if len(ls) != F:
        raise RefError("count")
    vocab, df = {}, []
    for i, ln in enumerate(ls):
        parts = ln.split("\t")
        if len(parts) > 2:
            raise RefError("fields")
        try:
            d = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise RefError("df") from None
        if not (np.isfinite(d) and d >= 0):
            raise RefError("df")
        df.append(d)
        vocab.setdefault(parts[0].strip(), i)
    return vocab, np.array(df)


def ref_lf(b, C, use_content):
    texts, rows = [], []
    for ln in ref_split(b):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ref_text(ln))
        except ValueError:
            raise RefError("json") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("title"), str):
            raise RefError("title")
        text = obj["title"]
        c = obj.get("content")
        if use_content and c is not None and not isinstance(c, str):
            raise RefError("content")
        if use_content and c:
            text += " " + c
        t = obj.get("target_ind")
        if not isinstance(t, list) or not all(type(x) is int and 0 <= x < C for x in t):
            raise RefError("target_ind")
        texts.append(" ".join(text.split()))
        rows.append({x: np.float32(1) for x in t})
    return texts, ref_csr(rows, C)


def ref_filter(b, n_docs, C):
    out = []
    for ln in ref_split(b):
        t = ln.split()
        if not t:
            continue
        if len(t) != 2 or not all(re.fullmatch(rb"[0-9]+", x) for x in t):
            raise RefError("pair")
        d, lab = int(t[0]), int(t[1])
        if d >= n_docs or lab >= C:
            raise RefError("range")
        out.append((d, lab))
    return np.array(out, np.int64).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------ valid seeds
def seed_bow(draw):
    N, F, C = draw(st.integers(0, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    vals = st.sampled_from(["1", "0.5", "2.25e-1", "-3", "0", "1e3"])
    out = [f"{N} {F} {C}"]
    for _ in range(N):
        labs = draw(st.lists(st.integers(0, C - 1), max_size=3, unique=True))
        feats = draw(st.lists(st.integers(0, F - 1), max_size=4, unique=True))
        out.append(",".join(map(str, labs)) + " " + " ".join(f"{f}:{draw(vals)}" for f in feats))
    return ("\n".join(out) + "\n").encode()


def seed_xy(draw):
    N, C = draw(st.integers(0, 5)), draw(st.integers(1, 6))
    out = [f"{N} {C}"]
    for _ in range(N):
        labs = draw(st.lists(st.integers(0, C - 1), max_size=3, unique=True))
        out.append(" ".join(f"{x}:1" if draw(st.booleans()) else f"{x}" for x in labs))
    return ("\n".join(out) + "\n").encode()


WORDS = ["pan", "egg", "ünï", "soup", "a-b", "x'y", "✓", "tab\there"]


def seed_lines(draw, n=None):
    n = draw(st.integers(0, 5)) if n is None else n
    return "".join(" ".join(draw(st.lists(st.sampled_from(WORDS), max_size=4))) + "\n" for _ in range(n)).encode()


def seed_lf(draw, C):
    rows = []
    for i in range(draw(st.integers(1, 5))):
        rows.append(json.dumps({"uid": str(i), "title": " ".join(draw(st.lists(st.sampled_from(WORDS), max_size=3))),
                                "content": draw(st.sampled_from(["", "more  words", "ü"])),
                                "target_ind": draw(st.lists(st.integers(0, C - 1), max_size=3))}))
    return ("\n".join(rows) + "\n").encode()


# ------------------------------------------------------------------------------------------------ the checks
_TMP = Path(tempfile.mkdtemp(prefix="xmcneg-fuzz-"))


def _tmp():
    """An empty directory for one example (the same one every time)."""
    d = _TMP / "case"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


class _Limits:
    """Set formats' block size and line limit for one example, restored afterwards."""

    def __init__(self, draw):
        self.new = {"_BLOCK_BYTES": draw(st.sampled_from([7, 16, 1 << 24])),
                    "MAX_LINE_BYTES": draw(st.sampled_from([40, 1 << 26]))}

    def __enter__(self):
        self.old = {k: getattr(formats, k) for k in self.new}
        for k, v in self.new.items():
            setattr(formats, k, v)

    def __exit__(self, *a):
        for k, v in self.old.items():
            setattr(formats, k, v)


def run_case(fmt, path, read, reference, where=None):
    """Run the reader on the mutant; record the outcome; fail on a non-XMCError exception, an error that does not
    name the file (or a file under ``where``), or a parse that differs from the reference."""
    COUNTS[fmt]["tried"] += 1
    try:
        got = read(path)
    except XMCError as e:
        msg = str(e)
        if not msg.startswith(str(where or path)) or "\n" in msg:
            COUNTS[fmt]["failures"] += 1
            raise AssertionError(f"error does not start with the file name, or is not one line: {msg!r}")
        COUNTS[fmt]["clean_errors"] += 1
        return None
    except Exception as e:  # noqa: BLE001
        COUNTS[fmt]["failures"] += 1
        raise AssertionError(f"{fmt}: {type(e).__name__} escaped: {e}") from e
    try:
        want = reference()
    except RefError as e:
        COUNTS[fmt]["failures"] += 1
        raise AssertionError(f"{fmt}: the reader accepted a file the reference rejects ({e})") from None
    if not same(got, want):
        COUNTS[fmt]["failures"] += 1
        raise AssertionError(f"{fmt}: parse differs from the reference:\n got {got!r}\nwant {want!r}")
    COUNTS[fmt]["clean_parses"] += 1
    return got


def same(a, b):
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if sp.issparse(a) or sp.issparse(b):
        if not (sp.issparse(a) and sp.issparse(b)) or a.shape != b.shape:
            return False
        a, b = sp.csr_matrix(a), sp.csr_matrix(b)
        a.sort_indices(); b.sort_indices()
        return a.dtype == np.float32 and np.array_equal(a.indptr, b.indptr) and \
            np.array_equal(a.indices, b.indices) and np.array_equal(a.data, b.data)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a == b
    return a == b


def _write(d, draw, data, name):
    fname, raw = store(draw, data, name)
    p = d / fname
    p.write_bytes(raw)
    return p, fname, raw


def _check_one_file(draw, kind, seed, name, reader, ref):
    """A mutant of `seed(draw)` stored as `name`: `reader` must fail cleanly or agree with `ref`."""
    p, fname, raw = _write(_tmp(), draw, mutate(draw, seed(draw)), name)
    with _Limits(draw):
        run_case(kind, p, reader, lambda: ref(ref_bytes(fname, raw)))


def check_bow(draw):
    _check_one_file(draw, "xc_bow", seed_bow, "train.txt", formats.read_xc_bow, ref_bow)


def check_xy(draw):
    _check_one_file(draw, "xy", seed_xy, "trn_X_Y.txt", formats.read_xy, ref_xy)


def check_lines(draw):
    _check_one_file(draw, "text_lines", seed_lines, "trn_X.txt", formats.read_lines, ref_lines)


def check_label_texts(draw):
    d = _tmp()
    C = draw(st.integers(1, 4))
    base = seed_lines(draw, C)
    if draw(st.booleans()):
        base = b"".join(b"%d\t%s\n" % (i, ln) for i, ln in enumerate(base.split(b"\n")[:C]))
    p, fname, raw = _write(d, draw, mutate(draw, base), "lbl_X.txt")
    with _Limits(draw):
        run_case("label_texts", p, lambda q: label_text.read_label_texts(q, C),
                 lambda: ref_label_texts(ref_bytes(fname, raw), C))


def check_vocab(draw):
    d = _tmp()
    F = draw(st.integers(1, 4))
    base = "".join(f"{draw(st.sampled_from(WORDS))}\t{draw(st.sampled_from(['1', '20', '3.5', '0']))}\n"
                   for _ in range(F)).encode()
    p, fname, raw = _write(d, draw, mutate(draw, base), "vocab.txt")
    with _Limits(draw):
        run_case("vocab", p, lambda q: label_text.read_vocab(q, F), lambda: ref_vocab(ref_bytes(fname, raw), F))


def check_lf(draw):
    d = _tmp()
    C, use_content = draw(st.integers(1, 5)), draw(st.booleans())
    p, fname, raw = _write(d, draw, mutate(draw, seed_lf(draw, C), json_lines=True), "trn.json")
    with _Limits(draw):
        run_case("lf_json", p, lambda q: lf_json.read_lf_json(q, C, use_content),
                 lambda: ref_lf(ref_bytes(fname, raw), C, use_content))


def check_filter(draw):
    d = _tmp()
    n_docs, C = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    pairs = draw(st.lists(st.tuples(st.integers(0, n_docs - 1), st.integers(0, C - 1)), max_size=5))
    base = "".join(f"{a} {b}\n" for a, b in pairs).encode()
    p, fname, raw = _write(d, draw, mutate(draw, base), "filter_labels_test.txt")
    with _Limits(draw):
        run_case("filter_pairs", p, lambda q: lf_json.read_filter_pairs(q, n_docs, C),
                 lambda: ref_filter(ref_bytes(fname, raw), n_docs, C))


def _npz_bytes(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def check_token_cache(draw):
    """A damaged token cache entry is refused (rebuilt by the datamodule), never read as other rows."""
    d = _tmp()
    seqs = draw(st.lists(st.lists(st.integers(0, 9), max_size=4), max_size=4))
    rows = token_cache.TokenRows.from_lists(seqs)
    arrays = {"ids": rows.ids, "indptr": rows.indptr}
    if draw(st.booleans()):  # a well-formed file with wrong content
        key = draw(st.sampled_from(["ids", "indptr"]))
        arrays[key] = draw(st.sampled_from([arrays[key][::-1], arrays[key].astype(np.float64), arrays[key] + 20,
                                            arrays[key] - 1, arrays[key][:-1], arrays[key].reshape(-1, 1)]))
        if draw(st.booleans()):
            arrays = {"other": arrays[key]}
    raw = _npz_bytes(arrays)
    i = draw(st.integers(0, len(raw)))
    raw = draw(st.sampled_from([raw, raw[:i], raw[:i] + bytes([raw[i % len(raw)] ^ 0x5a]) + raw[i + 1:]]))
    p = d / "tok.npz"
    p.write_bytes(raw)
    COUNTS["token_cache"]["tried"] += 1
    try:
        got = token_cache.load_token_rows(p, len(seqs), 10)
    except Exception as e:  # noqa: BLE001
        COUNTS["token_cache"]["failures"] += 1
        raise AssertionError(f"token cache: {type(e).__name__} escaped: {e}") from e
    if got is None:
        COUNTS["token_cache"]["clean_errors"] += 1  # refused: rebuilt from the text
        return
    written = (arrays.get("ids"), arrays.get("indptr"))
    ok = any(np.array_equal(got.ids, a) and np.array_equal(got.indptr, p_) for a, p_ in
             ((rows.ids, rows.indptr), written) if a is not None and p_ is not None)  # what was written, nothing else
    ok = ok and len(got) == len(seqs) and (not len(got.ids) or (got.ids.min() >= 0 and got.ids.max() < 10))
    if not ok:
        COUNTS["token_cache"]["failures"] += 1
        raise AssertionError("token cache: damaged entry read as other rows")
    COUNTS["token_cache"]["clean_parses"] += 1


def check_bow_cache(draw):
    """A damaged BoW parse cache entry is re-parsed: the result always equals the file's own parse."""
    d = _tmp()
    src = d / "train.txt"
    src.write_bytes(seed_bow(draw))
    cache = d / "cache"
    want = formats.read_xc_bow(src)
    formats.load_bow_cached(src, cache)
    (cf,) = list(cache.iterdir())
    raw = cf.read_bytes()
    cf.write_bytes(mutate(draw, raw) if draw(st.booleans()) else raw[:draw(st.integers(0, len(raw)))])
    run_case("bow_cache", cf, lambda q: formats.load_bow_cached(src, cache), lambda: want)


TINY = {**OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "encoder"
                                                 / "tiny_transformer.yaml")), "max_len": 6}


def check_text_layout(draw):
    """The text layout through the datamodule, one of its files mutated: files that disagree (line counts, label
    counts) give a clean error; otherwise the splits hold the reference's labels and the reference's texts."""
    from omegaconf import OmegaConf

    from xmcneg.data.datamodule import XCDataModule
    from xmcneg.data.token_cache import TokenRows

    d = _tmp()
    N, C, M = draw(st.integers(2, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))

    def xy(n):
        return (f"{n} {C}\n" + "".join(" ".join(f"{x}:1" for x in draw(st.lists(st.integers(0, C - 1), max_size=2,
                                                                                   unique=True))) + "\n"
                                        for _ in range(n))).encode()

    files = {"trn_X.txt": seed_lines(draw, N), "trn_X_Y.txt": xy(N), "tst_X.txt": seed_lines(draw, M),
             "tst_X_Y.txt": xy(M), "lbl_X.txt": seed_lines(draw, C)}
    target = draw(st.sampled_from(sorted(files)))
    names = {}
    for name, data in files.items():
        if name == target:
            names[name], raw = store(draw, mutate(draw, data), name)
        else:
            names[name], raw = name, data
        (d / names[name]).write_bytes(raw)

    def content(name):
        return ref_bytes(names[name], (d / names[name]).read_bytes())

    def texts(name, n):
        ls = ref_lines(content(name))
        if len(ls) > n and not any(s.strip() for s in ls[n:]):
            ls = ls[:n]
        if len(ls) != n:
            raise RefError(f"{name}: {len(ls)} lines for {n} rows")
        return ls

    def reference():
        Ytr, Yte = ref_xy(content("trn_X_Y.txt")), ref_xy(content("tst_X_Y.txt"))
        if Yte.shape[1] != Ytr.shape[1]:
            raise RefError("num_labels differ")
        return Ytr, Yte, texts("trn_X.txt", Ytr.shape[0]), texts("tst_X.txt", Yte.shape[0]), \
            texts("lbl_X.txt", Ytr.shape[1])

    held = {}

    def read(_):
        dm = XCDataModule(OmegaConf.create({"name": "t", "format": "text", "dir": str(d)}),
                          OmegaConf.create({"batch_size": 4, "num_workers": 0, "val_size": 1, "val_max_docs": 10,
                                            "max_train_docs": None}),
                          OmegaConf.create({"cache_dir": str(d / "cache")}), OmegaConf.create(TINY), seed=0)
        dm.setup()
        held["dm"] = dm
        return (dm.full_train_Y, dm.split("test")[1], dm.split("train")[0].ids, dm.split("test")[0].ids,
                dm.label_inputs(np.arange(dm.num_labels))["input_ids"].numpy())

    def expected():
        Ytr, Yte, ttr, tte, tlb = reference()
        dm = held["dm"]
        enc = dm.inputs.tokenizer.encode
        return (Ytr, Yte, TokenRows.from_lists(enc(ttr, 6))[dm.train_rows].ids, TokenRows.from_lists(enc(tte, 6)).ids,
                TokenRows.from_lists(enc(tlb, 6)).padded(np.arange(len(tlb)))["input_ids"].numpy())

    run_case("text_layout", d, read, expected, where=d)


CHECKS = {"xc_bow": check_bow, "xy": check_xy, "text_lines": check_lines, "label_texts": check_label_texts,
          "vocab": check_vocab, "lf_json": check_lf, "filter_pairs": check_filter, "token_cache": check_token_cache,
          "bow_cache": check_bow_cache, "text_layout": check_text_layout}


def _fuzz(check, n, ci):
    @settings(max_examples=n, deadline=None, derandomize=ci, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def test(data):
        check(data.draw)

    return test


@pytest.mark.parametrize("fmt", sorted(CHECKS))
def test_fuzz_reader(fmt):
    _fuzz(CHECKS[fmt], N_CI, True)()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(CHECKS))
def test_fuzz_reader_slow(fmt):
    _fuzz(CHECKS[fmt], N_SLOW, False)()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not COUNTS:
        return
    cols = ("tried", "clean_errors", "clean_parses", "failures")
    lines = [f"{'format':<14}" + "".join(f"{c:>14}" for c in cols)]
    lines += [f"{f:<14}" + "".join(f"{COUNTS[f][c]:>14}" for c in cols) for f in sorted(COUNTS)]
    print("\nfuzz counts (mutants per format)\n" + "\n".join(lines), file=sys.stderr)
    if os.environ.get("XMC_FUZZ_REPORT"):
        Path(os.environ["XMC_FUZZ_REPORT"]).write_text(json.dumps({f: dict(c) for f, c in COUNTS.items()},
                                                                  indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------------ through the CLI
FAST = ["logger=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "data.batch_size=8",
        "encoder.dim=8", "eval.k=5"]


def _cli_error(tmp, overrides, capsys):
    """Run train.cli in-process; return (exit code, stderr lines)."""
    from hydra import compose, initialize_config_dir

    from xmcneg import train

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *overrides, f"paths.output_dir={tmp / 'run'}",
                                          f"paths.cache_dir={tmp / 'cache'}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.cli(train.run, cfg)
    return exc.value.code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _cli_case(fmt, d, path, overrides, capsys):
    COUNTS[fmt]["tried"] += 1
    code, lines = _cli_error(d.parent, [f"dataset.dir={d}", *overrides], capsys)
    ok = code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}")
    COUNTS[fmt]["clean_errors" if ok else "failures"] += 1
    assert ok, (code, lines)


@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(var, raising=False)


@settings(max_examples=4, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_cli_xc_bow(cli_env, capsys, data):
    """Mutants of train.txt that the reader rejects give one `error: FILE...` line and exit code 2 via train.cli."""
    root = _tmp()
    d = root / "data"
    d.mkdir()
    good = b"4 5 3\n0 1:1 2:0.5\n1,2 0:1\n2 4:2\n0 3:1\n"
    p, fname, raw = _write(d, data.draw, mutate(data.draw, good), "train.txt")
    (d / "test.txt").write_bytes(good)
    try:
        formats.read_xc_bow(p)
        assume(False)  # parses: nothing to check through the CLI
    except XMCError:
        pass
    _cli_case("cli_xc_bow", d, p, ["dataset=xc"], capsys)


@settings(max_examples=4, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_cli_lf_json(cli_env, capsys, data):
    """Mutants of trn.json.gz that the reader rejects give one `error: FILE...` line and exit code 2 via train.cli."""
    root = _tmp()
    d = root / "data"
    d.mkdir()
    rows = [{"uid": str(i), "title": f"pan egg {i}", "content": "", "target_ind": [i % 3]} for i in range(6)]
    good = "".join(json.dumps(r) + "\n" for r in rows).encode()
    raw = gzip.compress(mutate(data.draw, good, json_lines=True), mtime=0)
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    (d / "trn.json.gz").write_bytes(raw)
    (d / "tst.json.gz").write_bytes(gzip.compress(good))
    (d / "lbl.json.gz").write_bytes(gzip.compress(b"".join(b'{"title": "l%d"}\n' % i for i in range(3))))
    try:
        lf_json.read_lf_json(d / "trn.json.gz", 3)
        assume(False)
    except XMCError:
        pass
    _cli_case("cli_lf_json", d, d / "trn.json.gz", ["dataset=lf_json", "encoder=text_bow", "encoder.text.min_df=1"],
              capsys)
