"""Text input: a LightningDataModule that turns raw document / label texts into encoder inputs.

Layouts (``dataset.format``; ``.gz`` accepted everywhere):

* ``text`` (also used for ``bow`` / ``synthetic`` datasets when the encoder reads text): ``trn_X.txt`` /
  ``tst_X.txt`` (one document per line), ``trn_X_Y.txt`` / ``tst_X_Y.txt`` (XY label files), ``lbl_X.txt``
  (label i's text on line i). File names come from ``dataset.train_text_file``, ``test_text_file``,
  ``train_label_file``, ``test_label_file``, ``label_text_file`` (defaults: the names above). The number of
  text lines must equal the number of points of the label file (a one-line error otherwise).
* ``lf_json`` (Extreme Classification Repository, LF-* datasets): ``trn.json.gz``, ``tst.json.gz``,
  ``lbl.json.gz``, one JSON object per line with ``uid``, ``title``, ``content``, ``target_ind``; the text is
  the title (+ " " + content when ``dataset.use_content``). ``filter_labels_test.txt`` (``doc label`` per
  line) lists (test document, label) pairs to drop from the predictions before scoring: see
  :meth:`TextDataModule.filter_pairs` (``filter_labels_train.txt``, when present, does the same for the
  validation documents carved from train).

What the inputs are depends on the encoder (``encoder._target_``'s ``input_kind`` and ``encoder.text``):

* ``input_kind == "tokens"`` (transformer, tiny_transformer): token ids. ``encoder.text.tokenizer`` = ``hf``
  (the Hugging Face tokenizer stored with the model in ``encoder.name_or_path``) or ``word`` (a word-level
  vocabulary built from the training texts: ``max_vocab`` most frequent words with document frequency >=
  ``min_df``; id 0 = [PAD], 1 = [UNK], 2 = [CLS] which starts every sequence). Sequences are cut to
  ``encoder.max_len``. Batches: ``x = {"input_ids": (B, L), "attention_mask": (B, L)}`` LongTensors with L the
  longest sequence in the batch. Evaluation batches group documents of similar length; training batches too
  (``encoder.text.sort_window`` batches' worth of shuffled documents sorted by length, batches shuffled).
* ``input_kind == "bow"`` (``encoder=text_bow``, or bow_linear / bow_mlp on a text-only dataset): a sparse
  bag of words built here from the raw text, ``encoder.text.features`` = ``tfidf`` (vocabulary of words with
  ``min_df`` <= df <= ``max_df`` x N_train, at most ``max_vocab``) or ``hashing`` (``hash_dim`` buckets of
  crc32(word)); values (1 + log tf) x idf (idf = log((1 + N) / (1 + df)) + 1 from the training split), rows
  L2-normalised. Batches are in EmbeddingBag form exactly like :class:`XCDataModule`, so bow_linear / bow_mlp
  run unchanged; ``num_features`` = vocabulary size / ``hash_dim``.

Tokenisation runs once per (tokenizer, max_len, file content) and is cached as ``.npz`` (flat int32 ids +
int64 row pointers) in ``${paths.cache_dir}/tokens/<tokenizer>-L<max_len>-<sha1 of the file bytes>.npz``;
later setups read the cache instead of the text (``dm.token_cache`` records ``hit`` / ``miss`` per file).
Word vocabularies are cached next to them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from xmcneg.data import formats
from xmcneg.data.datamodule import XCDataModule, csr_rows_to_bag
from xmcneg.errors import ConfigError, DataFormatError, MissingFileError

log = logging.getLogger("xmcneg")

TEXT_FORMATS = ("text", "lf_json")
TOKENIZERS = ("hf", "word")
BOW_FEATURES = ("tfidf", "hashing")
_WORD_RE = re.compile(r"\w+(?:['-]\w+)*")
PAD, UNK, CLS = 0, 1, 2  # word tokenizer special ids
_N_SPECIAL = 3
LF_FILES = ("trn.json.gz", "tst.json.gz", "lbl.json.gz")


# ------------------------------------------------------------------------------------------------ choosing
def encoder_input_kind(enc_cfg) -> str:
    """``input_kind`` class attribute of ``encoder._target_`` ("bow" or "tokens")."""
    from hydra.utils import get_class

    target = enc_cfg.get("_target_") if enc_cfg is not None else None
    if not target:
        return "bow"
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001
        raise ConfigError("encoder._target_", f"cannot import '{target}': {e}") from None
    return getattr(cls, "input_kind", "bow")


def wants_text(enc_cfg) -> bool:
    """Whether the encoder reads text: a token encoder, or a BoW encoder with an ``encoder.text`` section
    (text_bow: features built from the raw text)."""
    return encoder_input_kind(enc_cfg) == "tokens" or enc_cfg.get("text") is not None


# ------------------------------------------------------------------------------------------------ token rows
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
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
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


def _ragged(seqs):
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    indptr = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(indptr[-1]))
    return ids, indptr


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Training order with little padding: each epoch, shuffle all rows, sort windows of ``window x batch_size``
    rows by length, cut them into batches and shuffle the batches; the batch sampler then takes consecutive
    ``batch_size`` indices as one batch (:class:`~xmcneg.data.datamodule.RankBatchSampler`, which under DDP deals
    these blocks out to the ranks). Seeded by (seed, epoch), so the same on every rank; the epoch advances on every
    pass (or via ``set_epoch``)."""

    def __init__(self, lengths, batch_size, window=50, seed=0):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.window, self.seed, self.epoch = int(batch_size), int(window), int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.lengths)

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


