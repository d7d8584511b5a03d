"""`medcli data cache`: what the preprocessing cache holds, and `--prune` to delete what can never be used.

The cache only grows (a changed scan or setting maps to a new entry); this is the way to take it back.
torch is never imported (a quick command even on a cold start).
"""

from __future__ import annotations

from pathlib import Path

import typer

from medcli.cli import console
from medcli.cli.data_prepare import CACHE_OPTION


def register(data_app: typer.Typer) -> None:
    """Add ``cache`` to the ``data`` group."""
    data_app.command("cache")(cache)


def cache(
    prune: bool = typer.Option(
        False,
        "--prune",
        help="Delete stale entries: their scans changed or are gone, or an old medcli wrote them.",
    ),
    cache_dir: Path | None = CACHE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Show the preprocessing cache: a row per settings folder with its size and stale part; --prune frees it.

    Entries in use are never touched; half-written files count as stale only after an hour.
    """
    from medcli.data.cache import inspect_cache, prune_cache
    from medcli.paths import cache_dir as default_cache_dir

    root = Path(cache_dir or default_cache_dir()).expanduser()
    folders = inspect_cache(root)
    report = {
        "cache": str(root),
        "folders": [f.to_dict() for f in folders],
        "bytes": sum(f.bytes for f in folders),
        "stale_bytes": sum(f.stale_bytes for f in folders),
    }
    if prune:
        files, freed = prune_cache(root)
        report["pruned"] = {"files": files, "bytes": freed}
    if as_json:
        console.print_json(report)
        return
    if not folders:
        console.info(f"no preprocessed arrays under {root}")
        return
    table = console.table(f"Preprocessing cache {root}")
    for column in ("settings", "modalities", "input", "entries", "size", "stale"):
        table.add_column(column, justify="right" if column in ("entries", "size", "stale") else "left")
    for f in folders:
        cfg = f.config or {}
        table.add_row(
            f.key,
            ",".join(cfg.get("modalities", [])) or "?",
            "x".join(str(n) for n in cfg.get("input_size", [])) or "?",
            str(f.entries),
            _mb(f.bytes),
            (_mb(f.stale_bytes) + (f" ({f.stale_reason})" if f.stale_reason else "")) if f.stale else "-",
        )
    console.out.print(table)
    if prune:
        console.info(f"pruned {report['pruned']['files']} files, {_mb(report['pruned']['bytes'])} freed")
    elif report["stale_bytes"]:
        console.info(f"{_mb(report['stale_bytes'])} can be freed: medcli data cache --prune")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
