"""Build the model of a run from its config: Hydra instantiates conf/method/<method>.yaml, and this module fills
in what depends on the data (the encoder's input size, the label count, propensities, the datamodule) and
builds the nested parts (encoder, sampler, loss) from their config groups."""
import inspect

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from xmcneg.errors import ConfigError, XMCError

# keys of a config group that describe the choice rather than being constructor arguments
NOT_ARGUMENTS = ("name", "text", "full_below_labels")


def _instantiate(node, key, **kwargs):
    """hydra.utils.instantiate; a failure is a one-line ConfigError naming the config key."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, XMCError):  # already names the file or config key
            raise cause from None
        raise ConfigError(key, f"bad arguments for {node['_target_']}: {cause}".splitlines()[0]) from None


def build_part(cfg, key, **data_args):
    """Instantiate the config group `key` (its `_target_` with its keys and `data_args` as arguments); None when
    the group has no `_target_` (sampler=full)."""
    node = {k: v for k, v in OmegaConf.to_container(cfg[key], resolve=True).items() if k not in NOT_ARGUMENTS}
    return _instantiate(node, key, **data_args) if node.get("_target_") else None


def build_encoder(cfg, dm):
    # text datamodules say what the encoder needs (vocabulary size, or nothing for a pretrained tokenizer)
    extra = dm.encoder_kwargs() if hasattr(dm, "encoder_kwargs") else {"num_features": dm.num_features}
    enc = build_part(cfg, "encoder", **extra)
    if enc is None:
        raise ConfigError("encoder._target_", "missing")
    if int(enc.dim) <= 0:
        raise ConfigError("encoder.dim", f"must be > 0, got {enc.dim}")
    return enc


def full_scoring(cfg, dm):
    """True when the sampler config asks for full scoring below a label count (`sampler.full_below_labels`, set by
    conf/sampler/auto.yaml) and the data has fewer labels."""
    below = cfg.sampler.get("full_below_labels")
    if below is not None and not isinstance(below, int):
        raise ConfigError("sampler.full_below_labels", f"expected an integer or null, got {below!r}")
    return below is not None and int(dm.num_labels) < below


def build_module(cfg, dm):
    """The LightningModule of `cfg.method`, with the data-dependent arguments its constructor asks for."""
    from xmcneg.eval.metrics import inverse_propensities

    try:
        params = inspect.signature(get_class(cfg.method._target_)).parameters
    except Exception as e:  # noqa: BLE001
        raise ConfigError("method._target_", f"cannot import '{cfg.method.get('_target_')}': {e}") from None
    makers = {  # in this order (the encoder's and label table's initialisation draw from the global RNG)
        "encoder": lambda: build_encoder(cfg, dm),
        "num_labels": lambda: int(dm.num_labels),
        "num_features": lambda: getattr(dm, "num_features", None),
        "inv_prop": lambda: inverse_propensities(dm.full_train_Y, float(cfg.dataset.propensity_a),
                                                 float(cfg.dataset.propensity_b)),
        "sampler": lambda: None if full_scoring(cfg, dm) else build_part(cfg, "sampler", seed=int(cfg.seed)),
        "loss": lambda: build_part(cfg, "loss"),
        "datamodule": lambda: dm,
    }
    if "wide" not in params and cfg.get("wide") is not None and cfg.wide.get("enabled") is True:
        raise ConfigError("wide.enabled", f"method {cfg.method._target_.rsplit('.', 1)[-1]} has no wide head "
                                          "(method=classifier has: the samplers other than ngame and in_batch_random)")
    kwargs = {k: make() for k, make in makers.items() if k in params}
    return _instantiate(OmegaConf.to_container(cfg.method, resolve=True), "method", **kwargs)