# ------------------------------------------------------------------------------------------------ tokenizers
def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _cut(text: str, n_chars: int) -> str:
    """``text`` cut at the last space before ``n_chars`` (so the tokens of the cut text are a prefix of the
    full text's tokens); unchanged when shorter."""
    if len(text) <= n_chars:
        return text
    sp_at = text.rfind(" ", 0, n_chars)
    return text[:sp_at] if sp_at > 0 else text[:n_chars]


def _encode_exact(texts, max_len, encode_batch, chars_per_token=16, chunk=4096):
    """Token id lists for ``texts`` truncated to ``max_len``, tokenising only a prefix of long texts: a text
    is first cut at ``max_len x chars_per_token`` characters (at a space) and re-tokenised in full only when
    the cut text gave fewer than ``max_len`` tokens — so the result equals tokenising the full texts."""
    out = []
    n_chars = None if max_len is None else int(max_len) * chars_per_token
    for lo in range(0, len(texts), chunk):
        part = texts[lo: lo + chunk]
        cut = part if n_chars is None else [_cut(t, n_chars) for t in part]
        enc = encode_batch(cut)
        if n_chars is not None:
            redo = [i for i, (t, c, e) in enumerate(zip(part, cut, enc)) if len(c) < len(t) and len(e) < max_len]
            if redo:
                for i, e in zip(redo, encode_batch([part[i] for i in redo])):
                    enc[i] = e
        out.extend(enc)
    return out


class WordTokenizer:
    """Word-level vocabulary built from training texts (lower-cased ``\\w+`` words, ``'`` / ``-`` joined)."""

    kind = "word"

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.index = {w: i + _N_SPECIAL for i, w in enumerate(self.vocab)}
        self.name = "word-" + hashlib.sha1("\n".join(self.vocab).encode()).hexdigest()[:12]
        self.vocab_size = len(self.vocab) + _N_SPECIAL
        self.pad_id = PAD

    @classmethod
    def build(cls, texts, max_vocab=None, min_df=1, max_df=1.0):
        df = Counter()
        for t in texts:
            df.update(set(words(t)))
        n = max(len(texts), 1)
        cap = float(max_df) * n if float(max_df) <= 1.0 else float(max_df)
        kept = [(w, c) for w, c in df.items() if int(min_df) <= c <= cap]
        kept.sort(key=lambda wc: (-wc[1], wc[0]))  # most frequent first, ties alphabetical: deterministic
        if max_vocab:
            kept = kept[: int(max_vocab)]
        return cls([w for w, _ in kept])

    def encode(self, texts, max_len=None, cls=True):
        """Lists of ids: [CLS] + word ids ([UNK] for unknown words), cut to max_len (None = all)."""
        get = self.index.get

        def batch(ts):
            pre = [CLS] if cls else []
            seqs = [pre + [get(w, UNK) for w in words(t)] for t in ts]
            return seqs if max_len is None else [s[: int(max_len)] for s in seqs]

        return _encode_exact(texts, max_len, batch, chars_per_token=64)


