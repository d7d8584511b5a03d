"""medcli.locking: one writer at a time, told who holds the lock; unlocked where files cannot be locked."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

from medcli.errors import UsageError
from medcli.locking import exclusive, holder

SECOND = """
import sys
from pathlib import Path
from medcli.errors import UsageError
from medcli.locking import exclusive
try:
    with exclusive(Path(sys.argv[1]), lambda who: UsageError(f"busy: {who}")):
        print("got it")
except UsageError as e:
    print(e)
"""


def _second_process(lock) -> str:
    return subprocess.run(
        [sys.executable, "-c", SECOND, str(lock)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_second_process_is_told_who_holds_the_lock(tmp_path):
    lock = tmp_path / "x.lock"
    assert holder(lock) is None
    with exclusive(lock, lambda who: UsageError(who)):
        assert _second_process(lock) == f"busy: pid {os.getpid()}"
        assert holder(lock) == f"pid {os.getpid()}"
    assert not lock.exists() and holder(lock) is None
    assert _second_process(lock) == "got it"


def test_a_filesystem_that_cannot_lock_runs_unlocked(tmp_path, monkeypatch):
    """Lustre without the flock mount option answers ENOSYS, some FUSE mounts ENOLCK: that is no other
    process holding the lock, so the work goes on (unlocked) instead of every run being refused as busy.
    (The OS call is replaced here: no such filesystem is mounted on the test machine.)"""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = tmp_path / "x.lock"
    ran = False
    with exclusive(lock, lambda who: UsageError(who)):
        ran = True
    assert ran and not lock.exists()
    lock.write_text("123")
    assert holder(lock) is None
