"""Tokenizers turning texts into lists of token ids, truncated to ``max_len`` without tokenising all of a long text.
Each has a ``name`` that identifies its vocabulary (it keys the token cache) and a ``vocab_size`` (ids are below it).
"""
from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from pathlib import Path

from xmcneg.errors import ConfigError
from xmcneg.hf_model import import_transformers

PAD, UNK, CLS = 0, 1, 2  # word tokenizer special ids
N_SPECIAL = 3
_WORD_RE = re.compile(r"\w+(?:['-]\w+)*")


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
    """Token id lists for ``texts`` truncated to ``max_len``, equal to tokenising the full texts: a long text is cut
    at ``max_len x chars_per_token`` characters and re-tokenised in full only when that gave < ``max_len`` tokens."""
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
    """Word-level vocabulary built from training texts (lower-cased ``\\w+`` words, ``'`` / ``-`` joined); ids 0 =
    [PAD], 1 = [UNK], 2 = [CLS] (which starts every sequence), then the words."""

    n_special = N_SPECIAL

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.index = {w: i + N_SPECIAL for i, w in enumerate(self.vocab)}
        self.name = "word-" + hashlib.sha1("\n".join(self.vocab).encode()).hexdigest()[:12]
        self.vocab_size = len(self.vocab) + N_SPECIAL
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

    n_special = 0

    def __init__(self, dim):
        self.vocab_size = int(dim)
        if self.vocab_size <= 0:
            raise ConfigError("encoder.text.hash_dim", f"must be > 0, got {dim}")
        self.name = f"hash{self.vocab_size}"

    def encode(self, texts, max_len=None, cls=False):
        d = self.vocab_size
        return [[zlib.crc32(w.encode()) % d for w in words(t)] for t in texts]


class HFTokenizer:
    """The Hugging Face (fast) tokenizer stored in a local model directory; never downloads."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self.tok = import_transformers().AutoTokenizer.from_pretrained(str(self.dir), local_files_only=True)
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
              "return_token_type_ids": False, "max_length": None if max_len is None else int(max_len)}
        return _encode_exact(texts, max_len, lambda ts: list(self.tok(list(ts), **kw)["input_ids"]), chars_per_token=16)
