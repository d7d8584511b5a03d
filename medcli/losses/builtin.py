"""Cross-entropy family: ``ce``, ``weighted-ce`` and ``focal``.

Class weights always come from the *training fold's* counts (the trainer passes ``class_counts``), and a
weighted batch is reduced the way ``torch.nn.functional.cross_entropy`` does it: Σ w_yi ℓ_i / Σ w_yi.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medcli.errors import UsageError
from medcli.losses.base import Loss, check_range, fmt_per_class, inverse_frequency_weights


class CrossEntropy(Loss):
    """Cross-entropy (optional label smoothing)."""

    name = "ce"

    def __init__(self, *, num_classes=2, class_counts=None, label_smoothing: float = 0.0):
        super().__init__(num_classes=num_classes, class_counts=class_counts)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weighted_ce(logits, target, label_smoothing=self.label_smoothing)

    def describe(self) -> str:
        return f"ce (label_smoothing={self.label_smoothing:g})" if self.label_smoothing else "ce"


class WeightedCrossEntropy(Loss):
    """Cross-entropy with inverse-frequency class weights.

    Weights w_j ∝ 1/n_j from the training fold's counts, normalised to sum K.
    """

    name = "weighted-ce"

    def __init__(self, *, num_classes=2, class_counts=None, label_smoothing: float = 0.0):
        super().__init__(num_classes=num_classes, class_counts=class_counts)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
        self.register_buffer("weight", inverse_frequency_weights(self.class_counts))

    def requires_counts(self) -> bool:
        return True

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weighted_ce(logits, target, self.weight, self.label_smoothing)

    def describe(self) -> str:
        return f"weighted-ce (weights {fmt_per_class(self.weight.tolist())})"


def _parse_alpha(alpha, num_classes: int) -> str | tuple[float, ...] | None:
    """``None``/"none" (no weights), "balanced" (inverse frequency) or one non-negative weight per class."""
    if alpha is None or (isinstance(alpha, str) and alpha.lower() in ("none", "")) or alpha is False:
        return None
    if alpha is True or (isinstance(alpha, str) and alpha.lower() == "balanced"):
        return "balanced"
    if isinstance(alpha, str):
        alpha = [a for a in alpha.replace(",", " ").split()]
    if isinstance(alpha, Sequence) and len(alpha) == num_classes:
        values = tuple(check_range("alpha", a, 0.0, float("inf")) for a in alpha)
        if sum(values) > 0:
            return values
    raise UsageError(
        f"focal alpha must be 'balanced', 'none' or {num_classes} per-class weights, got {alpha!r}"
    )


class FocalLoss(Loss):
    """Focal loss (Lin et al. 2017), optional class weights.

    For softmax outputs: ℓ = −α_y (1 − p_y)^γ log p_y.
    ``alpha="balanced"`` uses inverse-frequency class weights from the training fold; the batch reduction
    with weights is the weighted mean, as for ``weighted-ce``.  γ = 0 and no alpha is plain cross-entropy.
    """

    name = "focal"

    def __init__(self, *, num_classes=2, class_counts=None, gamma: float = 2.0, alpha=None):
        self._alpha = _parse_alpha(alpha, int(num_classes))
        super().__init__(num_classes=num_classes, class_counts=class_counts)
        self.gamma = check_range("gamma", gamma, 0.0, float("inf"))
        if self._alpha is None:
            weight = None
        elif self._alpha == "balanced":
            weight = inverse_frequency_weights(self.class_counts)
        else:
            weight = torch.tensor(self._alpha, dtype=torch.float32)
        self.register_buffer("weight", weight)

    def requires_counts(self) -> bool:
        return self._alpha == "balanced"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        one_minus_pt = -torch.expm1(log_pt)  # 1 − p_t, accurate when p_t ≈ 1
        # The floor keeps d/dp (1 − p)^γ finite for γ < 1 when p_t rounds to 1; the value is unaffected.
        per_sample = -one_minus_pt.clamp_min(1e-12).pow(self.gamma) * log_pt
        if self.weight is None:
            return per_sample.mean()
        w = self.weight[target]
        return (w * per_sample).sum() / w.sum()

    def describe(self) -> str:
        text = f"focal (gamma={self.gamma:g}"
        if self.weight is not None:
            text += f", alpha {fmt_per_class(self.weight.tolist())}"
        return text + ")"
