"""`medcli bench`: measure this machine's compute ceiling and every speed/memory target, in one run."""

from __future__ import annotations

import typer

from medcli.cli import console


def _flatten(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.4g}"))
    else:
        rows.append((prefix, str(value)))


def bench(
    sections: str = typer.Option(
        "", "--sections", help="Comma-separated subset of sections (default: all). See --list."
    ),
    list_sections: bool = typer.Option(False, "--list", help="List the sections and exit."),
    depth: str = typer.Option("50", "--depth", help="ResNet depth for model sections (10..200, or tiny)."),
    input_size: int = typer.Option(128, "--input-size", help="Cubic input size for model sections."),
    batch_size: int = typer.Option(2, "--batch-size", "--batch_size", help="Batch size for the train step."),
    reps: int = typer.Option(5, "--reps", help="Timed repetitions per figure (median, min–max reported)."),
    threads: int = typer.Option(0, "--threads", help="torch threads (default: torch's choice)."),
    json_out: bool = typer.Option(False, "--json", help="Print only the JSON report on stdout."),
) -> None:
    """Measure the compute ceiling (large dense Conv3d) and medcli's train/predict/data/weights speed
    against it.  Each section runs in a fresh process so peak memory is its own; ratios are within this run."""
    from medcli.engine import bench as engine

    if list_sections:
        for name, fn in engine.SECTIONS.items():
            first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            console.out.print(f"{name:12s} {first}", highlight=False)
        return
    chosen = [s.strip() for s in sections.split(",") if s.strip()] or None
    if chosen:
        unknown = [s for s in chosen if s not in engine.SECTIONS]
        if unknown:
            from medcli.registry import unknown_name_error

            raise unknown_name_error("bench section", unknown[0], engine.SECTIONS)
    opts = {"depth": depth, "input_size": input_size, "batch_size": batch_size, "reps": reps}
    if threads:
        opts["threads"] = threads

    def on_section(name: str, figures) -> None:
        if figures is None:
            console.err.print(f"[dim]bench: {name} ...[/]")

    report = engine.run_bench(opts, chosen, on_section=on_section)
    if json_out:
        console.print_json(report)
        return
    from rich.table import Table

    m = report["machine"]
    console.out.print(
        f"[bold]{m['cpu']}[/] · {m['threads']} threads · {m['cpu_capability']} · native bf16: {m['native_bf16']}"
        + (f" · CUDA: {m['cuda']}" if m["cuda"] else "")
        + f" · torch {m['torch']}"
    )
    for name, figures in report["sections"].items():
        table = Table(title=name, show_header=True, title_justify="left")
        table.add_column("figure")
        table.add_column("value", justify="right")
        rows: list[tuple[str, str]] = []
        _flatten("", figures, rows)
        for k, v in rows:
            table.add_row(k, v)
        console.out.print(table)


def register(root: typer.Typer) -> None:
    root.command("bench")(bench)
