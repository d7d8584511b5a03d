"""The run directory: where one training writes, and in what shape.

::

    runs/<name>/splits.json          the k-fold split, shared by every fold of the run
    runs/<name>/fold<k>/config.json  the resolved TrainConfig
                        metrics.csv  one row per epoch (same fields as metrics.jsonl)
                        metrics.jsonl
                        val_predictions.csv  subject_id, patient_id, label, p_hgg, p_hgg_ema
                        last.pt, best.pt     checkpoints (medcli.engine.checkpoint)
                        curves.png           loss / AUC / lr per epoch
                        train.log            every session's story, timestamped (RunLog)

Small files are written whole through a temp file + ``os.replace`` so a killed run never leaves half a CSV.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from medcli.atomic import atomic_path, atomic_write_text
from medcli.engine.events import Callback, Event, Warning, log_line
from medcli.errors import UsageError

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_auc",
    "val_bal_acc",
    "val_auc_ema",
    "val_bal_acc_ema",
    "val_loss_ema",
    "lr",
    "samples_per_s",
    "seconds",
    "global_step",
)
PREDICTION_FIELDS = ("subject_id", "patient_id", "label", "p_hgg", "p_hgg_ema")


def fold_number(name: str) -> int:
    """k of a ``fold<k>`` directory's name (-1 when it has no digits)."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else -1


def split_file_of(root: Path) -> Path | None:
    """The ``splits.json`` a model source was trained with: its run's (``root`` a run directory, or a fold
    directory inside one), or None."""
    return next((p for p in (root / "splits.json", root.parent / "splits.json") if p.is_file()), None)


def missing_folds(run_root: Path, fold_dirs: Iterable[Path]) -> list[int]:
    """The folds of the run's split (``splits.json``) absent from ``fold_dirs``: using fewer folds than the
    run has is legitimate (``train --fold 0`` first), but worth saying.  No valid split: nothing missing."""
    from medcli.data.splits import Splits
    from medcli.errors import DataError

    try:
        k = Splits.load(Path(run_root) / "splits.json").k
    except DataError:
        return []
    have = {fold_number(Path(d).name) for d in fold_dirs}
    return [i for i in range(k) if i not in have]


def folds_in_training(target: str | Path) -> str | None:
    """A note when ``target`` (a run, a fold folder, or a checkpoint in one) has folds that a training holds
    right now (``FoldDir.exclusive``): their checkpoints and validation predictions may still change."""
    from medcli.locking import holder

    target = Path(target)
    folder = target.parent if target.is_file() else target
    if folder.name.startswith("fold") and fold_number(folder.name) >= 0:
        locks = [FoldDir(folder.parent, fold_number(folder.name)).lock]
    else:
        locks = sorted(folder.glob(".fold*.lock"), key=lambda p: fold_number(p.name))
    busy = [f"{fold_number(lock.name)} ({who})" for lock in locks if (who := holder(lock))]
    if not busy:
        return None
    what = ("fold " if len(busy) == 1 else "folds ") + ", ".join(busy)
    return (
        f"{what} {'is' if len(busy) == 1 else 'are'} still training: this uses the files as they are now, "
        "which may still change"
    )


