"""Rewrites that make MedicalNet's ResNets faster on CPUs: same function, same state-dict keys, other
kernels.  Used by the predictor's fast path and the trainer on CPU (:func:`rewrite_for_cpu`).

* In float32, every stride-1 3³ conv runs by Winograd's F(4³, 3³) (:mod:`medcli.engine.winograd`): 216
  products per 4³ output tile instead of 1728, the dilated ones (layer3 dilation 2, layer4 dilation 4)
  over their phase sub-grids.  Per conv, 2-core AVX2 EPYC, train step at 128³ (batch 2): layer4 573 ms
  against 1311 tap by tap and 1610 in oneDNN, layer3 162 / 481 / 630, layer2 47 vs 124 (oneDNN), layer1
  172 vs 254; one-scan inference: layer4 149 / 245 / 433, layer3 40 / 79 / 89.  Where a volume is too
  small for a tile (e.g. layer4 of a 64³ input), the dilated convs run tap by tap
  (:class:`medcli.engine.tap_conv.TapwiseConv3d`, the taps that read zero padding skipped).
* In float32, the larger 1³ convs (layer3 and layer4 of a ResNet-50) run as plain GEMMs over
  channels_last voxels (:class:`PointwiseConv3d`).
* Those two run in MKL, which on AMD's AVX-512 CPUs (Zen 4/5) runs its AVX2 code while oneDNN's convs use
  AVX-512: there oneDNN's convs were faster and stay, but for the dilated convs on grids no larger than
  their dilation, which run as their one in-volume (centre) tap (:class:`CentreTapConv3d`).
  :func:`fp32_kernels_for` says which, ``MEDCLI_FP32_KERNELS=all|onednn`` overrides it.
* Under bf16 autocast (CPUs with AMX / AVX512-BF16):

  - the 7³ stem conv over 1-4 input channels runs in float32: oneDNN has no fast bf16 kernel for it (4x
    slower than fp32 there), and it is a small share of the FLOPs;
  - dilation-4 convs run tap by tap.  For layer4's conv on 2 Sapphire Rapids cores (batch 1)
    oneDNN's dilated bf16 kernel took 714 ms, the phase batching below 78 ms, and 27 GEMMs over the
    padded input 46 ms (training, batch 2: 3121 / 628 / 557 ms); the tap-wise conv is those GEMMs without
    the padding.  Per-conv evidence: the whole network on AMX was not re-timed since;
  - dilation-2 convs run as undilated convs over the r³ phase sub-grids (:class:`PhaseBatchedConv3d`):
    there phase batching beat 27 GEMMs (10 vs 16 ms).

  Plain bf16 autocast without these rewrites made a ResNet-50 step slower than fp32 (0.94x); with the
  stem and phase rewrites it ran 2.35x fp32 at 128³ on 2 Sapphire Rapids cores.  Winograd is not used
  in bf16: its transforms would round the tiles to 8 bits of mantissa.

Correctness, not speed: under bf16 training every other plain conv becomes a :class:`Bf16SafeConv3d`,
which computes in float32 on volumes shallower than its kernel, where oneDNN's AVX512-BF16 kernel got the
weight gradient wrong (applied with ``MEDCLI_CPU_KERNELS=0`` too).

All replacements are ``nn.Conv3d`` subclasses that take over the original's parameter objects under the
same attribute name, so checkpoints, EMA copies and optimisers see the model they would have seen.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

from medcli import switches
from medcli.engine import cpu_bf16
from medcli.engine.speed import cpu_has_fast_bf16
from medcli.engine.tap_conv import TapwiseConv3d
from medcli.engine.winograd import WinogradConv3d


def _like(cls: type[nn.Conv3d], conv: nn.Conv3d) -> nn.Conv3d:
    """A ``cls`` with ``conv``'s settings, holding ``conv``'s very parameter objects."""
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",  # no allocation or init: the parameters are replaced next
    )
    new.weight = conv.weight
    new.bias = conv.bias
    return new.train(conv.training)


class Float32Conv3d(nn.Conv3d):
    """A Conv3d that runs in float32 even under bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def _bf16_weight_grad_is_wrong(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> bool:
    """Would oneDNN compute this conv's weight gradient in bf16 on a volume shallower than the kernel?

    oneDNN's AVX512-BF16 backward-weights kernel (``jit_bf16:avx512_core_bf16``, CPUs with bf16 but no
    AMX, e.g. AMD Zen 4/5) gets the weight gradient wrong when the input's depth is smaller than the
    kernel's: on a ``[2, 16, 2, 4, 4]`` input with a 3³ kernel the gradient was off by more than 5% every
    time, and NaN in one case of ten (it reads memory it never wrote); the forward pass, the input's
    gradient, depth >= kernel and AMX's kernels were right.  ResNets reach such depths on small inputs: a
    16³ input leaves layer2 with a 2³ grid, and a 32³ input gives layer3's phase sub-grids 2³."""
    bf16 = x.dtype is torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    )
    extent = (weight.shape[2] - 1) * dilation + 1
    return (
        bf16
        and x.device.type == "cpu"
        and x.dim() == 5
        and x.shape[2] < extent
        and weight.requires_grad
        and torch.is_grad_enabled()
    )


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation):
    """``F.conv3d`` (zero padding, isotropic dilation), in float32 where oneDNN's bf16 weight gradient
    would be wrong (:func:`_bf16_weight_grad_is_wrong`); such volumes are tiny, so it costs nothing."""
    d = dilation if isinstance(dilation, int) else dilation[0]
    if _bf16_weight_grad_is_wrong(x, weight, d):
        with torch.autocast("cpu", enabled=False):
            b = bias.float() if bias is not None else None
            return F.conv3d(x.float(), weight.float(), b, stride, padding, dilation)
    return F.conv3d(x, weight, bias, stride, padding, dilation)


