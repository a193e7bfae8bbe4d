"""Bad input through the real entry point: each case gives ONE line on stderr, `error: <file>:<line>: ...` (a
malformed data file), `error: config key '<key>': ...` (a bad config value) or `error: <what is missing> ...`
(a missing file), and exit code 2, with no traceback (the traceback only with HYDRA_FULL_ERROR=1).

The table runs `xmcneg.train.cli(xmcneg.train.run, cfg)` in-process (tests/inprocess.py: a config composed with
Hydra's compose API, no Hydra app around it). Two cases run `train.py` as a subprocess, as a user does. The readers' own leniencies (empty documents, documents
without labels, repeated labels, CRLF) are covered in tests/test_formats.py.
"""
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inprocess import run_in_process

ROOT = Path(__file__).resolve().parents[1]

# a tiny valid XC BoW dataset: F features, C labels, N_TRAIN / N_TEST points
F, C, N_TRAIN, N_TEST = 10, 80, 20, 6  # C > the samplers' default 64 negatives
FAST = ["logger=none", "trainer.max_epochs=1", "encoder=bow_mlp", "trainer.enable_progress_bar=false",
        "data.batch_size=8", "encoder.dim=8", "encoder.hidden=16", "eval.k=5"]


def _point(i):
    """Line of point i: two labels, two features (valid)."""
    return f"{i % C},{(i + 1) % C} {i % F}:1.0 {(i + 3) % F}:0.5"


def bow(lines, n=None, f=F, c=C, header=None):
    """An XC BoW file: the header (`n f c` by default) and the given data lines."""
    head = header if header is not None else f"{len(lines) if n is None else n} {f} {c}"
    return "\n".join([head, *lines]) + "\n"


def train_lines(bad=None, at=2):
    """N_TRAIN valid lines; with `bad`, the point at file line `at` (the header is line 1) is replaced by it."""
    lines = [_point(i) for i in range(N_TRAIN)]
    if bad is not None:
        lines[at - 2] = bad
    return lines


GOOD_TRAIN = bow(train_lines())
GOOD_TEST = bow([_point(i) for i in range(N_TEST)])


def xy(n=None, c=C, rows=None, bad=None, at=2):
    rows = rows if rows is not None else [f"{i % c}:1 {(i + 2) % c}:1" for i in range(N_TRAIN)]
    if bad is not None:
        rows = list(rows)
        rows[at - 2] = bad
    return "\n".join([f"{len(rows) if n is None else n} {c}", *rows]) + "\n"


def texts(n):
    return "\n".join(f"alpha beta gamma doc{i % 3} word{i % 4}" for i in range(n)) + "\n"


def text_layout(trn_X=None, trn_X_Y=None, lbl_X=None):
    """Files of the text layout (trn_X.txt / trn_X_Y.txt / tst_X.txt / tst_X_Y.txt [/ lbl_X.txt])."""
    files = {"trn_X.txt": texts(N_TRAIN) if trn_X is None else trn_X,
             "trn_X_Y.txt": xy() if trn_X_Y is None else trn_X_Y,
             "tst_X.txt": texts(N_TEST),
             "tst_X_Y.txt": xy(rows=[f"{i % C}:1" for i in range(N_TEST)])}
    if lbl_X is not None:
        files["lbl_X.txt"] = lbl_X
    return files


def xc(train=GOOD_TRAIN, test=GOOD_TEST, **more):
    files = {"train.txt": train, "test.txt": test, **more}
    return {k: v for k, v in files.items() if v is not None}


def data_err(file, line, msg):
    """Expect `error: <dataset dir>/<file>:<line>: <msg regex>`."""
    return lambda d: rf"error: {re.escape(str(d / file))}:{line}: {msg}"


def key_err(key, msg):
    """Expect `error: config key '<key>': <msg regex>`."""
    return lambda d: rf"error: config key '{re.escape(key)}': {msg}"


def missing_err(fmt):
    """Expect a missing-file line; `fmt` (a regex) may use {d} for the escaped dataset dir."""
    return lambda d: "error: " + fmt.format(d=re.escape(str(d)))


