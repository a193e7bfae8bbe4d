"""DDP with every sampler: `train.py hardware=ddp_cpu` (2 CPU processes, gloo) on tiny synthetic data, one run per
sampler, checking (debug.record_train_rows writes each rank's training rows per epoch and digests of its state at
fit end to <run dir>/debug/):

(a) every training row is used exactly once per epoch across the two ranks (no padding duplicates, none dropped),
    and both ranks run the same number of batches, none empty;
(b) both ranks end with bit-identical weights (the sparse label tables updated by the row-wise optimiser too),
    optimiser states and sampler state (adversarial tree, MIPS index builds, NGAME clusters), equal to the final
    checkpoint's weights;
(c) the test metrics equal a single-process `eval.py` of the checkpoint that was tested.

Plus cheap unit tests of the rank-aware batching and of the per-rank sampler streams.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_train_e2e import run
from xmcneg.data.datamodule import EpochPermutation, RankBatchSampler, num_rank_batches, rank_batches, shard_rows
from xmcneg.records import state_digests

NUM_TRAIN = 601  # 571 training rows: odd, so a DistributedSampler would pad one rank with a duplicate
DATA = ["dataset.num_labels=200", f"dataset.num_train={NUM_TRAIN}", "dataset.num_test=200",
        "dataset.num_features=500", "data.batch_size=64"]
TRAIN_ROWS = NUM_TRAIN - round(0.05 * NUM_TRAIN)  # data.val_size 0.05 is held out
SAMPLERS = {
    "full": [],
    "uniform": [],
    "frequency": [],
    "in_batch": [],
    "adversarial": [],
    # hard negatives from the first epoch, index rebuilt every 2 steps (5 steps per epoch and rank)
    "mips": ["sampler.warmup_epochs=0", "sampler.refresh_steps=2"],
    # epoch 0 random batches, epoch 1 clustered (size 8, the re-clustering of phase 1), epoch 2 phase 2
    "ngame": ["sampler.phase1_epochs=2", "trainer.max_epochs=3", "sampler.phase1_warmup_steps=2"],
}


def _load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp_cache")  # synthetic data generated once for all samplers


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_ddp_run(sampler, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [*DATA, "hardware=ddp_cpu", f"sampler={sampler}", "trainer.max_epochs=2", *SAMPLERS[sampler],
            "logger=csv", "trainer.enable_progress_bar=false", "debug.record_train_rows=true", f"hydra.run.dir={out}"]
    p = run("train.py", args, cache_dir, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = _load(out / "results.json")
    assert res["status"] == "completed"
    dbg = out / "debug"

    # (a) each training row exactly once per epoch over the two ranks; same number of non-empty batches per rank
    epochs = res["epochs"]
    orders = []
    for e in range(epochs):
        r0, r1 = _load(dbg / f"train_rows_e{e}_r0.json"), _load(dbg / f"train_rows_e{e}_r1.json")
        assert len(r0) == len(r1) > 0, f"epoch {e}: {len(r0)} vs {len(r1)} batches"
        assert all(len(b) > 0 for b in r0 + r1)
        rows = [i for b in r0 + r1 for i in b]
        assert len(rows) == TRAIN_ROWS, f"epoch {e}: {len(rows)} rows trained, expected {TRAIN_ROWS}"
        assert sorted(rows) == list(range(TRAIN_ROWS)), f"epoch {e}: duplicated or missing rows"
        orders.append([i for b in r0 for i in b])
    assert orders[0] != orders[1]  # a new order every epoch

    # (b) identical state on both ranks, and equal to the final checkpoint
    s0, s1 = _load(dbg / "fit_end_r0.json"), _load(dbg / "fit_end_r1.json")
    assert s0["global_step"] == s1["global_step"] > 0
    for key in ("state_dict", "optimizers", "debug_state"):
        if isinstance(s0[key], dict):  # name the entries that differ
            diff = sorted(k for k in set(s0[key]) | set(s1[key]) if s0[key].get(k) != s1[key].get(k))
            assert not diff, f"{key} differs between ranks: {diff[:5]}"
        assert s0[key] == s1[key], f"{key} differs between ranks"
    assert any("label_w" in k for k in s0["state_dict"])
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state_digests(last["state_dict"]) == s0["state_dict"]
    dbg_state = s0["debug_state"]
    if sampler == "adversarial":
        assert dbg_state["tree"]
    if sampler == "mips":  # the index was in use and rebuilt at the same steps on both ranks
        assert dbg_state["index_version"] >= 3 and dbg_state["builds"] and dbg_state["index_answers"]
    if sampler == "ngame":  # clustered in phase 1 (epoch 1) and phase 2 (epoch 2), identically on both ranks
        assert [c[0] for c in dbg_state["clusters"]] == [1, 2] and dbg_state["phase"] == 2

    # (c) the DDP test metrics (all ranks' predictions gathered, padding dropped) = a single-process eval.py
    ckpt = out / "checkpoints" / f"{res['tested']}.ckpt"
    p = run("eval.py", [*DATA, f"ckpt_path={ckpt}", "trainer.enable_progress_bar=false",
                        f"hydra.run.dir={tmp_path / 'eval'}"], cache_dir, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ev = _load(tmp_path / "eval" / "results.json")["test"]
    assert set(ev) == set(res["test"]) and "P@1" in ev and "P@5" in ev
    for k, v in res["test"].items():
        assert ev[k] == pytest.approx(v, abs=1e-6), f"test {k}: DDP {v} vs eval.py {ev[k]}"


# ------------------------------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("N", [1, 2, 3, 127, 128, 129, 130, 131, 570, 1000])
@pytest.mark.parametrize("W", [1, 2, 3])
def test_rank_batches_cover_every_row_once_with_equal_counts(N, W):
    B = 32
    order = np.random.default_rng(N).permutation(N)
    if N < W:
        with pytest.raises(ValueError):
            rank_batches(order, B, 0, W)
        return
    per_rank = [rank_batches(order, B, r, W) for r in range(W)]
    counts = {len(b) for b in per_rank}
    assert counts == {num_rank_batches(N, B, W)}
    assert all(1 <= len(b) <= B + 1 for bs in per_rank for b in bs)
    rows = np.concatenate([b for bs in per_rank for b in bs])
    assert sorted(rows.tolist()) == list(range(N))
    if W == 1:  # single process: plain consecutive batches
        assert [b.tolist() for b in per_rank[0]] == [order[i:i + B].tolist() for i in range(0, N, B)]


def test_rank_batch_sampler_reseeds_per_epoch_and_agrees_across_ranks():
    samplers = [RankBatchSampler(EpochPermutation(300, seed=4), 16, rank=r, world_size=2) for r in (0, 1)]
    epochs = []
    for e in (0, 1, 0):
        for s in samplers:
            s.sampler.set_epoch(e)
        b0, b1 = list(samplers[0]), list(samplers[1])
        assert len(b0) == len(b1) == len(samplers[0])
        assert sorted(i for b in b0 + b1 for i in b) == list(range(300))
        epochs.append(b0)
    assert epochs[0] == epochs[2] != epochs[1]


def test_shard_rows_pads_evenly():
    shards = [shard_rows(np.arange(7), r, 2) for r in (0, 1)]
    assert [len(s) for s in shards] == [4, 4]
    assert sorted(set(np.concatenate(shards).tolist())) == list(range(7))


@pytest.mark.parametrize("name", ["uniform", "frequency"])
def test_sampler_streams_differ_by_rank_and_replay_per_epoch(name):
    from xmcneg.samplers.frequency import FrequencySampler
    from xmcneg.samplers.uniform import UniformSampler

    dm = SimpleNamespace(num_labels=50, train_label_counts=np.arange(50))
    batch, emb = {"pos": torch.zeros(4, 1, dtype=torch.long)}, torch.zeros(4, 3)
    draws = {}
    for rank in (0, 1):
        s = (UniformSampler if name == "uniform" else FrequencySampler)(num_negatives=8, seed=5)
        s.setup(dm, SimpleNamespace(global_rank=rank, _trainer=object()))
        for epoch in (0, 1, 0):
            s.set_epoch(epoch)
            draws.setdefault((rank, epoch), []).append(s.sample(batch, emb)[0])
    assert torch.equal(*draws[(0, 0)])  # reproducible
    assert not torch.equal(draws[(0, 0)][0], draws[(1, 0)][0])  # ranks differ
    assert not torch.equal(draws[(0, 0)][0], draws[(0, 1)][0])  # epochs differ
