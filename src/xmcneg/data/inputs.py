"""Input builders of the datamodule, built from the dataset's files: :class:`BowInputs` (XC BoW files after
``dataset.feature_transform``) and :class:`TextInputs` (raw text of the text or LF json layout: token ids for a token
encoder, tf-idf bags of words for a BoW encoder, as ``encoder.text`` says). Both give the datamodule ``load(dir)``,
``x(X, rows)`` (a batch of encoder inputs), ``label_rows``, ``lengths``, ``encoder_kwargs``, ``text_inputs``."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from xmcneg.data import formats
from xmcneg.data.label_text import bow_label_features
from xmcneg.data.lf_json import LF_FILES, count_lines, read_lf_json
from xmcneg.data.tfidf import doc_freq, smooth_idf, tfidf_l2
from xmcneg.data.token_cache import TextSource, TokenRows, file_sha1, load_token_rows, load_vocab, save_vocab
from xmcneg.data.tokenizers import HashTokenizer, HFTokenizer, WordTokenizer
from xmcneg.errors import ConfigError, DataFormatError, MissingFileError
from xmcneg.hf_model import resolve_model_dir

log = logging.getLogger(__name__)

TEXT_FORMATS = ("text", "lf_json")
BOW_FORMATS = ("bow", "synthetic")
TOKENIZERS = ("hf", "word")
BOW_FEATURES = ("tfidf", "hashing")
TRANSFORMS = ("auto", "none", "l2", "tfidf_l2")
BOW_SOURCES = ("text", "bow")


def csr_rows_to_bag(X: sp.csr_matrix, rows):
    """EmbeddingBag inputs (indices, offsets, per-sample weights) for the given rows of a CSR matrix."""
    sub = X[rows]
    return {
        "indices": torch.from_numpy(sub.indices.astype(np.int64)),
        "offsets": torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
        "weights": torch.from_numpy(sub.data.astype(np.float32)),
    }


# ------------------------------------------------------------------------------------------------ choosing
def encoder_input_kind(enc_cfg) -> str:
    """``input_kind`` class attribute of ``encoder._target_`` ("bow" or "tokens")."""
    from hydra.utils import get_class

    target = enc_cfg.get("_target_")
    if not target:
        return "bow"
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001
        raise ConfigError("encoder._target_", f"cannot import '{target}': {e}") from None
    return getattr(cls, "input_kind", "bow")


def wants_text(enc_cfg) -> bool:
    """Whether the encoder reads text also where the dataset has XC BoW files: a token encoder, or a BoW encoder
    with ``encoder.text.source: text`` (text_bow); ``bow`` (bow_mlp, bow_linear) reads text on text layouts only."""
    if encoder_input_kind(enc_cfg) == "tokens":
        return True
    if enc_cfg.get("text") is None:
        return False
    source = enc_cfg["text"].get("source")
    if source not in BOW_SOURCES:
        raise ConfigError("encoder.text.source", f"got {source!r}, expected one of {', '.join(BOW_SOURCES)}")
    return source == "text"


def make_inputs(dataset_cfg, paths_cfg, encoder_cfg):
    """:class:`TextInputs` for a text layout, or a ``bow`` / ``synthetic`` dataset whose text the encoder reads
    (:func:`wants_text`); otherwise :class:`BowInputs`."""
    enc = encoder_cfg if encoder_cfg is not None else {}
    fmt = dataset_cfg["format"]
    if fmt in TEXT_FORMATS or (fmt in BOW_FORMATS and wants_text(enc)):
        return TextInputs(dataset_cfg, paths_cfg, enc)
    if fmt in BOW_FORMATS:
        return BowInputs(dataset_cfg, paths_cfg)
    raise ConfigError("dataset.format", f"unknown format '{fmt}', expected bow, synthetic, text or lf_json")


# ------------------------------------------------------------------------------------------------ XC BoW
class FeatureTransform:
    """none | l2 (row L2 normalisation) | tfidf_l2 (idf from the train split, then L2) | auto (tfidf_l2 when every
    training value is a non-negative integer: binary or count features; l2 otherwise: weights such as tf-idf, whose
    rows the learning rates assume of unit length); fitted on train only."""

    def __init__(self, name):
        if name not in TRANSFORMS:
            raise ConfigError("dataset.feature_transform",
                              f"unknown '{name}', expected one of {', '.join(TRANSFORMS)}")
        self.name, self.idf = name, None

    def fit(self, X_train):
        if self.name == "auto":
            v = X_train.data
            counts = v.size > 0 and bool((v >= 0).all() and (v == np.round(v)).all())
            self.name = "tfidf_l2" if counts else "l2"
            log.info("dataset.feature_transform=auto: %s (%s feature values)", self.name,
                     "integer" if counts else "real")
        if self.name == "tfidf_l2":
            self.idf = smooth_idf(doc_freq(X_train), X_train.shape[0]).astype(np.float32)
        return self

    def __call__(self, X):
        if self.name == "none":
            return sp.csr_matrix(X, dtype=np.float32)
        return tfidf_l2(X, self.idf)


class BowInputs:
    """Sparse feature rows read from XC BoW files; batches in EmbeddingBag form."""

    reads_text = False

    def __init__(self, dataset_cfg, paths_cfg):
        self.dcfg, self.paths = dataset_cfg, paths_cfg
        self.transform = self.num_features = self.label_text_path = None

    def check_dir(self, name, d):
        if not d.is_dir():
            raise MissingFileError(f"dataset '{name}': directory {d} not found; put {self.dcfg.train_file} and "
                                   f"{self.dcfg.test_file} there (set XMC_DATA_DIR or dataset.dir)")

    def load(self, d):
        cache = Path(self.paths.cache_dir) / "parsed"
        Xtr, Ytr = formats.load_bow_cached(d / self.dcfg.get("train_file", "train.txt"), cache)
        Xte, Yte = formats.load_bow_cached(d / self.dcfg.get("test_file", "test.txt"), cache,
                                           num_features=Xtr.shape[1], num_labels=Ytr.shape[1])
        self.transform = FeatureTransform(self.dcfg.get("feature_transform", "none")).fit(Xtr)
        Xtr, Xte = self.transform(Xtr), self.transform(Xte)
        self.num_features = Xtr.shape[1]
        label_file = self.dcfg.get("label_text_file")
        self.label_text_path = formats.resolve_path(d / label_file, required=False) if label_file else None
        return Xtr, Ytr, Xte, Yte

    def x(self, X, rows):
        return csr_rows_to_bag(X, rows)

    def label_rows(self, dm):
        return bow_label_features(dm)

    def lengths(self, X):
        return None

    def encoder_kwargs(self):
        return {"num_features": int(self.num_features)}

    def text_inputs(self, texts):
        raise ConfigError("input", "this model reads XC BoW features, not text: give it an XC BoW file")


# ------------------------------------------------------------------------------------------------ text
def _no_bow_transform(X):
    raise ConfigError("input", "this model reads text, not XC BoW features: give it texts (one document per line) "
                               "through the datamodule's text_inputs(texts)")


class TextInputs:
    """Token ids (cut to ``encoder.max_len``; batches padded to their longest row) or (1 + log tf) x idf bags of
    words, rows L2-normalised, built from the text layout (``dataset.*_file``, defaults in ``_DEFAULTS``) or the LF
    json layout; token rows and vocabularies are cached (:mod:`xmcneg.data.token_cache`)."""

    reads_text = True
    _DEFAULTS = {"train_text_file": "trn_X.txt", "test_text_file": "tst_X.txt", "train_label_file": "trn_X_Y.txt",
                 "test_label_file": "tst_X_Y.txt", "label_text_file": "lbl_X.txt"}

    def __init__(self, dataset_cfg, paths_cfg, encoder_cfg):
        self.dcfg, self.paths, self.enc_cfg = dataset_cfg, paths_cfg, encoder_cfg
        self.fmt = dataset_cfg["format"]
        self.input_kind = encoder_input_kind(encoder_cfg)
        self.text_cfg = encoder_cfg.get("text") or {}
        key, kinds = ("tokenizer", TOKENIZERS) if self.input_kind == "tokens" else ("features", BOW_FEATURES)
        self.tokenizer_kind = str(self.text_key(key))
        if self.tokenizer_kind not in kinds:
            raise ConfigError(f"encoder.text.{key}",
                              f"unknown '{self.tokenizer_kind}', expected one of {', '.join(kinds)}")
        self.max_len = None
        if self.input_kind == "tokens" and encoder_cfg["max_len"] is not None:
            self.max_len = int(encoder_cfg["max_len"])
            if self.max_len < 2:
                raise ConfigError("encoder.max_len", f"must be >= 2, got {encoder_cfg['max_len']}")
        self.token_cache = {}
        self.tokenizer = self.idf = self.num_features = self.label_text_path = self._label_src = None
        self.transform = _no_bow_transform  # the BoW feature transform has no meaning for text inputs

    def text_key(self, key):
        """`encoder.text.<key>` (declared in conf/encoder/*.yaml); a missing key is a ConfigError."""
        if key not in self.text_cfg:
            raise ConfigError(f"encoder.text.{key}", "missing (conf/encoder/bow_mlp.yaml, text_bow.yaml and "
                                                     "tiny_transformer.yaml declare the text keys)")
        return self.text_cfg[key]

    # ---------------------------------------------------------------- files
    def _file(self, key):
        return self.dcfg.get(key) or self._DEFAULTS[key]

    def check_dir(self, name, d):
        if self.fmt == "lf_json":
            missing = [f for f in LF_FILES if not (d / f).exists()]
            if missing:
                raise MissingFileError(
                    f"dataset '{name}': {', '.join(missing)} not found in {d}; an LF dataset needs "
                    f"{', '.join(LF_FILES)} (+ filter_labels_test.txt) from the Extreme Classification Repository "
                    f"unpacked into {d} (set XMC_DATA_DIR or dataset.dir)")
        elif not d.is_dir():
            raise MissingFileError(
                f"dataset '{name}': directory {d} not found; put {self._file('train_text_file')}, "
                f"{self._file('train_label_file')}, {self._file('test_text_file')}, "
                f"{self._file('test_label_file')} there (set XMC_DATA_DIR or dataset.dir)")

    def _resolve(self, d, key, what):
        try:
            return formats.resolve_path(d / self._file(key))
        except MissingFileError:
            raise MissingFileError(
                f"dataset '{self.dcfg.name}': {what} {d / self._file(key)} not found (dataset.{key}; the encoder "
                f"reads text, so the dataset dir needs the text layout: trn_X.txt, trn_X_Y.txt, tst_X.txt, "
                f"tst_X_Y.txt)") from None

    # ---------------------------------------------------------------- loading
    def load(self, d):
        sources = self._lf_sources if self.fmt == "lf_json" else self._text_sources
        (src_tr, Ytr), (src_te, Yte), self._label_src = sources(d)
        self.tokenizer = self._make_tokenizer(src_tr)
        Xtr, Xte = self._tokens(src_tr, Ytr.shape[0]), self._tokens(src_te, Yte.shape[0])
        if self.input_kind == "tokens":
            self.num_features = int(self.tokenizer.vocab_size)
        else:
            self.num_features = self.tokenizer.vocab_size - self.tokenizer.n_special
            C = self._counts(Xtr)
            self.idf = smooth_idf(doc_freq(C), C.shape[0]).astype(np.float32)
            Xtr, Xte = self._bag(Xtr), self._bag(Xte)
        src_tr.release()
        src_te.release()
        self.label_text_path = self._label_src.path if self._label_src is not None else None
        return Xtr, Ytr, Xte, Yte

    def _text_sources(self, d):
        out = []
        for split in ("train", "test"):
            tp = self._resolve(d, f"{split}_text_file", f"{split} texts")
            yp = self._resolve(d, f"{split}_label_file", f"{split} labels")
            Y = formats.read_xy(yp, num_labels=None if split == "train" else out[0][1].shape[1])

            def read(tp=tp, yp=yp, n=Y.shape[0]):
                lines = formats.read_lines(tp)
                if len(lines) > n and not any(s.strip() for s in lines[n:]):  # blank lines after the last
                    del lines[n:]
                if len(lines) != n:  # at the line where the files stop matching: the text's end or first extra line
                    raise DataFormatError(tp, min(len(lines), n + 1) if lines else 1,
                                          f"has {len(lines)} lines (documents) but {yp} has {n} points: text and "
                                          f"label files must match line for line")
                return lines

            out.append((TextSource(split, tp, read), Y))
        C = out[0][1].shape[1]
        lp = formats.resolve_path(d / self._file("label_text_file"), required=False)
        return out[0], out[1], (TextSource("labels", lp, lambda: formats.read_lines(lp, C)) if lp is not None else None)

    def _lf_sources(self, d):
        use_content = bool(self.dcfg.get("use_content", False))
        variant = "-content" if use_content else "-title"
        lbl = d / "lbl.json.gz"
        C = count_lines(lbl)
        if C == 0:
            raise DataFormatError(lbl, 1, "no labels (empty file)")
        out = []
        for split, fname in (("train", "trn.json.gz"), ("test", "tst.json.gz")):
            p = d / fname
            cf = Path(self.paths.cache_dir) / "parsed" / f"lf-{fname.split('.')[0]}-{file_sha1(p)[:20]}-C{C}.npz"
            cached = formats.load_csr(cf, "Y")
            Y = cached[0] if cached is not None and cached[0].shape[1] == C else None
            src = TextSource(split, p, lambda p=p: read_lf_json(p, C, use_content, want_labels=False)[0], variant)
            if Y is None:
                texts, Y = read_lf_json(p, C, use_content)
                formats.save_csr(cf, Y=Y)
                src._texts = texts
            out.append((src, Y))
        label_src = TextSource("labels", lbl, lambda: read_lf_json(lbl, None, use_content, want_labels=False)[0],
                               variant)
        return out[0], out[1], label_src

    # ---------------------------------------------------------------- tokens
    def _make_tokenizer(self, src_tr):
        k = self.tokenizer_kind
        if k == "hf":
            return HFTokenizer(resolve_model_dir(self.enc_cfg["name_or_path"]))
        if k == "hashing":
            return HashTokenizer(int(self.text_key("hash_dim")))
        # word vocabulary from the training texts, cached
        min_df, max_df = int(self.text_key("min_df")), float(self.text_key("max_df"))
        max_vocab = int(self.text_key("max_vocab") or 0) or None
        cf = Path(self.paths.cache_dir) / "tokens" / (
            f"vocab-{src_tr.key}-df{min_df}-{max_df:g}-v{max_vocab or 'all'}.txt")
        vocab = load_vocab(cf) if cf.exists() else None
        if vocab is not None:
            return WordTokenizer(vocab)
        tok = WordTokenizer.build(src_tr.texts(), max_vocab=max_vocab, min_df=min_df, max_df=max_df)
        save_vocab(cf, tok.vocab)
        return tok

    def _tokens(self, src, n_expected) -> TokenRows:
        """The source's token rows: from the cache, or tokenised once and cached."""
        cls = self.input_kind == "tokens"
        key = f"{self.tokenizer.name}-L{self.max_len if self.max_len is not None else 'all'}" \
              f"{'' if cls else '-bag'}-{src.key}"
        cf = Path(self.paths.cache_dir) / "tokens" / f"{key}.npz"
        rows = load_token_rows(cf, n_expected, self.tokenizer.vocab_size)
        if rows is not None:
            self.token_cache[src.name] = "hit"
            return rows
        rows = TokenRows.from_lists(self.tokenizer.encode(src.texts(), self.max_len, cls=cls))
        formats.save_cache(cf, {"ids": rows.ids, "indptr": rows.indptr})
        self.token_cache[src.name] = "miss"
        return rows

    # ---------------------------------------------------------------- bag of words
    def _counts(self, rows: TokenRows) -> sp.csr_matrix:
        """Word counts per row; the word tokenizer's special ids ([PAD]/[UNK]/[CLS]) are dropped."""
        ids = rows.ids.astype(np.int64)
        r = np.repeat(np.arange(len(rows)), rows.lengths)
        n_special = self.tokenizer.n_special
        keep = ids >= n_special
        ids, r = ids[keep] - n_special, r[keep]
        X = sp.csr_matrix((np.ones(len(ids), np.float32), (r, ids)), shape=(len(rows), self.num_features))
        X.sum_duplicates()
        return X

    def _bag(self, rows) -> sp.csr_matrix:
        X = tfidf_l2(self._counts(rows), self.idf, log_tf=True)
        X.sort_indices()
        return X

    # ---------------------------------------------------------------- for the datamodule
    def x(self, X, rows):
        if self.input_kind == "tokens":
            return X.padded(rows, self.tokenizer.pad_id)
        return csr_rows_to_bag(X, rows)

    def label_rows(self, dm):
        if self._label_src is None:
            raise MissingFileError(
                f"dataset '{dm.name}': no label texts ({self._file('label_text_file')} not found in "
                f"{dm.dataset_dir()}); set dataset.label_text_file")
        rows = self._tokens(self._label_src, dm.num_labels)
        self._label_src.release()
        return rows if self.input_kind == "tokens" else self._bag(rows)

    def lengths(self, X):
        """Row lengths for length-grouped batches (token inputs), else None."""
        return X.lengths if self.input_kind == "tokens" else None

    def encoder_kwargs(self):
        if self.input_kind == "tokens" and self.tokenizer_kind == "hf":
            return {}
        return {"num_features": int(self.num_features)}

    def text_inputs(self, texts):
        """Encoder inputs for arbitrary texts (e.g. prediction on new documents), one batch."""
        cls = self.input_kind == "tokens"
        rows = TokenRows.from_lists(self.tokenizer.encode(list(texts), self.max_len, cls=cls))
        return self.x(rows if cls else self._bag(rows), np.arange(len(rows)))
