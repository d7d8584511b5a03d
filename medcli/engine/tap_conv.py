"""MedicalNet's dilated 3³ convolutions computed tap by tap, without the taps that read zero padding.

A 128³ input reaches layer3 (dilation 2) and layer4 (dilation 4) as a 16³ grid.  At dilation 4, a tap
offset by ±4 along an axis reads padding for 4 of the 16 positions, so only (40/48)³ = 58% of layer4's
multiply-adds touch data (layer3: 77%; a 64³ input, 8³ grid: 30%; at 32³ only the centre tap is left).
oneDNN's convolution computes them all.

Here each of the 27 taps is one GEMM ``[voxels, C] @ [C, K]`` over exactly the output voxels whose input
lies inside the volume, accumulated into the output.  Taps are grouped by their (H, W) offset: the input is
cropped (copied) once per group in a depth-outermost layout, ``[D, N, H', W', C]``, where the three depth
offsets are contiguous row ranges and accumulate into one buffer with ``addmm_``, without further copies.
The backward pass is the same loop with the taps mirrored and the weights transposed (gradient of the
input) and one GEMM per tap for the weight gradient; only the input and the weights are kept for it.

The result equals the dilated convolution up to float rounding (the sums run in another order).  Measured
on 2 AVX2 EPYC cores in fp32 (``scripts/bench_dilated_conv.py``): layer4's conv 1.6x faster than
``F.conv3d`` at inference, layer3's 1.1x.  FLOP counts (``medcli bench``) stay those of the declared model,
so the skipped padding shows as a higher achieved FLOP/s, as it would for any padding-aware kernel.

In float32 the Winograd conv (:mod:`medcli.engine.winograd`) does fewer multiplications still and takes
over, except on volumes too small for its 4³ output tiles, where it calls this one; under bf16 autocast
the dilation-4 convs run here (``medcli.engine.cpu_kernels``).
"""

from __future__ import annotations

import torch
from torch import nn

# Tap index 0, 1, 2 along an axis = offset -r, 0, +r.  The centre (1) first: it covers the whole output,
# so its product initialises the buffer that the other taps add into.
_ORDER = (1, 0, 2)


