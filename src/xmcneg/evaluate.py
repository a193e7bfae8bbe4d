"""eval.py: rebuild a trained model from its checkpoint (weights-only load) and test it or predict top-k."""
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from xmcneg.errors import ConfigError
from xmcneg.records import peak_rss_mb, write_json
from xmcneg.resume import check_fits, read_checkpoint

log = logging.getLogger("xmcneg")


def model_config(cfg, ckpt):
    """The training config from the checkpoint, with data location, evaluation and hardware from this call
    (and the dataset too when `dataset=` was given on the command line)."""
    mcfg = OmegaConf.create(ckpt["xmcneg_config"])
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for key in ("paths", "eval", "hardware", "data"):
        mcfg[key] = cfg[key]
    mcfg.optim = OmegaConf.merge(cfg.optim, mcfg.optim)  # optimiser keys added since the checkpoint was written
    if "wide" not in mcfg:  # written before the wide head existed: a model without one
        mcfg.wide = OmegaConf.merge(cfg.wide, {"enabled": False})
    if any(o.split("=")[0].lstrip("+~") == "dataset" or o.startswith("dataset.") for o in overrides):
        mcfg.dataset = cfg.dataset
    return mcfg


def build_trained(cfg, ckpt, path=None):
    from xmcneg.data.datamodule import build_datamodule
    from xmcneg.factory import build_module

    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("test")
    module = build_module(cfg, dm)
    check_fits(path, ckpt, module, hint="evaluate it on a dataset with the labels and features it was trained on, "
                                        "or point ckpt_path to a checkpoint trained on this dataset")
    module.load_state_dict(ckpt["state_dict"])
    if getattr(module, "sampler", None) is not None and ckpt.get("sampler_state") is not None:
        module.sampler.setup(dm, None, state=ckpt["sampler_state"])
    module.eval()
    return dm, module


def input_batches(cfg, mcfg, dm):
    """predict: batches of the documents of `input`, read as the model reads them."""
    from xmcneg.data import formats
    from xmcneg.data.datamodule import csr_rows_to_bag

    if dm.reads_text:  # a model trained on raw text: one document per line, in its tokenisation
        texts = formats.read_lines(cfg.input)
        n = len(texts)
    else:  # a BoW model: an XC BoW file (train.txt format; labels may be empty)
        X = dm.transform(formats.read_xc_bow(formats.resolve_path(cfg.input), num_features=dm.num_features)[0])
        n = X.shape[0]
    bs = int(mcfg.data.batch_size)
    for i in range(0, n, bs):
        rows = np.arange(i, min(i + bs, n))
        x = dm.text_inputs([texts[i] for i in rows]) if dm.reads_text else csr_rows_to_bag(X, rows)
        yield {"x": x, "pos": torch.full((len(rows), 1), -1), "idx": torch.from_numpy(rows)}


def test_batches(mcfg, dm):
    """The test split in row order, in batches."""
    n, collate, bs = dm.split("test")[0].shape[0], dm.collate("test"), int(mcfg.data.batch_size)
    return (collate(np.arange(i, min(i + bs, n))) for i in range(0, n, bs))


def predict(cfg, members):
    """Top-k labels of every document of `input`: one model's own search, or an ensemble's exact one."""
    from xmcneg.data import formats

    if not cfg.input or not cfg.output:
        raise ConfigError("input", "mode=predict needs input=FILE and output=FILE")
    k = int(cfg.k)
    if k <= 0:
        raise ConfigError("k", f"must be > 0, got {k}")
    if len(members) == 1:
        path, mcfg, dm, module = members[0]
        out = []
        with torch.no_grad():
            for batch in input_batches(cfg, mcfg, dm):
                h = module.encoder(batch["x"])
                x = batch["x"] if getattr(module, "wide", None) is not None else None
                out.append(module.predict_topk(h, module.correction_query(batch, h), k=k, x=x))
        scores, ids = torch.cat([s for s, _ in out]), torch.cat([i for _, i in out])
    else:
        scores, ids = ensemble_topk(members, k, lambda mcfg, dm: input_batches(cfg, mcfg, dm))
    rows_out = [" ".join(f"{a}:{b:.6g}" for a, b in zip(lab, s) if a >= 0)
                for s, lab in zip(scores.tolist(), ids.tolist())]
    formats.write_lines(cfg.output, rows_out)
    log.info("wrote %d predictions to %s", len(rows_out), cfg.output)
    return len(rows_out)


