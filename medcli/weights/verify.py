"""Is a file on disk the one we expect?  Size first (free), then SHA-256 (reads the whole file)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from medcli.errors import UsageError

CHUNK = 1 << 20  # 1 MiB: constant memory, large enough that hashing runs at full speed

_HEX64 = re.compile(r"[0-9a-f]{64}")


def normalize_sha256(value: str) -> str:
    """Lower-case a user-supplied SHA-256 and check its shape (64 hex digits)."""
    sha = value.strip().lower()
    if not _HEX64.fullmatch(sha):
        raise UsageError(
            f"{value!r} is not a SHA-256 checksum",
            hint="pass the 64 hex digits that `sha256sum FILE` prints",
        )
    return sha


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value.lower()) is not None


def sha256_file(path: Path):
    """A ``hashlib.sha256`` object fed with ``path``'s bytes, 1 MiB at a time (callers may update it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


@dataclass(frozen=True)
class FileCheck:
    """The state of one local file: ``absent``, ``verified`` or ``corrupt`` (``reason`` says why)."""

    path: Path
    state: str
    reason: str | None = None
    size: int | None = None

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "state": self.state, "reason": self.reason, "size": self.size}


def check_file(path: Path, *, sha256: str, size: int | None) -> FileCheck:
    """Compare ``path`` with the expected size (when known) and SHA-256; never raises for a bad file."""
    path = Path(path)
    if not path.is_file():
        return FileCheck(path, "absent")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return FileCheck(path, "corrupt", f"size {actual_size:,} bytes, expected {size:,}", actual_size)
    actual_sha = sha256_file(path).hexdigest()
    if actual_sha != sha256:
        return FileCheck(path, "corrupt", f"sha256 {actual_sha[:12]}…, expected {sha256[:12]}…", actual_size)
    return FileCheck(path, "verified", None, actual_size)
