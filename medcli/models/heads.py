"""Classification heads that sit on the pooled backbone features (the module named ``fc``).

* ``linear``: ``nn.Linear`` (keys ``fc.weight``, ``fc.bias``), what MedicalNet fine-tuning usually adds.
* ``cosine``: logits are cosines between the L2-normalised feature vector and L2-normalised class
  weights, so they lie in [-1, 1]; LDAM multiplies them by its scale ``s`` (Cao et al., 2019, use a
  normalised last layer for exactly this reason).  It has a weight only (``fc.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medcli.registry import unknown_name_error

HEAD_TYPES = ("linear", "cosine")


class CosineLinear(nn.Module):
    """``cos(feature, class weight)`` for each class; no bias, no scale (the loss owns the scale)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initial distribution as nn.Linear; only the direction of each row matters here.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """The ``fc`` module for head ``kind`` ("linear" or "cosine", case-insensitive)."""
    name = kind.strip().lower()
    if name == "linear":
        return nn.Linear(in_features, num_classes)
    if name == "cosine":
        return CosineLinear(in_features, num_classes)
    raise unknown_name_error("head", kind, HEAD_TYPES)
