"""The negative-sampler interface; a sampler is one class and one conf/sampler/<name>.yaml.

Life cycle: `setup(datamodule, model)` once before training (fit a tree, build an index, count labels);
`set_epoch(epoch)` at the start of every training epoch; `sample(batch, doc_emb) -> (label_ids, log_q)` every
step; `refresh(step, epoch, model)` at the start of every step (rebuild an index when due; returns a dict of
statistics to log, or None); `state_dict()/load_state_dict()` for resume; `score_correction(query, start, end)`
for a prediction-time bias term on labels [start, end) (None = no correction).
`model` is the method (methods/base.py); a sampler reads it only through `model.global_rank`, `model.weights()`
(the label table) and `model.embed_split(split, batch_size, datamodule)` (encoder outputs of a split).

Random draws come from `self.generator`, reseeded at every epoch start from (seed, rank, epoch): one stream per DDP
rank (different across ranks) that a resumed run replays exactly on every rank (a checkpoint, written by rank 0,
cannot hold the other ranks' generator states).

`sample` returns either per-document negatives, `label_ids` of shape (B, k), or negatives shared by the whole
batch, shape (U,); `log_q` has the same shape and holds log q(y|x), the probability of drawing y in one draw.
Negatives that are positives of the document are masked by the method, never counted as negatives.
Cost per call must not depend on C beyond O(log C) per negative.
"""
import numpy as np
import torch

from xmcneg.errors import ConfigError


class Sampler:
    name = "base"
    fixed_k = True  # draws exactly num_negatives per document (so it must be < C)

    def __init__(self, num_negatives: int, seed: int = 0):
        try:
            self.num_negatives = int(num_negatives)
        except (TypeError, ValueError):
            raise ConfigError("sampler.num_negatives", f"must be an integer, got {num_negatives!r}") from None
        self.seed = int(seed)
        self.rank = 0
        self.num_labels = None
        self.generator = torch.Generator()

    # -- life cycle -------------------------------------------------------------------------------------------
    def setup(self, datamodule, model=None, state=None):
        """Cheap per-process setup, then either the expensive one-time `fit` or, on resume, `load_state_dict`."""
        self.num_labels = datamodule.num_labels
        if self.num_negatives <= 0:
            raise ConfigError("sampler.num_negatives", f"must be > 0, got {self.num_negatives}")
        self.rank = int(model.global_rank) if model is not None else 0
        self.set_epoch(0)
        if state is None:
            self.fit(datamodule, model)
        else:
            self.load_state_dict(state)

    def set_epoch(self, epoch: int):
        """Reseed the stream from (seed, rank, epoch): reproducible, different across ranks and epochs."""
        key = np.random.SeedSequence([self.seed, self.rank, int(epoch)]).generate_state(2, dtype=np.uint32)
        self.generator.manual_seed(int(key[0]) << 32 | int(key[1]))

    def fit(self, datamodule, model=None):
        """Expensive one-time work whose result goes into state_dict (a tree, an index)."""

    def log_prob(self, batch, doc_emb, label_ids):
        """log q(y|x) of given labels (B, P); needed by the ns regulariser. Default: unknown."""
        return None

    def refresh(self, step: int, epoch: int, model=None):
        """Called before every training step; samplers with periodic work do it here. Returns statistics to log
        ({name: number}) or None."""

    def sample(self, batch, doc_emb):
        raise NotImplementedError

    # -- prediction-time correction -----------------------------------------------------------------------------
    def correction_query(self, batch, doc_emb):
        """Per-document input the correction needs (kept for the whole evaluation split); None = no correction."""
        return None

    def score_correction(self, query, start: int, end: int):
        return None

    def debug_state(self):
        """State that must be identical on every DDP rank (digested by the debug.record_train_rows test hook)."""
        return {}

    # -- resume ------------------------------------------------------------------------------------------------
    def state_dict(self):
        # the stream's position: only a mid-epoch resume continues from it (every epoch start reseeds)
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def uniform(self, shape, device):
        """Uniform label ids drawn from this sampler's own stream."""
        return torch.randint(0, self.num_labels, shape, generator=self.generator).to(device, non_blocking=True)
