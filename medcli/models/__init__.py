"""The model family: MedicalNet-topology 3D ResNets, their heads, and pretrained-weight loading.

    model = create_model(50, in_channels=1, num_classes=2, dropout=0.4)
    report = load_pretrained(model, "pretrained/medicalnet_resnet50_3d.pth")
    print(report.summary_line())   # 318/320 keys loaded · missing 2 (fc.weight, fc.bias) · ...

Models are looked up by name in ``MODELS`` ("resnet10" .. "resnet200", "tiny"); ``create_model`` accepts
a depth (``50``, ``"50"``) or a name (``"resnet50"``, ``"tiny"``).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from medcli.models.heads import HEAD_TYPES, CosineLinear
from medcli.models.pretrained import LoadReport, detect_architecture, load_pretrained
from medcli.models.resnet3d import ARCHS, ArchSpec, ResNet3D
from medcli.registry import Registry

MODELS = Registry("model")
for _name, _spec in ARCHS.items():
    MODELS.register(_name, partial(ResNet3D, _spec))

DEPTHS = tuple(spec.depth for spec in ARCHS.values() if isinstance(spec.depth, int))


def model_name(depth: int | str) -> str:
    """Registry name for a depth or name: ``50``/``"50"``/``"ResNet50"`` → ``"resnet50"``, ``"tiny"``."""
    text = str(depth).strip().lower()
    return f"resnet{text}" if text.isdigit() else text


def create_model(
    depth: int | str = 50,
    in_channels: int = 1,
    num_classes: int = 2,
    dropout: float = 0.0,
    head: str = "linear",
    zero_init_last: bool = True,
) -> nn.Module:
    """Build a model with random (MedicalNet-style Kaiming) weights; see ``load_pretrained`` for weights.

    Unknown depths raise ``UnknownNameError`` listing the known ones.
    """
    factory = MODELS.get(model_name(depth))
    return factory(
        in_channels=in_channels,
        num_classes=num_classes,
        dropout=dropout,
        head=head,
        zero_init_last=zero_init_last,
    )


__all__ = [
    "ARCHS",
    "DEPTHS",
    "HEAD_TYPES",
    "MODELS",
    "ArchSpec",
    "CosineLinear",
    "LoadReport",
    "ResNet3D",
    "create_model",
    "detect_architecture",
    "load_pretrained",
    "model_name",
]
