"""Events the trainer emits; the CLI (and tests) decide how to show them.

The engine never prints.  ``train()`` takes one ``callback(event)`` and calls it with the small frozen
dataclasses below; ``medcli.cli.train`` renders them as the seed's INFO lines, Rich progress bars or one
plain line per epoch.  Plain data only, so events can be logged, asserted on in tests, or sent elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Base class of everything the trainer reports."""


@dataclass(frozen=True)
class Info(Event):
    """A line in the seed's INFO voice ("Creating ResNet50-3D model...")."""

    message: str


@dataclass(frozen=True)
class Warning(Event):  # noqa: A001 - the name the CLI matches on; never raised
    """Something the user should know but that does not stop training (random init, --multi-gpu on 1 GPU)."""

    message: str


@dataclass(frozen=True)
class FoldStarted(Event):
    fold: int
    run_dir: str
    num_train: int
    num_val: int
    epochs: int
    start_epoch: int
    batches_per_epoch: int
    device: str
    precision: str

    def describe(self) -> str:
        return (
            f"Training fold {self.fold}: {self.num_train} train / {self.num_val} val subjects, "
            f"epochs {self.start_epoch + 1}..{self.epochs}, {self.batches_per_epoch} "
            f"batch{'es' if self.batches_per_epoch != 1 else ''}/epoch "
            f"on {self.device} ({self.precision}) → {self.run_dir}"
        )


@dataclass(frozen=True)
class EpochStarted(Event):
    epoch: int
    epochs: int
    num_batches: int


@dataclass(frozen=True)
class BatchEnded(Event):
    epoch: int
    batch: int  # 1-based, of num_batches
    num_batches: int
    loss: float
    lr: float
    samples_per_s: float


@dataclass(frozen=True)
class EpochEnded(Event):
    """One row of metrics.jsonl (epoch, train_loss, val_loss, val_auc, ...), plus what changed."""

    record: dict[str, Any]
    is_best: bool
    line: str  # the plain one-line summary also written to train.log


@dataclass(frozen=True)
class FoldFinished(Event):
    summary: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        s = self.summary
        best = "no validation AUC yet"
        if s.get("best_epoch") is not None:
            metric = s.get("best_metric")
            value = "n/a" if metric is None else f"{metric:.4f}"
            metric_name = "val_auc_ema" if s.get("selection") == "ema" else "val_auc"
            best = f"best epoch {s['best_epoch'] + 1} ({metric_name} {value}): best.pt"
        stopped = " (stopped early)" if s.get("stopped_early") else ""
        return f"Fold {s.get('fold')} finished after {s.get('epochs_run')} epochs{stopped}: {best}"


def log_line(event: Event) -> str | None:
    """The plain line ``event`` adds to a run's train.log, or None for progress that has no place there
    (batches, epoch starts)."""
    if isinstance(event, Info):
        return event.message
    if isinstance(event, Warning):
        return f"warning: {event.message}"
    if isinstance(event, EpochEnded):
        return event.line
    if isinstance(event, (FoldStarted, FoldFinished)):
        return event.describe()
    return None


Callback = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default callback: report nothing."""
