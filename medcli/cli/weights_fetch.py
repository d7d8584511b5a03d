"""`medcli weights fetch` and `medcli weights list`: get MedicalNet releases onto disk, verified.

Rendering only: the manifest and the downloader live in ``medcli.weights`` (no torch there); the load
check after a fetch uses ``medcli.models`` and is imported inside the command, so ``--help`` stays instant.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import typer

from medcli.cli import console
from medcli.errors import IncompleteLoadError, MedcliError, PartialFailure, UsageError, WeightsError
from medcli.paths import require_writable_file


def register(weights_app: typer.Typer) -> None:
    """Add ``fetch`` and ``list`` to the ``weights`` group."""
    weights_app.command("fetch")(fetch)
    weights_app.command("list")(list_weights)


# ------------------------------------------------------------------------------------------------ fetch
def fetch(
    name: str | None = typer.Argument(
        None,
        help="Release to fetch (see `medcli weights list`), e.g. resnet50, resnet18_8dataset. "
        "Default: resnet50_23dataset.",
        show_default=False,
    ),
    # A string, not a Path: Path() drops the trailing slash that says "a folder" (`--dest weights/`).
    dest: str | None = typer.Option(
        None,
        "--dest",
        help="File to write, or a folder (existing, or ending in /) to put the release's file in. Default: "
        "pretrained/medicalnet_resnet50_3d.pth for the default release, $MEDCLI_HOME/weights/<file> for the "
        "others.",
        show_default=False,
    ),
    url: str | None = typer.Option(
        None,
        "--url",
        help="Fetch from this URL instead of the manifest's mirrors: your own mirror, or a file you "
        "downloaded (a path or file://). Verified against NAME's checksum unless --sha256 is given.",
        show_default=False,
    ),
    sha256: str | None = typer.Option(
        None, "--sha256", help="Expected SHA-256 of the --url file, when it is not a manifest release."
    ),
    force: bool = typer.Option(False, "--force", help="Download again even if a verified copy is present."),
    all_: bool = typer.Option(
        False, "--all", help="Fetch every release into $MEDCLI_HOME/weights/ (about 2.5 GB)."
    ),
    timeout: float = typer.Option(
        60.0,
        "--timeout",
        min=0.1,
        help="Seconds without data before a mirror counts as stalled (connect timeout: at most 10 s).",
    ),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries per mirror for transient errors."),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Load the fetched file into the matching ResNet and report the keys."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Download MedicalNet weights, verify size and SHA-256, and check they load.

    Interrupted downloads resume (HTTP Range) when run again; mirrors are tried in order; a verified file
    is not downloaded twice.  Proxies work through HTTPS_PROXY / NO_PROXY.
    """
    from medcli.weights.manifest import load_manifest
    from medcli.weights.verify import normalize_sha256

    manifest = load_manifest()
    if all_:
        if name or url or dest or sha256:
            raise UsageError(
                "--all fetches every release to $MEDCLI_HOME/weights; it takes no NAME, --url, "
                "--dest or --sha256",
                hint="drop those options, or drop --all",
            )
        entries = list(manifest.entries)
    else:
        entries = [manifest.get(name) if name else manifest.default]
    if sha256 and not url:
        raise UsageError(
            "--sha256 checks the file given with --url",
            hint=f"the manifest already holds {entries[0].name}'s checksum; add --url URL, or drop --sha256",
        )
    expected_sha = normalize_sha256(sha256) if sha256 else None
    if expected_sha and expected_sha != entries[0].sha256 and not dest:
        # The install path is where `list`, `verify` and `train --pretrained-path auto` look for the
        # release: a file of your own there would be called corrupt, replaced, or used as the release.
        raise UsageError(
            f"--sha256 names a file of your own, not {entries[0].name}: it needs --dest",
            hint="add --dest FILE; the release's install path holds only the verified release",
        )
    # Every output path before any work (a 176 MiB download), not after it.
    targets = [_target(entry, dest, all_) for entry in entries]
    for target in targets:
        _require_writable(target, dest, all_)
    connect_timeout = min(timeout, 10.0)
    render = "none" if json_out else "summary" if all_ else "full"

    results: list[dict] = []
    failures: list[str] = []
    for entry, target in zip(entries, targets, strict=True):
        own_file = expected_sha is not None and expected_sha != entry.sha256
        loaded: list = []  # the load report, once the check has run
        check_part = partial(_check_loads, entry.depth, shown=target, own_file=own_file, into=loaded)
        try:
            try:
                result = _fetch_one(
                    target,
                    [url] if url else _sources(entry, target),
                    sha256=expected_sha or entry.sha256,
                    size=None if own_file else entry.size,
                    force=force,
                    timeout=(connect_timeout, timeout),
                    retries=retries,
                    # Checked before it is moved into place: a file that fails leaves --dest as it was.
                    accept=check_part if check else None,
                )
                # A present release was checked when it was fetched; a file of your own is checked every
                # time, since its checksum says nothing of which ResNet it fits.
                if check and own_file and result.action == "present":
                    _check_loads(entry.depth, target, shown=target, own_file=own_file, into=loaded)
            except IncompleteLoadError:
                if loaded:  # which keys did not load
                    _render(loaded[0], render)
                raise
            # A file of the user's own (--sha256) is not the release; NAME only says which ResNet loads it.
            row = {"name": None if own_file else entry.name, "depth": entry.depth, **result.to_dict()}
            if not (all_ or json_out):
                _print_fetch_table([row])
            if loaded:
                # One fetch: the full key report (a result, on stdout); --all: one summary line each.
                _render(loaded[0], render)
                row["load"] = loaded[0].to_dict()
            results.append(row)
        except MedcliError as e:
            if not all_:
                raise
            console.print_error(f"{entry.name}: {e}")
            failures.append(entry.name)
            results.append({"name": entry.name, "error": str(e), "exit_code": e.exit_code})

    if json_out:
        console.print_json(results)
    elif all_:
        _print_fetch_table([r for r in results if "error" not in r])
    if failures:
        raise PartialFailure(
            f"{len(failures)} of {len(entries)} releases failed: {', '.join(failures)}",
            hint="run the same command again: finished files are skipped and partial ones resume",
        )


