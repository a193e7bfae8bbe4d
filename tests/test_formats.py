"""Readers/writers of the XC formats: round trips and strict, well-located validation errors."""
import gzip
import re
import os
import time

import numpy as np
import pytest
import scipy.sparse as sp

from xmcneg.data import formats
from xmcneg.errors import DataFormatError, MissingFileError


def _random_xy(rng, n=50, F=30, C=12):
    X = sp.random(n, F, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    X.data = rng.uniform(-2, 2, size=X.nnz).astype(np.float32)
    X.data[::7] = rng.uniform(1e-6, 1e-3, size=len(X.data[::7]))
    Y = sp.random(n, C, density=0.25, format="csr", dtype=np.float32, random_state=rng)
    Y.data[:] = 1.0
    # make sure the special cases are present: empty doc, doc without labels, doc with neither
    X = X.tolil(); Y = Y.tolil()
    X[3, :] = 0; Y[4, :] = 0; X[5, :] = 0; Y[5, :] = 0; Y[3, 1] = 1
    X, Y = X.tocsr(), Y.tocsr()
    X.eliminate_zeros(); Y.eliminate_zeros()
    return X, Y


def _write(tmp_path, name, text, gz=False):
    p = tmp_path / (name + (".gz" if gz else ""))
    data = text.encode()
    p.write_bytes(gzip.compress(data) if gz else data)
    return p


def _assert_same(A, B, rtol=1e-5):
    assert A.shape == B.shape
    assert A.dtype == np.float32
    np.testing.assert_allclose(A.toarray(), B.toarray(), rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_bow_round_trip(tmp_path, suffix):
    X, Y = _random_xy(np.random.default_rng(0))
    p = tmp_path / f"train.txt{suffix}"
    formats.write_xc_bow(p, X, Y)
    X2, Y2 = formats.read_xc_bow(p, num_features=30, num_labels=12)
    _assert_same(X2, X)
    _assert_same(Y2, Y)
    assert X2.has_sorted_indices and Y2.has_sorted_indices
    if suffix:  # deterministic gzip bytes (no time stamp)
        b1 = p.read_bytes()
        time.sleep(0.01)
        formats.write_xc_bow(p, X, Y)
        assert p.read_bytes() == b1
        assert gzip.decompress(b1).startswith(b"50 30 12\n")


def test_bow_written_format(tmp_path):
    X = sp.csr_matrix(np.array([[0, 0.5, 0], [0, 0, 0], [1 / 3, 0, 2]], dtype=np.float32))
    Y = sp.csr_matrix(np.array([[0, 1], [1, 1], [0, 0]], dtype=np.float32))
    p = tmp_path / "a.txt"
    formats.write_xc_bow(p, X, Y)
    assert p.read_text() == "3 3 2\n1 1:0.5\n0,1 \n 0:0.333333 2:2\n"


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_xy_round_trip(tmp_path, suffix):
    _, Y = _random_xy(np.random.default_rng(1))
    Y = Y.tolil(); Y[0, 2] = 0.25; Y = Y.tocsr()
    p = tmp_path / f"trn_X_Y.txt{suffix}"
    formats.write_xy(p, Y)
    _assert_same(formats.read_xy(p, num_labels=12), Y)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_lines_round_trip(tmp_path, suffix):
    lines = ["first doc", "", "  spaced  ", "ünïcödé ✓", "tab\there"]
    p = tmp_path / f"trn_X.txt{suffix}"
    formats.write_lines(p, lines)
    assert formats.read_lines(p) == lines
    assert formats.read_lines(p, expected=5) == lines


def test_xy_value_omitted_and_dedup(tmp_path):
    p = _write(tmp_path, "x_y.txt", "3 5\n1 4:0.5\n\n2:1 2:3 0\n")
    Y = formats.read_xy(p)
    np.testing.assert_array_equal(Y.toarray(), [[0, 1, 0, 0, 0.5], [0, 0, 0, 0, 0], [1, 0, 3, 0, 0]])


def test_read_lines_crlf_and_count(tmp_path):
    p = _write(tmp_path, "lbl_X.txt", "a b\r\nc\r\n\r\n")
    assert formats.read_lines(p) == ["a b", "c", ""]
    assert formats.read_lines(p, expected=2) == ["a b", "c"]  # blank trailing line ignored
    with pytest.raises(DataFormatError, match=r"lbl_X.txt:3: has 3 lines, expected 4 \(one per point/label\)"):
        formats.read_lines(p, expected=4)
    p2 = _write(tmp_path, "trn_X.txt", "a\nb\nc\n")
    with pytest.raises(DataFormatError, match=r"has 3 lines, expected 2"):
        formats.read_lines(p2, expected=2)


def test_resolve_path_and_missing(tmp_path):
    p = _write(tmp_path, "test.txt", "1 2 2\n0 1:1\n", gz=True)
    assert formats.resolve_path(tmp_path / "test.txt") == p
    X, Y = formats.read_xc_bow(tmp_path / "test.txt")  # finds test.txt.gz
    assert X.shape == (1, 2) and Y.nnz == 1
    with pytest.raises(MissingFileError, match=r"nope.txt: file not found .*XMC_DATA_DIR"):
        formats.resolve_path(tmp_path / "nope.txt")


def test_open_text_reads_crlf(tmp_path):
    p = _write(tmp_path, "t.txt.gz", "a\r\nb\r\n", gz=True)
    with formats.open_text(p) as f:
        assert f.read() == "a\nb\n"


# ---------------------------------------------------------------------------------------------- leniencies
def test_crlf_parses_like_lf(tmp_path):
    text = "4 6 3\n0,2 1:0.5 3:0.25\n 2:1\n1\n2 0:1e-3 5:2\n"
    a = formats.read_xc_bow(_write(tmp_path, "lf.txt", text))
    b = formats.read_xc_bow(_write(tmp_path, "crlf.txt", text.replace("\n", "\r\n")))
    for A, B in zip(a, b):
        assert (A != B).nnz == 0


def test_special_documents_kept(tmp_path):
    # doc 0: duplicate labels; doc 1: no labels; doc 2: labels, no features; doc 3: empty line = empty doc;
    # extra spaces between tokens; blank trailing lines ignored
    text = "5 4 3\n2,0,2 1:1  3:2 \n 0:1\n1\n\n0 2:0.5\n\n  \n"
    X, Y = formats.read_xc_bow(_write(tmp_path, "t.txt", text))
    np.testing.assert_array_equal(Y.toarray(), [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(X.toarray(), [[0, 1, 0, 2], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0],
                                                [0, 0, 0.5, 0]])


def test_many_blocks(tmp_path, monkeypatch):
    """Parsing in several blocks (lines cut at block edges, CRLF split across blocks) gives the same result."""
    X, Y = _random_xy(np.random.default_rng(2), n=300)
    p = tmp_path / "t.txt"
    formats.write_xc_bow(p, X, Y)
    p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    monkeypatch.setattr(formats, "_BLOCK_BYTES", 97)
    X2, Y2 = formats.read_xc_bow(p)
    _assert_same(X2, X)
    _assert_same(Y2, Y)


def test_header_must_match_given_sizes(tmp_path):
    p = _write(tmp_path, "t.txt", "1 4 3\n0 1:1\n")
    with pytest.raises(DataFormatError, match=r"t.txt:1: header says num_features=4 but 5 was expected"):
        formats.read_xc_bow(p, num_features=5)
    with pytest.raises(DataFormatError, match=r"t.txt:1: header says num_labels=3 but 2"):
        formats.read_xc_bow(p, num_labels=2)


# ------------------------------------------------------------------------------------------------- errors
HDR = "3 10 5\n"
OK = "1,2 0:0.5 3:1\n"
BAD_BOW = [
    # (body after header, line number, message pattern)
    ("header", "3 10\n" + OK * 3, 1, r"bad header '3 10': expected 'num_points num_features num_labels'"),
    ("header_nonint", "3 10 x\n" + OK * 3, 1, r"bad header"),
    ("header_zero", "3 0 5\n" + OK * 3, 1, r"num_features must be >= 1"),
    ("empty_file", "", 1, r"empty file"),
    ("label_range", HDR + OK + "1,5 0:1\n" + OK, 3, r"label id 5 out of range \(num_labels=5\)"),
    ("label_negative", HDR + OK + OK + "-1 0:1\n", 4, r"negative label id -1"),
    ("label_nonint", HDR + "a,1 0:1\n" + OK * 2, 2, r"label id 'a' is not a non-negative integer"),
    ("label_no_space", HDR + OK + "0:1 2:1\n" + OK, 3, r"must start with a space"),
    ("no_value", HDR + OK + "1 3:\n" + OK, 3, r"feature token '3:' has no value"),
    ("no_colon", HDR + OK * 2 + "1 3:1 4\n", 4, r"feature token '4' has no ':'"),
    ("nonnumeric_value", HDR + "1 3:abc\n" + OK * 2, 2, r"feature value 'abc' in token '3:abc' is not a number"),
    ("nonnumeric_index", HDR + "1 x:1\n" + OK * 2, 2, r"feature index 'x' in token 'x:1' is not a non-negative"),
    ("float_index", HDR + OK + "1 2.0:1\n" + OK, 3, r"feature index '2.0'"),
    ("feature_range", HDR + OK + OK + "1 10:1\n", 4, r"feature index 10 out of range \(num_features=10\)"),
    ("nan", HDR + OK + "1 2:nan\n" + OK, 3, r"non-finite feature value in token '2:nan'"),
    ("inf", HDR + OK + "1 2:-inf\n" + OK, 3, r"non-finite feature value"),
    ("float32_overflow", HDR + OK + "1 2:1e39\n" + OK, 3, r"non-finite .* \(beyond float32 range\)"),
    ("duplicate_feature", HDR + OK + "1 2:1 7:1 2:3\n" + OK, 3, r"duplicate feature index 2 on the line"),
    ("truncated", HDR + OK * 2, 3, r"file ends after 2 data lines, but the header says num_points=3"),
    ("truncated_blank", HDR + OK, 2, r"file ends after 1 data lines"),
    ("too_many", HDR + OK * 3 + OK, 5, r"more data lines than the header's num_points=3"),
    ("too_many_after_blank", HDR + OK * 3 + "\n" + OK, 6, r"more data lines"),
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", BAD_BOW, ids=[c[0] for c in BAD_BOW])
def test_bow_errors(tmp_path, case, gz):
    name, text, line, pattern = case
    p = _write(tmp_path, "train.txt", text, gz=gz)
    with pytest.raises(DataFormatError) as ei:
        formats.read_xc_bow(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert ei.value.line == line and ei.value.path == str(p)
    assert re.search(pattern, msg), msg


def test_error_located_in_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_BLOCK_BYTES", 64)
    lines = ["3 10 5"] + ["0 1:0.5 2:0.25"] * 40 + ["0 1:0.5 2:0.25 1:1"] + ["0 1:1"] * 5
    lines[0] = f"{len(lines) - 1} 10 5"
    p = _write(tmp_path, "t.txt", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"^{p}:42: duplicate feature index 1"):
        formats.read_xc_bow(p)


BAD_XY = [
    ("header", "2 5 1\n0:1\n1:1\n", 1, r"bad header .*'num_points num_labels'"),
    ("range", "2 5\n0:1\n5:1\n", 3, r"label index 5 out of range \(num_labels=5\)"),
    ("negative", "2 5\n-1:1\n1\n", 2, r"negative label index -1"),
    ("no_value", "2 5\n0:1\n1:\n", 3, r"has no value"),
    ("nan", "2 5\n0:nan\n1\n", 2, r"non-finite"),
    ("nonnumeric", "2 5\n0:1\nb\n", 3, r"label index 'b'"),
    ("truncated", "3 5\n0:1\n1\n", 3, r"file ends after 2 data lines"),
    ("too_many", "1 5\n0:1\n1\n", 3, r"more data lines"),
]


@pytest.mark.parametrize("case", BAD_XY, ids=[c[0] for c in BAD_XY])
def test_xy_errors(tmp_path, case):
    name, text, line, pattern = case
    p = _write(tmp_path, "tst_X_Y.txt", text)
    with pytest.raises(DataFormatError) as ei:
        formats.read_xy(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert re.search(pattern, msg), msg


# --------------------------------------------------------------------------------------------------- cache
def test_load_bow_cached(tmp_path, monkeypatch):
    X, Y = _random_xy(np.random.default_rng(3))
    p = tmp_path / "train.txt"
    formats.write_xc_bow(p, X, Y)
    cache = tmp_path / "cache"
    X1, Y1 = formats.load_bow_cached(p, cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(formats, "read_xc_bow", boom)
    X2, Y2 = formats.load_bow_cached(p, cache, num_features=30, num_labels=12)
    _assert_same(X2, X1)
    _assert_same(Y2, Y1)
    with pytest.raises(DataFormatError, match="num_labels=12 but 13"):
        formats.load_bow_cached(p, cache, num_labels=13)
    monkeypatch.undo()
    # a changed file (size/mtime) is parsed again, under a new key
    formats.write_xc_bow(p, X[:10], Y[:10])
    os.utime(p, ns=(1, 1))
    X3, _ = formats.load_bow_cached(p, cache)
    assert X3.shape == (10, 30) and len(list(cache.iterdir())) == 2
    # a corrupt cache entry is rebuilt
    for f in cache.iterdir():
        f.write_bytes(b"garbage")
    X4, _ = formats.load_bow_cached(p, cache)
    _assert_same(X4, X3)
    assert not [f for f in cache.iterdir() if f.name.endswith(".tmp")]


def test_valid_files_take_the_vectorised_path(tmp_path, monkeypatch):
    """Well-formed files never fall back to the (slow) line-by-line parser."""
    def slow(*a, **k):
        raise AssertionError("slow path used on a valid file")

    monkeypatch.setattr(formats, "_bow_line_slow", slow)
    monkeypatch.setattr(formats, "_parse_pair_slow", slow)
    X, Y = _random_xy(np.random.default_rng(4))
    formats.write_xc_bow(tmp_path / "a.txt", X, Y)
    formats.write_xy(tmp_path / "a_X_Y.txt", Y)
    _assert_same(formats.read_xc_bow(tmp_path / "a.txt")[0], X)
    _assert_same(formats.read_xy(tmp_path / "a_X_Y.txt"), Y)
    text = "5 4 3\r\n2,0,2 1:1  3:2 \r\n 0:1\r\n1\r\n\r\n0 2:5e-07\r\n\r\n"
    assert formats.read_xc_bow(_write(tmp_path, "b.txt", text))[0].nnz == 4
    assert formats.read_xy(_write(tmp_path, "b_X_Y.txt", "2 3\n0 2:0.5\n1:1 1\n")).nnz == 3


def test_line_longer_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 50)
    p = _write(tmp_path, "trn_X.txt", "short\n" + "x" * 80 + "\n")
    with pytest.raises(DataFormatError, match=r"trn_X\.txt:2: line longer than 50 bytes"):
        formats.read_lines(p)
    monkeypatch.setattr(formats, "_BLOCK_BYTES", 16)
    p = _write(tmp_path, "train.txt", "1 3 2\n0 " + " ".join(["1:1"] * 30), gz=True)  # no newline at all
    with pytest.raises(DataFormatError, match=r"train\.txt\.gz:2: line longer than 50 bytes"):
        formats.read_xc_bow(p)


@pytest.mark.parametrize("damage", ["cut", "flip", "foreign"])
def test_damaged_parse_cache_is_reparsed(tmp_path, damage):
    X, Y = _random_xy(np.random.default_rng(3))
    p = tmp_path / "train.txt"
    formats.write_xc_bow(p, X, Y)
    want = formats.load_bow_cached(p, tmp_path / "cache")
    (cf,) = (tmp_path / "cache").iterdir()
    b = bytearray(cf.read_bytes())
    if damage == "cut":
        b = b[: len(b) // 2]
    elif damage == "flip":
        b[len(b) // 2] ^= 0xFF
    else:  # a well-formed entry whose indices point outside the matrix
        with np.load(cf) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["X_indices"] = arrays["X_indices"] + 1000
        formats.save_cache(cf, arrays)
        b = cf.read_bytes()
    cf.write_bytes(bytes(b))
    got = formats.load_bow_cached(p, tmp_path / "cache")
    for a, w in zip(got, want):
        assert (a != w).nnz == 0 and a.shape == w.shape


def test_auto_feature_transform_follows_the_values():
    """dataset.feature_transform=auto (dataset=xc): integer values (binary, counts) get tf-idf + L2, real values
    (tf-idf already) L2-normalised rows; a row's direction is kept in the second case."""
    import numpy as np
    import scipy.sparse as sp

    from xmcneg.data.inputs import FeatureTransform

    counts = sp.csr_matrix(np.array([[1, 0, 3], [0, 2, 1]], dtype=np.float32))
    t = FeatureTransform("auto").fit(counts)
    assert t.name == "tfidf_l2" and t.idf is not None
    weights = sp.csr_matrix(np.array([[0.5, 0, 0.25], [0, 0.3, 0.1]], dtype=np.float32))
    t = FeatureTransform("auto").fit(weights)
    out = t(weights).toarray()
    assert t.name == "l2" and t.idf is None
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(out[0] / out[0, 0], weights.toarray()[0] / 0.5, rtol=1e-6)