def gz(text, cut=None, flip=None):
    """gzip bytes of `text`, cut to `cut` bytes or with byte `flip` inverted."""
    b = bytearray(gzip.compress(text.encode(), mtime=0))
    if flip is not None:
        b[flip] ^= 0xFF
    return bytes(b[:cut])


def lf_rows(n, bad=None, at=None):
    """An LF json file of n documents; with `bad`, the document at line `at` gets target_ind = bad."""
    rows = [{"uid": str(i), "title": f"alpha beta doc{i % 3}", "content": "", "target_ind": [i % C]}
            for i in range(n)]
    if bad is not None:
        rows[at - 1]["target_ind"] = bad
    return "".join(json.dumps(r) + "\n" for r in rows)


def lf(trn=None, **more):
    files = {"trn.json.gz": gz(trn if trn is not None else lf_rows(N_TRAIN)), "tst.json.gz": gz(lf_rows(N_TEST)),
             "lbl.json.gz": gz("".join(json.dumps({"title": f"label {i}"}) + "\n" for i in range(C))), **more}
    return {k: v for k, v in files.items() if v is not None}


XC = ["dataset=xc", "sampler=uniform"]
TEXT = ["dataset=eurlex57k_text", "encoder=bow_mlp"]  # text layout, BoW features built from the text
LF = ["dataset=lf_json", "encoder=text_bow", "encoder.text.min_df=1"]

