"""`medcli bench`: measure this machine's compute ceiling and every speed/memory target, in one run.

The engine (``medcli.engine.bench``) measures; this module only renders: a targets table (each target of
the other issues beside what was reached, PASS/FAIL/n/a with the reason), a speed table for the model
sections, and the remaining figures per section.  ``--json`` prints only the report, which
``scripts/bench_table.py`` turns into the README's table.
"""

from __future__ import annotations

import os
from typing import Any

import typer

from medcli.cli import console

_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "n/a": "yellow"}
_MODEL_SECTIONS = ("train", "infer", "predict")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten_rows(figures: dict) -> list[tuple[str, str]]:
    from medcli.engine.bench import flatten

    return [(k, _fmt(v)) for k, v in flatten(figures)]


def _speed_table(report: dict):
    """One row per (section, mode): time, samples/s, TFLOP/s, fraction of the ceiling, speedup."""

    from medcli.engine.bench import median_range

    table = console.table("Model speed (median, min–max)")
    for col in ("section", "mode", "seconds", "samples/s", "TFLOP/s", "of ceiling", "vs fp32"):
        table.add_column(col, justify="left" if col in ("section", "mode") else "right")
    for name in _MODEL_SECTIONS:
        figures = report["sections"].get(name)
        if not figures or "modes" not in figures:
            continue
        for mode, fig in figures["modes"].items():
            if "skipped" in fig:
                reason = "no native bf16" if "bf16" in fig["skipped"] else fig["skipped"]
                table.add_row(name, mode, console.styled(f"skipped: {reason}", "dim"), "", "", "", "")
                continue
            frac = fig.get("fraction_of_ceiling")
            table.add_row(
                name,
                mode,
                median_range(fig.get("seconds")),
                median_range(fig.get("samples_per_s")),
                median_range(fig.get("tflops")),
                f"{frac:.0%}" if frac is not None else "—",
                f"{fig['speedup_vs_fp32']:.2f}x" if "speedup_vs_fp32" in fig else "—",
            )
    return table


def _targets_table(report: dict):
    table = console.table("Targets")
    for col in ("issue", "target", "reached", "status", "note"):
        table.add_column(col, overflow="fold")
    for row in report["targets"]:
        style = _STATUS_STYLE.get(row["status"], "")
        table.add_row(
            str(row["issue"]),
            row["target"],
            row["reached"],
            console.styled(row["status"], style),
            row["note"],
        )
    return table


def render(report: dict) -> None:
    """The human-readable report on stdout."""

    m = report["machine"]
    line = console.styled(m["cpu"], "bold")
    line.append(
        f" · {m['cores']} cores, {m['threads']} torch threads · {m['cpu_capability']} · "
        f"native bf16: {m['native_bf16']}"
        + (f" · CUDA: {m['cuda']}" if m["cuda"] else "")
        + f" · torch {m['torch']} · model sections on {report['options']['device']}"
        + f" · {report['total_s']:.0f} s"
    )
    console.out.print(line, highlight=False)
    console.out.print(_targets_table(report))
    console.out.print(_speed_table(report))
    for name, figures in report["sections"].items():
        if name in _MODEL_SECTIONS and "modes" in figures and not console.verbose():
            rest = {k: v for k, v in figures.items() if k != "modes"}
        else:
            rest = figures
        table = console.table(name, show_header=False)
        table.add_column("figure")
        table.add_column("value", justify="right", overflow="fold")
        for k, v in _flatten_rows(rest):
            table.add_row(k, v)
        console.out.print(table)


def bench(
    sections: str = typer.Option(
        "", "--sections", help="Comma-separated subset of sections (default: all). See --list."
    ),
    list_sections: bool = typer.Option(False, "--list", help="List the sections and exit."),
    depth: str = typer.Option("50", "--depth", help="ResNet depth for model sections (10..200, or tiny)."),
    input_size: int = typer.Option(128, "--input-size", help="Cubic input size for models."),
    batch_size: int = typer.Option(2, "--batch-size", help="Batch size for the train step."),
    reps: int = typer.Option(3, "--reps", help="Timed repetitions per figure (median, min–max reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed repetitions before timing."),
    device: str = typer.Option(
        "auto", "--device", help="Model sections on: auto (CUDA if present), cpu, cuda or cuda:N."
    ),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's choice)."),
    ceiling_size: int = typer.Option(
        0, "--ceiling-size", help="Volume side of the ceiling's Conv3d (0: 24 on CPU, 48 on GPU)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print only the JSON report on stdout."),
) -> None:
    """Measure this machine's compute ceiling and medcli's speed and memory against it.

    The ceiling is the best FLOP/s of a large dense Conv3d; then the train step, forward pass, predict,
    ensemble, data pipeline and weights, each target of the project beside what was reached.

    Each section runs in a fresh process, so its peak memory is its own; ratios are taken within one run,
    the compared variants timed in turn (A B A B).

    The full run (ResNet-50 at 128³) takes minutes; `--depth 18 --input-size 64` is a quick look.
    """
    from medcli.engine import bench as engine
    from medcli.errors import UsageError

    if list_sections:
        for name, fn in engine.SECTIONS.items():
            first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            console.out.print(f"{name:10s} {first}", highlight=False, soft_wrap=True)
        return
    chosen = [s.strip() for s in sections.split(",") if s.strip()] or None
    for name in chosen or []:
        if name not in engine.SECTIONS:
            from medcli.registry import unknown_name_error

            raise unknown_name_error("bench section", name, engine.SECTIONS)
    for flag, value, low in (
        ("--input-size", input_size, 8),
        ("--batch-size", batch_size, 1),
        ("--reps", reps, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} {value} is too small", hint=f"use {low} or more")
    for flag, value in (("--warmup", warmup), ("--threads", threads), ("--ceiling-size", ceiling_size)):
        if value < 0:
            raise UsageError(f"{flag} {value} is negative", hint="use 0 or more")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads > cores:  # threads taking turns on a core would time the scheduler, not medcli
        raise UsageError(
            f"--threads {threads} is more than the {cores} cores this process may use",
            hint=f"use {cores} or fewer (0: torch's choice)",
        )
    from medcli.models import MODELS, model_name

    if model_name(depth) not in MODELS:
        from medcli.registry import unknown_name_error

        raise unknown_name_error("model depth", depth, ["10", "18", "34", "50", "101", "152", "200", "tiny"])
    from medcli.engine.devices import select_device

    # cuda:N where a GPU was asked for; unknown or absent: an error.  Each section's process makes it current.
    resolved = str(select_device(device, make_current=False))
    opts: dict[str, Any] = {
        "depth": depth,
        "input_size": input_size,
        "batch_size": batch_size,
        "reps": reps,
        "warmup": warmup,
        "device": resolved,
    }
    if threads:
        opts["threads"] = threads
    if ceiling_size:
        opts["ceiling_size"] = ceiling_size

    def on_section(name: str, figures) -> None:
        if figures is None:
            console.err.print(f"bench: {name} ...", style="dim", highlight=False)
        elif "error" in figures:
            console.warn(f"bench: {name} failed: {figures['error']}")
        else:
            console.err.print(
                f"bench: {name} done in {figures.get('section_s', 0):.0f} s, "
                f"peak RSS {figures.get('peak_rss_mb', 0):.0f} MB",
                style="dim",
                highlight=False,
            )

    report = engine.run_bench(opts, chosen, on_section=on_section)
    if json_out:
        console.print_json(report)
    else:
        render(report)


def register(root: typer.Typer) -> None:
    root.command("bench")(bench)
