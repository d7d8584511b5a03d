"""What every medcli loss shares: the ``Loss`` base class, class-count checks and class-weight formulas.

A loss is an ``nn.Module`` called as ``loss(logits[N, K], target[N]) -> scalar``.  Beyond that, the trainer
relies on three things, all defaulted here so a loss only overrides what it needs:

- ``needs_cosine_head``: the model must emit cosine logits in [-1, 1] (LDAM scales them by ``s``);
- ``on_epoch_start(epoch, num_epochs)``: called by the trainer before each epoch (0-based), e.g. to switch
  on deferred re-weighting;
- ``describe()``: one short line for the training log.

Losses compute in fp32 even under ``torch.autocast``: fp16 logits times ``s = 30`` and ``exp`` in the
softmax are exactly where half precision overflows or loses the small margins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medcli.errors import DataError, UsageError

try:  # the data package owns the class names; fall back while it is being written
    from medcli.data import CLASS_NAMES
except ImportError:  # pragma: no cover - depends on what else is installed
    CLASS_NAMES = ("LGG", "HGG")


def class_name(j: int, num_classes: int) -> str:
    """``LGG``/``HGG`` for the binary task, ``class j`` otherwise."""
    return CLASS_NAMES[j] if num_classes == len(CLASS_NAMES) else f"class {j}"


def check_class_counts(
    class_counts: Sequence[int] | None, num_classes: int, loss_name: str, *, required: bool
) -> tuple[int, ...] | None:
    """Validate training-fold class counts: one non-negative integer per class, none of them zero.

    A class with no training subjects cannot be learned (and LDAM margins / DRW weights divide by its count),
    so it is a data problem, reported with the class's name.
    """
    if class_counts is None:
        if required:
            raise UsageError(
                f"loss {loss_name!r} needs the training fold's class counts",
                hint="pass class_counts=(n_lgg, n_hgg) to get_loss (the trainer does this)",
            )
        return None
    try:
        counts = tuple(int(n) for n in class_counts)
    except (TypeError, ValueError):
        raise UsageError(f"class_counts must be integers, got {class_counts!r}") from None
    if len(counts) != num_classes:
        raise UsageError(
            f"class_counts has {len(counts)} entries but num_classes is {num_classes}",
            hint="give one count per class, in label order (LGG, HGG)",
        )
    for j, n in enumerate(counts):
        if n < 0:
            raise UsageError(f"class_counts must be >= 0, got {counts}")
        if n == 0:
            raise DataError(
                f"class {class_name(j, num_classes)} has no subjects in the training fold (counts {counts})",
                hint="check the labels with `medcli data index`, or use fewer folds so each has both grades",
            )
    return counts


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """Scale per-class weights to sum to K (the number of classes), the convention of the LDAM-DRW paper."""
    return weights * (len(weights) / weights.sum())


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """w_j ∝ 1 / n_j, summing to K."""
    return normalised(1.0 / torch.tensor(counts, dtype=torch.float64)).float()


def effective_number_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Cui et al. (CVPR 2019): w_j = (1 − β) / (1 − β^{n_j}), summing to K.  β = 0 gives exactly 1."""
    n = torch.tensor(counts, dtype=torch.float64)
    return normalised((1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))).float()


def fmt_per_class(values: Sequence[float], digits: int = 3) -> str:
    k = len(values)
    return " / ".join(f"{class_name(j, k)} {float(v):.{digits}f}" for j, v in enumerate(values))


class Loss(nn.Module):
    """Base class for medcli losses (plugins may use it too, but need not)."""

    name = "loss"
    needs_cosine_head = False

    def __init__(self, *, num_classes: int = 2, class_counts: Sequence[int] | None = None):
        super().__init__()
        if int(num_classes) < 2:
            raise UsageError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_counts = check_class_counts(
            class_counts, self.num_classes, self.name, required=self.requires_counts()
        )

    def requires_counts(self) -> bool:
        """Whether this loss cannot be built without class counts (weights or margins come from them)."""
        return False

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook called by the trainer before each epoch (0-based); nothing to do by default."""

    def describe(self) -> str:
        return self.name

    @staticmethod
    def weighted_ce(
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy in fp32; with ``weight`` the batch reduction is Σ w_yi ℓ_i / Σ w_yi (torch's)."""
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=label_smoothing)


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    """Return ``value`` as float, or raise a UsageError naming the option and its valid range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi) or v != v
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise UsageError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return v
