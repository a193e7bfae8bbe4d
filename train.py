"""Train and test one model: `python train.py [group=option ...] [key=value ...]` (see --help)."""
import hydra

from xmcneg.train import main as _main


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    return _main(cfg)


if __name__ == "__main__":
    main()
