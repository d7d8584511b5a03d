"""`medcli data`: make a synthetic BraTS-like cohort (``synth``) and see what a data folder holds (``index``).

``prepare`` (preprocessing into the cache) lives in ``data_prepare.py``, owned by the preprocessing side;
it is added when present so either side can land first.  Nothing here imports numpy, nibabel or torch at
module level: the engine modules are imported inside the commands (``medcli --help`` stays instant).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medcli.cli import console
from medcli.engine.config import SEED_MAX
from medcli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from medcli.data.discover import Cohort

data_app = typer.Typer(
    name="data",
    help="Make a synthetic cohort, index BraTS folders or CSV manifests, fill and prune the cache.",
    no_args_is_help=True,
)


def register(root: typer.Typer) -> None:
    """Add the ``data`` group: ``synth`` and ``index`` (here), ``prepare`` and ``cache`` (their modules)."""
    from medcli.cli import data_cache, data_prepare

    data_app.command("synth")(synth)
    data_app.command("index")(index)
    data_prepare.register(data_app)
    data_cache.register(data_app)
    root.add_typer(data_app, name="data")


# ------------------------------------------------------------------------------------------------- synth


def synth(
    out: Path = typer.Argument(..., help="Folder to create (must be new or empty).", show_default=False),
    subjects: int = typer.Option(60, "--subjects", "-n", min=1, help="Number of subjects."),
    shape: str | None = typer.Option(
        None, "--shape", help="Volume size X,Y,Z in voxels. (default: 240,240,155, BraTS's)"
    ),
    small: bool = typer.Option(False, "--small", help="64,64,48 volumes: a demo cohort in seconds."),
    layout: str = typer.Option(
        "2020",
        "--layout",
        help="2020: flat folders + name_mapping.csv; 2019: HGG/ and LGG/ folders; csv: a manifest.csv.",
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, max=SEED_MAX, help="Cohort seed; subject i is the same whatever --subjects is."
    ),
    lgg_fraction: float = typer.Option(
        0.3,
        "--lgg-fraction",
        min=0.0,
        max=1.0,
        help="Share of LGG subjects (BraTS: ~0.21).",
    ),
    label_noise: float = typer.Option(
        0.0, "--label-noise", min=0.0, max=0.5, help="Share of recorded grades flipped."
    ),
    workers: int = typer.Option(
        0, "--workers", "-j", min=0, help="Subjects made in parallel (0: one per CPU core, at most 8)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON only."),
) -> None:
    """Write a synthetic BraTS-like cohort: four MRI contrasts, a tumour, BraTS naming and grades.

    HGG-like subjects have a necrotic core, an enhancing rim on t1ce and large oedema; LGG-like ones a
    non-enhancing mass with little oedema, with confounders so the task is not trivial.  For trying medcli
    offline; never a substitute for real data.
    """
    from medcli.data.synth import SMALL_SHAPE, parse_shape, synth_cohort, validate_options

    if small and shape is not None:  # one of them would be ignored
        raise UsageError(f"--small (64,64,48) and --shape {shape} both set the size", hint="give one of them")
    size = SMALL_SHAPE if small else parse_shape(shape or "240,240,155")
    workers = workers or min(8, os.cpu_count() or 1)  # output is identical whatever the worker count
    validate_options(out, subjects, size, layout, lgg_fraction, label_noise, workers)
    console.info(
        f"Writing {subjects} synthetic subjects ({'×'.join(map(str, size))}, layout {layout}) to {out}"
    )
    with _progress("synth", subjects) as advance:
        result = synth_cohort(
            out,
            n_subjects=subjects,
            shape=size,
            layout=layout,
            seed=seed,
            lgg_fraction=lgg_fraction,
            label_noise=label_noise,
            workers=workers,
            progress=advance,
        )
    summary = result.to_dict()
    if as_json:
        console.print_json(summary)
        return
    table = console.table("Synthetic cohort", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    grades = summary["grades"]
    for key, value in (
        ("folder", summary["out"]),
        ("layout", summary["layout"]),
        ("subjects", f"{summary['n_subjects']} ({grades['HGG']} HGG, {grades['LGG']} LGG)"),
        ("grades flipped", str(summary["label_flips"])),
        ("shape", "×".join(map(str, summary["shape"]))),
        ("seed", str(summary["seed"])),
        ("time", f"{summary['seconds']:.1f} s"),
    ):
        table.add_row(key, value)
    console.out.print(table)
    console.info(f"next: medcli data index {out}")


class _progress:
    """A Rich progress bar on stderr when it is a terminal; a no-op callback otherwise."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.bar = what, total, None

    def __enter__(self):
        if not console.progress_enabled():
            return lambda done, total: None
        from rich.progress import Progress

        self.bar = Progress(console=console.err, transient=True)
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


