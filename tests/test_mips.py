"""MIPS + uniform negatives (Qaraei & Babbar): candidate sets, index determinism, refresh schedule, ANN eval."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from xmcneg.encoders.bow_linear import BowLinear
from xmcneg.errors import ConfigError
from train_conf import encoder_args, sampler_args, section
from xmcneg.methods.base import mask_positives
from xmcneg.methods.classifier import XMCClassifier
from xmcneg.methods.losses import BCE
from xmcneg.samplers.frequency import FrequencySampler
from xmcneg.samplers.mips import MIPSSampler

OPTIM = section("optim", label_lr=0.1)
ROOT = Path(__file__).resolve().parents[1]


def eval_cfg(search="exact", index="flat", shortlist=50, k=5):
    return section("eval", k=k, doc_chunk=16, label_chunk=37, search=search, ann_index=index,
                   ann_shortlist=shortlist)


def make_module(C=300, d=8, F=20, sampler=None, ev=None, seed=0):
    torch.manual_seed(seed)
    enc = BowLinear(F, **encoder_args("bow_linear", dim=d))
    m = XMCClassifier(enc, C, BCE(), sampler=sampler, optim=OPTIM, evaluation=ev or eval_cfg())
    with torch.no_grad():  # spread-out label vectors and biases so scores have no ties
        m.labels.w.weight.normal_(0, 1.0)
        m.labels.b.weight.normal_(0, 0.1)
    return m


def make_sampler(C, **kw):
    kw.setdefault("index", "flat")
    kw.setdefault("warmup_epochs", 0)
    s = MIPSSampler(**sampler_args("mips", **kw))
    s.setup(SimpleNamespace(num_labels=C, train_label_counts=np.ones(C)), None)
    return s


def batch_with_top_positives(module, B=6, P=4, seed=0):
    """Documents whose positives are among their highest-scoring labels (collisions with MIPS results)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, module.labels.w.weight.shape[1], generator=g)
    scores = h @ module.labels.w.weight.detach().T + module.labels.b.weight.detach().T
    top = scores.topk(8, dim=1).indices
    pos = torch.full((B, P), -1, dtype=torch.long)
    for i in range(B):
        n = 1 + i % P  # 1..P positives, padded with -1
        pos[i, :n] = top[i, [0, 2, 3, 5][:n]]
    return {"pos": pos}, h


# ------------------------------------------------------------------------------------------------ candidate sets
@pytest.mark.parametrize("mode", ["mix", "mips_only", "uniform_only"])
def test_candidate_set_has_fixed_size_and_no_positives(mode):
    C, K = 300, 20
    module = make_module(C)
    s = make_sampler(C, num_hard=5, num_candidates=K, mode=mode)
    s.refresh(0, 0, module)
    batch, h = batch_with_top_positives(module)
    neg, log_q = s.sample(batch, h)
    pos = batch["pos"]
    p = (pos >= 0).sum(1)
    assert neg.shape == log_q.shape == (pos.shape[0], K - int(p.min()))
    valid = mask_positives(neg, pos) & (neg >= 0)  # exactly what the method counts
    assert ((neg >= 0) == valid).all(), "a returned negative is a positive"
    assert (p + valid.sum(1) == K).all()
    assert ((neg >= -1) & (neg < C)).all()
    # padding only at the end of a row
    first_pad = torch.where(neg < 0, torch.arange(neg.shape[1]), neg.shape[1]).min(1).values
    assert (first_pad == K - p).all()


def test_hard_negatives_are_top_scoring_non_positives():
    C, K = 300, 20
    module = make_module(C)
    s = make_sampler(C, num_hard=5, num_candidates=K, mode="mix")
    s.refresh(0, 0, module)
    batch, h = batch_with_top_positives(module)
    neg, _ = s.sample(batch, h)
    scores = h @ module.labels.w.weight.detach().T + module.labels.b.weight.detach().T
    for i in range(h.shape[0]):
        pos = set(batch["pos"][i][batch["pos"][i] >= 0].tolist())
        order = [y for y in scores[i].argsort(descending=True).tolist() if y not in pos][:5]
        assert neg[i, :5].tolist() == order
        assert not pos & set(neg[i].tolist())


