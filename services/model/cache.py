"""Where meshserve keeps model folders, and how one is written once even when processes race.
Torch-free: the gateway finds its tokenizer here without loading the model code."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "meshserve-tiny-llama"


def models_root() -> Path:
    """$MESHSERVE_CACHE, else $XDG_CACHE_HOME/meshserve, else ~/.cache/meshserve; + models/."""
    root = os.environ.get("MESHSERVE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "meshserve") if xdg else str(Path.home() / ".cache" / "meshserve")
    return Path(root) / "models"


def default_model_dir() -> Path:
    """Where the tiny test model is written: models_root() / its name."""
    return models_root() / TINY_MODEL_NAME


def write_once(target: Path, write) -> Path:
    """target, made by write(folder) on first use. Safe when processes race: each writes a
    private temporary folder and renames it into place; the rename is atomic and only one wins."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(scratch)
        scratch.chmod(0o755)
        os.rename(scratch, target)
    except OSError:
        if not target.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