# ------------------------------------------------------------------------------------------------- index


def index(
    roots: list[Path] = typer.Argument(
        ..., help="BraTS folder(s), a parent of several, or a CSV manifest.", show_default=False
    ),
    modalities: str | None = typer.Option(
        None,
        "--modalities",
        help="Sequences each subject must have, e.g. t1ce or t1,t1ce,t2,flair "
        "(default: all four for BraTS, every path column of a CSV).",
        show_default=False,
    ),
    list_subjects: bool = typer.Option(False, "--list", "-l", help="Also list every subject."),
    as_json: bool = typer.Option(False, "--json", help="Print the index as JSON only."),
) -> None:
    """Show what a data folder holds: layout, subjects per grade, modalities, and every problem.

    Reads NIfTI headers only (fast).  A subject with a problem (missing sequence, unreadable or truncated
    file, sequences on different grids) is reported and set aside; the exit code is 0 as long as some
    subject is usable.  Several roots are merged, and BraTS 2019 subjects that reappear in 2020 are kept once.
    """
    from medcli.data.discover import discover

    wanted = [m for m in (modalities or "").replace(" ", ",").split(",") if m] or None
    cohort = discover(*roots, modalities=wanted)
    if as_json:
        console.print_json(cohort.to_dict())
    else:
        _render_cohort(cohort, list_subjects)
    for note in [*cohort.left_out, *cohort.notes]:
        console.info(note)
    cohort.require_usable()


def _render_cohort(cohort: Cohort, list_subjects: bool) -> None:
    grades = cohort.grade_counts()
    errors = [p for p in cohort.problems if p.severity == "error"]
    warnings = [p for p in cohort.problems if p.severity != "error"]

    summary = console.table("Cohort", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("root" if len(cohort.roots) == 1 else "roots", "\n".join(str(r) for r in cohort.roots))
    summary.add_row("layout", cohort.layout)
    summary.add_row("usable subjects", str(len(cohort.subjects)))
    summary.add_row("  HGG", str(grades["HGG"]))
    summary.add_row("  LGG", str(grades["LGG"]))
    if grades["unlabelled"]:
        summary.add_row("  no grade", f"{grades['unlabelled']} (prediction only)")
    summary.add_row("set aside", str(len(cohort.excluded)))
    summary.add_row("problems", f"{len(errors)} errors, {len(warnings)} warnings")
    console.out.print(summary)

    found = cohort.modality_counts()
    required = set(cohort.required_modalities or ())
    modalities = console.table("Modalities")
    modalities.add_column("modality")
    modalities.add_column("subjects", justify="right")
    modalities.add_column("required")
    for modality, n in found.items():
        modalities.add_row(modality, str(n), "yes" if modality in required else "")
    console.out.print(modalities)

    if list_subjects and cohort.subjects:
        subjects = console.table("Subjects")
        for column in ("subject", "patient", "grade", "source", "modalities"):
            subjects.add_column(column)
        for s in cohort.subjects:
            patient = "" if s.patient_id == s.subject_id else str(s.patient_id)
            subjects.add_row(s.subject_id, patient, s.grade or "—", s.source, ", ".join(s.paths))
        console.out.print(subjects)

    if cohort.problems:
        problems = console.table("Problems")
        for column in ("", "subject", "file", "problem", "what to do"):
            problems.add_column(column, overflow="fold")
        for p in [*errors, *warnings]:
            mark = (
                console.styled("error", "red")
                if p.severity == "error"
                else console.styled("warning", "yellow")
            )
            problems.add_row(mark, p.subject or "—", Path(p.file).name if p.file else "", p.what, p.hint)
        console.out.print(problems)
