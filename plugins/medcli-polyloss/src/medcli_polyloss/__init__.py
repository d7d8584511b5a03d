"""Poly-1 cross-entropy for medcli (Leng et al., "PolyLoss: A Polynomial Expansion Perspective of
Classification Loss Functions", ICLR 2022).

Cross-entropy is −log p_t = Σ_{j≥1} (1 − p_t)^j / j.  Poly-1 adds ε to the first polynomial coefficient:

    L = CE + ε · (1 − p_t)

ε > 0 pushes harder on confidently-wrong samples than CE does; ε = 0 is exactly CE; ε = −1 removes the
leading term.  The paper's default for classification is ε = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__version__ = "0.1.0"
__all__ = ["Poly1CrossEntropy"]


class Poly1CrossEntropy(nn.Module):
    """Poly-1 cross-entropy: CE + ε·(1 − p_t), averaged over the batch.

    Built by medcli as ``Poly1CrossEntropy(num_classes=K, class_counts=(n_0, ..., n_{K-1}), **options)``;
    the only option is ``epsilon`` (``--loss-opt epsilon=2``).  Class counts are accepted (medcli always
    passes them) and unused: Poly-1 is not a re-weighting loss.
    """

    needs_cosine_head = False  # works on ordinary (unbounded) logits

    def __init__(
        self,
        *,
        num_classes: int = 2,
        class_counts: Sequence[int] | None = None,
        epsilon: float = 1.0,
    ):
        super().__init__()
        epsilon = float(epsilon)
        if not epsilon >= -1.0:  # also rejects NaN
            # ValueError, not a medcli error: the plugin does not depend on medcli, which reports it
            # as "plugin loss 'poly1' ... failed to build: ValueError: ...".
            raise ValueError(f"epsilon must be >= -1 (the loss is unbounded below otherwise), got {epsilon}")
        self.num_classes = int(num_classes)
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # fp32 even under autocast: softmax of fp16 logits loses precision
        log_p = F.log_softmax(logits, dim=1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        ce = -log_pt
        pt = log_pt.exp()
        return (ce + self.epsilon * (1.0 - pt)).mean()

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Nothing changes over training (the hook is optional; shown here for plugin authors)."""

    def describe(self) -> str:
        return f"poly1 (epsilon={self.epsilon:g}; medcli-polyloss {__version__})"