class Bf16SafeConv3d(nn.Conv3d):
    """A zero-padded Conv3d whose weight gradient is right under bf16 autocast on every CPU: it runs in
    float32 on volumes shallower than its kernel (:func:`conv3d`).  The trainer's CPU bf16 path puts it in
    place of every plain conv (:func:`rewrite_for_cpu`)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return conv3d(x, weight, bias, self.stride, self.padding, self.dilation)


def _guard_bf16_weight_grads(model: nn.Module) -> None:
    """In place: every plain zero-padded Conv3d of ``model`` becomes a :class:`Bf16SafeConv3d` (same
    parameter objects and keys); :func:`rewrite_for_cpu` does it for bf16 training."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv3d and child.padding_mode == "zeros":
                setattr(module, name, _like(Bf16SafeConv3d, child))


class PhaseBatchedConv3d(Bf16SafeConv3d):
    """A stride-1 3³ Conv3d with dilation r (padding r), computed as an undilated conv over r³ phases.

    Output voxel p reads inputs p - r, p, p + r: all in the same phase (p mod r).  Splitting the volume
    into its r³ phases (space-to-batch, as TensorFlow's ``atrous_conv2d`` does), convolving each with the
    same weights at dilation 1 / padding 1, and interleaving the results back gives exactly the dilated
    convolution (zero padding at a sub-grid's edge is zero padding of the original).  Sizes not divisible
    by r fall back to the dilated conv.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.dilation[0]
        n, c, d, h, w = x.shape
        if d % r or h % r or w % r:
            return super().forward(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        phases = (
            x.reshape(n, c, d // r, r, h // r, r, w // r, r)
            .permute(0, 3, 5, 7, 1, 2, 4, 6)
            .reshape(n * r**3, c, d // r, h // r, w // r)
            .contiguous(memory_format=fmt)
        )
        y = conv3d(phases, self.weight, self.bias, 1, 1, 1)
        k = y.shape[1]
        y = y.reshape(n, r, r, r, k, d // r, h // r, w // r).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return y.reshape(n, k, d, h, w).contiguous(memory_format=fmt)


# in_channels x out_channels from which a 1³ conv runs as a GEMM (a ResNet-50: layer3 and layer4).
POINTWISE_MIN_PRODUCT = 256 * 512


class PointwiseConv3d(nn.Conv3d):
    """A 1³ stride-1 Conv3d computed as ``F.linear`` over a channels_last_3d input's voxels.

    On channels_last_3d tensors a 1³ conv is one GEMM ``[voxels, C] @ [C, K]`` with no copy in or out, and
    MKL's GEMMs (and their backward) beat oneDNN's 1³ convs on the large ones: fwd + bwd at batch 2 on 2
    AVX2 cores, 512→2048 at 16³ 305 vs 357 ms, 1024→2048 601 vs 742, 256→1024 83 vs 93; on layer1's 64↔256
    at 32³ they were ~10% slower, hence :data:`POINTWISE_MIN_PRODUCT`.  A ResNet-50 train step at 128³ ran
    8.7 s instead of 10.1 s (medians of 3, interleaved).  Other layouts and dtypes take the conv."""

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv3d
            and conv.kernel_size == (1, 1, 1)
            and conv.stride == (1, 1, 1)
            and conv.padding == (0, 0, 0)
            and conv.groups == 1
            and conv.in_channels * conv.out_channels >= POINTWISE_MIN_PRODUCT
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() != 5
            or x.dtype != torch.float32
            or torch.is_autocast_enabled(x.device.type)
            or not x.is_contiguous(memory_format=torch.channels_last_3d)
        ):
            return super().forward(x)
        y = F.linear(x.permute(0, 2, 3, 4, 1), self.weight.reshape(self.out_channels, -1), self.bias)
        return y.permute(0, 4, 1, 2, 3)  # channels_last_3d, as the conv's output would be


# Which fp32 rewrites run (rewrite_for_cpu's ``fp32_kernels``): "all" (Winograd for every stride-1 3³
# conv, GEMMs for the large 1³ convs) or "onednn" (oneDNN's convs, but for the dilated convs that only
# their centre tap can reach, :class:`CentreTapConv3d`).
FP32_KERNELS = switches.FP32_KERNELS_CHOICES


@functools.cache
def _cpu_vendor() -> str:
    """'AuthenticAMD', 'GenuineIntel', ... ('' where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    text = platform.processor()  # Windows: "AMD64 Family 26 Model 2 Stepping 1, AuthenticAMD"
    return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in text), "")


