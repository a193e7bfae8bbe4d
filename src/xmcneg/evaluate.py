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


def predict(cfg, mcfg, dm, module):
    from xmcneg.data import formats
    from xmcneg.data.datamodule import csr_rows_to_bag

    if not cfg.input or not cfg.output:
        raise ConfigError("input", "mode=predict needs input=FILE and output=FILE")
    k = int(cfg.k)
    if k <= 0:
        raise ConfigError("k", f"must be > 0, got {k}")
    if dm.reads_text:  # a model trained on raw text: one document per line, in its tokenisation
        texts = formats.read_lines(cfg.input)
        n = len(texts)
    else:  # a BoW model: an XC BoW file (train.txt format; labels may be empty)
        X = dm.transform(formats.read_xc_bow(formats.resolve_path(cfg.input), num_features=dm.num_features)[0])
        n = X.shape[0]
    rows_out = []
    bs = int(mcfg.data.batch_size)
    with torch.no_grad():
        for i in range(0, n, bs):
            rows = np.arange(i, min(i + bs, n))
            x = dm.text_inputs([texts[i] for i in rows]) if dm.reads_text else csr_rows_to_bag(X, rows)
            batch = {"x": x, "pos": torch.full((len(rows), 1), -1), "idx": torch.from_numpy(rows)}
            h = module.encoder(batch["x"])
            scores, ids = module.predict_topk(h, module.correction_query(batch, h), k=k)
            for s, l in zip(scores.tolist(), ids.tolist()):
                rows_out.append(" ".join(f"{a}:{b:.6g}" for a, b in zip(l, s) if a >= 0))
    formats.write_lines(cfg.output, rows_out)
    log.info("wrote %d predictions to %s", len(rows_out), cfg.output)
    return len(rows_out)


def run(cfg):
    import pytorch_lightning as pl

    out_dir = Path(cfg.paths.output_dir)
    ckpt = read_checkpoint(cfg.ckpt_path)
    mcfg = model_config(cfg, ckpt)
    dm, module = build_trained(mcfg, ckpt, cfg.ckpt_path)
    if cfg.mode == "predict":
        return predict(cfg, mcfg, dm, module)
    if cfg.mode != "test":
        raise ConfigError("mode", f"expected test or predict, got {cfg.mode}")
    t = time.perf_counter()
    trainer = pl.Trainer(accelerator=cfg.hardware.accelerator, devices=1, logger=False,
                         enable_progress_bar=bool(cfg.trainer.enable_progress_bar), enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=True)
    results = {"sampler": mcfg.sampler.name, "dataset": mcfg.dataset.name,
               "encoder": str(mcfg.encoder._target_).rsplit(".", 1)[-1], "ckpt_path": str(cfg.ckpt_path),
               "test": {k: round(v, 6) for k, v in module.test_metrics.items()},
               "eval_time_s": round(time.perf_counter() - t, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
               "status": "completed"}
    write_json(out_dir / "results.json", results)
    return results["test"].get("P@1")
