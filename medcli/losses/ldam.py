"""LDAM and LDAM-DRW (Cao et al., NeurIPS 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss"), following the official implementation (github.com/kaidic/LDAM-DRW).

LDAM is defined on a *cosine* classifier: logits are cosines in [-1, 1] that the loss scales by ``s``.  Both
losses set ``needs_cosine_head = True`` so the trainer builds the model with ``head="cosine"``; fed ordinary
unbounded logits, s = 30 would make a much harsher loss than the paper's, so the first batch is checked.

- margins  m_j = max_m · (n_min / n_j)^{1/4}  (the rarest training-fold class gets ``max_m``);
- per sample  ℓ = CE(s · (z − m_y · onehot(y)), y)  (only the true-class logit is shifted);
- DRW: class weights w_j = (1 − β) / (1 − β^{n_j}) normalised to sum K, with β = 0 (all weights exactly 1)
  before the switch epoch and β = 0.9999 from it; the batch is reduced as Σ w_yi ℓ_i / Σ w_yi.

The official code switches at epoch 160 of 200, its first LR step; medcli trains with a cosine schedule, so
the switch is an option: an epoch (int ≥ 1, 0-based epoch index at which DRW turns on) or a fraction of
training (0 < f < 1, default 0.8 = 160/200).
"""

from __future__ import annotations

import math

import torch

from medcli.errors import UsageError
from medcli.losses.base import Loss, check_range, effective_number_weights, fmt_per_class

COSINE_TOLERANCE = 1e-3  # cosine logits may overshoot 1 by rounding (more in fp16/bf16, see _check_cosine)


class LDAMLoss(Loss):
    """LDAM margins on a cosine head (Cao et al. 2019).

    Label-distribution-aware margins, no re-weighting.
    """

    name = "ldam"
    needs_cosine_head = True

    def __init__(self, *, num_classes=2, class_counts=None, max_m: float = 0.5, s: float = 30.0):
        super().__init__(num_classes=num_classes, class_counts=class_counts)
        self.max_m = check_range("max_m", max_m, 0.0, float("inf"))
        self.s = check_range("s", s, 0.0, float("inf"), lo_open=True)
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        margins = self.max_m * (counts.min() / counts) ** 0.25
        self.register_buffer("margins", margins.float())
        self._checked_range = False

    def requires_counts(self) -> bool:
        return True

    def _check_cosine(self, logits: torch.Tensor) -> None:
        # Once per loss object: a .item() per step would synchronise the GPU for nothing.  Under autocast a
        # cosine near 1 can round up by a few ulps of the low-precision dtype (bf16: 2^-7).
        self._checked_range = True
        tolerance = max(COSINE_TOLERANCE, 4 * torch.finfo(logits.dtype).eps)
        worst = float(logits.detach().abs().max()) if logits.numel() else 0.0
        if worst > 1.0 + tolerance:
            raise UsageError(
                f"loss {self.name!r} expects cosine logits in [-1, 1], got values up to {worst:.3g}",
                hint='build the model with head="cosine" (train does this for LDAM losses)',
            )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self._checked_range:
            self._check_cosine(logits)
        z = logits.float()
        shifted = z - self.margins[target][:, None] * torch.nn.functional.one_hot(target, self.num_classes)
        return self.weighted_ce(self.s * shifted, target, self._batch_weight())

    def _batch_weight(self) -> torch.Tensor | None:
        return None  # plain LDAM is unweighted

    def describe(self) -> str:
        margins = fmt_per_class(self.margins.tolist())
        return f"{self.name} (s={self.s:g}, max_m={self.max_m:g}, margins {margins})"


class LDAMDRWLoss(LDAMLoss):
    """LDAM + deferred re-weighting (Cao et al. 2019).

    Unweighted until the switch epoch, effective-number class weights from it on.
    """

    name = "ldam-drw"

    def __init__(
        self,
        *,
        num_classes=2,
        class_counts=None,
        max_m: float = 0.5,
        s: float = 30.0,
        beta: float = 0.9999,
        drw_start: float = 0.8,
    ):
        super().__init__(num_classes=num_classes, class_counts=class_counts, max_m=max_m, s=s)
        self.beta = check_range("beta", beta, 0.0, 1.0, hi_open=True)
        self.drw_start = _parse_drw_start(drw_start)
        self.drw_weights = effective_number_weights(self.class_counts, self.beta)
        self.register_buffer("weight", effective_number_weights(self.class_counts, 0.0))  # β = 0: all 1
        self.drw_active = False

    def drw_epoch(self, num_epochs: int) -> int:
        """The 0-based epoch from which DRW is on; a fraction never switches at epoch 0 (it is *deferred*)."""
        if isinstance(self.drw_start, int):
            return self.drw_start
        return max(1, math.floor(self.drw_start * num_epochs + 1e-9))

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.set_drw(epoch >= self.drw_epoch(num_epochs))

    def set_drw(self, active: bool) -> None:
        """β = 0.9999 weights when active, β = 0 (exactly 1) when not; the buffer moves with ``.to()``."""
        self.drw_active = bool(active)
        new = self.drw_weights if self.drw_active else effective_number_weights(self.class_counts, 0.0)
        self.weight.copy_(new)

    def _batch_weight(self) -> torch.Tensor | None:
        return self.weight

    def describe(self) -> str:
        start = self.drw_start
        start = f"epoch {start}" if isinstance(start, int) else f"{start:g} of training"
        state = "on" if self.drw_active else "off"
        return (
            f"{super().describe()}; DRW beta={self.beta:g} from {start} "
            f"(weights {fmt_per_class(self.drw_weights.tolist())}; now {state})"
        )


def _parse_drw_start(value) -> int | float:
    """An epoch (int ≥ 1) or a fraction of training (0 < f < 1); "160" and "0.8" both parse from the CLI."""
    given = value
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"drw_start must be an epoch (int >= 1) or a fraction in (0, 1), got {given!r}")
    if isinstance(value, float) and value.is_integer() and value >= 1:
        value = int(value)
    if isinstance(value, int):
        if value < 1:
            raise UsageError(
                f"drw_start must be an epoch >= 1 or a fraction in (0, 1), got {value}",
                hint="DRW is deferred re-weighting: it cannot start at epoch 0 (use weighted-ce for that)",
            )
        return value
    return check_range("drw_start", value, 0.0, 1.0, lo_open=True, hi_open=True)