def fp32_kernels_for(vendor: str, capability: str) -> str:
    """The fp32 rewrites that pay off on a CPU of ``vendor`` with ATen's ``capability`` (one of
    :data:`FP32_KERNELS`).

    Winograd's batched products and the 1³ GEMMs run in MKL, and MKL runs its AVX2 code on AMD CPUs even
    where they have AVX-512, while oneDNN's convs use AVX-512: on 2 Zen 5 cores a ``[4096, 2048] @ [2048,
    512]`` fp32 GEMM took 40 ms in MKL and 18 ms as oneDNN's 1³ conv.  A ResNet-50 there, against plain
    fp32 (medians, interleaved): train step (batch 2) with all the kernels 0.65x at 128³ and 0.67x at 64³,
    with oneDNN's convs 1.13x and 0.98x; BN-folded forward pass 0.84x and 0.72x with all of them, 1.37x
    and 1.02x without.  So on AMD with AVX-512: "onednn".  Elsewhere "all": on the AVX2 EPYC they won
    everywhere (see the module doc); on Intel's AVX-512 CPUs MKL runs its AVX-512 code, and the fp32
    kernels were not timed there."""
    if vendor == "AuthenticAMD" and capability.startswith("AVX512"):
        return "onednn"
    return "all"


def fp32_kernels_here() -> str:
    """``MEDCLI_FP32_KERNELS`` where set, else :func:`fp32_kernels_for` this CPU."""
    return switches.fp32_kernels_choice() or fp32_kernels_for(
        _cpu_vendor(), torch.backends.cpu.get_cpu_capability()
    )


