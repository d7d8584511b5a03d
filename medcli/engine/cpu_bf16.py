"""bf16 inference of MedicalNet's ResNets on CPUs with native bf16 (AMX / AVX512-BF16), as fused oneDNN ops.

The predictor's CPU bf16 path (:func:`medcli.engine.cpu_kernels.rewrite_for_cpu` with ``inference=True``),
on a model whose BatchNorms are already folded into the convs (``predictor.fuse_conv_bn``).  bf16 autocast
over that model leaves work that is pure memory traffic, and a one-scan ResNet-50 forward pass at 128³
streams gigabytes through two cores:

* every call casts every fp32 weight to bf16 again (113 casts per pass): here the weights are bf16 once;
* each conv's ReLU, and each block's residual sum and ReLU, are passes of their own over an activation:
  here they run inside the conv as oneDNN post-ops (``torch.ops.mkldnn._convolution_pointwise``, the ops
  that inductor's CPU backend fuses to): conv+ReLU, and conv+add+ReLU for a block's last conv;
* the stem's 7³ stride-2 conv over 1-4 channels has no fast bf16 kernel in oneDNN (slower than fp32, so the
  autocast path keeps it in fp32): here it runs in bf16 as a 4³ stride-1 conv over the space-to-depth
  input, where 2³ voxels of a channel become 8 channels (:class:`SpaceToDepthStem`), ReLU fused.

Layer4's dilation-4 convs keep the tap-wise GEMMs (:mod:`medcli.engine.tap_conv`; oneDNN's dilated bf16
kernel took 35x as long for layer4's conv), with bias and ReLU after them; the other convs, layer3's
dilation-2 ones included, are oneDNN's direct kernels (there 1.7x faster than tap by tap).  One 128³ scan
through a random ResNet-50 on 2 Sapphire Rapids cores: 236 ms against 348 ms for bf16 autocast with the
CPU rewrites (1.47x, interleaved, min of 5); 1³ convs run as oneDNN matmuls (see :func:`_conv`).

Tried and left out, on the same cores: Winograd F(2³, 3³) in bf16 for the dilated convs (over their
phase sub-grids; 3.4x fewer products, but its relative error was 1e-2 against direct bf16's 3e-3, its
batched GEMMs of 512 tiles ran at 1 TFLOP/s where one large GEMM runs at 2.2, and its transforms are
memory-bound: layer4's conv took longer than tap by tap), and weights prepacked for oneDNN (~3% of a pass
in reorders, but the packed layout is tied to one input shape).

The function is the model's up to bf16 rounding (tests compare it with the float64 model; ``medcli bench``
compares P(HGG) with plain fp32).  Inference only: the fused ops have no autograd, so the trainer keeps
bf16 autocast with :mod:`medcli.engine.cpu_kernels`' rewrites.  Grad-CAM still works on a rewritten
model: it runs ``forward_features`` without gradients and differentiates only the fp32 head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcli.engine.tap_conv import tapwise_conv3d
from medcli.models.resnet3d import BasicBlock, Bottleneck, ResNet3D

_OPS = torch.ops.mkldnn
_CL = torch.channels_last_3d
# For log lines and reports (cpu_kernels.describe).
DESCRIPTION = (
    "bf16 weights, fused conv+ReLU and conv+add+ReLU, space-to-depth stem, dilation-4 convs tap by tap"
)


def _pointwise(conv: nn.Conv3d) -> bool:
    return (
        conv.kernel_size == (1, 1, 1)
        and conv.stride == (1, 1, 1)
        and conv.padding == (0, 0, 0)
        and conv.groups == 1
    )


def _conv(conv: nn.Conv3d, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """``relu(conv(x))`` (or ``conv(x)``) in one oneDNN primitive, tap by tap for dilation >= 4.

    A 1³ conv is one matmul over the channels_last voxels, with the ReLU as its post-op: oneDNN's matmul
    ran 1.3x as fast as its 1³ conv on these shapes (2048→512 at 16³: 4.0 vs 5.3 ms on 2 AMX cores)."""
    attr = "relu" if relu else "none"
    if _pointwise(conv) and x.is_contiguous(memory_format=_CL):
        n, c, d, h, w = x.shape
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c)  # a view: channels_last is [N, D, H, W, C]
        y = _OPS._linear_pointwise(rows, conv.weight.view(conv.out_channels, c), conv.bias, attr, [], "")
        return y.view(n, d, h, w, -1).permute(0, 4, 1, 2, 3)  # channels_last_3d, as the conv's output
    if conv.dilation[0] >= 4:
        y = tapwise_conv3d(x, conv.weight, conv.bias, conv.dilation[0])
        return y.relu_() if relu else y
    return _OPS._convolution_pointwise(
        x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, attr, [], ""
    )


def _conv_add_relu(conv: nn.Conv3d, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x) + identity)``, in one oneDNN primitive but for dilation >= 4."""
    if conv.dilation[0] >= 4:
        return _conv(conv, x, relu=False).add_(identity).relu_()
    return _OPS._convolution_pointwise.binary(
        x, identity, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
        "add", 1.0, "relu", [], "",
    )  # fmt: skip


