"""Transformer encoders over token inputs (a local pretrained Hugging Face model, or a small random BERT), pooled
(``mean`` or ``cls``), optionally projected to ``dim`` and L2-normalised."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from xmcneg.encoders.base import Encoder
from xmcneg.errors import ConfigError, MissingFileError
from xmcneg.hf_model import import_transformers, resolve_model_dir

POOLINGS = ("mean", "cls")


class _TokenEncoder(Encoder):
    """Shared pooling / projection / normalisation around a Hugging Face model in ``self.model``."""

    input_kind = "tokens"

    def _finish_init(self, hidden, pooling, dim, normalize, bf16, freeze=False):
        if pooling not in POOLINGS:
            raise ConfigError("encoder.pooling", f"unknown '{pooling}', expected one of {', '.join(POOLINGS)}")
        if dim is not None and int(dim) <= 0:
            raise ConfigError("encoder.dim", f"must be > 0 or null, got {dim}")
        self.pooling, self.normalize, self.bf16, self.freeze = pooling, bool(normalize), bool(bf16), bool(freeze)
        self.hidden = int(hidden)
        self.proj = nn.Linear(self.hidden, int(dim)) if dim else None
        self.dim = int(dim) if dim else self.hidden
        if self.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
        # from_pretrained returns the model in eval mode and Lightning keeps submodule modes: fine-tune with dropout
        self.model.train(not self.freeze)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.model.eval()  # a frozen model never uses dropout
        return self

    def forward(self, x):
        ids, mask = x["input_ids"], x["attention_mask"]
        amp = torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        grad = torch.no_grad() if self.freeze else nullcontext()
        with grad, amp:
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = out.float()
        if self.pooling == "cls":
            h = out[:, 0]
        else:
            m = mask.unsqueeze(-1).to(out.dtype)
            h = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        if self.proj is not None:
            h = self.proj(h)
        return self.finish(h)


class TransformerEncoder(_TokenEncoder):
    """A pretrained local Hugging Face encoder; ``max_len`` is the tokenizer's truncation length."""

    def __init__(self, name_or_path, pooling: str, max_len: int, dim, normalize: bool, freeze: bool, bf16: bool, lr):
        super().__init__()
        # the learning rate this encoder wants (a pretrained model needs ~5e-5); None = optim.encoder_lr
        self.lr = None if lr is None else float(lr)
        path = resolve_model_dir(name_or_path)
        tf = import_transformers()
        self.name_or_path, self.max_len = str(path), int(max_len)
        try:
            self.model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
        except OSError as e:
            raise MissingFileError(f"encoder.name_or_path={path}: cannot load the model: {e}".splitlines()[0]) \
                from None
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and self.max_len > int(limit):
            raise ConfigError("encoder.max_len", f"{self.max_len} exceeds the model's {limit} positions")
        self._finish_init(self.model.config.hidden_size, pooling, dim, normalize, bf16, freeze)


class TinyTransformerEncoder(_TokenEncoder):
    """A small randomly initialised BERT over the datamodule's word vocabulary (``num_features`` = its size)."""

    def __init__(self, num_features: int, hidden: int, num_layers: int, num_heads: int, intermediate: int,
                 max_len: int, dropout: float, pooling: str, dim, normalize: bool, bf16: bool):
        super().__init__()
        if int(hidden) % int(num_heads):
            raise ConfigError("encoder.hidden", f"{hidden} must be a multiple of encoder.num_heads={num_heads}")
        tf = import_transformers()
        cfg = tf.BertConfig(vocab_size=int(num_features), hidden_size=int(hidden), num_hidden_layers=int(num_layers),
                            num_attention_heads=int(num_heads), intermediate_size=int(intermediate),
                            max_position_embeddings=int(max_len), hidden_dropout_prob=float(dropout),
                            attention_probs_dropout_prob=float(dropout), type_vocab_size=1, pad_token_id=0)
        self.max_len = int(max_len)
        self.model = tf.BertModel(cfg, add_pooling_layer=False)
        self._finish_init(hidden, pooling, dim, normalize, bf16)
