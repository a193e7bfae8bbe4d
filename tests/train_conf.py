"""conf/train.yaml's, conf/sampler/*.yaml's and conf/encoder/*.yaml's values for tests that build a method, sampler or
encoder directly (the defaults live in conf/ only)."""
from pathlib import Path

from omegaconf import OmegaConf

TRAIN_YAML = Path(__file__).resolve().parents[1] / "conf" / "train.yaml"


def section(name, **over):
    """conf/train.yaml's `name` section as a dict, with `over` replacing some of its keys."""
    return {**OmegaConf.to_container(OmegaConf.load(TRAIN_YAML)[name]), **over}


def sampler_args(name, **over):
    """conf/sampler/<name>.yaml's constructor arguments as a dict, with `over` replacing some of them."""
    node = OmegaConf.to_container(OmegaConf.load(TRAIN_YAML.parent / "sampler" / f"{name}.yaml"))
    return {**{k: v for k, v in node.items() if k not in ("defaults", "name", "_target_")}, **over}


def encoder_args(name, **over):
    """conf/encoder/<name>.yaml's constructor arguments as a dict, with `over` replacing some of them."""
    node = OmegaConf.to_container(OmegaConf.load(TRAIN_YAML.parent / "encoder" / f"{name}.yaml"))
    return {**{k: v for k, v in node.items() if k not in ("_target_", "text")}, **over}
