"""`train.py` / `eval.py` run in this process, for runs that end before training starts (a bad checkpoint or
config) or that only evaluate: the entry point `xmcneg.train.cli` on a config composed with Hydra's compose API
(no Hydra app around it: `paths.output_dir` is set from `hydra.run.dir=`, and HydraConfig is not initialised, so
eval.py does not see which keys the command line gave). It saves the ~7 s a new Python
process spends importing torch and Lightning. The result has `returncode`, `stdout` and `stderr`, like
`subprocess.run`'s. The runs that check the command line itself stay subprocesses (tests/test_train_e2e.py,
tests/test_bad_inputs.py::test_train_py_subprocess)."""
import contextlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"train.py": "train", "eval.py": "eval"}
# set for the call, then restored: pl.seed_everything sets the PL_ ones
ENV = {"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": None, "PL_GLOBAL_SEED": None, "PL_SEED_WORKERS": None}


def run_in_process(script, args, tmp_path):
    """`script`'s entry point with the command-line overrides `args` (one must be `hydra.run.dir=...`); the data
    caches under `tmp_path`/cache, as tests/test_train_e2e.run puts them."""
    from xmcneg import evaluate, train

    out = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
    Path(out).mkdir(parents=True, exist_ok=True)  # as Hydra makes the run dir
    overrides = [a for a in args if not a.startswith("hydra.")]
    overrides += [f"paths.output_dir={out}", f"paths.cache_dir={Path(tmp_path) / 'cache'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(CONFIG[script], overrides=overrides)
    saved, threads = {k: os.environ.get(k) for k in ENV}, torch.get_num_threads()
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        _set_env(ENV)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            train.cli(train.run if script == "train.py" else evaluate.run, cfg)
    except SystemExit as e:
        code = e.code
    finally:
        _set_env(saved)
        torch.set_num_threads(threads)
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def _set_env(values):
    """Set each variable to its value; None unsets it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