def _sources(entry, target: Path) -> list[str]:
    """Where to get ``entry`` from: a local copy elsewhere (e.g. ``$MEDCLI_HOME/weights`` after ``--all``)
    first, copied through the same checksum check, then the manifest's mirrors."""
    from medcli.weights.manifest import local_candidates

    local = [str(p) for p in local_candidates(entry) if p.is_file() and p.resolve() != target.resolve()]
    return [*local, *entry.urls]


def _target(entry, dest: str | None, all_: bool) -> Path:
    """Where ``entry`` goes: ``--dest``, else ``$MEDCLI_HOME/weights`` (``--all``), else its install path."""
    from medcli.weights.manifest import install_path, weights_dir

    if dest:
        # A trailing slash means a folder even before it exists: the release's file goes inside it.
        path = Path(dest).expanduser()
        return path / entry.file if path.is_dir() or dest.endswith(("/", os.sep)) else path
    return weights_dir() / entry.file if all_ else install_path(entry)


def _require_writable(target: Path, dest: str | None, all_: bool) -> None:
    """A usage error now for a target that is a folder or lies under a file, not a failure after the
    download."""
    if dest:
        require_writable_file(target, "--dest")
        return
    if target.is_file():  # a verified release (say, in a read-only shared folder) needs no writing
        return
    try:
        require_writable_file(target, "the install path")
    except UsageError as e:
        elsewhere = "set MEDCLI_HOME to another folder" if all_ else "choose another file with --dest"
        raise UsageError(e.message, hint=f"move what is there out of the way, or {elsewhere}") from None


def _fetch_one(target: Path, urls: list[str], **options):
    """Run the downloader with progress on stderr (a bar on terminals, INFO lines always)."""
    from medcli.weights.download import fetch as download

    with _progress(target.name) as on_progress:
        result = download(urls, target, progress=on_progress, notify=console.info, **options)
    if result.action == "present":
        console.info(f"{target} is present and verified; not downloading (--force downloads again)")
    else:
        # A local copy, or a complete .part from an earlier run, transfers nothing: no rate to show.
        rate = result.bytes_transferred / max(result.seconds, 1e-9) / 2**20
        speed = f" ({rate:.1f} MiB/s)" if result.bytes_transferred else ""
        console.info(
            f"{target.name}: {_mib(result.size)} verified in {result.seconds:.1f}s{speed} → {target}"
        )
    return result


# Without a terminal (CI, SLURM, nohup): a plain progress line at most this often, so a long download shows
# it is alive in the log without flooding it.
LOG_EVERY_S = 30.0


