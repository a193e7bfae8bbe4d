"""The whole cost of a new sampler or a new method: one class + one config each, outside src/ and conf/
(tests/toy_sampler.py + tests/conf/sampler/toy.yaml, tests/toy_method.py + tests/conf/method/toy.yaml), trained
end to end by train.py's run and evaluated from the checkpoint by eval.py's run."""
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

TESTS = Path(__file__).resolve().parent
CONF = TESTS.parent / "conf"
TINY = ["dataset.num_labels=100", "dataset.num_train=800", "dataset.num_test=200", "dataset.num_features=400",
        "logger=none", "trainer.enable_progress_bar=false", "data.batch_size=64", "trainer.max_epochs=2",
        "encoder=bow_linear", "encoder.dim=32", f"hydra.searchpath=[file://{TESTS / 'conf'}]"]


def train(tmp_path, *overrides):
    from xmcneg.train import run

    over = [*TINY, *overrides, f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=over)
    run(cfg)
    return cfg, json.loads((tmp_path / "run" / "results.json").read_text())


def test_toy_sampler_trains_with_the_classifier(tmp_path):
    cfg, res = train(tmp_path, "sampler=toy")
    assert cfg.method._target_ == "xmcneg.methods.classifier.XMCClassifier"
    assert res["status"] == "completed" and res["sampler"] == "toy"
    assert res["test"]["P@1"] > 0.2  # far above chance (1/100) after two tiny epochs


def test_toy_method_trains_and_evaluates_from_its_checkpoint(tmp_path):
    from xmcneg import evaluate

    cfg, res = train(tmp_path, "sampler=uniform", "method=toy", "sampler.num_negatives=16")
    assert res["status"] == "completed" and res["test"]["P@1"] > 0.2
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose("eval", overrides=[*TINY[:4], f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'ev'}",
                                          f"paths.cache_dir={tmp_path / 'cache'}"])
    (tmp_path / "ev").mkdir()
    evaluate.run(ecfg)
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["test"]["P@1"] == pytest.approx(res["test"]["P@1"], abs=1e-6)
