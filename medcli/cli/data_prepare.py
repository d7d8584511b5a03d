"""`medcli data prepare`: preprocess a cohort into the cache before training (nnU-Net's "preprocess").

Training then memory-maps ready arrays instead of decoding gzip NIfTI every epoch.  The flags that shape
the arrays (``--modalities``, ``--input-size``) must match the ones ``train`` gets, or train simply misses
the cache and preprocesses on the fly.  numpy/nibabel/torch are imported inside the command only.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from medcli.cli import console
from medcli.errors import DataError, PartialFailure, UsageError
from medcli.paths import require_writable_dir

# `--cache`, shared with `medcli data cache`.
CACHE_OPTION = typer.Option(
    None,
    "--cache",
    help="Cache directory (default: $MEDCLI_CACHE or ~/.cache/medcli/preprocessed).",
    show_default=False,
)


def register(data_app: typer.Typer) -> None:
    """Add ``prepare`` to the ``data`` group."""
    data_app.command("prepare")(prepare)


def parse_size(text: str) -> tuple[int, int, int]:
    """``"128"`` → (128, 128, 128); ``"112,128,128"`` → as given."""
    try:
        sizes = [int(p) for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 3
    if len(sizes) != 3:
        raise UsageError(
            f"--input-size {text!r} is invalid", hint="give one size (128) or three (112,128,128)"
        )
    return tuple(sizes)  # type: ignore[return-value]


def prepare(
    root: Path = typer.Argument(
        ..., help="BraTS folder or CSV manifest (as for `data index`).", show_default=False
    ),
    modalities: str = typer.Option("t1ce", "--modalities", help="Input channels, in order, e.g. t1ce,flair."),
    input_size: str = typer.Option(
        "128", "--input-size", help="Model input size: 128 or D,H,W (as for train)."
    ),
    cache: Path | None = CACHE_OPTION,
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Subjects preprocessed in parallel."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON only."),
) -> None:
    """Preprocess every subject into the cache (reorient, crop, normalise, resize) ahead of training.

    Entries are keyed by the source files and the settings: re-running only does what changed.
    A subject that fails is reported with its reason and the rest go on (exit code 10).
    """
    from medcli.data.cache import PreprocessCache, prepare_cohort
    from medcli.data.discover import discover
    from medcli.data.preprocess import PreprocessConfig

    cfg = PreprocessConfig(
        modalities=tuple(m for m in modalities.replace(" ", ",").split(",") if m),
        input_size=parse_size(input_size),
    )
    store = PreprocessCache(cache)
    require_writable_dir(store.root, "--cache" if cache is not None else "MEDCLI_CACHE")  # before any work
    cohort = discover(root, modalities=cfg.modalities)
    subjects = cohort.require_usable()
    skipped = {s.subject_id: _reason(cohort, s.subject_id) for s in cohort.excluded}

    started = time.perf_counter()
    with _Progress(len(subjects)) as advance:
        report = prepare_cohort(subjects, cfg, store, workers=workers, on_progress=advance)
    seconds = time.perf_counter() - started

    summary = {
        "root": str(root),
        "cache": str(store.config_dir(cfg)),
        "config": cfg.to_dict(),
        "subjects": len(subjects),
        **report.to_dict(),
        "skipped": [{"subject_id": s, "reason": r} for s, r in skipped.items()],
        "seconds": round(seconds, 2),
    }
    if as_json:
        console.print_json(summary)
    else:
        _render(summary)
    for note in cohort.left_out:  # files and folders under the root that are no subject's
        console.info(note)
    if report.failed and not (report.cached or report.already_cached):
        raise DataError(
            f"no subject could be preprocessed (first: {report.failed[0][0]}: {report.failed[0][1]})",
            hint="fix the files listed above, or check them with `medcli data index`",
        )
    if report.failed:
        raise PartialFailure(
            f"{len(report.failed)} of {len(subjects)} subjects failed to preprocess",
            hint="see the reasons above; fix or remove those subjects before training",
        )


def _reason(cohort, subject_id: str) -> str:
    problem = cohort.reason(subject_id)
    return problem.what if problem else "set aside by discovery"


def _render(summary: dict) -> None:
    table = console.table("Preprocessing cache", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    cfg = summary["config"]
    table.add_row("cache", summary["cache"])
    table.add_row("modalities", ", ".join(cfg["modalities"]))
    table.add_row("input size", "×".join(map(str, cfg["input_size"])))
    table.add_row("subjects", str(summary["subjects"]))
    table.add_row("  cached now", str(summary["cached"]))
    table.add_row("  already cached", str(summary["already_cached"]))
    table.add_row("  failed", str(len(summary["failed"])))
    if summary["skipped"]:
        table.add_row("set aside by discovery", str(len(summary["skipped"])))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    console.out.print(table)
    if summary["warnings"]:
        warned = console.table("Cached, with a warning")
        for column in ("subject", "warning"):
            warned.add_column(column, overflow="fold")
        for item in summary["warnings"]:
            warned.add_row(item["subject_id"], item["warning"])
        console.out.print(warned)
    rows = [("failed", f) for f in summary["failed"]] + [("set aside", s) for s in summary["skipped"]]
    if rows:
        problems = console.table("Not cached")
        for column in ("", "subject", "reason"):
            problems.add_column(column, overflow="fold")
        for kind, item in rows:
            problems.add_row(kind, item["subject_id"], item["reason"])
        console.out.print(problems)


class _Progress:
    """A Rich progress bar on stderr when it is a terminal; otherwise a no-op callback."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __enter__(self):
        if not console.progress_enabled():
            return lambda subject_id, status: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("prepare"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console.err,
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("prepare", total=self.total)
        return lambda subject_id, status: self.bar.advance(task)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False
