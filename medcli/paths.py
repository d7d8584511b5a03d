"""Where medcli keeps things on disk.  Every default can be moved with an environment variable."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
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


# -------------------------------------------------------------------------------------- output locations
def require_writable_dir(path: str | Path, option: str) -> Path:
    """Check a file can be created in the output folder ``path`` (given with ``option``), before
    any work: a UsageError (exit 2) now, not an OSError traceback once the work is done."""
    from medcli.errors import UsageError

    path = Path(path)
    problem = _cannot_write_in(path)
    if problem:
        raise UsageError(f"{option} {path}: {problem}", hint=f"give {option} a folder you can write to")
    return path


def require_writable_file(path: str | Path, option: str) -> Path:
    """The same for an output file: not a folder, and its folder writable."""
    from medcli.errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"{option} {path} is a folder", hint=f"give {option} a file name, e.g. {path / 'out'}"
        )
    problem = _cannot_write_in(path.parent)
    if problem:
        raise UsageError(
            f"{option} {path}: {path.parent} {problem}", hint=f"give {option} a path you can write to"
        )
    return path


def _cannot_write_in(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None.  Folders it makes to find out are removed again:
    a command that then fails for another reason leaves nothing behind."""
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    try:
        with folder_for_now(folder), tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot be written ({e.strerror or e})"
    return None


@contextlib.contextmanager
def folder_for_now(folder: Path) -> Iterator[Path]:
    """Make ``folder`` (and missing parents) for the block; afterwards remove those it made that are still
    empty, deepest first.  Whatever was written into them stays, with the folders holding it."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (or gone): it and its parents stay
                break
