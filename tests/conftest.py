"""Shared fixtures: a CLI runner on the real app, a subprocess runner for the console script,
and torch settings that keep tests deterministic and light on a 2-core machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    # Tests run many tiny models; two threads is the machine, and avoids oversubscription.
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))


class Cli:
    """Invoke the real Typer app in-process; stdout and stderr are kept apart."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, env: dict | None = None):
        from medcli.cli.app import app

        return self.runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def run_medcli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run ``python -m medcli`` in a real subprocess (exit codes, stderr/stdout separation, imports)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "medcli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def medcli_proc():
    return run_medcli


def training_with_a_checkpoint(
    train_env: dict, name: str, *extra: str, **popen
) -> tuple[subprocess.Popen, Path]:
    """Start a long `medcli train --name NAME` in a real process; return it once fold 0's last.pt exists
    (for a test to signal it mid-training), with the fold's folder.  ``popen``: more Popen arguments."""
    args = ["train", "--data", str(train_env["data"]), "--out", str(train_env["out"]), *train_env["tiny"]]
    fold = train_env["out"] / name / "fold0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcli", *args, "--epochs", "400", "--name", name, *extra],
        env={**os.environ, **train_env["env"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    deadline = time.time() + 300
    while not (fold / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1]
    return proc, fold