class CentreTapConv3d(TapwiseConv3d):
    """A dilated 3³ conv that runs as its centre tap alone (one GEMM, :mod:`medcli.engine.tap_conv`) on
    volumes no larger than its dilation, where every other tap reads zero padding, and as oneDNN's conv
    elsewhere.  A 32³ input leaves layer4 (dilation 4) such a 4³ grid: on 2 Zen 5 cores its conv took
    0.9 ms that way against 5.5 in oneDNN (fwd + bwd at batch 2: 15 against 85 ms); on larger grids
    oneDNN's was the faster (layer3's at 8³, dilation 2: 27 against 36 ms fwd + bwd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5 and max(x.shape[2:]) <= self.dilation[0]:
            return super().forward(x)
        return nn.Conv3d.forward(self, x)


def _fp32_rewrite(conv: nn.Module, kernels: str) -> type[nn.Conv3d] | None:
    if kernels == "onednn":
        return CentreTapConv3d if TapwiseConv3d.applies(conv) else None
    for cls in (WinogradConv3d, PointwiseConv3d):
        if cls.applies(conv):
            return cls
    return None


def rewrite_for_cpu(
    model: nn.Module, *, bf16: bool, inference: bool = False, fp32_kernels: str | None = None
) -> nn.Module:
    """In place: the CPU rewrites for fp32 (``bf16=False``) or bf16 autocast; same function and keys.

    ``inference=True`` with ``bf16`` (the predictor, on a BN-folded eval-mode ResNet3D, on a CPU with
    native bf16): the backbone runs in bf16 on fused oneDNN ops instead (:mod:`medcli.engine.cpu_bf16`;
    other keys, no autograd).  Without native bf16 oneDNN emulates it, and the autocast path stays.
    In fp32, ``fp32_kernels`` (one of :data:`FP32_KERNELS`; default: what pays off on this CPU,
    :func:`fp32_kernels_here`) chooses the rewrites.  Returns the model.  ``MEDCLI_CPU_KERNELS=0`` leaves
    the speed rewrites out (oneDNN's convs throughout); bf16 training keeps the weight-gradient guard
    (:func:`_guard_bf16_weight_grads`) either way, being a correctness fix."""
    if not switches.switched_off(switches.CPU_KERNELS):
        model = _speed_rewrites(model, bf16=bf16, inference=inference, fp32_kernels=fp32_kernels)
    if bf16 and not inference:
        _guard_bf16_weight_grads(model)
    return model


def _speed_rewrites(model: nn.Module, *, bf16: bool, inference: bool, fp32_kernels: str | None) -> nn.Module:
    if bf16 and inference:
        if cpu_bf16.applies(model) and cpu_has_fast_bf16():
            return cpu_bf16.rewrite_for_bf16_inference(model)
    if bf16 and type(getattr(model, "conv1", None)) is nn.Conv3d:
        model.conv1 = _like(Float32Conv3d, model.conv1)
    kernels = fp32_kernels or fp32_kernels_here()
    if kernels not in FP32_KERNELS:
        raise ValueError(f"fp32_kernels must be one of {FP32_KERNELS}, not {kernels!r}")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not bf16:
                cls = _fp32_rewrite(child, kernels)
                if cls is not None:
                    setattr(module, name, _like(cls, child))
            elif TapwiseConv3d.applies(child):
                use = PhaseBatchedConv3d if child.dilation[0] < 4 else TapwiseConv3d
                setattr(module, name, _like(use, child))
    return model
    if bf16 and inference:
        if cpu_bf16.applies(model) and cpu_has_fast_bf16():
            return cpu_bf16.rewrite_for_bf16_inference(model)
    if bf16 and type(getattr(model, "conv1", None)) is nn.Conv3d:
        model.conv1 = _like(Float32Conv3d, model.conv1)
    kernels = fp32_kernels or fp32_kernels_here()
    if kernels not in FP32_KERNELS:
        raise ValueError(f"fp32_kernels must be one of {FP32_KERNELS}, not {kernels!r}")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not bf16:
                cls = _fp32_rewrite(child, kernels)
                if cls is not None:
                    setattr(module, name, _like(cls, child))
            elif TapwiseConv3d.applies(child):
                use = PhaseBatchedConv3d if child.dilation[0] < 4 else TapwiseConv3d
                setattr(module, name, _like(use, child))
    return model


def describe(model: nn.Module) -> str | None:
    """What :func:`rewrite_for_cpu` changed in ``model`` (read from its modules), for log lines and
    reports; None where it changed nothing."""
    if cpu_bf16.is_rewritten(model):
        return cpu_bf16.DESCRIPTION
    parts = ["fp32 stem"] if isinstance(getattr(model, "conv1", None), Float32Conv3d) else []
    if any(type(m) is WinogradConv3d for m in model.modules()):
        parts.append("3³ convs by Winograd F(4,3)")
    if any(type(m) is PointwiseConv3d for m in model.modules()):
        parts.append("large 1³ convs as GEMMs")
    kinds = (
        (TapwiseConv3d, "tap by tap"),
        (PhaseBatchedConv3d, "phase-batched"),
        (CentreTapConv3d, "as their centre tap on grids within the dilation"),
    )
    for cls, how in kinds:
        dilations = sorted({m.dilation[0] for m in model.modules() if type(m) is cls})
        if dilations:
            parts.append(f"dilation-{'/'.join(map(str, dilations))} convs {how}")
    return ", ".join(parts) or None
