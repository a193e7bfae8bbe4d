"""Optimisers as one object: named parts (dense AdamW for the encoder, row-wise for the label table, ...) behind
one `CombinedOptimizer`, with warm-up and gradient clipping as wrappers around a part (the design of torchrec's
CombinedOptimizer / OptimizerWrapper). Lightning sees one optimiser; a checkpoint holds each part by name."""
from dataclasses import dataclass, fields
from typing import Optional

import torch

from xmcneg.errors import ConfigError
from xmcneg.methods.sparse_optim import clip_grad_norm_


def params_of(cls, d, key):
    """The dataclass `cls` (typed config keys, values only in conf/) from the dict `d` of config group `key`; an
    unknown or a missing key is a ConfigError."""
    if isinstance(d, cls):
        return d
    d, names = dict(d or {}), {f.name for f in fields(cls)}
    for k in sorted(set(d) ^ names):
        raise ConfigError(f"{key}.{k}", "unknown key" if k in d else "missing (declare it in conf/)")
    return cls(**d)


@dataclass
class OptimParams:
    """conf/train.yaml `optim`: the keys, their types and checks (values: only in conf/)."""
    encoder_lr: float
    weight_decay: float
    input_optimizer: str
    input_sgd_below_labels: Optional[int]
    input_lr: float
    input_weight_decay: float
    label_optimizer: str
    label_lr: float
    full_label_lr: float
    label_weight_decay: float
    label_init: str
    warmup_steps: int
    grad_clip: Optional[float]

    @classmethod
    def of(cls, d):
        p = params_of(cls, d, "optim")
        for key in ("encoder_lr", "input_lr", "label_lr"):
            if not float(getattr(p, key)) > 0:
                raise ConfigError(f"optim.{key}", f"must be > 0, got {getattr(p, key)}")
        for key in ("full_label_lr", "input_weight_decay"):
            if not float(getattr(p, key)) >= 0:
                raise ConfigError(f"optim.{key}", f"must be >= 0, got {getattr(p, key)}")
        if p.input_optimizer not in ("auto", "adamw", "sgd"):
            raise ConfigError("optim.input_optimizer", f"expected auto, adamw or sgd, got {p.input_optimizer!r}")
        if p.input_sgd_below_labels is not None and not (isinstance(p.input_sgd_below_labels, int)
                                                         and p.input_sgd_below_labels >= 0):
            raise ConfigError("optim.input_sgd_below_labels",
                              f"expected an integer >= 0 or null, got {p.input_sgd_below_labels!r}")
        if p.label_init not in ("random", "centroid"):
            raise ConfigError("optim.label_init", f"expected random or centroid, got {p.label_init!r}")
        if int(p.warmup_steps) < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {p.warmup_steps}")
        return p


class OptimizerWrapper(torch.optim.Optimizer):
    """Delegates to `self.optimizer`; subclasses add behaviour around step(). (No Optimizer.__init__: the wrapped
    optimiser owns the parameters and their state.)"""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.defaults = optimizer.defaults

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)


class Warmup(OptimizerWrapper):
    """Before each step the lr of every group is its initial lr x factor(number of steps done)."""

    def __init__(self, optimizer, factor):
        super().__init__(optimizer)
        self.factor, self.steps = factor, 0
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def step(self, closure=None):
        f = self.factor(self.steps)
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * f
        out = self.optimizer.step(closure)
        self.steps += 1
        return out

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.steps = int(state_dict["steps"])


def linear_warmup(steps: int):
    """factor(t) = min(1, (t + 1) / steps)."""
    return lambda t: min(1.0, (t + 1) / steps)


class ClipGradNorm(OptimizerWrapper):
    """Clips the gradient norm of the wrapped optimiser's parameters to `max_norm` before each step."""

    def __init__(self, optimizer, max_norm: float):
        super().__init__(optimizer)
        self.max_norm = float(max_norm)

    def step(self, closure=None):
        clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_norm)  # sparse grads too
        return self.optimizer.step(closure)


def wrap(optimizer, warmup=None, clip=None):
    """`optimizer` with a warm-up factor function and/or gradient clipping (None / <= 0: none)."""
    if warmup is not None:
        optimizer = Warmup(optimizer, warmup)
    if clip is not None and float(clip) > 0:
        optimizer = ClipGradNorm(optimizer, clip)
    return optimizer


class CombinedOptimizer(torch.optim.Optimizer):
    """Named optimisers stepped as one, in insertion order. `step(parts=...)` / `zero_grad(parts=...)` act on
    the named parts only (NGAME trains the encoder in one phase and the label table in the other)."""

    def __init__(self, parts: dict):
        self.parts = dict(parts)
        self.defaults = {}

    @property
    def param_groups(self):
        return [g for o in self.parts.values() for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.parts.values() for p, s in o.state.items()}

    def _named(self, parts):
        return [self.parts[n] for n in (self.parts if parts is None else parts)]

    def zero_grad(self, set_to_none=True, parts=None):
        for o in self._named(parts):
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None, parts=None):
        if closure is not None:  # Lightning's closure runs its before-step hooks
            with torch.enable_grad():
                closure()
        for o in self._named(parts):
            o.step()

    def state_dict(self):
        return {name: o.state_dict() for name, o in self.parts.items()}

    def load_state_dict(self, state_dict):
        for name, o in self.parts.items():
            o.load_state_dict(state_dict[name])
