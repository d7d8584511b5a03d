"""`medcli predict`: grade + P(HGG) for new scans, from one checkpoint or a fold ensemble.

Rendering only: finding the model, reading the scans, ensembling, TTA and Grad-CAM live in
``medcli.engine.predictor`` / ``medcli.engine.saliency`` (imported inside the command so ``--help`` stays
instant).  Results go to stdout (a table, or JSON with ``--json``); progress and failures to stderr.  A batch
in which some scans fail still predicts the rest, lists the failures and exits 10.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
from pathlib import Path

import typer

from medcli.cli import console
from medcli.data import label_to_grade
from medcli.errors import MedcliError, PartialFailure, UsageError, interruption
from medcli.paths import default_runs_root, require_writable_dir, require_writable_file

CSV_FIELDS = (
    "scan_id",
    "grade",
    "p_hgg",
    "p_sd",
    "p_min",
    "p_max",
    "n_members",
    "n_flips",
    "true_grade",
    "saliency_nifti",
    "saliency_png",
    "warnings",
)


def predict_command(
    inputs: list[Path] = typer.Argument(
        ...,
        metavar="INPUT...",
        help="NIfTI scan(s) (single-modality models), subject folder(s) in BraTS naming, a directory of "
        "subjects, a folder of NIfTI scans (single-modality models), or a CSV manifest.",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A checkpoint (.pt), a fold directory (uses best.pt) or a run directory (all folds: ensemble). "
        "(default: the newest run under $MEDCLI_RUNS or ./runs)",
    ),
    weights: str = typer.Option(
        "auto",
        "--weights",
        help="auto (the weights that selected best.pt in training), ema (raw where absent) or raw.",
    ),
    tta: bool = typer.Option(
        False,
        "--tta/--no-tta",
        help="Average over the 8 flips of the 3 spatial axes (batched with the ensemble).",
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (bf16 on CPUs with native bf16, for inputs of 64³ and up as in training; else fp32), "
        "fp32 or bf16.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threshold: str = typer.Option(
        "0.5",
        "--threshold",
        help="Call HGG when P(HGG) >= this; `tuned`: the Youden threshold `medcli eval --tune-threshold "
        "youden` saved for this model.",
    ),
    saliency: Path | None = typer.Option(
        None,
        "--saliency",
        help="Write Grad-CAM maps here: <scan>_gradcam.nii.gz on the scan's own grid, and a PNG of "
        "sagittal, coronal and axial slices.",
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Also write the predictions to this CSV file; `-`: the CSV alone on stdout."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
) -> None:
    """Predict the grade (LGG/HGG) of new scans with a trained model or a fold ensemble."""
    if weights not in ("auto", "ema", "raw"):
        raise UsageError(f"--weights {weights!r} is not auto, ema or raw", hint="e.g. --weights auto")
    cut = parse_threshold(threshold)
    tuned = cut == "tuned"
    csv_stdout = csv_path is not None and str(csv_path) == "-"  # `--csv - | csvlook`: stdout is the CSV
    if csv_stdout and json_out:
        raise UsageError("--json and --csv - both print on stdout", hint="choose one, or --csv FILE")
    # Outputs are checked before any scan is read: a bad path must not cost the whole batch's work.
    if csv_path is not None and not csv_stdout:
        require_writable_file(csv_path, "--csv")
        if any(Path(i).is_file() and csv_path.resolve() == Path(i).resolve() for i in inputs):
            raise UsageError(
                f"--csv {csv_path} is one of the inputs: the predictions would overwrite it",
                hint="write the predictions to another file",
            )
    if saliency is not None:
        require_writable_dir(saliency, "--saliency")

    from medcli.engine import predictor as P

    source = P.find_checkpoints(model, default_runs_root())
    if model is None:
        console.info(f"Using the newest run: {source.root}")
    from medcli.engine.runs import folds_in_training

    if training := folds_in_training(source.checkpoints[0] if source.kind == "checkpoint" else source.root):
        console.info(training)
    if tuned:
        from medcli.engine.evaluator import tuned_threshold

        cut, origin = tuned_threshold(source.root, source.checkpoints)
        console.info(f"Threshold {cut:.3f}: {origin}")
    predictor = P.load_predictor(
        source, weights=weights, tta=tta, precision=precision, device=device, threshold=cut
    )
    modalities = tuple(predictor.preprocess_cfg.modalities)
    console.info(
        f"Model: {source.describe()} · modalities {','.join(modalities)} · "
        f"input {'x'.join(map(str, predictor.preprocess_cfg.input_size))} · {predictor.precision} on "
        f"{predictor.device}" + (" · 8-flip TTA" if tta else "")
    )

    notes: list[str] = []
    scans, input_failures = P.collect_scans(inputs, modalities, notes)
    for note in notes:
        console.info(note)
    if not scans:
        _raise_all_failed(input_failures, json_out)

    result = predictor.empty_result()
    try:
        _run(predictor, scans, saliency, result)
        stopped = None
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the scans done are reported as a finished run's
        if not result.predictions:
            raise
        stopped = e
    result.failures[:0] = input_failures
    if not result.predictions:
        _raise_all_failed(result.failures, json_out)

    if csv_stdout:
        sys.stdout.write(_csv_text(result))
        sys.stdout.flush()
    elif csv_path is not None:
        from medcli.atomic import atomic_write_text

        atomic_write_text(csv_path, _csv_text(result))
    if json_out:
        console.print_json(result.to_dict())
    else:
        if not csv_stdout:
            _print_table(result)
        if csv_path is not None and not csv_stdout:
            console.info(f"Predictions written to {csv_path}")
        if saliency is not None:
            console.info(f"Grad-CAM maps (NIfTI on each scan's grid + PNG) written to {saliency}/")
        _point_to_eval(result, source, inputs)
    _note_scans_it_trained_on(result, source)
    for p in result.predictions:
        for w in p.warnings:
            console.warn(f"{p.scan_id}: {w}")
    for f in result.failures:
        _warn_failure(f)
    if stopped is not None:
        kind = interruption(stopped)
        done = len(result.predictions) + len(result.failures) - len(input_failures)
        kept = f"in {csv_path} and above" if csv_path is not None and not csv_stdout else "above"
        raise kind(
            f"{kind.how} after {done} of {len(scans)} scans; the predictions of those are {kept}",
            hint="run the same command again to predict every scan",
        )
    if result.failures:
        n = len(result.failures) + len(result.predictions)
        raise PartialFailure(
            f"{len(result.failures)} of {n} scans failed ({', '.join(f.scan_id for f in result.failures[:5])}"
            f"{', ...' if len(result.failures) > 5 else ''}); the others were predicted",
            hint="see the warnings above for what is wrong with each and what to do",
        )


def parse_threshold(value: str) -> float | str:
    """``--threshold`` of predict and eval: a number in [0, 1], or ``"tuned"`` (the Youden threshold a
    validation evaluation saved)."""
    if value.strip().lower() == "tuned":
        return "tuned"
    try:
        cut = float(value)
    except ValueError:
        cut = float("nan")
    if not 0.0 <= cut <= 1.0:
        raise UsageError(f"--threshold {value} is not in [0, 1] or `tuned`", hint="e.g. --threshold 0.5")
    return cut


def _point_to_eval(result, source, inputs) -> None:
    """Labelled scans: how many were graded as labelled, and the command that measures it properly."""
    labelled = [p for p in result.predictions if p.label is not None]
    if not labelled:
        return
    agree = sum(p.grade == label_to_grade(p.label) for p in labelled)
    where = str(inputs[0]) if len(inputs) == 1 else "DATA"
    console.info(
        f"{agree} of {len(labelled)} labelled scans graded as labelled; for metrics with confidence "
        f"intervals (and a check that the scans are held out): `medcli eval {source.root} --test {where}`"
    )


def _note_scans_it_trained_on(result, source) -> None:
    """Scans named as subjects of the run's split were trained or validated on: their P(HGG) is no
    held-out estimate (eval --test refuses such a set; predict grades them, and says so)."""
    from medcli.data.splits import Splits
    from medcli.engine.runs import split_file_of

    split_file = split_file_of(source.root)
    if split_file is None:
        return
    try:
        split = Splits.load(split_file)
    except MedcliError:
        return
    seen = [p.scan_id for p in result.predictions if p.scan_id in split.labels]
    if seen:
        console.info(
            f"{len(seen)} of the {len(result.predictions)} scans share an id with subjects of the split the "
            f"model was trained with ({split_file}; e.g. {seen[0]}): trained or validated on, so their "
            "predictions are no held-out estimate"
        )


def _raise_all_failed(failures, json_out: bool = False) -> None:
    """Nothing could be predicted: one failure keeps its own message and exit code.  Under --json the
    failures are still printed, so a script reads why from stdout as it would in a partial failure."""
    if json_out:
        console.print_json({"predictions": [], "failures": [dataclasses.asdict(f) for f in failures]})
    if len(failures) == 1:
        e = MedcliError(failures[0].error)
        e.exit_code = failures[0].exit_code
        raise e
    for f in failures:
        _warn_failure(f)
    from medcli.errors import DataError

    raise DataError(
        f"none of the {len(failures)} inputs could be predicted", hint="see the warnings above for each one"
    )


def _warn_failure(f) -> None:
    console.warn(f.error if f.error.startswith(f.scan_id) else f"{f.scan_id}: {f.error}")


def _run(predictor, scans, saliency, result) -> None:
    """Predict ``scans`` into ``result``, with a progress bar on a terminal."""
    if not console.progress_enabled() or len(scans) < 2:
        predictor.predict(scans, saliency_dir=saliency, into=result)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console.err
    ) as bar:
        task = bar.add_task("predict", total=len(scans))
        predictor.predict(scans, saliency_dir=saliency, on_scan=lambda *_: bar.advance(task), into=result)


def _print_table(result) -> None:
    n = result.n_members
    members = f"{n} model{'s' if n != 1 else ''}" + (" x 8 flips" if result.tta else "")
    show_label = any(p.label is not None for p in result.predictions)
    title = f"Predictions ({members}, threshold {result.threshold:g})"
    table = console.table(title)
    table.add_column("scan")
    table.add_column("grade")
    table.add_column("P(HGG)", justify="right")
    spread = result.n_members * (8 if result.tta else 1) > 1
    if spread:
        table.add_column("sd", justify="right")
        table.add_column("min–max", justify="right")
    if show_label:
        table.add_column("true grade")
    for p in result.predictions:
        row = [p.scan_id, console.styled(p.grade, "bold"), f"{p.p_hgg:.3f}"]
        if spread:
            row += [f"{p.p_sd:.3f}", f"{p.p_min:.3f}–{p.p_max:.3f}"]
        if show_label:
            row.append("" if p.label is None else label_to_grade(p.label))
        table.add_row(*row)
    console.out.print(table)


def _csv_text(result) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for p in result.predictions:
        row = p.to_dict()
        row["warnings"] = "; ".join(row["warnings"])
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})
    return buf.getvalue()


def register(root: typer.Typer) -> None:
    root.command("predict", help="Predict LGG/HGG for new scans (fold ensembles, flip TTA, Grad-CAM).")(
        predict_command
    )