def _shortcut(downsample: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and isinstance(downsample[0], nn.Conv3d):
        return _conv(downsample[0], x, relu=False)  # downsample[1]: the folded BN, now an Identity
    return downsample(x)  # shortcut type A: zero-padded identity


class FusedBottleneck(nn.Module):
    """A BN-folded :class:`~medcli.models.resnet3d.Bottleneck` as three fused convs (same conv modules)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = _shortcut(self.downsample, x)
        return _conv_add_relu(self.conv3, _conv(self.conv2, _conv(self.conv1, x)), identity)


class FusedBasicBlock(nn.Module):
    """A BN-folded :class:`~medcli.models.resnet3d.BasicBlock` as two fused convs (same conv modules)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = _shortcut(self.downsample, x)
        return _conv_add_relu(self.conv2, _conv(self.conv1, x), identity)


class SpaceToDepthStem(nn.Module):
    """ReLU of the stem's ``k``³ stride-2 conv, as a ``⌈k/2⌉``³ stride-1 conv over the space-to-depth input.

    Output voxel o reads the padded input at ``2o + t`` for taps ``t < k``; with ``t = 2a + b`` that is
    phase b (``x[2j + b]``) at ``j = o + a``.  So the 2³ phases of each input channel become 8 channels,
    and the kernel ``[K, C, k, k, k]``, padded with zero taps to an even size, becomes ``[K, 8C, a, a, a]``.
    Takes fp32 or bf16 input and computes in bf16."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        k, pad = conv.kernel_size[0], conv.padding[0]
        self.pad, a = pad, (k + 1) // 2
        w = F.pad(conv.weight.detach().float(), (0, 2 * a - k) * 3)  # [K, C, 2a, 2a, 2a]
        kk, c = w.shape[:2]
        w = w.reshape(kk, c, a, 2, a, 2, a, 2).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(kk, 8 * c, a, a, a)
        self.weight = nn.Parameter(w.to(torch.bfloat16, memory_format=_CL), requires_grad=False)
        bias = conv.bias if conv.bias is not None else torch.zeros(kk)
        self.bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv3d
            and conv.stride == (2, 2, 2)
            and len(set(conv.kernel_size)) == 1
            and len(set(conv.padding)) == 1
            and conv.dilation == (1, 1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *size = x.shape
        p = self.pad
        # Pad by p on each side, and by one more at the end of an axis of odd padded length.
        x = F.pad(x.to(torch.bfloat16), [v for s in reversed(size) for v in (p, p + (s + 2 * p) % 2)])
        d, h, w = (s // 2 for s in x.shape[2:])
        x = x.reshape(n, c, d, 2, h, 2, w, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(n, 8 * c, d, h, w).contiguous(memory_format=_CL)
        ones = [1, 1, 1]
        return _OPS._convolution_pointwise(
            x, self.weight, self.bias, [0, 0, 0], ones, ones, 1, "relu", [], ""
        )


def applies(model: nn.Module) -> bool:
    """A BN-folded ResNet3D whose stem :class:`SpaceToDepthStem` can run."""
    return (
        isinstance(model, ResNet3D)
        and isinstance(model.bn1, nn.Identity)  # folded (predictor.fuse_conv_bn)
        and SpaceToDepthStem.applies(model.conv1)
        and not model.training
    )


def rewrite_for_bf16_inference(model: nn.Module) -> nn.Module:
    """In place, on a BN-folded ResNet3D (:func:`applies`): bf16 backbone on fused ops; returns the model.

    The head stays fp32 (``ResNet3D.pool`` averages in fp32).  The state dict changes (bf16, stem
    reshaped): inference only, like the BN folding before it."""
    fused = {Bottleneck: FusedBottleneck, BasicBlock: FusedBasicBlock}
    model.conv1 = SpaceToDepthStem(model.conv1)
    model.relu = nn.Identity()  # the stem's ReLU runs inside its conv; blocks have ReLUs of their own
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}")
        for j, block in enumerate(layer):
            layer[j] = fused[type(block)](block)
        for p in layer.parameters():
            p.data = p.data.to(torch.bfloat16, memory_format=_CL if p.dim() == 5 else torch.preserve_format)
    return model


def is_rewritten(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv1", None), SpaceToDepthStem)