class FoldDir:
    """Paths and writers of ``runs/<name>/fold<k>/``."""

    def __init__(self, run_root: Path, fold: int):
        self.run_root = Path(run_root)
        self.fold = fold
        self.path = self.run_root / f"fold{fold}"

    # paths
    @property
    def splits(self) -> Path:
        return self.run_root / "splits.json"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold ``<run>/.fold<k>.lock`` while training this fold (beside the folder: ``--force`` empties
        the folder): a second training of the same fold, which would interleave its checkpoints, metrics
        and log with the first's, or wipe them under ``--force``, is refused at once.  A run folder made
        for the lock alone (the training failed before writing anything) is removed again."""
        from medcli.locking import exclusive
        from medcli.paths import folder_for_now

        def busy(holder: str) -> UsageError:
            return UsageError(
                f"fold {self.fold} of {self.run_root} is being trained by another medcli process"
                + (f" ({holder})" if holder else ""),
                hint="wait for it to finish (then --resume continues it), or use --name for a separate run",
            )

        with folder_for_now(self.run_root), exclusive(self.lock, busy):  # --out may be new too
            yield

    @property
    def lock(self) -> Path:
        return self.run_root / f".fold{self.fold}.lock"

    # config -------------------------------------------------------------------------------------------
    def check_reusable(self, cfg_dict: dict[str, Any], *, resume: bool, force: bool) -> None:
        """Refuse to silently mix two trainings in one folder.

        An existing fold with another config is a UsageError (unless --force); an existing fold with the
        same config needs --resume (continue) or --force (start over).
        """
        from medcli.engine.config import TrainConfig

        if force or not self.path.exists():
            return
        if self.config.exists():
            try:
                old = TrainConfig.from_dict(json.loads(self.config.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
                raise UsageError(
                    f"{self.config} cannot be read as the fold's settings ({type(e).__name__}: {e})",
                    hint="--force starts the fold over (its checkpoints too), --name trains a new run "
                    "beside it",
                ) from None
            new = TrainConfig.from_dict(cfg_dict)
            diff = old.differences(new)
            if diff:
                raise UsageError(
                    f"{self.path} holds a run with different settings ({', '.join(diff)})",
                    hint="use --name for a new run, --force to overwrite it, "
                    "or the old settings with --resume",
                )
        if not resume and (self.last.exists() or self.best.exists()):
            raise UsageError(
                f"{self.path} already holds a training",
                hint="pass --resume to continue it, --force to start over, or --name for a new run",
            )

    def start(self, cfg_dict: dict[str, Any], *, fresh: bool) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):  # temp files of a killed write; the real files are intact
            stale.unlink(missing_ok=True)
        if fresh:
            for name in (
                "metrics.csv",
                "metrics.jsonl",
                "val_predictions.csv",
                "train.log",
                "best.pt",
                "last.pt",
                "curves.png",  # else the old run's curves stand until the first epoch ends
            ):
                (self.path / name).unlink(missing_ok=True)
        self.write_config(cfg_dict)

    def write_config(self, cfg_dict: dict[str, Any]) -> None:
        atomic_write_text(self.config, json.dumps(cfg_dict, indent=2, default=str) + "\n")

    # metrics ------------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                break
        return rows

    def write_metrics(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl and metrics.csv from ``rows`` (small: one row per epoch)."""
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def write_predictions(self, rows: Iterable[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=PREDICTION_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in PREDICTION_FIELDS})
        atomic_write_text(self.path / "val_predictions.csv", buf.getvalue())

    def plot_curves(self, rows: Sequence[dict[str, Any]]) -> Path:
        """curves.png: losses, AUC (raw and EMA) and lr per epoch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] + 1 for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))

        def series(ax, key, label, style="-"):
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(
                    epochs, [float("nan") if y is None else y for y in ys], style, label=label, marker="."
                )

        series(axes[0], "train_loss", "train")
        series(axes[0], "val_loss", "val")
        series(axes[0], "val_loss_ema", "val (EMA)", "--")
        axes[0].set_title("loss")
        series(axes[1], "val_auc", "val AUC")
        series(axes[1], "val_auc_ema", "val AUC (EMA)", "--")
        series(axes[1], "val_bal_acc", "val balanced acc", ":")
        axes[1].set_ylim(0, 1.02)
        axes[1].set_title("validation")
        series(axes[2], "lr", "lr (backbone)")
        axes[2].set_title("learning rate")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"{self.run_root.name} · fold {self.fold}")
        fig.tight_layout()
        out = self.path / "curves.png"
        try:
            with atomic_path(out, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=100)
        finally:
            plt.close(fig)
        return out


class RunLog:
    """train.log: the lines that tell a training's story (:func:`events.log_line`: data, loss, the model and
    its pretrained-weights load report, each epoch, warnings, the end or the error), each with the time.

    Called with every event, it writes the line and passes the event on to ``callback``.  Lines from before
    the fold folder is ready are held until :meth:`open`; a fresh start has replaced the old file by then, a
    resumed one appends under a header of its own, so the file keeps every session of the fold.
    """

    def __init__(self, callback: Callback):
        self.callback = callback
        self.path: Path | None = None
        self.held: list[str] = []
        self.started = _now()  # the header's time: the session's start, before the lines it holds
        self.failed = False

    def __call__(self, event: Event) -> None:
        line = log_line(event)
        if line is not None:
            self.write(line)
        self.callback(event)

    def open(self, path: Path, *, resume: bool) -> None:
        import torch

        from medcli import __version__

        self.path = path
        header = f"medcli {__version__} (torch {torch.__version__}) {'resumed' if resume else 'started'}"
        held, self.held = self.held, []
        self._append([f"{self.started} {header}", *held])

    def write(self, line: str) -> None:
        stamped = f"{_now()} {line}"
        if self.path is None:
            self.held.append(stamped)
        else:
            self._append([stamped])

    def _append(self, lines: list[str]) -> None:
        if self.path is None or self.failed:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(line.rstrip("\n") + "\n" for line in lines))
        except OSError as e:  # a log that cannot be written must not stop the training it describes
            self.failed = True
            self.callback(Warning(f"could not write {self.path} ({e}); training goes on without it"))


def _now() -> str:
    """Local time with its UTC offset, to the second (ISO 8601)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")