# (id, files, overrides (dataset.dir is added), expected stderr line (regex, full match))
CASES = [
    # ---- malformed XC BoW files
    ("header_not_int", xc(train=bow(train_lines(), header=f"x {F} {C}")), XC,
     data_err("train.txt", 1, rf"bad header 'x {F} {C}': expected 'num_points num_features num_labels' "
                              r"\(3 integers\)")),
    ("header_two_fields", xc(train=bow(train_lines(), header=f"{N_TRAIN} {F}")), XC,
     data_err("train.txt", 1, r"bad header '20 10': expected 'num_points num_features num_labels' \(3 integers\)")),
    ("label_id_out_of_range", xc(train=bow(train_lines(bad=f"{C} 1:1", at=5))), XC,
     data_err("train.txt", 5, rf"label id {C} out of range \(num_labels={C}\)")),
    ("negative_label_id", xc(train=bow(train_lines(bad="-1 1:1", at=4))), XC,
     data_err("train.txt", 4, r"negative label id -1 \(label ids are 0-based\)")),
    ("empty_label_id", xc(train=bow(train_lines(bad="0,,1 1:1", at=3))), XC,
     data_err("train.txt", 3, r"empty label id in '0,,1' \(stray comma\?\)")),
    ("feature_without_value", xc(train=bow(train_lines(bad="0 3:", at=6))), XC,
     data_err("train.txt", 6, r"feature token '3:' has no value after ':'")),
    ("token_without_colon", xc(train=bow(train_lines(bad="0 1:1 3", at=7))), XC,
     data_err("train.txt", 7, r"feature token '3' has no ':' \(expected index:value\)")),
    ("non_numeric_value", xc(train=bow(train_lines(bad="0 3:abc", at=8))), XC,
     data_err("train.txt", 8, r"feature value 'abc' in token '3:abc' is not a number")),
    ("feature_index_out_of_range", xc(train=bow(train_lines(bad=f"0 {F}:1", at=9))), XC,
     data_err("train.txt", 9, rf"feature index {F} out of range \(num_features={F}\) in token '{F}:1'")),
    ("nan_value", xc(train=bow(train_lines(bad="0 2:nan", at=10))), XC,
     data_err("train.txt", 10, r"non-finite feature value in token '2:nan'")),
    ("duplicate_feature", xc(train=bow(train_lines(bad="0 3:1 5:1 3:2", at=11))), XC,
     data_err("train.txt", 11, r"duplicate feature index 3 on the line")),
    ("truncated_file", xc(train=bow(train_lines()[:17], n=N_TRAIN)), XC,
     data_err("train.txt", 18, rf"file ends after 17 data lines, but the header says num_points={N_TRAIN} "
                               r"\(truncated file\?\)")),
    ("extra_data_lines", xc(train=bow(train_lines() + ["0 1:1", "1 2:1"], n=N_TRAIN)), XC,
     data_err("train.txt", N_TRAIN + 2, rf"more data lines than the header's num_points={N_TRAIN} "
                                        r"\(line is '0 1:1'\)")),
    ("test_num_features_differs", xc(test=bow([_point(i) for i in range(N_TEST)], f=F + 2)), XC,
     data_err("test.txt", 1, rf"header says num_features={F + 2} but {F} was expected "
                             r"\(it must match the training split / config\)")),
    ("test_label_out_of_range", xc(test=bow([_point(0), f"0,{C + 7} 1:1", _point(2)])), XC,
     data_err("test.txt", 3, rf"label id {C + 7} out of range \(num_labels={C}\)")),
    # ---- missing files
    ("missing_train_file", xc(train=None), XC,
     missing_err(r"{d}/train\.txt: file not found \(put it there, or set XMC_DATA_DIR / dataset\.dir\)")),
    ("missing_dataset_dir", None, XC,
     missing_err(r"dataset 'xc': directory {d} not found; put train\.txt and test\.txt there "
                 r"\(set XMC_DATA_DIR or dataset\.dir\)")),
    ("ngame_without_label_texts", xc(), XC + ["sampler=ngame"],
     missing_err(r"dataset 'xc': label-text file {d}/lbl_X\.txt not found "
                 r"\(NGAME needs one text per label; set dataset\.label_text_file\)")),
    # ---- bad config values
    ("batch_size_zero", xc(), XC + ["data.batch_size=0"], key_err("data.batch_size", "must be > 0, got 0")),
    ("val_size_too_large", xc(), XC + ["data.val_size=100"],
     key_err("data.val_size", rf"gives 100 validation points out of {N_TRAIN} training points")),
    ("num_negatives_zero", xc(), XC + ["sampler.num_negatives=0"],
     key_err("sampler.num_negatives", "must be > 0, got 0")),
    ("num_negatives_not_below_C", xc(), XC + [f"sampler.num_negatives={C}"],
     key_err("sampler.num_negatives", rf"{C} negatives must be fewer than the {C} labels")),
    ("num_negatives_not_an_int", xc(), XC + ["sampler.num_negatives=lots"],
     key_err("sampler.num_negatives", r".+")),
    ("propensity_a_negative", xc(), XC + ["dataset.propensity_a=-1"],
     key_err("dataset.propensity_a", r"must be > 0, got -1\.0")),
    ("feature_transform_unknown", xc(), XC + ["dataset.feature_transform=bogus"],
     key_err("dataset.feature_transform", r"unknown 'bogus', expected one of auto, none, l2, tfidf_l2")),
    ("ns_loss_with_full_sampler", xc(), XC + ["loss=ns", "sampler=full"],
     key_err("loss.name", r"'ns' needs sampled negatives; use bce, softmax or sq_hinge with sampler=full")),
    ("input_optimizer_unknown", xc(), XC + ["optim.input_optimizer=bogus"],
     key_err("optim.input_optimizer", r"expected auto, adamw or sgd, got 'bogus'")),
    ("input_sgd_below_labels_negative", xc(), XC + ["optim.input_sgd_below_labels=-1"],
     key_err("optim.input_sgd_below_labels", r"expected an integer >= 0 or null, got -1")),
    ("full_label_lr_negative", xc(), XC + ["optim.full_label_lr=-1"],
     key_err("optim.full_label_lr", r"must be >= 0, got -1")),
    ("label_init_unknown", xc(), XC + ["optim.label_init=pifa"],
     key_err("optim.label_init", r"expected random or centroid, got 'pifa'")),
    ("label_optimizer_unknown", xc(), XC + ["optim.label_optimizer=bogus"],
     key_err("optim.label_optimizer", r"unknown 'bogus', expected one of .+")),
    ("wide_features_zero", xc(), XC + ["wide.features=0"], key_err("wide.features", r"expected an integer > 0, got 0")),
    ("wide_enabled_unknown", xc(), XC + ["wide.enabled=maybe"],
     key_err("wide.enabled", r"expected auto, true or false, got 'maybe'")),
    ("wide_with_sampled_negatives", xc(), XC + ["wide.enabled=true", "sampler.num_negatives=3"],
     key_err("wide.enabled", r"the wide head needs every label scored: .+")),
    ("kill_in_unknown", xc(), XC + ["debug.kill_in=bogus"], key_err("debug.kill_in", r"expected one of .+, got bogus")),
    ("dataset_format_unknown", xc(), XC + ["dataset.format=csv"],
     key_err("dataset.format", r"unknown format 'csv', expected bow, synthetic, text or lf_json")),
    ("encoder_dim_zero", xc(), XC + ["encoder.dim=0"], key_err("encoder.dim", r"must be > 0, got 0")),
    # ---- NGAME label texts, text layout
    ("ngame_label_text_count", xc(**{"lbl_X.txt": "w1 w2\nw3\nw4\nw5\n"}), XC + ["sampler=ngame"],
     data_err("lbl_X.txt", 4, rf"has 4 lines, expected {C} \(one per point/label\)")),
    ("text_label_file_bad_index", text_layout(trn_X_Y=xy(bad=f"0:1 {C + 7}:1", at=6)), TEXT,
     data_err("trn_X_Y.txt", 6, rf"label index {C + 7} out of range \(num_labels={C}\) in token '{C + 7}:1'")),
    ("text_line_count_mismatch", text_layout(trn_X=texts(N_TRAIN - 2)), TEXT,
     data_err("trn_X.txt", N_TRAIN - 2, rf"has {N_TRAIN - 2} lines \(documents\) but .*trn_X_Y\.txt has "
                                         rf"{N_TRAIN} points.*")),
    ("text_invalid_utf8", text_layout(trn_X=texts(2).encode() + b"caf\xe9\n" + texts(N_TRAIN - 3).encode()), TEXT,
     data_err("trn_X.txt", 3, r"not valid UTF-8 text \(unexpected end of data at byte 3\)")),
    ("header_count_absurd", xc(train=bow(train_lines(), header=f"{N_TRAIN} 99999999999 {C}")), XC,
     data_err("train.txt", 1, rf"bad header '{N_TRAIN} 99999999999 {C}': num_features=99999999999 is beyond "
                              r"2147483647")),
    # ---- compression
    ("gz_not_gzip", xc(train=None, **{"train.txt.gz": GOOD_TRAIN}), XC,
     missing_err(r"{d}/train\.txt\.gz: not gzip data although the file name ends in \.gz \(Not a gzipped file "
                 r"\(b'20'\)\)")),
    ("gz_cut_short", xc(train=None, **{"train.txt.gz": gz(GOOD_TRAIN, cut=60)}), XC,
     missing_err(r"{d}/train\.txt\.gz: gzip data cut short \(the compressed stream ends before its end marker: "
                 r"an incomplete copy or download\?\)")),
    ("gz_corrupt", xc(train=None, **{"train.txt.gz": gz(GOOD_TRAIN, flip=-6)}), XC,
     missing_err(r"{d}/train\.txt\.gz: corrupt gzip data \(CRC check failed .*\)")),
    ("gzip_data_plain_name", xc(train=gz(GOOD_TRAIN)), XC,
     data_err("train.txt", 1, r"gzip-compressed data, but the file name does not end in \.gz \(rename it to end "
                              r"in \.gz, or decompress it\)")),
    # ---- LF json: label ids must be JSON integers, fields of the right type
    ("lf_float_label_id", lf(trn=lf_rows(N_TRAIN, bad=[1.0], at=3)), LF,
     data_err("trn.json.gz", 3, r"label id 1\.0 in 'target_ind' is not an integer")),
    ("lf_bool_label_id", lf(trn=lf_rows(N_TRAIN, bad=[True], at=4)), LF,
     data_err("trn.json.gz", 4, r"label id true in 'target_ind' is not an integer")),
    ("lf_string_label_id", lf(trn=lf_rows(N_TRAIN, bad=["2"], at=5)), LF,
     data_err("trn.json.gz", 5, r"label id '2' in 'target_ind' is not an integer")),
    ("lf_nested_label_ids", lf(trn=lf_rows(N_TRAIN, bad=[[1, 2]], at=6)), LF,
     data_err("trn.json.gz", 6, r"label id \[1, 2\] in 'target_ind' is not an integer")),
    ("lf_target_not_a_list", lf(trn=lf_rows(N_TRAIN, bad=7, at=2)), LF,
     data_err("trn.json.gz", 2, r"'target_ind' must be a list of integer label ids, got 7")),
    ("lf_title_not_a_string", lf(trn=lf_rows(N_TRAIN).replace('"alpha beta doc1"', "12", 1)), LF,
     data_err("trn.json.gz", 2, r"'title' must be a string, got 12")),
    ("lf_deeply_nested", lf(trn=lf_rows(N_TRAIN).replace('"alpha beta doc0"', "[" * 10 ** 5 + "]" * 10 ** 5, 1)), LF,
     data_err("trn.json.gz", 1, r"not a JSON object: maximum recursion depth exceeded.*")),
    ("lf_cut_short", lf(**{"trn.json.gz": gz(lf_rows(N_TRAIN), cut=100)}), LF,
     missing_err(r"{d}/trn\.json\.gz: gzip data cut short .*")),
    ("lf_filter_bad_line", lf(**{"filter_labels_test.txt": "0 1\n2 x\n"}), LF,
     data_err("filter_labels_test.txt", 2, r"expected 'doc_id label_id' \(two non-negative integers\), got "
                                           r"'2 x'")),
    ("lf_filter_doc_out_of_range", lf(**{"filter_labels_test.txt": f"0 1\n{N_TEST} 2\n"}), LF,
     data_err("filter_labels_test.txt", 2, rf"document id {N_TEST} out of range \({N_TEST} documents\)")),
    # ---- vocabulary of the label texts (NGAME on BoW data)
    ("vocab_df_not_a_number", xc(**{"lbl_X.txt": "alpha\n" * C, "vocab.txt": "alpha\tnan\n" * F}),
     XC + ["sampler=ngame"],
     data_err("vocab.txt", 1, r"expected 'term<TAB>document frequency' \(a number >= 0\), got 'alpha\\tnan'")),
]

