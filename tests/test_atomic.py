"""Atomic writes: complete files only, old file kept on failure, no temp files left, normal permissions."""

from __future__ import annotations

import os

import pytest

from medcli.atomic import atomic_path, atomic_write, atomic_write_text, default_mode


def test_write_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "a.json"  # parent folders are created
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["a.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def half_then_fail(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.csv", "a,b\n")
        assert (tmp_path / "x.csv").stat().st_mode & 0o777 == 0o644 == default_mode()
    finally:
        os.umask(old)


def test_atomic_path_keeps_the_suffix_for_writers_that_dispatch_on_it(tmp_path):
    target = tmp_path / "map.nii.gz"
    with atomic_path(target, suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path and not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".nii.gz") as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == ["map.nii.gz"]