def ensemble_topk(members, k, batches):
    """Exact top-k (scores, ids) of the ensemble (`xmcneg.eval.ensemble`) over the documents of
    `batches(mcfg, dm)` (the same documents in the same order for every member)."""
    from xmcneg.eval.ensemble import combine, standardised_rows
    from xmcneg.eval.topk import exact_topk
    from xmcneg.methods.classifier import XMCClassifier

    parts, inputs = [], []
    with torch.no_grad():
        for path, mcfg, dm, module in members:
            if not isinstance(module, XMCClassifier):
                raise ConfigError("ckpt_path", f"{path}: an ensemble takes models of method=classifier (inner "
                                               f"products with a label table), not {type(module).__name__}")
            embs, xs = [], []
            for batch in batches(mcfg, dm):
                h = module.encoder(batch["x"])
                if module.correction_query(batch, h) is not None:
                    raise ConfigError("ckpt_path", f"{path}: its sampler corrects the scores at prediction time; an "
                                                   "ensemble averages plain inner-product scores")
                embs.append(h.float())
                xs.append(batch["x"])
            parts.append((torch.cat(embs), *module.labels.weights()))
            inputs.append((module.wide, xs, [e.shape[0] for e in embs]))
        ev = members[0][1].eval
        k = min(k, parts[0][1].shape[0])
        if all(wide is None for wide, _, _ in inputs):  # inner products only: one search over concatenated vectors
            docs, labels = combine(parts)
            return exact_topk(docs, labels, None, k=k, doc_chunk=int(ev.doc_chunk), label_chunk=int(ev.label_chunk))
        # a member with a wide head: every member's (batch, C) scores, standardised per document and summed
        out_s, out_i, start = [], [], 0
        for j, n in enumerate(inputs[0][2]):
            total = 0
            for (emb, w, b), (wide, xs, _) in zip(parts, inputs):
                s = emb[start:start + n] @ w.T + b
                total = total + standardised_rows(s if wide is None else s + wide(xs[j]))
            top = torch.topk(total, k, dim=1)
            out_s.append(top.values)
            out_i.append(top.indices)
            start += n
        return torch.cat(out_s), torch.cat(out_i)


def ensemble_metrics(members):
    """Test metrics of the ensemble, with the test filter of the dataset when it has one (LF benchmarks)."""
    from xmcneg.eval.metrics import split_metrics

    _, mcfg, dm, module = members[0]
    ids = ensemble_topk(members, int(mcfg.eval.k), test_batches)[1].cpu().numpy()
    return split_metrics(dm, "test", np.arange(dm.split("test")[1].shape[0]), ids, module.inv_prop)


def load_members(cfg):
    """(path, model config, datamodule, module) of each checkpoint of `ckpt_path` (one path, or a list: an
    ensemble of models of one dataset and label set)."""
    paths = [str(p) for p in cfg.ckpt_path] if OmegaConf.is_list(cfg.ckpt_path) else [str(cfg.ckpt_path)]
    if not paths:
        raise ConfigError("ckpt_path", "an empty list; give a checkpoint, or a list of checkpoints for an ensemble")
    members = []
    for path in paths:
        ckpt = read_checkpoint(path)
        mcfg = model_config(cfg, ckpt)
        members.append((path, mcfg, *build_trained(mcfg, ckpt, path)))
        first, this = members[0], members[-1]
        if (this[1].dataset.name, this[3].num_labels) != (first[1].dataset.name, first[3].num_labels):
            raise ConfigError("ckpt_path", f"{path} was trained on {this[1].dataset.name} "
                                           f"({this[3].num_labels} labels), {first[0]} on {first[1].dataset.name} "
                                           f"({first[3].num_labels} labels): an ensemble needs one label set")
    return members


def run(cfg):
    import pytorch_lightning as pl

    out_dir = Path(cfg.paths.output_dir)
    members = load_members(cfg)
    if cfg.mode == "predict":
        return predict(cfg, members)
    if cfg.mode != "test":
        raise ConfigError("mode", f"expected test or predict, got {cfg.mode}")
    t = time.perf_counter()
    path, mcfg, dm, module = members[0]
    if len(members) == 1:
        trainer = pl.Trainer(accelerator=cfg.hardware.accelerator, devices=1, logger=False,
                             enable_progress_bar=bool(cfg.trainer.enable_progress_bar), enable_model_summary=False)
        trainer.test(module, datamodule=dm, verbose=True)
        metrics = module.test_metrics
    else:
        metrics = ensemble_metrics(members)
        log.info("ensemble of %d: %s", len(members), {k: round(float(v), 4) for k, v in metrics.items()})
    results = {"sampler": mcfg.sampler.name, "dataset": mcfg.dataset.name,
               "encoder": str(mcfg.encoder._target_).rsplit(".", 1)[-1], "ckpt_path": path,
               "test": {k: round(float(v), 6) for k, v in metrics.items()},
               "eval_time_s": round(time.perf_counter() - t, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
               "status": "completed"}
    if len(members) > 1:
        results["ckpt_path"] = [p for p, _, _, _ in members]
        results["ensemble"] = [{"ckpt_path": p, "sampler": c.sampler.name, "loss": c.loss.name,
                                "encoder": str(c.encoder._target_).rsplit(".", 1)[-1]} for p, c, _, _ in members]
    write_json(out_dir / "results.json", results)
    return results["test"].get("P@1")
