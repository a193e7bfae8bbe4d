"""conf/dataset/{medical,enron,corel5k}.yaml: they compose, and (when XMC_DATA_DIR holds the shared datasets) load
through the BoW datamodule with the sizes of the datasets' READMEs."""
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# name: (folder, train points, test points, features, labels)
DATASETS = {"medical": ("Medical", 333, 645, 1449, 45), "enron": ("Enron", 1123, 579, 1001, 53),
            "corel5k": ("Corel5k", 4500, 500, 499, 374)}


def _compose(name, data_dir, cache_dir):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"dataset={name}", f"paths.data_dir={data_dir}",
                                           f"paths.cache_dir={cache_dir}"])


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_config_composes(name, tmp_path):
    cfg = _compose(name, tmp_path / "data", tmp_path / "cache")
    d = cfg.dataset
    assert (d.name, d.format, d.feature_transform) == (name, "bow", "tfidf_l2")
    assert d.dir == str(tmp_path / "data" / DATASETS[name][0])
    assert (d.train_file, d.test_file, d.propensity_a, d.propensity_b) == ("train.txt", "test.txt", 0.55, 1.5)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_loads_when_present(name, tmp_path):
    data_dir = Path(os.environ.get("XMC_DATA_DIR", "data"))
    folder, n_train, n_test, n_feat, n_labels = DATASETS[name]
    if not (data_dir / folder / "train.txt").is_file():
        pytest.skip(f"{data_dir / folder} not present")
    from xmcneg.data.datamodule import build_datamodule

    dm = build_datamodule(_compose(name, data_dir, tmp_path / "cache"))
    dm.setup()
    (Xtr, Ytr), (Xva, _), (Xte, Yte) = dm.split("train"), dm.split("val"), dm.split("test")
    assert Xtr.shape[0] + Xva.shape[0] == n_train and Xte.shape[0] == n_test
    assert (dm.num_features, dm.num_labels) == (n_feat, n_labels)
    norms = np.sqrt(np.asarray(Xte.multiply(Xte).sum(1)).ravel())
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)  # tf-idf rows L2-normalised
