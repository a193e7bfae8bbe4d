"""DDP with every sampler: `train.py hardware=ddp_cpu` (2 CPU processes, gloo) on tiny synthetic data, one run per
sampler, checking (debug.record_train_rows writes each rank's training rows per epoch and digests of its state at
fit end to <run dir>/debug/):

(a) every training row is used exactly once per epoch across the two ranks (no padding duplicates, none dropped),
    and both ranks run the same number of batches, none empty;
(b) both ranks end with bit-identical weights (the sparse label tables updated by the row-wise optimiser too),
    optimiser states and sampler state (adversarial tree, MIPS index builds, NGAME clusters), equal to the final
    checkpoint's weights;
(c) the test metrics equal a single-process `eval.py` of the checkpoint that was tested (its entry point, run in
    the test process: tests/inprocess.py).

uniform and mips run again with `hardware.sparse_grad_sync=all_gather` (the label tables outside DDP, their sparse
gradients all-gathered with dense collectives: the path NCCL takes) under the same checks, and must end with the same
weights as the default (`auto` = DDP's sparse all-reduce on gloo). NGAME averages every gradient itself (its label
tables always all-gathered, its dense encoder gradients all-reduced: `XMCModule.outside_ddp`).

A mid-epoch resume retraces the uninterrupted run (slow): the preemption signal in batch 2 of epoch 1 on both ranks
saves a mid-epoch checkpoint holding each rank's own RNG streams; the resumed run skips the batches already done
and ends with the same weights, optimiser states and test metrics, bit for bit, on both ranks.

Plus cheap unit tests of the rank-aware batching, of the per-rank sampler streams and of the sparse all-gather.
"""
import json
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inprocess import run_in_process
from test_train_e2e import run
from train_conf import sampler_args
from xmcneg.data.datamodule import EpochPermutation, RankBatchSampler, num_rank_batches, rank_batches, shard_rows
from xmcneg.records import state_digests

NUM_TRAIN = 601  # 571 training rows: odd, so a DistributedSampler would pad one rank with a duplicate
DATA = ["dataset.num_labels=200", f"dataset.num_train={NUM_TRAIN}", "dataset.num_test=200",
        "dataset.num_features=500", "data.batch_size=64", "data.val_min_docs=0",
        "encoder=bow_mlp"]
TRAIN_ROWS = NUM_TRAIN - round(0.05 * NUM_TRAIN)  # data.val_size 0.05 is held out
SAMPLERS = {
    "full": [],
    "uniform": [],
    "frequency": [],
    "in_batch": [],
    "adversarial": [],
    # hard negatives from the first epoch, index rebuilt every 2 steps (5 steps per epoch and rank)
    "mips": ["sampler.warmup_epochs=0", "sampler.refresh_steps=2"],
    # epoch 0 random batches, epoch 1 clustered (size 8, the re-clustering of phase 1), epoch 2 phase 2; a sparse
    # input table (all-gathered) and dense encoder layers (all-reduced outside DDP's reducer)
    "ngame": ["sampler.phase1_epochs=2", "trainer.max_epochs=3", "sampler.phase1_warmup_steps=2",
              "encoder.sparse_input=true"],
}
ALL_GATHER = ["uniform", "mips"]  # also run with hardware.sparse_grad_sync=all_gather
RUNS = [(s, "auto") for s in SAMPLERS] + [(s, "all_gather") for s in ALL_GATHER]
_TRAINED = {}  # (sampler, sync) -> run dir: each configuration trains once per session


def _load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp_cache")  # synthetic data generated once for all samplers


