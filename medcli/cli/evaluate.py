"""`medcli eval`: metrics with patient-level bootstrap CIs, per fold and pooled over a CV run, plus plots.

Rendering only; the evaluation lives in ``medcli.engine.evaluator`` (imported inside the command).  Tables
go to stdout (or JSON with ``--json``); notes, plot paths and progress to stderr.
"""

from __future__ import annotations

from pathlib import Path

import typer

from medcli.cli import console
from medcli.engine.config import SEED_MAX
from medcli.errors import UsageError
from medcli.paths import default_runs_root, require_writable_dir

# (key in BinaryMetrics, label) in display order; AUC and balanced accuracy first (79% of BraTS is HGG).
ROWS = (
    ("auc", "ROC AUC"),
    ("balanced_accuracy", "balanced accuracy"),
    ("sensitivity", "sensitivity (HGG)"),
    ("specificity", "specificity (HGG)"),
    ("f1", "F1 (HGG)"),
    ("mcc", "MCC"),
    ("accuracy", "accuracy"),
    ("brier", "Brier score"),
    ("ece", "ECE"),
)
FOLD_COLUMNS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "mcc", "brier", "ece")
SHORT = {
    "auc": "ROC AUC",
    "balanced_accuracy": "balanced acc.",
    "sensitivity": "sensitivity HGG",
    "specificity": "specificity HGG",
    "f1": "F1 (HGG)",
    "mcc": "MCC",
    "brier": "Brier",
    "ece": "ECE",
}


