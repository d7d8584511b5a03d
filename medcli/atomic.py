"""Atomic file writes: nothing half-written is ever visible at the destination.

Every writer goes through a temp file in the destination's own directory (so ``os.replace`` is a rename on
one filesystem), gets the permissions ``open()`` would have given (mkstemp's are 0o600), and is renamed
into place only once complete; on any failure the temp file is removed and the old file is untouched.
Standard library only: this sits at the bottom of the layers, beside ``errors`` and ``registry``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def default_mode() -> int:
    """0o666 minus the umask: what open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (nibabel, matplotlib);
    it replaces ``path`` when the block ends without an exception.  ``suffix`` keeps the extension a
    writer may dispatch on (e.g. ``.nii.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object], *, fsync: bool = True) -> None:
    """Call ``write(binary_file)`` on a temp file, optionally fsync it, then move it to ``path``.
    fsync where a crash must not leave an empty-but-renamed file (checkpoints, cache entries); skip it for
    bulk outputs that are regenerated anyway (synthetic cohorts)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    atomic_write(path, lambda fh: fh.write(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform has directory fds)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
