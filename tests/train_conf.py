"""conf/train.yaml's values for tests that build a method directly (the defaults live in conf/ only)."""
from pathlib import Path

from omegaconf import OmegaConf

TRAIN_YAML = Path(__file__).resolve().parents[1] / "conf" / "train.yaml"


def section(name, **over):
    """conf/train.yaml's `name` section as a dict, with `over` replacing some of its keys."""
    return {**OmegaConf.to_container(OmegaConf.load(TRAIN_YAML)[name]), **over}