def test_many_positives_keep_all_and_get_num_hard():
    C, K = 200, 6
    module = make_module(C)
    s = make_sampler(C, num_hard=3, num_candidates=K)
    s.refresh(0, 0, module)
    pos = torch.tensor([list(range(10)), [10, 11, -1, -1, -1, -1, -1, -1, -1, -1]])
    neg, _ = s.sample({"pos": pos}, torch.randn(2, 8))
    assert neg.shape[1] == K - 2
    assert (neg[0] >= 0).sum() == 3 and (neg[1] >= 0).sum() == K - 2
    assert not set(neg[0].tolist()) & set(range(10))


def test_uniform_part_is_exactly_uniform_over_allowed_labels():
    C, K = 12, 9  # positives {0, 5}, hard negatives: 3 labels; uniform over the 7 others
    module = make_module(C)
    s = make_sampler(C, num_hard=3, num_candidates=K, mode="mix")
    s.refresh(0, 0, module)
    pos = torch.tensor([[0, 5]]).expand(4000, 2).contiguous()
    h = torch.randn(1, 8).expand(4000, 8).contiguous()
    neg, log_q = s.sample({"pos": pos}, h)
    hard = set(neg[0, :3].tolist())
    allowed = sorted(set(range(C)) - hard - {0, 5})
    uni = neg[:, 3:].reshape(-1)
    counts = torch.bincount(uni, minlength=C).double()
    assert counts[sorted(hard | {0, 5})].sum() == 0
    freq = counts[allowed] / uni.numel()
    assert torch.allclose(freq, torch.full_like(freq, 1 / 7), atol=0.01)
    # log q: hard slots -log W (counted once by the logQ correction), uniform slots log(u / (W (C - m)))
    W = neg.shape[1]
    assert torch.allclose(log_q[:, :3], torch.full((4000, 3), -math.log(W)))
    assert torch.allclose(log_q[:, 3:], torch.full((4000, W - 3), math.log(4 / (W * 7))))


def test_warmup_epochs_give_uniform_only():
    C, K = 300, 20
    module = make_module(C)
    s = make_sampler(C, num_hard=5, num_candidates=K, warmup_epochs=1)
    s.refresh(0, 0, module)
    assert s.index is None and not s.hard_active
    batch, h = batch_with_top_positives(module)
    neg, log_q = s.sample(batch, h)
    hard_slot = torch.isclose(log_q, torch.tensor(-math.log(log_q.shape[1])))
    assert not (hard_slot & (neg >= 0)).any()  # no hard slots
    assert (log_q[neg < 0] == 0).all()


# ------------------------------------------------------------------------------------------------ index + schedule
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_index_rebuilt_from_same_weights_gives_same_neighbours(kind):
    C = 500
    module = make_module(C, d=16)
    q = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for rank_seed in (0, 1):  # two "ranks": different uniform streams, same index
        s = make_sampler(C, index=kind, seed=rank_seed, num_hard=5, num_candidates=30)
        s.refresh(0, 0, module)
        first = s.query(q, 10)
        s.rebuild(module, 1, 0)
        assert torch.equal(first, s.query(q, 10))
        results.append(first)
        assert s.index_version == 2
    assert torch.equal(results[0], results[1])