def _train(sampler, sync, cache_dir, tmp_path_factory):
    if (sampler, sync) not in _TRAINED:
        out = tmp_path_factory.mktemp(f"ddp_{sampler}_{sync}") / "run"
        args = [*DATA, "hardware=ddp_cpu", f"hardware.sparse_grad_sync={sync}", f"sampler={sampler}",
                "trainer.max_epochs=2", *SAMPLERS[sampler], "logger=csv", "trainer.enable_progress_bar=false",
                "debug.record_train_rows=true", f"hydra.run.dir={out}"]
        p = run("train.py", args, cache_dir, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        _TRAINED[(sampler, sync)] = out
    return _TRAINED[(sampler, sync)]


# frequency and in-batch negatives take uniform's DDP path (sparse label-table gradients over rows that differ by
# rank, averaged by DDP's reducer), and uniform's all_gather run is the path of
# tests/test_sparse_input.py::test_ddp_sparse_input_all_gather: those runs are kept out of CI (-m slow runs them)
SLOW_RUNS = {("frequency", "auto"), ("in_batch", "auto"), ("uniform", "all_gather")}


@pytest.mark.parametrize("sampler,sync", [
    pytest.param(s, m, id=f"{s}-{m}", marks=[pytest.mark.slow] * ((s, m) in SLOW_RUNS)) for s, m in RUNS])
def test_ddp_run(sampler, sync, cache_dir, tmp_path_factory, tmp_path):
    out = _train(sampler, sync, cache_dir, tmp_path_factory)
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
    assert any("labels.w" in k for k in s0["state_dict"])
    if sampler == "full":  # wide.enabled=auto: full scoring of BoW inputs trains a wide head, reduced by DDP too
        assert "wide.values" in s0["state_dict"]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state_digests(last["state_dict"]) == s0["state_dict"]
    dbg_state = s0["debug_state"]
    # gloo: auto = DDP's sparse all-reduce; the full softmax has dense tables, always reduced by DDP; NGAME all-gathers
    gathered = sampler == "ngame" or (sync == "all_gather" and sampler != "full")
    assert dbg_state["label_sync"] == ("all_gather" if gathered else "ddp")
    if sampler == "adversarial":
        assert dbg_state["tree"]
    if sampler == "mips":  # the index was in use and rebuilt at the same steps on both ranks
        assert dbg_state["index_version"] >= 3 and dbg_state["builds"] and dbg_state["index_answers"]
    if sampler == "ngame":  # clustered in phase 1 (epoch 1) and phase 2 (epoch 2), identically on both ranks
        assert [c[0] for c in dbg_state["clusters"]] == [1, 2] and dbg_state["phase"] == 2

    # (c) the DDP test metrics (all ranks' predictions gathered, padding dropped) = a single-process eval.py
    ckpt = out / "checkpoints" / f"{res['tested']}.ckpt"
    p = run_in_process("eval.py", [*DATA, f"ckpt_path={ckpt}", "trainer.enable_progress_bar=false",
                                   f"hydra.run.dir={tmp_path / 'eval'}"], cache_dir)
    assert p.returncode == 0, p.stderr[-4000:]
    ev = _load(tmp_path / "eval" / "results.json")["test"]
    assert set(ev) == set(res["test"]) and "P@1" in ev and "P@5" in ev
    for k, v in res["test"].items():
        assert ev[k] == pytest.approx(v, abs=1e-6), f"test {k}: DDP {v} vs eval.py {ev[k]}"


@pytest.mark.parametrize("sampler", [pytest.param(s, marks=[pytest.mark.slow] * ((s, "all_gather") in SLOW_RUNS))
                                     for s in ALL_GATHER])
def test_all_gather_equals_ddp_sparse_allreduce(sampler, cache_dir, tmp_path_factory):
    """Same seed, same data: the two ways of averaging the label tables' gradients give the same training run
    (the same final weights: the gradients agree up to float summation order, bit for bit here with 2 ranks)."""
    states = [torch.load(_train(sampler, sync, cache_dir, tmp_path_factory) / "checkpoints" / "last.ckpt",
                         map_location="cpu", weights_only=True)["state_dict"] for sync in ("auto", "all_gather")]
    assert set(states[0]) == set(states[1])
    for k in ("labels.w.weight", "labels.b.weight", *sorted(k for k in states[0] if k.startswith("encoder."))):
        torch.testing.assert_close(states[1][k], states[0][k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_mid_epoch_resume_retraces_the_uninterrupted_run(cache_dir, tmp_path_factory, tmp_path):
    ref = _train("uniform", "auto", cache_dir, tmp_path_factory)
    out = tmp_path / "run"
    args = [*DATA, "hardware=ddp_cpu", "hardware.sparse_grad_sync=auto", "sampler=uniform", "trainer.max_epochs=2",
            "logger=csv", "trainer.enable_progress_bar=false", "debug.record_train_rows=true", f"hydra.run.dir={out}"]
    p = run("train.py", [*args, "debug.kill_in=preempt", "debug.kill_epoch=1"], cache_dir, timeout=300)
    assert p.returncode == -signal.SIGUSR2, p.stderr[-4000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["rank_states"]) == 2  # mid-epoch 1, with both ranks' streams
    gens = [st["sampler_generator"] for st in ckpt["rank_states"]]
    assert not torch.equal(*gens)  # each rank's own negative stream
    p = run("train.py", [*args, "ckpt_path=last"], cache_dir, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "skipping the 3 training batches of epoch 1" in p.stderr + p.stdout
    res, want = _load(out / "results.json"), _load(ref / "results.json")
    assert res["test"] == want["test"] and res["global_step"] == want["global_step"]
    for r in (0, 1):
        done, full = _load(out / "debug" / f"train_rows_e1_r{r}.json"), _load(ref / "debug" / f"train_rows_e1_r{r}.json")
        assert done == full[3:]  # the rest of epoch 1, in the uninterrupted order
        s, w = _load(out / "debug" / f"fit_end_r{r}.json"), _load(ref / "debug" / f"fit_end_r{r}.json")
        for key in ("state_dict", "optimizers", "debug_state", "global_step"):
            assert s[key] == w[key], f"rank {r}: {key} differs from the uninterrupted run"


# ------------------------------------------------------------------------------------------------ unit tests
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# one rank of the sparse all-gather check (a plain script: a spawned worker would re-import this test module)
SPARSE_SYNC_WORKER = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from xmcneg.methods.sparse_optim import all_gather_sparse_mean

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
torch.manual_seed(0)
w, b = nn.Embedding(40, 3, sparse=True), nn.Embedding(40, 1, sparse=True)
unused = nn.Embedding(40, 2, sparse=True)  # no gradient on any rank: stays None
gen = torch.Generator().manual_seed(10 + rank)
ids = torch.randint(0, 40, (5 + 7 * rank, 4), generator=gen)  # uneven row counts, duplicate rows
(w(ids).sum(-1) * torch.randn(ids.shape, generator=gen)).sum().backward()
if rank == 1:  # b: a gradient on rank 1 only (rank 0 counts as empty)
    b(ids).pow(2).sum().backward()
# DistributedDataParallel's semantics: every rank's gradient / world size, summed (gloo's sparse all-reduce)
ref = {}
for name, p in (("w", w.weight), ("b", b.weight)):
    g = p.grad.clone() if p.grad is not None else torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, *p.shape[1:]), p.shape)
    g = g / world
    dist.all_reduce(g)
    ref[name] = g.coalesce().to_dense()
all_gather_sparse_mean([w.weight, b.weight, unused.weight], dist)
res = {"unused_none": unused.weight.grad is None,
       "coalesced": all(p.grad.is_sparse and p.grad.is_coalesced() for p in (w.weight, b.weight))}
for name, p in (("w", w.weight), ("b", b.weight)):
    res[name + "_maxdiff"] = (p.grad.to_dense() - ref[name]).abs().max().item()
open(out, "w").write(json.dumps(res))
dist.destroy_process_group()
"""


def test_all_gather_sparse_mean_matches_sparse_allreduce(tmp_path):
    import subprocess
    import sys

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", SPARSE_SYNC_WORKER, str(r), "2", str(port),
                               str(tmp_path / f"r{r}.json")], stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err[-3000:]
    for r in (0, 1):
        out = _load(tmp_path / f"r{r}.json")
        assert out["unused_none"] and out["coalesced"]
        assert out["w_maxdiff"] <= 1e-6 and out["b_maxdiff"] <= 1e-6, out


# one rank of the per-rank RNG stream check: checkpoint written by rank 0, loaded by both
RANK_STATES_WORKER = """
import json, sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from xmcneg.methods.base import get_rng_state
from xmcneg.records import AtomicCheckpointIO
from xmcneg.resume import RankStates

rank, world, port, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
torch.manual_seed(100 + rank)
module = SimpleNamespace(sampler=SimpleNamespace(generator=torch.Generator().manual_seed(10 + rank)))
torch.randint(0, 9, (rank + 1,), generator=module.sampler.generator)  # each rank at its own stream position
own = {"gen": module.sampler.generator.get_state(), "torch": get_rng_state()["torch"]}
ckpt = {"rng_state": get_rng_state(), "sampler_state": {"generator": module.sampler.generator.get_state()}}
RankStates().on_save_checkpoint(None, module, ckpt)  # collective: every rank's streams into the checkpoint
io = AtomicCheckpointIO()
if rank == 0:  # as Lightning does: only rank 0 writes
    io.save_checkpoint(ckpt, path)
dist.barrier()
loaded = io.load_checkpoint(path, weights_only=True)
res = {"n_states": len(ckpt["rank_states"]), "no_states_left": "rank_states" not in loaded,
       "own_generator": torch.equal(loaded["sampler_state"]["generator"], own["gen"]),
       "own_rng": torch.equal(loaded["rng_state"]["torch"], own["torch"])}
open(out, "w").write(json.dumps(res))
dist.destroy_process_group()
"""


def test_each_rank_restores_its_own_rng_streams(tmp_path):
    import subprocess
    import sys

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_STATES_WORKER, str(r), "2", str(port),
                               str(tmp_path / "c.ckpt"), str(tmp_path / f"r{r}.json")], stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err[-3000:]
    for r in (0, 1):
        assert _load(tmp_path / f"r{r}.json") == {"n_states": 2, "no_states_left": True, "own_generator": True,
                                                   "own_rng": True}, r


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
        s = (UniformSampler if name == "uniform" else FrequencySampler)(**sampler_args(name, num_negatives=8), seed=5)
        s.setup(dm, SimpleNamespace(global_rank=rank, _trainer=object()))
        for epoch in (0, 1, 0):
            s.set_epoch(epoch)
            draws.setdefault((rank, epoch), []).append(s.sample(batch, emb)[0])
    assert torch.equal(*draws[(0, 0)])  # reproducible
    assert not torch.equal(draws[(0, 0)][0], draws[(1, 0)][0])  # ranks differ
    assert not torch.equal(draws[(0, 0)][0], draws[(0, 1)][0])  # epochs differ