def eval_command(
    target: Path | None = typer.Argument(
        None,
        metavar="RUN_OR_CHECKPOINT",
        help="A run directory (all folds: per fold + pooled out-of-fold), a fold directory, or a .pt "
        "checkpoint. (default: the newest run under $MEDCLI_RUNS or ./runs)",
        show_default=False,
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Data folder for --recompute or a checkpoint. (default: the one training used)"
    ),
    test: Path | None = typer.Option(
        None,
        "--test",
        help="A labelled held-out folder or CSV manifest to score instead of the validation data: a run's "
        "folds ensembled as predict does; refused if it shares subjects or patients with the training split.",
    ),
    fold: int | None = typer.Option(
        None,
        "--fold",
        help="Only this fold of a run; for a checkpoint it must be the fold it was trained for.",
    ),
    recompute: bool = typer.Option(
        False,
        "--recompute/--stored",
        help="Score best.pt on the data again instead of the stored val_predictions.csv (the default: same "
        "epoch as best.pt, no data needed).",
    ),
    weights: str = typer.Option(
        "auto",
        "--weights",
        help="auto (the weights that selected best.pt), ema (falls back to raw when absent) or raw.",
    ),
    tune_threshold: str | None = typer.Option(
        None,
        "--tune-threshold",
        help="youden: choose the threshold on validation data (cross-fitted across folds); else --threshold.",
    ),
    threshold: str = typer.Option(
        "0.5",
        "--threshold",
        help="Decision threshold on P(HGG); with --test also `tuned`: the Youden threshold a validation "
        "evaluation (--tune-threshold youden) saved.",
    ),
    n_boot: int = typer.Option(
        1000, "--n-boot", help="Bootstrap resamples over patients for 95% CIs (0: none)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Bootstrap seed."),
    bins: int = typer.Option(10, "--bins", help="Equal-width bins for ECE and the reliability diagram."),
    out: Path | None = typer.Option(
        None, "--out", help="Where plots, eval.json and predictions.csv go. (default: <target>/eval)"
    ),
    tta: bool = typer.Option(
        False, "--tta", help="With --test: 8-flip test-time augmentation, as predict's."
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    precision: str = typer.Option("auto", "--precision", help="For --recompute: auto, fp32 or bf16."),
    device: str = typer.Option("auto", "--device", help="For --recompute: auto, cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
) -> None:
    """Evaluate a fold, a checkpoint or a whole CV run on its validation data, or on a held-out set with
    --test: AUC, balanced accuracy, sensitivity/specificity, F1, MCC, Brier, ECE and the confusion matrix,
    with 95% bootstrap CIs over patients, and plots."""
    from medcli.engine.metrics import MIN_BOOT

    if n_boot < 0 or 0 < n_boot < MIN_BOOT:  # fewer resamples give no interval (metrics.bootstrap_ci)
        raise UsageError(
            f"--n-boot {n_boot}: an interval takes at least {MIN_BOOT} resamples",
            hint="use 0 to skip CIs, or e.g. 1000 (the default)",
        )
    if bins < 1:
        raise UsageError(f"--bins {bins} must be at least 1", hint="e.g. --bins 10")
    cut = _threshold(threshold, test is not None)
    if test is None and tta:
        raise UsageError("--tta applies to --test", hint="add --test DATA, or leave --tta out")
    if not (recompute or test is not None):  # the stored predictions need no model run: nothing to set
        for flag, value in (("--precision", precision), ("--device", device)):
            if value != "auto":
                raise UsageError(
                    f"{flag} applies to --recompute and --test (the stored predictions run no model)",
                    hint=f"add --recompute, or leave {flag} out",
                )
    if target is None:  # `medcli train` then `medcli eval`: the run just trained
        from medcli.engine.predictor import newest_run

        target = newest_run(default_runs_root(), what="a run directory, fold directory or .pt checkpoint")
        console.info(f"Using the newest run: {target}")
    if test is not None and tune_threshold not in (None, "none"):
        raise UsageError(
            "--tune-threshold with --test would choose the threshold on the test set",
            hint=f"tune on validation data (`medcli eval {target} --tune-threshold youden`), then "
            "`--test ... --threshold tuned`",
        )
    if test is not None and (recompute or fold is not None or data is not None):
        raise UsageError(
            "--test scores the held-out set with the model as trained: --data, --fold and --recompute "
            "are for validation data",
            hint="pass a fold directory or checkpoint as RUN_OR_CHECKPOINT to score one fold's model",
        )
    if out is not None:
        require_writable_dir(out, "--out")
    from medcli.engine.evaluator import evaluate, evaluate_test

    common = {
        "weights": weights,
        "threshold": cut,
        "n_boot": n_boot,
        "seed": seed,
        "n_bins": bins,
        "out_dir": out,
        "plots": not no_plots,
        "precision": precision,
        "device": device,
    }
    with _Progress() as progress:
        if test is not None:
            report = evaluate_test(target, test, tta=tta, on_progress=progress.update, **common)
        else:
            report = evaluate(
                target,
                data=data,
                fold=fold,
                recompute=recompute,
                tune_threshold=tune_threshold,
                on_progress=progress.update,
                **common,
            )
    if json_out:
        console.print_json(report.to_dict())
    else:
        _render(report)
    from medcli.engine.runs import folds_in_training

    for note in [*report.notes, folds_in_training(target)]:
        if note:
            console.info(note)
    for name, path in report.plots.items():
        console.info(f"{name}: {path}")


def _threshold(value: str, test: bool) -> float | str:
    """``--threshold``: as predict's, with ``tuned`` for ``--test`` only (validation data get a threshold
    tuned on them with --tune-threshold, not a tuned one to apply)."""
    from medcli.cli.predict import parse_threshold

    cut = parse_threshold(value)
    if cut == "tuned" and not test:
        raise UsageError(
            "--threshold tuned applies to --test (a threshold tuned on validation data)",
            hint="tune one here with --tune-threshold youden",
        )
    return cut


class _Progress:
    """A Rich bar per fold while best.pt is re-scored (``--recompute``), only on an interactive stderr."""

    def __enter__(self):
        self.bar, self.tasks = None, {}
        if console.progress_enabled():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console.err
            )
            self.bar.__enter__()
        return self

    def update(self, label: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(f"scoring {label}", total=total)
        self.bar.update(self.tasks[label], completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------------------------------


def _fmt(value, reason: str | None = None, digits: int = 3) -> str:
    if value is None:
        return f"n/a ({reason})" if reason else "n/a"
    return f"{value:.{digits}f}"


def _ci(ci: dict | None) -> str:
    if not ci or ci.get("low") is None:
        return "n/a"
    return f"{ci['low']:.3f}–{ci['high']:.3f}"


def _threshold_text(report) -> str:
    t = report.threshold
    if t["method"] == "fixed":
        return f"threshold {t['value']:g}"
    if "deploy" in t:
        return f"Youden thresholds cross-fitted per fold (deploy {t['deploy']:.3f})"
    return f"Youden threshold {t['value']:.3f}"


def _render(report) -> None:
    out = console.out
    if len(report.folds) > 1:
        # Metrics as rows and folds as columns: stays readable at 80 columns for 5-10 folds.
        sources = sorted({f"{r.source} · {r.weights} weights" for r in report.folds})
        table = console.table(f"Per fold: {report.target} ({', '.join(sources)})")
        table.add_column("metric", no_wrap=True)
        for r in report.folds:
            table.add_column(f"fold {r.fold}", justify="right", no_wrap=True)
        table.add_column("mean ± sd", justify="right", no_wrap=True)
        table.add_row("n (LGG/HGG)", *(f"{r.metrics.n_lgg}/{r.metrics.n_hgg}" for r in report.folds), "")
        for c in FOLD_COLUMNS:
            s = report.summary.get(c) or {}
            if s.get("mean") is None:
                mean_sd = "n/a"
            else:
                mean_sd = (
                    f"{s['mean']:.3f} ± {s['sd']:.3f}" if s.get("sd") is not None else f"{s['mean']:.3f}"
                )
            table.add_row(SHORT[c], *(_fmt(getattr(r.metrics, c)) for r in report.folds), mean_sd)
        undefined = [
            f"fold {r.fold}: {r.metrics.undefined_reason}" for r in report.folds if r.metrics.undefined_reason
        ]
        if undefined:
            table.caption = "n/a: " + "; ".join(undefined)
        out.print(table)
        n_folds = len(report.folds) + len(report.missing_folds)
        of = f" of {len(report.folds)}/{n_folds} folds" if report.missing_folds else ""
        title = f"Pooled out-of-fold ({report.pooled.n} scans{of} · {_threshold_text(report)})"
    else:
        r = report.folds[0]
        if report.kind == "test":
            t = report.test
            models = f"{t['members']} model{'s' if t['members'] > 1 else ''} of {report.target}"
            models += f" x {t['flips']} flips" if t.get("flips", 1) > 1 else ""
            title = (
                f"held-out test set {t['data']} ({models} · {r.weights} weights · {_threshold_text(report)})"
            )
        else:
            fold = f"fold {r.fold}" if r.fold is not None else "validation"
            title = (
                f"{fold} of {report.target} ({r.source} · {r.weights} weights · {_threshold_text(report)})"
            )
    _metrics_table(report.pooled, title, report.n_boot)
    _per_class_and_confusion(report.pooled)


def _metrics_table(m, title: str, n_boot: int) -> None:
    table = console.table(title)
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    if n_boot:
        table.add_column(f"95% CI ({n_boot} patient bootstraps)", justify="right", no_wrap=True)
    for key, label in ROWS:
        value = getattr(m, key)
        row = [label, _fmt(value, m.undefined_reason if value is None else None)]
        if n_boot:
            row.append(_ci(m.ci.get(key)))
        table.add_row(*row)
    table.caption = (
        f"n={m.n} ({m.n_lgg} LGG, {m.n_hgg} HGG) · ECE with {m.ece_bins} equal-width bins on P(HGG)"
    )
    console.out.print(table)


def _per_class_and_confusion(m) -> None:
    table = console.table("Per class")
    for col in ("class", "support", "sensitivity", "specificity", "precision", "F1"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c in m.per_class.items():
        table.add_row(
            name,
            str(c["support"]),
            _fmt(c["sensitivity"], None),
            _fmt(c["specificity"], None),
            _fmt(c["precision"], None),
            _fmt(c["f1"], None),
        )
    console.out.print(table)

    cm = console.table("Confusion matrix")
    cm.add_column("true \\ predicted")
    cm.add_column("LGG", justify="right")
    cm.add_column("HGG", justify="right")
    for name, row in zip(("LGG", "HGG"), m.confusion, strict=True):
        cm.add_row(name, *(str(v) for v in row))
    console.out.print(cm)


def register(root: typer.Typer) -> None:
    root.command("eval", help="Evaluate a run, fold or checkpoint: metrics with bootstrap CIs and plots.")(
        eval_command
    )