def test_refresh_exactly_at_configured_steps_and_epoch_starts():
    C = 100
    module = make_module(C)
    s = make_sampler(C, num_hard=2, num_candidates=10, refresh_steps=3, warmup_epochs=1)
    steps_per_epoch = 5
    for epoch in range(3):
        for j in range(steps_per_epoch):
            step = epoch * steps_per_epoch + j
            s.refresh(step, epoch, module)
            s.refresh(step, epoch, module)  # a repeated call at the same step never rebuilds twice
    # epoch 0: warm-up, nothing; epoch 1 (steps 5-9): 5 (epoch start), 6, 9; epoch 2 (10-14): 10 (start), 12
    assert s.refresh_steps_log == [5, 6, 9, 10, 12]
    assert s.index_version == 5 and s.last_refresh_step == 12
    # resume: state is plain python scalars/tensors; the index is rebuilt at the first refresh after load
    state = s.state_dict()
    torch.save(state, "/tmp/_mips_state.pt")
    state = torch.load("/tmp/_mips_state.pt", weights_only=True)
    r = MIPSSampler(**sampler_args("mips", num_hard=2, num_candidates=10, refresh_steps=3, warmup_epochs=1,
                                   index="flat"))
    r.setup(SimpleNamespace(num_labels=C), None, state=state)
    assert r.index is None and r.index_version == 5 and r.last_refresh_step == 12
    r.refresh(13, 2, module)
    assert r.refresh_steps_log == [13] and r.index_version == 6
    r.refresh(14, 2, module)
    assert r.refresh_steps_log == [13]


def test_uniform_only_never_builds_and_bad_config_is_rejected():
    C = 100
    module = make_module(C)
    s = make_sampler(C, num_hard=2, num_candidates=10, refresh_steps=1, mode="uniform_only")
    for step in range(4):
        s.refresh(step, step // 2, module)
    assert s.refresh_steps_log == [] and s.index is None
    with pytest.raises(ConfigError):
        MIPSSampler(**sampler_args("mips", mode="hard"))
    with pytest.raises(ConfigError):
        MIPSSampler(**sampler_args("mips", index="lsh"))
    with pytest.raises(ConfigError):
        make_sampler(50, num_candidates=60)


def test_config_group_and_ablation_switch():
    from hydra import compose, initialize_config_dir

    from xmcneg.factory import build_part

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["sampler=mips", "sampler.mode=mips_only", "sampler.index=ivf"])
    s = build_part(cfg, "sampler", seed=int(cfg.seed))
    assert isinstance(s, MIPSSampler) and s.mode == "mips_only" and s.index_kind == "ivf"
    assert s.num_hard == 5 and cfg.eval.ann_index == "hnsw" and int(cfg.eval.ann_shortlist) >= int(cfg.eval.k)


# ------------------------------------------------------------------------------------------------ ANN evaluation
def test_ann_eval_with_flat_index_equals_exact():
    C = 500
    exact = make_module(C, ev=eval_cfg("exact", k=10))
    ann = make_module(C, ev=eval_cfg("ann", "flat", shortlist=20, k=10))
    emb = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    se, ie = exact.predict_topk(emb)
    sa, ia = ann.predict_topk(emb)
    assert torch.equal(ie, ia)
    assert torch.allclose(se, sa, atol=1e-5)
    # the index is cached while the weights do not change, rebuilt when they do
    idx = ann._ann_label_index()
    assert ann._ann_label_index() is idx
    with torch.no_grad():
        ann.labels.w.weight[0] += 1.0
    assert ann._ann_label_index() is not idx


class _IdsCorrection(FrequencySampler):
    """Frequency correction, also available for arbitrary label ids (the hook the ANN path uses)."""

    def score_correction_ids(self, query, ids):
        return self.log_p[ids.cpu()].to(query.device)


@pytest.mark.parametrize("cls", [_IdsCorrection, FrequencySampler])
def test_ann_eval_with_correction_matches_exact(cls):
    C = 400
    counts = np.random.default_rng(0).integers(0, 50, C)
    samplers = []
    for _ in range(2):
        s = cls(**sampler_args("frequency", num_negatives=8))
        s.setup(SimpleNamespace(num_labels=C, train_label_counts=counts), None)
        samplers.append(s)
    exact = make_module(C, sampler=samplers[0], ev=eval_cfg("exact", k=5))
    ann = make_module(C, sampler=samplers[1], ev=eval_cfg("ann", "flat", shortlist=C, k=5))
    emb = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    query = emb[:, :0]
    _, ie = exact.predict_topk(emb, query)
    _, ia = ann.predict_topk(emb, query)  # FrequencySampler: range-only correction -> exact fallback
    assert torch.equal(ie, ia)
