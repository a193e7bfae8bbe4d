"""Refuse Hydra multiruns with Lightning's `ddp`, which re-runs `sys.argv` (so the whole sweep) in each child;
`ddp_spawn`/`ddp_fork`/`ddp_notebook` and the submitit SLURM launcher are allowed."""
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from xmcneg.errors import ConfigError

MESSAGE = ("multirun with the ddp strategy re-runs the whole sweep in each child process; use "
           "hydra/launcher=submitit_slurm (one job per task) instead")

_SAFE_LAUNCH = ("spawn", "fork", "notebook")


def _count(v):
    """Number of devices/nodes a Lightning `devices`/`num_nodes` value stands for (None: unknown, e.g. auto)."""
    if v is None:
        return 1
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return None if v < 0 else max(v, 1)
    if isinstance(v, str):
        s = v.strip()
        if s.lstrip("-").isdigit():
            return _count(int(s))
        if "," in s:
            return len([p for p in s.split(",") if p.strip()])
        return None  # "auto", "-1"
    try:
        return len(list(v))  # list of device ids
    except TypeError:
        return None


def is_ddp_like(hardware, choice=None):
    """True when the hardware config runs a re-launching DDP strategy on more than one process, or is the
    `ddp` hardware option (by its `name` key or `choice`, the option picked in the hardware group)."""
    name = str(hardware.get("name", "") or choice or "").lower()
    strategy = hardware.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        strategy = strategy.get("_target_") or strategy  # a strategy given as a config node
    strategy = str(strategy or "").lower()
    if "ddp" in strategy and not any(s in strategy for s in _SAFE_LAUNCH):
        devices, nodes = _count(hardware.get("devices", 1)), _count(hardware.get("num_nodes", 1))
        if devices is None or nodes is None or devices * nodes > 1:
            return True
    return name == "ddp"


def check_multirun(cfg, multirun=None, launcher=None):
    """ConfigError('hardware.strategy') for a multirun with a ddp-like hardware config outside the SLURM launcher;
    `multirun`/`launcher` default to the running Hydra app's mode and `hydra.launcher._target_`."""
    choice = None
    if (multirun is None or launcher is None) and HydraConfig.initialized():
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN if multirun is None else multirun
        launcher = str((hc.get("launcher") or {}).get("_target_") or "") if launcher is None else launcher
        choice = hc.runtime.choices.get("hardware")
    if not multirun or "slurm" in str(launcher).lower():
        return
    hardware = cfg.get("hardware")
    if hardware is not None and is_ddp_like(hardware, choice):
        raise ConfigError("hardware.strategy", MESSAGE)
