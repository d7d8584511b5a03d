"""Poly-1 against its formula, and through medcli's plugin loader (real installed entry point)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from medcli_polyloss import Poly1CrossEntropy

LOGITS = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-3.0, 1.0]])
TARGET = torch.tensor([0, 1, 0])


def _direct(logits, target, eps):
    """L_i = −log p_t + ε (1 − p_t), written out with math.exp for each sample."""
    total = 0.0
    for row, t in zip(logits.tolist(), target.tolist(), strict=True):
        denom = sum(math.exp(v) for v in row)
        pt = math.exp(row[t]) / denom
        total += -math.log(pt) + eps * (1.0 - pt)
    return total / len(logits)


@pytest.mark.parametrize("eps", [1.0, 2.5, -0.5])
def test_matches_formula(eps):
    loss = Poly1CrossEntropy(num_classes=2, class_counts=(3, 7), epsilon=eps)
    assert loss(LOGITS, TARGET).item() == pytest.approx(_direct(LOGITS, TARGET, eps), rel=1e-6)


def test_epsilon_zero_is_cross_entropy():
    loss = Poly1CrossEntropy(num_classes=2, class_counts=(3, 7), epsilon=0.0)
    assert torch.allclose(loss(LOGITS, TARGET), F.cross_entropy(LOGITS, TARGET))


def test_half_precision_logits_are_computed_in_fp32():
    loss = Poly1CrossEntropy()
    out = loss(LOGITS.half(), TARGET)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_direct(LOGITS.half().float(), TARGET, 1.0), rel=1e-6)


def test_bad_epsilon_is_rejected():
    with pytest.raises(ValueError, match="epsilon"):
        Poly1CrossEntropy(epsilon=-2)


def test_through_medcli_get_loss():
    losses = pytest.importorskip("medcli.losses")
    loss = losses.get_loss("POLY1", num_classes=2, class_counts=(3, 7), epsilon=2.0)
    assert isinstance(loss, Poly1CrossEntropy) and loss.epsilon == 2.0
    assert "poly1" in losses.available_losses()
    record = next(r for r in losses.list_losses(check=True) if r.name == "poly1")
    assert (record.status, record.distribution) == ("ok", "medcli-polyloss")