def _span(size: int, offset: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose input position (plus ``offset``) lies inside ``0..size-1``."""
    return max(0, -offset), min(size, size - offset)


def _taps_forward(src: torch.Tensor, mats: list, r: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``out[p] = bias + sum_t src[p + o_t] @ mats[t]`` over in-volume taps.

    ``src``: ``[D, N, H, W, C]``; ``mats[i][j][k]``: ``[C, K]``, the tap at offset ((i-1)r, (j-1)r, (k-1)r).
    Returns ``[D, N, H, W, K]`` (contiguous)."""
    d, n, h, w, c = src.shape
    out = None
    for j in _ORDER:
        h0, h1 = _span(h, (j - 1) * r)
        for k in _ORDER:
            w0, w1 = _span(w, (k - 1) * r)
            if h1 <= h0 or w1 <= w0:
                continue
            oh, ow = (j - 1) * r, (k - 1) * r
            crop = src[:, :, h0 + oh : h1 + oh, w0 + ow : w1 + ow].contiguous()  # [D, N, H', W', C]
            rows = crop.view(d, -1, c)
            centre = crop.view(-1, c)
            if out is None and bias is not None:
                buf = torch.addmm(bias, centre, mats[1][j][k])
            else:
                buf = centre @ mats[1][j][k]
            buf = buf.view(d, -1, buf.shape[-1])
            for i in (0, 2):
                d0, d1 = _span(d, (i - 1) * r)
                if d1 > d0:
                    od = (i - 1) * r
                    buf[d0:d1].view(-1, buf.shape[-1]).addmm_(
                        rows[d0 + od : d1 + od].reshape(-1, c), mats[i][j][k]
                    )
            buf = buf.view(d, n, h1 - h0, w1 - w0, -1)
            if out is None:  # the centre group spans the whole output
                out = buf
            else:
                out[:, :, h0:h1, w0:w1] += buf
    assert out is not None
    return out


def _taps_weight_grad(src: torch.Tensor, grad: torch.Tensor, r: int) -> torch.Tensor:
    """``dW[i, j, k] = sum_p src[p + o_t]^T grad[p]`` as ``[3, 3, 3, C, K]`` (zero for taps fully in padding).

    ``src``: ``[D, N, H, W, C]``, ``grad``: ``[D, N, H, W, K]``."""
    d, n, h, w, c = src.shape
    kk = grad.shape[-1]
    dw = src.new_zeros(3, 3, 3, c, kk)
    for j in range(3):
        h0, h1 = _span(h, (j - 1) * r)
        for k in range(3):
            w0, w1 = _span(w, (k - 1) * r)
            if h1 <= h0 or w1 <= w0:
                continue
            oh, ow = (j - 1) * r, (k - 1) * r
            xs = src[:, :, h0 + oh : h1 + oh, w0 + ow : w1 + ow].contiguous().view(d, -1, c)
            gs = grad[:, :, h0:h1, w0:w1].contiguous().view(d, -1, kk)
            for i in range(3):
                d0, d1 = _span(d, (i - 1) * r)
                if d1 > d0:
                    od = (i - 1) * r
                    rows_x = xs[d0 + od : d1 + od].reshape(-1, c)
                    torch.mm(rows_x.t(), gs[d0:d1].reshape(-1, kk), out=dw[i, j, k])
    return dw


class _TapwiseConv(torch.autograd.Function):
    """Dilated 3³ conv, stride 1, padding = dilation, on ``[D, N, H, W, C]`` tensors (see the module doc)."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r: int):
        ctx.save_for_backward(src, weight)
        ctx.r, ctx.has_bias = r, bias is not None
        # weight [K, C, 3, 3, 3] -> tap (i, j, k) as [C, K]: a transposed view, no copy.
        mats = [[[weight[:, :, i, j, k].t() for k in range(3)] for j in range(3)] for i in range(3)]
        return _taps_forward(src, mats, r, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        src, weight = ctx.saved_tensors
        r = ctx.r
        grad = grad.contiguous()
        grad_src = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The input gradient is the same tap loop run from the output side: tap (i, j, k) moved data
            # by +o, so its gradient moves back by -o, i.e. through the mirrored tap, with W^T = [K, C].
            taps = range(3)
            mirrored = [[[weight[:, :, 2 - i, 2 - j, 2 - k] for k in taps] for j in taps] for i in taps]
            grad_src = _taps_forward(grad, mirrored, r, None)
        if ctx.needs_input_grad[1]:
            grad_weight = _taps_weight_grad(src, grad, r).permute(4, 3, 0, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 1, 2, 3))
        return grad_src, grad_weight, grad_bias, None


def tapwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r: int) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride=1, padding=r, dilation=r)`` for a 3³ kernel, tap by tap.

    ``x``: ``[N, C, D, H, W]``; returns ``[N, K, D, H, W]`` in ``x``'s memory format (channels_last_3d or
    contiguous).  Under autocast the GEMMs run in the autocast dtype, as the conv's would."""
    cl = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = _TapwiseConv.apply(x.permute(2, 0, 3, 4, 1), weight, bias, r)  # [D, N, H, W, K]
    return y.permute(1, 4, 0, 2, 3).contiguous(memory_format=fmt)


def is_same_padded_3x3x3(conv: nn.Module) -> bool:
    """A plain stride-1 3³ Conv3d whose zero padding equals its (isotropic) dilation: output size = input
    size, the convs MedicalNet's ResNets are made of and medcli's CPU kernels replace."""
    return (
        type(conv) is nn.Conv3d
        and conv.kernel_size == (3, 3, 3)
        and conv.stride == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and len(set(conv.dilation)) == 1
        and conv.padding == conv.dilation
    )


class TapwiseConv3d(nn.Conv3d):
    """A stride-1 3³ Conv3d with dilation r > 1 (padding r), computed by :func:`tapwise_conv3d`."""

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        return is_same_padded_3x3x3(conv) and conv.dilation[0] > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:  # an unbatched [C, D, H, W] input
            return super().forward(x)
        return tapwise_conv3d(x, self.weight, self.bias, self.dilation[0])
