"""One writer at a time: an advisory ``flock`` on a lock file beside what is being written.

Used where two medcli processes writing the same files would corrupt them without either noticing: two
``weights fetch`` into one ``.part``, two ``train`` runs in one fold folder (a SLURM array with a repeated
fold, a command started twice).  The second one fails at once with the error ``busy`` builds, told which
process holds the lock.  Standard library only, like ``atomic``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from medcli.errors import MedcliError

# flock's answers for "another process holds it"; any other error means the filesystem cannot lock.
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@contextlib.contextmanager
def exclusive(lock: Path, busy: Callable[[str], MedcliError]) -> Iterator[None]:
    """Hold ``lock`` (created if absent) for the block, or raise ``busy(holder)`` at once where another
    process holds it (``holder``: "pid N", or "" when unknown).

    The lock file is removed afterwards; a holder checks that the path it locked is still the file on
    disk, since a finishing holder may unlink it between another's open and flock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    lock = Path(lock)
    cannot_lock = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _HELD:
                cannot_lock = True
                break
            holder = _pid_in(fd)
            os.close(fd)
            raise busy(holder or "") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file that was unlinked meanwhile: take the new one
    if cannot_lock:
        # The filesystem cannot lock (Lustre mounted without flock, some FUSE mounts): go on unlocked, as
        # before locks existed, rather than refuse every run as "busy".
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for the message another process gets
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def holder(lock: Path) -> str | None:
    """Who holds ``lock`` now ("pid N", or "another process"), or None when nobody does (no file, or one a
    killed process left behind: the kernel released its flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _HELD:  # a filesystem that cannot lock: nobody can hold it
                return None
            return _pid_in(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> str | None:
    """ "pid N" from a lock file its holder wrote its pid into (None before it has)."""
    pid = os.read(fd, 32).decode(errors="replace").strip()
    return f"pid {pid}" if pid.isdigit() else None