class HashTokenizer:
    """Each word -> crc32(word) mod ``dim`` (no vocabulary; for hashed bags of words)."""

    kind = "hashing"

    def __init__(self, dim):
        self.dim = int(dim)
        if self.dim <= 0:
            raise ConfigError("encoder.text.hash_dim", f"must be > 0, got {dim}")
        self.name = f"hash{self.dim}"

    def encode(self, texts, max_len=None, cls=False):
        d = self.dim
        return [[zlib.crc32(w.encode()) % d for w in words(t)] for t in texts]


class HFTokenizer:
    """The Hugging Face (fast) tokenizer stored in a local model directory; never downloads."""

    kind = "hf"

    def __init__(self, model_dir):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise MissingFileError("text encoders need transformers: pip install -e .[text]") from None
        self.dir = Path(model_dir)
        self.tok = AutoTokenizer.from_pretrained(str(self.dir), local_files_only=True)
        h = hashlib.sha1()
        for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if (self.dir / f).exists():
                h.update(f.encode() + b"\0" + (self.dir / f).read_bytes())
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(self.tok, "name_or_path", "") or self.dir.name))
        self.name = f"hf-{base.rsplit('/', 1)[-1][-40:]}-{h.hexdigest()[:10]}"
        self.vocab_size = len(self.tok)
        self.pad_id = int(self.tok.pad_token_id or 0)

    def encode(self, texts, max_len=None, cls=True):
        kw = {"add_special_tokens": True, "truncation": max_len is not None, "return_attention_mask": False,
              "return_token_type_ids": False}
        if max_len is not None:
            kw["max_length"] = int(max_len)

        def batch(ts):
            return list(self.tok(list(ts), **kw)["input_ids"])

        return _encode_exact(texts, max_len, batch, chars_per_token=16)


# ------------------------------------------------------------------------------------------------ caching
_SHA_MEMO: dict = {}


def file_sha1(path) -> str:
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


def _load_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001  (corrupt / partial cache entry: re-make it)
        return None


def _save_npz(path, arrays):
    try:
        formats._save_npz_atomic(Path(path), arrays)
    except OSError as e:
        log.warning("could not write cache %s: %s", path, e)


class _Source:
    """One split's text: where it comes from (for the cache key) and how to read it (memoised)."""

    def __init__(self, name, path, read, variant=""):
        self.name, self.path, self._read, self.variant = name, Path(path), read, variant
        self._texts = None

    @property
    def key(self):
        return file_sha1(self.path) + self.variant

    def texts(self):
        if self._texts is None:
            self._texts = self._read()
        return self._texts

    def release(self):
        self._texts = None


# ------------------------------------------------------------------------------------------------ LF json
def _lf_parse(path, num_labels=None, use_content=False, want_texts=True, want_labels=True):
    """Parse an XC-repo LF json(.gz) file -> (texts or None, Y csr or None)."""
    texts, counts, labels = [], [], []
    with formats.open_text(path, "rb") as f:
        for k, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataFormatError(path, k, f"not a JSON object: {e}") from None
            if not isinstance(obj, dict):
                raise DataFormatError(path, k, "not a JSON object")
            if want_texts:
                title = obj.get("title")
                if title is None:
                    raise DataFormatError(path, k, "missing key 'title'")
                text = str(title)
                if use_content and obj.get("content"):
                    text = f"{text} {obj['content']}"
                texts.append(" ".join(text.split()))
            if want_labels:
                tgt = obj.get("target_ind")
                if tgt is None:
                    raise DataFormatError(path, k, "missing key 'target_ind'")
                try:
                    ids = [int(t) for t in tgt]
                except (TypeError, ValueError):
                    raise DataFormatError(path, k, f"target_ind {str(tgt)[:60]!r} is not a list of label ids") \
                        from None
                for t in ids:
                    if t < 0 or (num_labels is not None and t >= num_labels):
                        raise DataFormatError(path, k, f"label id {t} out of range (num_labels={num_labels}, "
                                                       f"the number of lines of lbl.json.gz)")
                counts.append(len(ids))
                labels.extend(ids)
    Y = None
    if want_labels:
        indptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        Y = sp.csr_matrix((np.ones(len(labels), np.float32), np.asarray(labels, np.int64), indptr),
                          shape=(len(counts), int(num_labels)))
        Y.sum_duplicates()
        Y.data[:] = 1.0
    return (texts if want_texts else None), Y


