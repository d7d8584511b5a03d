"""`medcli weights`: verify (here), fetch and list (``weights_fetch.py``) MedicalNet weights.

``render_load_report`` is the one rendering of a ``LoadReport``: ``weights verify``, ``weights fetch`` and
``train`` all print the same file facts, summary line and per-layer key tables.  Nothing here imports
torch at module level (``medcli weights --help`` stays instant).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medcli.cli import console
from medcli.errors import IncompleteLoadError, UsageError, WeightsError

if TYPE_CHECKING:  # pragma: no cover
    from medcli.models.pretrained import LoadReport

weights_app = typer.Typer(
    name="weights",
    help="Fetch, list and verify MedicalNet pretrained weights.",
    no_args_is_help=True,
)

_KINDS = ("loaded", "missing", "unexpected", "mismatched", "ignored")
_KIND_STYLE = {
    "loaded": "green",
    "missing": "yellow",
    "unexpected": "red",
    "mismatched": "red",
    "ignored": "dim",
}


def register(root: typer.Typer) -> None:
    """Add the ``weights`` group (``verify``, plus ``fetch``/``list`` from ``weights_fetch``)."""
    # `fetch` and `list` live in their own module (the downloads side); optional so either side can land
    # first.  Registered before `verify`: help lists the commands in the order a user runs them.
    if importlib.util.find_spec("medcli.cli.weights_fetch") is not None:
        from medcli.cli import weights_fetch

        weights_fetch.register(weights_app)
    weights_app.command("verify")(verify)
    root.add_typer(weights_app, name="weights")


def verify(
    path: Path | None = typer.Argument(
        None,
        help="Weights file to check. (default: the local copy of the release for --depth; `medcli weights "
        "list` shows where)",
        show_default=False,
    ),
    depth: str = typer.Option("50", "--depth", help="ResNet depth: 10, 18, 34, 50, 101, 152, 200 or tiny."),
    in_channels: int = typer.Option(
        1, "--in-channels", min=1, help="Input channels (MRI modalities) of the model."
    ),
    num_classes: int = typer.Option(2, "--num-classes", min=1, help="Classes of the new head."),
    head: str = typer.Option("linear", "--head", help="Head type: linear, or cosine (LDAM)."),
    json_out: bool = typer.Option(False, "--json", help="Print the load report as JSON on stdout."),
) -> None:
    """Load a weights file into the matching ResNet and report key by key what loaded.

    Exit 0 when the whole backbone loaded and only the new classification head is missing; 5 when the
    backbone did not load completely; 4 when the file is unusable (missing, HTML page, truncated, unsafe
    pickle).  Use the root -v for full key lists.
    """
    from medcli.models import create_model, load_pretrained
    from medcli.models.pretrained import incomplete_hint

    # A plain CPU build (~0.5 s for ResNet-50).  Not meta + to_empty(): measured slower, since the first
    # meta-tensor op imports torch's symbolic-shape machinery (2-3 s).
    model = create_model(depth, in_channels=in_channels, num_classes=num_classes, head=head)
    fetch = "medcli weights fetch"
    entry = None  # the release, when checking its local copy
    if path is None:
        from medcli.weights.manifest import fetch_command, weights_for_depth

        path, entry = weights_for_depth(model.depth)
        if path is None:
            raise UsageError(f"MedicalNet released no weights for depth {depth}", hint="pass a file to check")
        fetch = fetch_command(entry)
        actual = path.stat().st_size if path.is_file() else None
        if actual is not None and entry.size is not None and actual != entry.size:  # free: before loading
            raise _corrupt_copy(path, entry, f"size {actual:,} bytes, expected {entry.size:,}", fetch)
    elif not path.exists():
        raise WeightsError(
            f"weights file not found: {path}",
            hint="check the path, or download a release with `medcli weights fetch` (`medcli weights list`)",
        )
    report = load_pretrained(model, path, require=True, fetch=fetch)
    if entry is not None and report.sha256 != entry.sha256:
        why = f"sha256 {(report.sha256 or '')[:12]}…, expected {entry.sha256[:12]}…"
        raise _corrupt_copy(path, entry, why, fetch)

    if json_out:
        data = report.to_dict()
        data["model"] = {
            "depth": model.depth,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "head": head,
        }
        console.print_json(data)
    else:
        render_load_report(report)
    if not report.ok:
        raise IncompleteLoadError(f"{path}: {report.summary_line()}", hint=incomplete_hint(report))


def _corrupt_copy(path: Path, entry, why: str, fetch: str) -> WeightsError:
    """The release's own copy is not the release: `list` calls it corrupt, and `train --pretrained-path
    auto` would start from it, so `verify` fails too (a file of your own belongs at another path)."""
    return WeightsError(
        f"{path} is a corrupt copy of {entry.name} ({why})",
        hint=f"re-fetch it with `{fetch}`, which replaces it",
    )


def render_load_report(report: LoadReport, *, to_stderr: bool = False, full: bool | None = None) -> None:
    """Print a ``LoadReport``: file facts, the summary line, keys per layer, and problems.

    ``to_stderr`` sends it to stderr (for commands whose stdout carries other results); ``full`` lists every
    key (default: the root ``-v``).
    """
    from rich.table import Table
    from rich.text import Text

    from medcli.models.pretrained import display_name, release_label

    out = console.err if to_stderr else console.out
    full = console.verbose() if full is None else full

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("file", report.path)
    if report.exists:
        facts.add_row("size", f"{report.size:,} bytes ({report.size / 2**20:.1f} MiB)")
        facts.add_row("sha256", report.sha256 or "")
        facts.add_row("release", release_label(report.release))
        layout = f"{report.format} · container {report.container}"
        if report.prefix_stripped:
            layout += f" · prefix {report.prefix_stripped!r} stripped"
        facts.add_row("format", layout)
        facts.add_row("entries", f"{report.file_entries} in file, {len(report.model_keys)} in model")
        if report.detected_arch:
            facts.add_row("file arch", f"{display_name(report.detected_arch)} (from its keys)")
    if report.model_arch:
        facts.add_row("model", display_name(report.model_arch))
    facts.add_row("params", f"{report.params_total:,} total, {report.params_trainable:,} trainable")
    facts.add_row("load time", f"{report.seconds:.2f} s")
    out.print(facts)

    style = "bold green" if report.ok else "bold red"
    out.print(Text(report.summary_line(), style=style), soft_wrap=True)  # one line, grep-able
    for line in report.adapted:
        out.print(Text(f"adapted: {line}", style="cyan"))
    for line in report.warnings:
        console.warn(line)
    if not report.exists:
        return

    table = console.table("keys by layer")
    table.add_column("layer")
    for kind in _KINDS:
        table.add_column(kind, justify="right")
    for group, counts in report.by_layer():
        cells = [
            Text(str(counts[k]), style=_KIND_STYLE[k] if counts[k] and k != "loaded" else "") for k in _KINDS
        ]
        table.add_row(group, *cells)
    out.print(table)

    if report.mismatched:
        mism = console.table("shape mismatches")
        for col in ("key", "file shape", "model shape"):
            mism.add_column(col)
        for key, file_shape, model_shape in report.mismatched:
            mism.add_row(key, str(file_shape), str(model_shape))
        out.print(mism)

    # Missing / unexpected / ignored keys are listed (they are few when things are right); loaded keys
    # only with -v.
    kinds = _KINDS if full else ("missing", "unexpected", "ignored")
    for kind in kinds:
        if kind == "mismatched":
            continue
        groups = report.keys_by_layer(kind)
        if not groups:
            continue
        keys_table = console.table(f"{kind} keys")
        keys_table.add_column("layer")
        keys_table.add_column("keys", overflow="fold")
        limit = None if full else 6
        for group, keys in groups.items():
            shown = (
                keys if limit is None or len(keys) <= limit else [*keys[:limit], f"… +{len(keys) - limit}"]
            )
            keys_table.add_row(group, Text(", ".join(shown), style=_KIND_STYLE[kind]))
        out.print(keys_table)
