"""3D ResNets with MedicalNet's topology, so MedicalNet's released weights load key for key.

Faithful to Tencent/MedicalNet ``models/resnet.py`` (see shared/reference/medicalnet.md):

* stem: conv1 7³ stride 2 padding 3 (no bias) → bn1 → ReLU → max-pool 3³ stride 2 padding 1;
* layer1..4 with 64/128/256/512 planes; layer2 stride 2; layer3 stride 1 dilation 2; layer4 stride 1
  dilation 4 (every block of a stage is dilated), so the network's output stride is 8;
* BasicBlock for depth 10/18/34, Bottleneck (expansion 4) for 50 and deeper; every conv has bias=False;
* the first block of a stage gets a shortcut when its stride or channel count changes: type "B"
  (``downsample`` = 1³ conv + BN) for 10/50/101/152/200, type "A" (parameter-free: subsample, zero-pad the
  new channels; no state-dict keys) for 18/34.

On top of the backbone sits a classification head instead of MedicalNet's segmentation head
(``conv_seg``): global average pooling → dropout → ``fc`` (see ``heads.py``).  State-dict keys are
MedicalNet's without the ``module.`` prefix (conv1, bn1, layer1..4) plus ``fc.*``.

Every stage uses ``reshape``-free ops, so ``torch.channels_last_3d`` inputs work end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medcli.models.heads import make_head
from medcli.models.maxpool import MaxPool3d


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one member of the family from another."""

    name: str
    depth: int | str
    block: str  # "basic" | "bottleneck"
    layers: tuple[int, int, int, int]
    shortcut: str  # "A" | "B"
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_width: int = 64


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("resnet10", 10, "basic", (1, 1, 1, 1), "B"),
        ArchSpec("resnet18", 18, "basic", (2, 2, 2, 2), "A"),
        ArchSpec("resnet34", 34, "basic", (3, 4, 6, 3), "A"),
        ArchSpec("resnet50", 50, "bottleneck", (3, 4, 6, 3), "B"),
        ArchSpec("resnet101", 101, "bottleneck", (3, 4, 23, 3), "B"),
        ArchSpec("resnet152", 152, "bottleneck", (3, 8, 36, 3), "B"),
        ArchSpec("resnet200", 200, "bottleneck", (3, 24, 36, 3), "B"),
        # Same topology as resnet10 (strides, dilations, shortcut B) at 1/8 of the width: real forward and
        # backward passes on 16³-32³ volumes in milliseconds, for tests and demos.
        ArchSpec("tiny", "tiny", "basic", (1, 1, 1, 1), "B", widths=(8, 16, 32, 64), stem_width=8),
    )
}

# Stage strides and dilations (MedicalNet: layer3/layer4 trade stride for dilation).
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)


def conv3x3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm3d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision does: no new activation-sized tensor per block
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, stride=stride, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm3d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # In place, as torchvision does: one activation-sized tensor less per block (BN's backward needs
        # its input, not its output); the ResNet-50 forward at 128³ ran ~3% faster on 2 cores.
        out += identity
        return self.relu(out)


class ZeroPadShortcut(nn.Module):
    """Shortcut type A: ``avg_pool3d(kernel 1, stride)`` (plain subsampling), then zero channels appended.

    The subsampling is a strided slice, which is what a 1³ average pool computes; its backward is a plain
    strided copy, where ``avg_pool3d``'s CUDA backward is not deterministic.

    Parameter-free, so it adds no state-dict keys (MedicalNet's ResNet-18/34 files have no ``downsample``).
    """

    def __init__(self, out_channels: int, stride: int):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        extra = self.out_channels - x.shape[1]
        # F.pad's tuple runs from the last dim backwards: (W, H, D, C) pairs; pad channels at the end.
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra)) if extra > 0 else x

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


class ResNet3D(nn.Module):
    """A MedicalNet-topology 3D ResNet with a classification head.

    ``forward(x[N,C,D,H,W]) -> logits[N,K]``; ``forward_features(x)`` gives the last stage's feature map
    ``[N, feature_dim, D/8, H/8, W/8]``; ``classify(features)`` pools it and applies dropout and ``fc``.
    """

    def __init__(
        self,
        spec: ArchSpec,
        in_channels: int = 1,
        num_classes: int = 2,
        dropout: float = 0.0,
        head: str = "linear",
        zero_init_last: bool = True,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spec = spec
        self.arch = spec.name
        self.depth = spec.depth
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.head_type = head.strip().lower()
        block = BasicBlock if spec.block == "basic" else Bottleneck

        self.conv1 = nn.Conv3d(in_channels, spec.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(spec.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool3d(kernel_size=3, stride=2, padding=1)  # reproducible on CUDA too
        self._inplanes = spec.stem_width
        stages = zip(spec.widths, spec.layers, STAGE_STRIDES, STAGE_DILATIONS, strict=True)
        for i, (planes, blocks, stride, dilation) in enumerate(stages, start=1):
            self.add_module(f"layer{i}", self._make_layer(block, planes, blocks, stride, dilation))
        self.feature_dim = self._inplanes
        del self._inplanes

        self.dropout = nn.Dropout(dropout)
        self.fc = make_head(self.head_type, self.feature_dim, num_classes)
        self._init_weights(zero_init_last)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_channels:
            if self.spec.shortcut == "A":
                downsample = ZeroPadShortcut(out_channels, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self._inplanes, out_channels, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(out_channels),
                )
        layers = [block(self._inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        self._inplanes = out_channels
        layers += [block(out_channels, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_last: bool) -> None:
        # MedicalNet's init: Kaiming-normal (fan_out) convs, BN to identity; the head keeps PyTorch's default.
        if self.conv1.weight.is_meta:
            return  # shapes only (fixtures, verify): init on meta would just import torch._dynamo, slowly
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            # Each residual branch's last BN starts at gamma = 0, so every block starts as its shortcut
            # (Goyal et al. 2017; timm's and torchvision's zero_init_last/zero_init_residual). Without it a
            # ResNet-50 trained from scratch on small batches diverges at lr 1e-3. Pretrained weights
            # overwrite these gammas, so this only matters for training from random initialization.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling: ``[N, F, d, h, w] -> [N, F]`` (works for any memory format).

        bf16/fp16 features are averaged into float32, so the head gets fp32 features from a bf16 backbone
        (``medcli.engine.cpu_bf16``) as from an fp32 one (under autocast, fc still casts them)."""
        low = features.dtype in (torch.bfloat16, torch.float16)
        return features.mean(dim=(2, 3, 4), dtype=torch.float32 if low else None)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))

    def head_keys(self) -> list[str]:
        """State-dict keys of the new head (what a backbone-only pretrained file cannot provide)."""
        return [f"fc.{k}" for k in self.fc.state_dict()]

    def extra_repr(self) -> str:
        return f"arch={self.arch}, in_channels={self.in_channels}, num_classes={self.num_classes}"