def _count_lines(path) -> int:
    n = 0
    with formats.open_text(path, "rb") as f:
        for raw in f:
            n += bool(raw.strip())
    return n


def read_filter_pairs(path, num_docs=None, num_labels=None) -> np.ndarray:
    """``doc_id label_id`` per line (whitespace separated) -> int64 (M, 2); bad lines raise DataFormatError."""
    with formats.open_text(path, "rb") as f:
        data = f.read()
    toks = data.split()
    arr = None
    if len(toks) % 2 == 0 and all(t.isdigit() for t in toks):
        arr = np.array(toks, dtype=np.int64).reshape(-1, 2) if toks else np.zeros((0, 2), np.int64)
    if arr is None or (num_docs is not None and len(arr) and arr[:, 0].max() >= num_docs) or \
            (num_labels is not None and len(arr) and arr[:, 1].max() >= num_labels):
        for k, line in enumerate(data.split(b"\n"), start=1):
            t = line.split()
            if not t:
                continue
            if len(t) != 2 or not all(x.isdigit() for x in t):
                raise DataFormatError(path, k, f"expected 'doc_id label_id' (two non-negative integers), got "
                                               f"{line[:60].decode('utf-8', 'replace')!r}")
            d, lab = int(t[0]), int(t[1])
            if num_docs is not None and d >= num_docs:
                raise DataFormatError(path, k, f"document id {d} out of range ({num_docs} documents)")
            if num_labels is not None and lab >= num_labels:
                raise DataFormatError(path, k, f"label id {lab} out of range (num_labels={num_labels})")
    return arr


# ------------------------------------------------------------------------------------------------ datamodule
def _no_bow_transform(X):
    raise ConfigError("input", "this model reads text, not XC BoW features: give it texts (one document per line) "
                               "through TextDataModule.text_inputs(texts)")


