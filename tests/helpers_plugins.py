"""Fake installed plugin distributions: a ``*.dist-info`` (METADATA + entry_points.txt) and a module in a
directory put on ``sys.path``, which is exactly what importlib.metadata finds for a pip-installed wheel."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from pathlib import Path

import pytest


class FakeSite:
    """A site-packages-like directory on sys.path; ``add`` installs one fake distribution into it."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, entry_points: dict[str, str], source: str = "", version: str = "1.0") -> str:
        """Install ``dist`` with ``entry_points`` (name → "attr" in a fresh module holding ``source``).

        Returns the module name (unique per call, so a test can tell whether it was imported).
        """
        module = f"fake_plugin_{uuid.uuid4().hex[:10]}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\nSummary: fake plugin {dist}\n"
        )
        lines = "".join(f"{name} = {module}:{attr}\n" for name, attr in entry_points.items())
        (info / "entry_points.txt").write_text(f"[medcli.losses]\n{lines}")
        self.modules.append(module)
        importlib.invalidate_caches()  # importlib.metadata caches directory listings
        return module

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should see the fake distributions."""
        import os

        return {"PYTHONPATH": os.pathsep.join([str(self.root), *sys.path])}


def fake_site_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Generator for a fixture: a ``FakeSite`` on sys.path, removed (with its modules) afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    site = FakeSite(root)
    yield site
    for module in site.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


GOOD_LOSS = """
import torch.nn.functional as F
from torch import nn

class Loss(nn.Module):
    def __init__(self, *, num_classes=2, class_counts=None, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, logits, target):
        return self.scale * F.cross_entropy(logits.float(), target)
"""
