"""`medcli bench`: (lands with its issue)."""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add this module's commands to the root app (none yet)."""