class TextDataModule(XCDataModule):
    """Same splits, batches and hooks as :class:`XCDataModule` (it is one), with inputs built from text; see
    the module docstring. ``encoder_cfg`` is the ``encoder`` config group (it says which inputs to build)."""

    def __init__(self, dataset_cfg, data_cfg, paths_cfg, encoder_cfg, seed: int = 0):
        super().__init__(dataset_cfg, data_cfg, paths_cfg, seed=seed)
        self.enc_cfg = encoder_cfg
        self.input_kind = encoder_input_kind(encoder_cfg)
        text = encoder_cfg.get("text") or {}
        self.text_cfg = text
        if self.input_kind == "tokens":
            self.tokenizer_kind = str(text.get("tokenizer", "hf"))
            if self.tokenizer_kind not in TOKENIZERS:
                raise ConfigError("encoder.text.tokenizer",
                                  f"unknown '{self.tokenizer_kind}', expected one of {', '.join(TOKENIZERS)}")
            ml = encoder_cfg.get("max_len", 128)
            self.max_len = None if ml is None else int(ml)
            if self.max_len is not None and self.max_len < 2:
                raise ConfigError("encoder.max_len", f"must be >= 2, got {ml}")
        else:
            self.tokenizer_kind = str(text.get("features", "tfidf"))
            if self.tokenizer_kind not in BOW_FEATURES:
                raise ConfigError("encoder.text.features",
                                  f"unknown '{self.tokenizer_kind}', expected one of {', '.join(BOW_FEATURES)}")
            self.max_len = None
        self.token_cache = {}
        self._label_X = None
        self._filters = {}
        self.transform = _no_bow_transform  # XCDataModule's BoW feature transform has no meaning here

    # ---------------------------------------------------------------- files
    def _fmt(self):
        return self.dcfg.get("format", "text")

    def dataset_dir(self) -> Path:
        if self._fmt() == "synthetic":
            return super().dataset_dir()
        d = Path(self.dcfg.dir)
        if self._fmt() == "lf_json":
            missing = [f for f in LF_FILES if not (d / f).exists()]
            if missing:
                raise MissingFileError(
                    f"dataset '{self.name}': {', '.join(missing)} not found in {d}; an LF dataset needs "
                    f"{', '.join(LF_FILES)} (+ filter_labels_test.txt) from the Extreme Classification Repository "
                    f"unpacked into {d} (set XMC_DATA_DIR or dataset.dir)")
            return d
        if not d.is_dir():
            raise MissingFileError(
                f"dataset '{self.name}': directory {d} not found; put {self._file('train_text_file')}, "
                f"{self._file('train_label_file')}, {self._file('test_text_file')}, {self._file('test_label_file')}"
                f" there (set XMC_DATA_DIR or dataset.dir)")
        return d

    _DEFAULTS = {"train_text_file": "trn_X.txt", "test_text_file": "tst_X.txt", "train_label_file": "trn_X_Y.txt",
                 "test_label_file": "tst_X_Y.txt", "label_text_file": "lbl_X.txt",
                 "filter_test_file": "filter_labels_test.txt", "filter_train_file": "filter_labels_train.txt"}

    def _file(self, key):
        return self.dcfg.get(key) or self._DEFAULTS[key]

    def _resolve(self, d, key, what):
        try:
            return formats.resolve_path(d / self._file(key))
        except MissingFileError:
            raise MissingFileError(
                f"dataset '{self.name}': {what} {d / self._file(key)} not found (dataset.{key}; the encoder reads "
                f"text, so the dataset dir needs the text layout: trn_X.txt, trn_X_Y.txt, tst_X.txt, tst_X_Y.txt)"
            ) from None

    # ---------------------------------------------------------------- loading
    def setup(self, stage=None):
        if self._loaded:
            return
        d = self.dataset_dir()
        if self._fmt() == "lf_json":
            (src_tr, Ytr), (src_te, Yte), self._label_src = self._lf_sources(d)
        else:
            (src_tr, Ytr), (src_te, Yte), self._label_src = self._text_sources(d)
        self.tokenizer = self._make_tokenizer(src_tr)
        if self.input_kind == "tokens":
            Xtr, Xte = self._tokens(src_tr, Ytr.shape[0]), self._tokens(src_te, Yte.shape[0])
            self.num_features = int(self.tokenizer.vocab_size)
        else:
            Btr, Bte = self._tokens(src_tr, Ytr.shape[0]), self._tokens(src_te, Yte.shape[0])
            self.num_features = self._bow_dim()
            self.idf = self._fit_idf(Btr)
            Xtr, Xte = self._bag(Btr), self._bag(Bte)
        src_tr.release()
        src_te.release()
        self._set_splits(Xtr, Ytr, Xte, Yte)
        self.label_text_path = self._label_src.path if self._label_src is not None else None
        self._loaded = True

    def _check_count(self, text_path, n_lines, label_path, n_points):
        if n_lines != n_points:
            # the line where the two files stop matching: the text file's end, or the first extra text line
            raise DataFormatError(text_path, min(n_lines, n_points + 1) if n_lines else 1,
                                  f"has {n_lines} lines (documents) but {label_path} has "
                                                   f"{n_points} points: text and label files must match line "
                                                   f"for line")

    def _text_sources(self, d):
        out = []
        for split in ("train", "test"):
            tp = self._resolve(d, f"{split}_text_file", f"{split} texts")
            yp = self._resolve(d, f"{split}_label_file", f"{split} labels")
            Y = formats.read_xy(yp, num_labels=None if split == "train" else out[0][1].shape[1])

            def read(tp=tp, yp=yp, n=Y.shape[0]):
                lines = formats.read_lines(tp)
                if len(lines) > n and not any(s.strip() for s in lines[n:]):
                    del lines[n:]
                self._check_count(tp, len(lines), yp, n)
                return lines

            out.append((_Source(split, tp, read), Y))
        C = out[0][1].shape[1]
        label_src = None
        try:
            lp = formats.resolve_path(d / self._file("label_text_file"))
        except MissingFileError:
            lp = None
        if lp is not None:
            def read_labels(lp=lp):
                lines = formats.read_lines(lp)
                if len(lines) > C and not any(s.strip() for s in lines[C:]):
                    del lines[C:]
                if len(lines) != C:
                    raise DataFormatError(lp, None, f"has {len(lines)} lines (label texts) but the label files "
                                                    f"have num_labels={C}: line i must be label i's text")
                return lines

            label_src = _Source("labels", lp, read_labels)
        return out[0], out[1], label_src

    def _lf_sources(self, d):
        use_content = bool(self.dcfg.get("use_content", False))
        variant = "-content" if use_content else "-title"
        lbl = d / "lbl.json.gz"
        C = _count_lines(lbl)
        if C == 0:
            raise DataFormatError(lbl, 1, "no labels (empty file)")
        out = []
        for split, fname in (("train", "trn.json.gz"), ("test", "tst.json.gz")):
            p = d / fname
            cf = Path(self.paths.cache_dir) / "parsed" / f"lf-{fname.split('.')[0]}-{file_sha1(p)[:20]}-C{C}.npz"
            z = _load_npz(cf) if cf.exists() else None
            if z is not None:
                Y = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
                src = _Source(split, p, lambda p=p: _lf_parse(p, C, use_content, want_labels=False)[0], variant)
            else:
                texts, Y = _lf_parse(p, C, use_content)
                _save_npz(cf, {"data": Y.data, "indices": Y.indices, "indptr": Y.indptr, "shape": np.array(Y.shape)})
                src = _Source(split, p, lambda p=p: _lf_parse(p, C, use_content, want_labels=False)[0], variant)
                src._texts = texts
            out.append((src, Y))
        label_src = _Source("labels", lbl, lambda: _lf_parse(lbl, None, use_content, want_labels=False)[0], variant)
        return out[0], out[1], label_src

    # ---------------------------------------------------------------- tokenizers
    def _make_tokenizer(self, src_tr):
        k, t = self.tokenizer_kind, self.text_cfg
        if k == "hf":
            from xmcneg.encoders.transformer import resolve_model_dir

            return HFTokenizer(resolve_model_dir(self.enc_cfg.get("name_or_path")))
        if k == "hashing":
            return HashTokenizer(t.get("hash_dim", 1 << 18))
        # word vocabulary from the training texts, cached
        bow = self.input_kind == "bow"
        min_df = int(t.get("min_df", 2 if bow else 1))
        max_df = float(t.get("max_df", 0.5 if bow else 1.0))
        max_vocab = t.get("max_vocab", None)
        max_vocab = int(max_vocab) if max_vocab else None
        cf = Path(self.paths.cache_dir) / "tokens" / (
            f"vocab-{src_tr.key}-df{min_df}-{max_df:g}-v{max_vocab or 'all'}.txt")
        if cf.exists():
            return WordTokenizer(cf.read_text(encoding="utf-8").split("\n") if cf.stat().st_size else [])
        tok = WordTokenizer.build(src_tr.texts(), max_vocab=max_vocab, min_df=min_df, max_df=max_df)
        try:
            cf.parent.mkdir(parents=True, exist_ok=True)
            tmp = cf.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text("\n".join(tok.vocab), encoding="utf-8")
            os.replace(tmp, cf)
        except OSError as e:
            log.warning("could not write vocabulary cache %s: %s", cf, e)
        return tok

    def _tokens(self, src, n_expected=None) -> TokenRows:
        """The source's token rows: from the cache, or tokenised once and cached."""
        cls = self.input_kind == "tokens"
        key = f"{self.tokenizer.name}-L{self.max_len if self.max_len is not None else 'all'}" \
              f"{'' if cls else '-bag'}-{src.key}"
        cf = Path(self.paths.cache_dir) / "tokens" / f"{key}.npz"
        z = _load_npz(cf) if cf.exists() else None
        if z is not None and (n_expected is None or len(z["indptr"]) - 1 == n_expected):
            self.token_cache[src.name] = "hit"
            return TokenRows(z["ids"], z["indptr"])
        texts = src.texts()
        if n_expected is not None:
            self._check_count(src.path, len(texts), "the label data", n_expected)
        ids, indptr = _ragged(self.tokenizer.encode(texts, self.max_len, cls=cls))
        _save_npz(cf, {"ids": ids, "indptr": indptr})
        self.token_cache[src.name] = "miss"
        return TokenRows(ids, indptr)

    # ---------------------------------------------------------------- bag of words
    def _bow_dim(self):
        return self.tokenizer.dim if self.tokenizer_kind == "hashing" else len(self.tokenizer.vocab)

    def _counts(self, rows: TokenRows) -> sp.csr_matrix:
        ids = rows.ids.astype(np.int64)
        r = np.repeat(np.arange(len(rows)), rows.lengths)
        if self.tokenizer_kind != "hashing":  # drop [PAD]/[UNK]/[CLS]; vocabulary words start at 3
            keep = ids >= _N_SPECIAL
            ids, r = ids[keep] - _N_SPECIAL, r[keep]
        X = sp.csr_matrix((np.ones(len(ids), np.float32), (r, ids)), shape=(len(rows), self._bow_dim()))
        X.sum_duplicates()
        return X

    def _fit_idf(self, rows):
        X = self._counts(rows)
        df = np.bincount(X.indices, minlength=X.shape[1]).astype(np.float64)
        return (np.log((1.0 + X.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)

    def _bag(self, rows) -> sp.csr_matrix:
        X = self._counts(rows)
        X.data = (1.0 + np.log(X.data)) * self.idf[X.indices]
        norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
        norms[norms == 0] = 1.0
        X = sp.csr_matrix(sp.diags((1.0 / norms).astype(np.float32)) @ X, dtype=np.float32)
        X.sort_indices()
        return X

    # ---------------------------------------------------------------- hooks
    def encoder_kwargs(self) -> dict:
        """Keyword arguments the encoder needs from the data (xmcneg.train.build_encoder adds them)."""
        if self.input_kind == "tokens" and self.tokenizer_kind == "hf":
            return {}
        return {"num_features": int(self.num_features)}

    def text_inputs(self, texts):
        """Encoder inputs for arbitrary texts (e.g. prediction on new documents), one batch."""
        cls = self.input_kind == "tokens"
        rows = TokenRows(*_ragged(self.tokenizer.encode(list(texts), self.max_len, cls=cls)))
        if cls:
            return rows.padded(np.arange(len(rows)), self.tokenizer.pad_id)
        return csr_rows_to_bag(self._bag(rows), np.arange(len(rows)))

    def label_inputs(self, label_ids):
        """Encoder inputs for the texts of the given labels, in the documents' form (tokenised once, cached)."""
        if self._label_X is None:
            if self._label_src is None:
                raise MissingFileError(
                    f"dataset '{self.name}': no label texts ({self._file('label_text_file')} not found in "
                    f"{self.dataset_dir()}); set dataset.label_text_file")
            rows = self._tokens(self._label_src, self.num_labels)
            self._label_src.release()
            self._label_X = rows if self.input_kind == "tokens" else self._bag(rows)
        ids = np.asarray(label_ids, dtype=np.int64)
        if self.input_kind == "tokens":
            return self._label_X.padded(ids, self.tokenizer.pad_id)
        return csr_rows_to_bag(self._label_X, ids)

    def filter_pairs(self, split, idx=None):
        """(doc, label) pairs to drop from ``split``'s predictions before scoring, int64 (M, 2), or None when
        the dataset has none. Doc ids are rows of the split (test: ``filter_labels_test.txt``; val: the rows of
        ``filter_labels_train.txt`` that fall in the validation split). With ``idx`` (the split rows of the
        evaluated documents, in order) doc ids are positions in ``idx`` instead, ready for
        :func:`xmcneg.eval.metrics.filter_predictions`."""
        if split not in self._filters:
            self._filters[split] = self._read_filter(split)
        pairs = self._filters[split]
        if pairs is None or idx is None:
            return pairs
        idx = np.asarray(idx, dtype=np.int64)
        pos = np.full(self.splits[split][1].shape[0], -1, dtype=np.int64)
        pos[idx] = np.arange(len(idx))
        mapped = np.stack([pos[pairs[:, 0]], pairs[:, 1]], axis=1) if len(pairs) else pairs
        return mapped[mapped[:, 0] >= 0] if len(mapped) else mapped

    def _read_filter(self, split):
        if split not in ("test", "val"):
            return None
        d = self.dataset_dir()
        key = "filter_test_file" if split == "test" else "filter_train_file"
        try:
            p = formats.resolve_path(d / self._file(key))
        except MissingFileError:
            return None
        if split == "test":
            return read_filter_pairs(p, self.splits["test"][1].shape[0], self.num_labels)
        pairs = read_filter_pairs(p, self.full_train_Y.shape[0], self.num_labels)
        pos = np.full(self.full_train_Y.shape[0], -1, dtype=np.int64)
        pos[self.val_rows] = np.arange(len(self.val_rows))
        mapped = np.stack([pos[pairs[:, 0]], pairs[:, 1]], axis=1) if len(pairs) else pairs
        return mapped[mapped[:, 0] >= 0] if len(mapped) else mapped

    # ---------------------------------------------------------------- batches
    def train_order(self):
        """Token inputs with `encoder.text.sort_window` > 0: the length-grouped order of
        :class:`LengthGroupedSampler` (batches of documents of similar length; the rank-aware batch sampler deals
        its consecutive batch_size blocks out to the ranks, so the grouping holds under DDP too); otherwise, and
        for BoW inputs, a plain seeded permutation as XCDataModule."""
        window = int(self.text_cfg.get("sort_window", 50))
        if self.input_kind != "tokens" or window <= 0:
            return super().train_order()
        X = self.splits["train"][0]
        return LengthGroupedSampler(X.lengths, int(self.cfg.batch_size), window=window, seed=self.seed)

    def eval_order(self, split):
        """Token inputs: evaluation batches hold documents of similar length (rows sorted by length; the
        evaluation reads each batch's `idx`, so the order is free); padding is then small."""
        if self.input_kind != "tokens":
            return super().eval_order(split)
        return np.argsort(-self.splits[split][0].lengths, kind="stable")

    def collate(self, split):
        if self.input_kind != "tokens":
            return super().collate(split)
        from xmcneg.data.datamodule import pad_label_rows

        X, Y = self.splits[split]
        pad = self.tokenizer.pad_id

        def fn(rows):
            rows = np.asarray(rows, dtype=np.int64)
            return {"x": X.padded(rows, pad), "pos": pad_label_rows(Y, rows), "idx": torch.from_numpy(rows)}

        return fn


@torch.no_grad()
def _embed_no_grad(encoder, dm, ids, batch_size):
    return embed_label_texts(encoder, dm, ids, batch_size, grad=True)


def embed_label_texts(encoder, dm, label_ids=None, batch_size=256, grad=False):
    """(n, dim) embeddings of label texts through the documents' encoder, in batches of ``batch_size``;
    without gradients unless ``grad`` (Siamese training). Inputs are moved to the encoder's device."""
    if not grad:
        return _embed_no_grad(encoder, dm, label_ids, batch_size)
    ids = np.arange(dm.num_labels) if label_ids is None else np.asarray(label_ids, dtype=np.int64)
    dev = next(encoder.parameters()).device
    out = []
    for lo in range(0, len(ids), int(batch_size)):
        x = dm.label_inputs(ids[lo: lo + int(batch_size)])
        out.append(encoder({k: v.to(dev) for k, v in x.items()}))
    if not out:
        return torch.zeros(0, encoder.dim, device=dev)
    return torch.cat(out)