@contextmanager
def _progress(label: str):
    """Yield a ``progress(done, total)`` callback: a Rich bar (bytes, rate, ETA) on a terminal, else an
    INFO line every ``LOG_EVERY_S`` seconds."""
    if not console.progress_enabled():
        start = last = time.monotonic()

        def log(done: int, total: int | None) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < LOG_EVERY_S or not done or (total and done >= total):
                return
            last = now
            share = f"{done / total:.0%} ({_mib(done)} of {_mib(total)})" if total else _mib(done)
            console.info(f"{label}: {share}, {done / max(now - start, 1e-9) / 2**20:.1f} MiB/s")

        yield log
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console.err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _check_loads(depth: int, path: Path, *, shown: Path, own_file: bool, into: list) -> None:
    """Load ``path`` (the verified ``.part``, or a present file) into a ResNet of its depth: the checksum says
    the bytes are right, this says medcli can use them.  The report is appended to ``into`` (also when the
    load is incomplete: the caller prints which keys failed).  Messages name ``shown``, the file asked for."""
    import torch

    from medcli.models import create_model, load_pretrained
    from medcli.models.pretrained import incomplete_hint

    staged = path != shown

    def named(message: str) -> str:
        # A failing .part is removed, so name the file the user asked for, and say it was not installed.
        return message.replace(str(path), str(shown)) + ("; not installed" if staged else "")

    with torch.device("meta"):  # skip the random init: the weights replace it
        model = create_model(depth=depth, num_classes=2)
    try:
        report = load_pretrained(model.to_empty(device="cpu"), path, require=True)
    except IncompleteLoadError as e:  # e.g. another depth's file
        raise IncompleteLoadError(
            named(f"{path}: checksum verified, but it does not fit a ResNet-{depth}: {e.message}"),
            hint="give the NAME of a release with the file's depth (`medcli weights list`), or --no-check",
        ) from e
    except WeightsError as e:
        # Your checksum vouches for the bytes, not that they are weights.
        hint = f"check that --url gives MedicalNet weights for a ResNet-{depth}" if own_file else e.hint
        raise WeightsError(named(e.message), hint=hint) from e
    report.path = str(shown)
    into.append(report)
    if not report.ok:
        what = "your file" if own_file else "the verified release"
        raise IncompleteLoadError(
            named(f"{shown}: {what} does not load completely into a ResNet-{depth}: {report.summary_line()}"),
            hint=incomplete_hint(report),
        )


def _render(report, render: str) -> None:
    """``render``: "full" (the `weights verify` report), "summary" (one line) or "none"."""
    from medcli.cli.weights import render_load_report

    if render == "full":
        render_load_report(report)
    elif render == "summary":
        console.info(f"{report.path}: {report.summary_line()}")


def _print_fetch_table(rows: list[dict]) -> None:
    if not rows:
        return
    table = console.table("MedicalNet weights")
    table.add_column("name")
    table.add_column("status")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("file", overflow="fold")
    for r in rows:
        status = {"present": "present, verified", "downloaded": "downloaded, verified"}.get(
            r["action"], "corrupt copy replaced, verified"
        )
        name = r["name"] or f"your file (ResNet-{r['depth']})"
        table.add_row(name, console.styled(status, "green"), _mib(r["size"]), r["path"])
    console.out.print(table)


# ------------------------------------------------------------------------------------------------- list
def list_weights(
    json_out: bool = typer.Option(False, "--json", help="Print the releases as JSON on stdout."),
) -> None:
    """List the known MedicalNet releases and whether a verified copy is on this machine.

    Local copies are looked for at pretrained/medicalnet_resnet50_3d.pth (the default release) and
    $MEDCLI_HOME/weights/<file>; a present file is checked for size and SHA-256.
    """
    from medcli.weights.manifest import load_manifest, local_status, weights_dir

    manifest = load_manifest()
    rows = [(e, local_status(e)) for e in manifest.entries]
    if json_out:
        console.print_json([{**e.to_dict(), "local": c.to_dict()} for e, c in rows])
        return

    # Paths under $MEDCLI_HOME/weights are shown by file name (the folder is in the title): full paths
    # were folded over three lines at 80 columns.
    home = weights_dir()
    table = console.table(f"MedicalNet releases (* = default); files in {home} unless a path is given")
    # A name and each alias on a line of their own, in a column as wide as the longest line: folded
    # mid-name ("medicalnet_resnet50_" / "3d") or cut short with "…", an alias could not be copied or typed.
    # No depth column: every name says its depth (`--json` has it as a number).
    labels = []
    for e, _ in rows:
        label = e.name + (" *" if e.is_default else "")
        labels.append(label + ("\n(" + ",\n ".join(e.aliases) + ")" if e.aliases else ""))
    widest = max(len(line) for label in labels for line in label.splitlines())
    table.add_column("name (aliases)", min_width=widest, overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("local copy")
    table.add_column("file", overflow="fold")
    for label, (e, c) in zip(labels, rows, strict=True):
        state = {
            "verified": console.styled("verified", "green"),
            "absent": console.styled("absent", "dim"),
        }.get(c.state, console.styled(f"corrupt: {c.reason}", "red"))
        path = c.path.name if c.path.parent == home else str(c.path)
        table.add_row(label, _mib(e.size), state, path)
    console.out.print(table)


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"