XFAIL = {}  # every case gives its one-line error today


def _params():
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[case[0]])] if case[0] in XFAIL else []
        out.append(pytest.param(*case[1:], id=case[0], marks=marks))
    return out


def test_at_least_15_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 15


def _write(d, files):
    d.mkdir(parents=True)
    for name, text in files.items():
        if isinstance(text, bytes):
            (d / name).write_bytes(text)
        else:
            (d / name).write_text(text)


@pytest.mark.parametrize("files,overrides,expected", _params())
def test_bad_input_gives_one_line_and_exit_2(tmp_path, files, overrides, expected):
    d = tmp_path / "data"
    if files is not None:
        _write(d, files)
    out = tmp_path / "run"
    p = run_in_process("train.py", [f"dataset.dir={d}", *FAST, *overrides, f"hydra.run.dir={out}"], tmp_path)
    err = p.stderr
    assert p.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert re.fullmatch(expected(d), lines[0]), f"\n got: {lines[0]}\nwant: {expected(d)}"
    assert "Traceback" not in err
    assert json.loads((out / "results.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------- subprocess
@pytest.mark.parametrize("full_error", [False, True], ids=["one_line", "HYDRA_FULL_ERROR"])
def test_train_py_subprocess(tmp_path, full_error):
    d = tmp_path / "data"
    _write(d, xc(train=bow(train_lines(bad="0 3:1 5:1 3:2", at=11))))
    env = dict(os.environ, XMC_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "dataset=xc", f"dataset.dir={d}", *FAST,
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    line = f"{d / 'train.txt'}:11: duplicate feature index 3 on the line"
    if not full_error:
        assert p.returncode == 2, p.stderr[-3000:]
        assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [f"error: {line}"], p.stderr[-3000:]
        assert "Traceback" not in p.stdout
    else:
        assert p.returncode != 0
        assert "Traceback (most recent call last)" in p.stderr, p.stderr[-3000:]
        assert f"DataFormatError: {line}" in p.stderr
        assert f"error: {line}" not in p.stderr
