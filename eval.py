"""Evaluate a checkpoint on a test split, or write top-k predictions: see conf/eval.yaml."""
import hydra

from xmcneg.evaluate import run
from xmcneg.train import cli


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg):
    return cli(run, cfg)


if __name__ == "__main__":
    main()
