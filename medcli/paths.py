"""Where medcli keeps things on disk.  Every default can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WEIGHTS = Path("pretrained/medicalnet_resnet50_3d.pth")  # the seed's path, relative to the cwd


def medcli_home() -> Path:
    """Root of medcli's own files (downloads, preprocessed cache): ``$MEDCLI_HOME`` or ~/.cache/medcli."""
    env = os.environ.get("MEDCLI_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medcli"


def cache_dir() -> Path:
    """Preprocessed-array cache: ``$MEDCLI_CACHE`` or ``<medcli_home>/preprocessed``."""
    env = os.environ.get("MEDCLI_CACHE")
    return Path(env).expanduser() if env else medcli_home() / "preprocessed"


def default_data_root() -> Path:
    """``--data`` default: ``$MEDCLI_DATA`` or ./data."""
    return Path(os.environ.get("MEDCLI_DATA", "data")).expanduser()


def default_runs_root() -> Path:
    """``--out`` default for training runs: ``$MEDCLI_RUNS`` or ./runs."""
    return Path(os.environ.get("MEDCLI_RUNS", "runs")).expanduser()
