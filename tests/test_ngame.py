"""NGAME: clustered batch sampler, curriculum, losses, label-text features, and a tiny two-phase fit + resume."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmcneg.errors import ConfigError, MissingFileError
from xmcneg.samplers.cluster_batching import ClusterBatchSampler, ClusterCurriculum, balanced_spherical_clusters

CONF = str(Path(__file__).resolve().parents[1] / "conf")


# ------------------------------------------------------------------------------------------------ batch sampler
def _flat(batches):
    return np.concatenate([np.asarray(b) for b in batches]) if batches else np.zeros(0, dtype=np.int64)


def test_batches_are_unions_of_whole_clusters_and_cover_every_document_once():
    N, B = 1000, 64
    rng = np.random.default_rng(0)
    clusters = rng.permutation(np.repeat(np.arange(125), 8))  # 125 clusters of 8 documents
    bs = ClusterBatchSampler(N, B, seed=3)
    bs.set_clusters(clusters)
    for epoch in (0, 1):
        bs.set_epoch(epoch)
        batches = list(bs)
        assert len(batches) == len(bs) == math.ceil(N / B)
        assert sorted(_flat(batches).tolist()) == list(range(N))  # every document exactly once
        for b in batches:
            cl, counts = np.unique(clusters[b], return_counts=True)
            assert (counts == 8).all(), "a batch holds a partial cluster"
            assert len(b) <= B + 8
    bs.set_epoch(0)
    first = list(bs)
    bs.set_epoch(1)
    assert first != list(bs)  # a new permutation of clusters each epoch
    bs.set_epoch(0)
    assert first == list(bs)  # same seed + epoch -> same batches


@pytest.mark.parametrize("N", [999, 1000, 1001, 5])
def test_random_batches_every_document_once(N):
    bs = ClusterBatchSampler(N, 64, seed=0)
    batches = list(bs)
    assert len(batches) == len(bs)
    assert sorted(_flat(batches).tolist()) == list(range(N))
    assert max(len(b) for b in batches) <= 64


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("N", [900, 1000])
def test_two_ranks_get_disjoint_batches_of_equal_count(N, clustered):
    clusters = np.random.default_rng(1).integers(0, N // 10, size=N) if clustered else None
    per_rank = []
    for rank in (0, 1):
        bs = ClusterBatchSampler(N, 64, seed=7, rank=rank, world_size=2)
        bs.set_clusters(clusters)
        bs.set_epoch(2)
        per_rank.append(list(bs))
        assert len(per_rank[-1]) == len(bs)
    assert len(per_rank[0]) == len(per_rank[1])
    a, b = _flat(per_rank[0]), _flat(per_rank[1])
    assert not set(a.tolist()) & set(b.tolist())  # disjoint
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(N))  # together: every document once


def test_drop_last_gives_every_rank_the_same_number_of_full_batches():
    bs = ClusterBatchSampler(300, batch_size=32, seed=5, rank=1, world_size=2, drop_last=True)
    assert len(bs) == (300 // 32) // 2 and all(len(b) == 32 for b in bs)


def test_balanced_spherical_clusters_are_balanced_and_group_similar_documents():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    topic = torch.arange(512) % 8
    X = centres[topic] + 0.05 * torch.randn(512, 16, generator=g)
    ids = balanced_spherical_clusters(X, 16, seed=0)
    sizes = np.bincount(ids)
    assert len(sizes) == 32 and sizes.min() == sizes.max() == 16  # 512/16 = 32 clusters of exactly 16
    purity = np.mean([np.bincount(topic.numpy()[ids == k]).max() / 16 for k in range(32)])
    assert purity > 0.9
    assert (balanced_spherical_clusters(X, 16, seed=0) == ids).all()  # deterministic
    ids = balanced_spherical_clusters(X[:500], 24, seed=1)  # 500/24 -> 21 -> rounded up to 32 clusters
    sizes = np.bincount(ids)
    assert len(sizes) == 32 and sizes.max() - sizes.min() <= 1


def test_curriculum_changes_cluster_size_at_configured_epochs():
    cur = ClusterCurriculum(start_size=1, doubling_epochs=[2, 4, 4, 6], max_size=8, start_epoch=1, refresh_epochs=3)
    assert [cur.size(e) for e in range(8)] == [1, 1, 2, 2, 8, 8, 8, 8]
    assert not cur.active(0) and not cur.active(1) and cur.active(2)
    assert cur.should_recluster(2, -1, 1)  # first clustering
    assert not cur.should_recluster(3, 2, 2)  # same size, not a refresh epoch ((3-1) % 3 != 0)
    assert cur.should_recluster(4, 2, 2)  # size changed 2 -> 8
    assert not cur.should_recluster(5, 4, 8)
    assert cur.should_recluster(7, 4, 8)  # refresh: (7-1) % 3 == 0
    with pytest.raises(ConfigError):
        ClusterCurriculum(start_size=1, doubling_epochs=[], max_size=8, start_epoch=1, refresh_epochs=0)


# ------------------------------------------------------------------------------------------------ losses
def test_triplet_loss_masks_positives():
    from xmcneg.methods.ngame import infonce_loss, triplet_ohnm_loss, triplet_multi_loss

    # row 0: its positive (col 0) scores 0.5; col 1 is ANOTHER positive of row 0 scoring 0.9 (masked);
    # col 2 is a negative at 0.1 -> no violation once col 1 is masked
    S = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.8, 0.0]])
    pos_col = torch.tensor([0, 1])
    neg_mask = torch.tensor([[False, False, True], [True, False, True]])
    assert triplet_ohnm_loss(S, pos_col, neg_mask, margin=0.3, num_hard=10).item() == pytest.approx(0.0)
    unmasked = neg_mask.clone()
    unmasked[0, 1] = True
    assert triplet_ohnm_loss(S[:1], pos_col[:1], unmasked[:1], margin=0.3).item() == pytest.approx(0.7)
    # plain mean over the valid negatives; a row without valid rows is ignored
    S2 = torch.tensor([[0.5, 0.6, 0.4]])
    l2 = triplet_ohnm_loss(S2, torch.tensor([0]), torch.tensor([[False, True, True]]), margin=0.3, weighted=False)
    assert l2.item() == pytest.approx(((0.6 - 0.5 + 0.3) + (0.4 - 0.5 + 0.3)) / 2)
    # weighted: softmax(s_n / 0.1) over the violators
    w = torch.softmax(torch.tensor([6.0, 4.0]), 0)
    lw = triplet_ohnm_loss(S2, torch.tensor([0]), torch.tensor([[False, True, True]]), margin=0.3, temperature=0.1)
    assert lw.item() == pytest.approx(float(w[0] * 0.4 + w[1] * 0.2), rel=1e-5)
    # InfoNCE: the masked positive leaves the denominator
    ce = infonce_loss(S[:1], pos_col[:1], neg_mask[:1], temperature=1.0).item()
    assert ce == pytest.approx(-(0.5 - math.log(math.exp(0.5) + math.exp(0.1))), rel=1e-6)
    # phase-2 multi-positive loss: positives are never negatives
    is_pos = torch.tensor([[True, True, False]])
    assert triplet_multi_loss(torch.tensor([[0.9, 0.8, 0.1]]), is_pos, margin=0.2).item() == pytest.approx(0.0)
    assert triplet_multi_loss(torch.tensor([[0.9, 0.1, 0.8]]), is_pos, margin=0.2).item() > 0


# ------------------------------------------------------------------------------------------------ label texts
def test_vocab_label_features_use_dataset_tokenisation_and_idf(tmp_path):
    from xmcneg.data.datamodule import FeatureTransform
    from xmcneg.data.label_text import bow_label_features

    (tmp_path / "vocab.txt").write_text("trade\t50\nstate\t10\nfood\t5\nsafety\t20\n")
    (tmp_path / "lbl_X.txt").write_text("State trading\nfood-safety\nretail trade trade\nzzz\n")
    dm = SimpleNamespace(name="t", num_labels=4, num_features=4, dcfg={"label_text_file": "lbl_X.txt"},
                         label_text_path=tmp_path / "lbl_X.txt", dataset_dir=lambda: tmp_path,
                         full_train_Y=sp.csr_matrix((100, 4)), transform=FeatureTransform("none"))
    X = bow_label_features(dm).toarray()
    assert X.shape == (4, 4)
    assert X[0].tolist() == pytest.approx([0, 1, 0, 0])  # "trading" is not "trade"
    idf_f, idf_s = math.log(100 / 5), math.log(100 / 20)
    n = math.hypot(idf_f, idf_s)
    assert X[1].tolist() == pytest.approx([0, 0, idf_f / n, idf_s / n], rel=1e-5)  # hyphenated tag -> parts
    assert X[2].tolist() == pytest.approx([1, 0, 0, 0])
    assert X[3].tolist() == [0, 0, 0, 0]  # no in-vocabulary token
    dm.label_text_path = None
    dm.dcfg = {}
    with pytest.raises(ConfigError, match="label_text_file"):
        bow_label_features(dm)
    dm.dcfg = {"label_text_file": "missing.txt"}
    with pytest.raises(MissingFileError):
        bow_label_features(dm)


# ------------------------------------------------------------------------------------------------ end to end
def _cfg(tmp, **over):
    from hydra import compose, initialize_config_dir

    overrides = [
        "sampler=ngame", "dataset=synthetic", "encoder=bow_linear", "encoder.dim=16",
        "dataset.num_train=640", "dataset.num_test=100", "dataset.num_labels=60", "dataset.num_features=300",
        "dataset.doc_len=20", "data.batch_size=64", "data.val_size=40", "eval.k=10",
        "sampler.phase1_epochs=2", "sampler.cluster_doubling_epochs=[1,1]", "sampler.cluster_size_max=4",
        "sampler.phase2_cluster_size=4", "sampler.phase1_warmup_steps=2", "sampler.ann_shortlist=10",
        f"paths.cache_dir={tmp}/cache", f"paths.output_dir={tmp}/out",
    ] + [f"{k}={v}" for k, v in over.items()]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=overrides)


def _fit(cfg, epochs, ckpt_dir=None, ckpt_path=None, test=False):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.factory import build_module

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    cbs = []
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                                   save_on_train_epoch_end=True))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=cbs,
                         enable_checkpointing=bool(cbs), enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    module.fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if test:
        trainer.test(module, datamodule=dm, verbose=False)
    return module, trainer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ngame")
    cfg = _cfg(tmp)
    module, trainer = _fit(cfg, 4, ckpt_dir=tmp / "ckpt", test=True)
    return SimpleNamespace(cfg=cfg, module=module, trainer=trainer, tmp=tmp)


def test_tiny_two_phase_fit(full_run):
    m = full_run.module
    assert m.phase == 2 and m.train_steps == 4 * 10  # 600 train docs / 64 -> 10 batches per epoch
    sizes = {(e, p): s for e, p, s, _, _ in m.cluster_log}
    assert sizes == {(1, 1): 4, (2, 2): 4}  # curriculum: size 4 from epoch 1; phase 2 clustered once
    assert set(m.test_metrics) >= {"P@1", "P@5", "nDCG@5", "PSP@1", "knn/P@1", "clf/P@1", "alpha"}
    assert m.test_metrics["alpha"] in m.s.fusion_alphas
    assert m.test_metrics["P@1"] > 0.2  # far above chance (1/60) after 4 tiny epochs
    assert {"val/P@1", "val/P@5", "val/alpha", "val/knn/P@1", "val/clf/P@1"} <= set(m.fit_metrics)
    assert not any(p.requires_grad for p in m.encoder.parameters())
    ck = torch.load(full_run.tmp / "ckpt" / "epoch=0.ckpt", weights_only=True)  # loads with weights_only
    assert ck["state_dict"]["ngame_state"][0] == 1 and ck["ngame"]["bank"].shape == (600, 16)  # phase 1
    # eval.py path: a fresh module + load_state_dict knows the phase and alpha, and predicts the fused top-k
    from xmcneg.factory import build_module

    fresh = build_module(full_run.cfg, full_run.trainer.datamodule)
    fresh.load_state_dict(m.state_dict())
    assert fresh.phase == 2 and fresh.alpha == m.alpha
    batch = full_run.trainer.datamodule.collate("test")(np.arange(8))
    with torch.no_grad():
        s1, i1 = fresh.predict_topk(fresh.encoder(batch["x"]), k=5)
        s2, i2 = m.predict_topk(m.encoder(batch["x"]), k=5)
    assert i1.shape == (8, 5) and torch.equal(i1, i2) and torch.allclose(s1, s2)


@pytest.mark.parametrize("epoch,phase", [(0, 1), (2, 2)])
def test_resume_from_checkpoint_in_either_phase(full_run, epoch, phase, tmp_path):
    ckpt = full_run.tmp / "ckpt" / f"epoch={epoch}.ckpt"
    assert torch.load(ckpt, weights_only=True)["state_dict"]["ngame_state"][0] == phase
    module, _ = _fit(full_run.cfg, 4, ckpt_path=str(ckpt))
    ref = full_run.module
    assert module.phase == 2 and module.train_steps == ref.train_steps
    assert [r[:3] for r in module.cluster_log] == [r[:3] for r in ref.cluster_log]
    for (name, a), (_, b) in zip(module.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b,
                              atol=1e-5), name


def test_missing_label_texts_is_a_config_error(tmp_path):
    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.factory import build_module

    cfg = _cfg(tmp_path)
    cfg.dataset.label_text_file = None
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(ConfigError, match="dataset.label_text_file"):
        build_module(cfg, dm)


@pytest.mark.parametrize("enc_lr,phase1_lr,expected", [(None, None, "optim"), (5e-5, None, 5e-5), (5e-5, 0.01, 0.01)])
def test_phase1_lr_comes_from_sampler_then_encoder_then_optim(tmp_path, enc_lr, phase1_lr, expected):
    from train_conf import section
    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.factory import build_module

    expected = section("optim")["encoder_lr"] if expected == "optim" else expected

    over = {} if phase1_lr is None else {"sampler.phase1_lr": phase1_lr}
    cfg = _cfg(tmp_path, **over)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    module.encoder.lr = enc_lr  # transformer encoders carry their own lr (encoder.lr)
    enc_opt = module.configure_optimizers().parts["encoder"]
    assert enc_opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_phase1_warmup_is_capped_at_a_tenth_of_phase1(tmp_path):
    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.factory import build_module

    cfg = _cfg(tmp_path, **{"sampler.phase1_warmup_steps": 100, "sampler.phase1_epochs": 2})
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    module._trainer = SimpleNamespace(num_training_batches=32)  # 64 phase-1 steps: warm-up capped at 6
    lrs = []
    for t in range(64):
        module.train_steps = t
        lrs.append(module._phase1_lr())
    assert lrs[0] == pytest.approx(1 / 6) and lrs[5] == pytest.approx(min(1.0, 1 - 5 / 64 + 1e-3))
    assert max(lrs) > 0.9 and lrs[-1] < 0.05  # reaches the full lr, decays to ~0 by the end of phase 1
    module._trainer = SimpleNamespace(num_training_batches=5000)  # long phase 1: the configured 100 steps hold
    module.train_steps = 49
    assert module._phase1_lr() == pytest.approx(0.5)
