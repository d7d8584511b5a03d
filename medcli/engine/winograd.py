"""Stride-1 3³ convolutions by Winograd's minimal filtering F(4³, 3³): 3.4 multiplications per output voxel
and channel pair instead of 27.

Lavin & Gray ("Fast algorithms for convolutional neural networks", 2016) compute a 4-output, 3-tap
correlation from a 6-input tile as ``y = Aᵀ[(G g) ⊙ (Bᵀ d)]``.  Nested over three axes, a 6³ input tile
``d`` and a 3³ kernel ``g`` give a 4³ output tile from 216 products; summed over input channels, those
products are 216 independent GEMMs ``[tiles, C] @ [C, K]`` (:func:`torch.bmm`), which is where the time
goes.  The transforms around them are small matrix products along one axis at a time.

A dilated conv (MedicalNet's layer3 at r=2, layer4 at r=4) is first split into its r³ phase sub-grids,
where it is an undilated conv (see :class:`medcli.engine.cpu_kernels.PhaseBatchedConv3d`): a 128³ input
reaches layer4 as a 16³ grid, i.e. 4³ phases of 4³ voxels, one tile each.  There the GEMMs do 3.4
multiply-adds per output and channel pair against the 15.7 of the tap-wise conv (which already skips the
taps that read padding) and the 27 of oneDNN's.

The phase split, the zero padding and the cutting into overlapping tiles are one row gather
(:func:`torch.Tensor.index_select` over the volume's voxels as rows of C channels, plus a zero row), and
putting the output tiles back is another.  The backward pass runs the same linear maps transposed (the
tiles' overlap summed back by ``index_add_``), with one GEMM per transform point for each of the input and
weight gradients, and keeps only the transformed input and weights.

In float32 the result differs from a float64 reference by ~1e-5 relative (oneDNN's conv: ~1e-6): the
transforms multiply by up to 8 and divide by 24.  Used in float32 only, never in bf16.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from medcli.engine.tap_conv import is_same_padded_3x3x3, tapwise_conv3d

# F(4, 3) with interpolation points 0, ±1, ±2 and ∞ (Lavin & Gray, section 4.2).
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)
M = 4  # outputs per tile and axis
A = M + 2  # inputs per tile and axis


def _matrix(rows: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).to(like.dtype)


def _along_three(mat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mat`` ([o, p]) applied along each of ``x``'s first three axes ([p, p, p, ...] -> [o, o, o, ...]).

    One matrix product per axis, each over a contiguous [p, rest] view, so no transposing copies."""
    o, p = mat.shape
    rest = x.shape[3:]
    y = (mat @ x.reshape(p, -1)).view(o, p, -1)  # axis 0
    y = torch.matmul(mat, y.view(o, p, -1))  # axis 1, batched over axis 0
    y = torch.matmul(mat, y.view(o * o, p, -1))  # axis 2, batched over axes 0 and 1
    return y.view(o, o, o, *rest)


def _kron_g(like: torch.Tensor) -> torch.Tensor:
    """``G ⊗ G ⊗ G``: ``[216, 27]``, the weight transform of all three axes as one matrix."""
    g = _matrix(_G, like)
    return torch.kron(torch.kron(g, g), g)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``G g Gᵀ`` over three axes: ``[K, C, 3, 3, 3]`` -> ``[216, C, K]`` (a view of ``[K, 216, C]``).

    Depth first (``G``: ``[6, 3] @ [3, 9·C]`` per output channel), then height and width at once
    (``G ⊗ G``: ``[36, 9] @ [9, C]`` per output channel and depth point): 2.8x fewer multiplications than
    ``G ⊗ G ⊗ G`` in one product, and 13-25% faster here at 128-512 channels.  Per output channel, not one
    product over K·C columns, which MKL ran 2x slower with such short inner dimensions.  For channels_last_3d
    weights, as the CPU paths keep them, ``[K, 3, 9·C]`` is a view."""
    k, c = weight.shape[:2]
    g = _matrix(_G, weight)
    taps = weight.permute(0, 2, 3, 4, 1).reshape(k, 3, 9 * c)
    depth = torch.matmul(g, taps)  # [K, 6, 9·C]
    u = torch.matmul(torch.kron(g, g), depth.view(k * A, 9, c))  # [K·6, 36, C]
    return u.view(k, A**3, c).permute(1, 2, 0)


def _weight_grad(dm: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The weight gradient from the output points' gradient ``dm`` [216, tiles, K] and the transformed
    input ``v`` [216, tiles, C]: ``[K, C, 3, 3, 3]`` (channels_last_3d).

    ``du = dmᵀ v`` ([216, K, C]) is made a block of output channels at a time and transformed back at
    once: whole, layer4's would be a fresh 226 MB tensor, and the product into it ran 2.3x slower inside a
    train step than alone."""
    k, c = dm.shape[-1], v.shape[-1]
    kron_t = _kron_g(v).t()  # [27, 216]
    taps = v.new_empty(k, 27, c)
    block = 1 << max(0, ((1 << 23) // (A**3 * c)).bit_length() - 1)  # du blocks of <= 32 MB, 2^n channels
    for k0 in range(0, k, block):
        du = torch.bmm(dm[:, :, k0 : k0 + block].transpose(1, 2), v)  # [216, block, C]
        torch.matmul(kron_t, du.transpose(0, 1), out=taps[k0 : k0 + block])
    return taps.view(k, 3, 3, 3, c).permute(0, 4, 1, 2, 3)


@functools.lru_cache(maxsize=64)
def _indices(shape: tuple[int, ...], r: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row indices that cut an ``[N, D, H, W, C]`` volume (as ``N·D·H·W`` rows of C) into tiles.

    Phase (i, j, l) of the volume holds the voxels at ``(i + r·a, j + r·b, l + r·c)``; each phase grid,
    zero-padded by one voxel and up to a multiple of 4, is cut into 6³ tiles at stride 4.  Offset x of tile
    t in phase i reads voxel ``(4t + x - 1)·r + i``.  Returns ``(inputs, outputs, tiles)``: ``inputs``
    [216·tiles] picks each tile point's voxel row (``N·D·H·W``, a zero row, where it reads padding);
    ``outputs`` [N·D·H·W] names each voxel's row among the 64·tiles output points."""
    n, *spatial = shape
    counts = [math.ceil(s / (r * M)) for s in spatial]  # tiles per phase and axis
    tiles = n * r**3 * math.prod(counts)

    def axis(size: int, count: int, offsets: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel coordinate and validity along one axis, as [offsets, phase, tile]."""
        o = torch.arange(offsets).view(-1, 1, 1)
        i = torch.arange(r).view(1, -1, 1)
        t = torch.arange(count).view(1, 1, -1)
        v = (M * t + o - shift) * r + i
        return v, (v >= 0) & (v < size)

    def rows(offsets: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel row and validity as [x, y, z, n, i, j, l, td, th, tw] (one axis per dimension)."""
        (d, vd), (h, vh), (w, vw) = (axis(s, c, offsets, shift) for s, c in zip(spatial, counts, strict=True))
        # [x, i, t] per axis -> [x, y, z, n, i, j, l, td, th, tw] by broadcasting.
        d = d.view(offsets, 1, 1, 1, r, 1, 1, counts[0], 1, 1)
        h = h.view(1, offsets, 1, 1, 1, r, 1, 1, counts[1], 1)
        w = w.view(1, 1, offsets, 1, 1, 1, r, 1, 1, counts[2])
        b = torch.arange(n).view(1, 1, 1, n, 1, 1, 1, 1, 1, 1)
        voxel = ((b * spatial[0] + d) * spatial[1] + h) * spatial[2] + w
        ok = vd.view_as(d) & vh.view_as(h) & vw.view_as(w)
        return voxel, ok.expand_as(voxel)

    voxel, ok = rows(A, 1)
    inputs = torch.where(ok, voxel, n * math.prod(spatial)).reshape(-1)
    voxel, ok = rows(M, 0)
    outputs = torch.empty(n * math.prod(spatial), dtype=torch.long)
    outputs[voxel[ok]] = torch.arange(voxel.numel()).view_as(voxel)[ok]
    return inputs, outputs, tiles


def _tile_indices(shape: tuple[int, ...], r: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`_indices`, cached in eager mode.  Under ``torch.compile`` the uncached function is traced
    (the indices depend on static shapes only); calling the cached one made Dynamo warn users that it
    ignores the cache."""
    return _indices.__wrapped__(shape, r) if torch.compiler.is_compiling() else _indices(shape, r)


class _WinogradConv(torch.autograd.Function):
    """F(4³, 3³) conv on ``[N, D, H, W, C]`` tensors, stride 1, padding = dilation = r (module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, r: int, kept: torch.Tensor | None):
        inputs, outputs, tiles = _tile_indices(tuple(x.shape[:4]), r)
        c = x.shape[-1]
        rows = torch.cat([x.reshape(-1, c), x.new_zeros(1, c)])  # the last row: the padding
        d = rows.index_select(0, inputs).view(A, A, A, -1)  # [6, 6, 6, tiles·C]
        v = _along_three(_matrix(_BT, x), d).view(A**3, tiles, c)
        u = transform_weight(weight) if kept is None else kept  # [216, C, K]
        m = torch.bmm(v, u)  # [216, tiles, K]
        k = m.shape[-1]
        y = _along_three(_matrix(_AT, m), m.view(A, A, A, -1)).view(-1, k)  # [64·tiles, K]
        y = y.index_select(0, outputs).view(*x.shape[:4], k)
        if bias is not None:
            y += bias
        ctx.save_for_backward(v, u)
        ctx.r, ctx.has_bias = r, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, u = ctx.saved_tensors
        inputs, outputs, tiles = _tile_indices(tuple(grad.shape[:4]), ctx.r)
        k, c = grad.shape[-1], v.shape[-1]
        # Transposes of the forward's maps, in reverse order; output points outside the volume get 0.
        dy = grad.new_zeros(M**3 * tiles, k).index_copy_(0, outputs, grad.reshape(-1, k))
        dm = _along_three(_matrix(_AT, grad).t(), dy.view(M, M, M, -1)).view(A**3, tiles, k)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(dm, u.transpose(1, 2))  # [216, tiles, C]
            dd = _along_three(_matrix(_BT, dv).t(), dv.view(A, A, A, -1)).view(-1, c)
            rows = grad.new_zeros(grad.shape[:4].numel() + 1, c)
            rows.index_add_(0, inputs, dd)  # neighbouring tiles overlap: their gradients add
            grad_x = rows[:-1].view(*grad.shape[:4], c)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(dm, v)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 1, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def winograd_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    r: int,
    transformed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride=1, padding=r, dilation=r)`` for a 3³ kernel, by F(4³, 3³).

    ``x``: ``[N, C, D, H, W]``; returns ``[N, K, D, H, W]`` in ``x``'s memory format and dtype (autocast
    does not apply).  ``transformed``: ``transform_weight(weight)`` computed earlier (inference only: no
    gradient reaches the weight through it)."""
    cl = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    with torch.autocast(x.device.type, enabled=False):  # in x's dtype: bf16 tiles would lose too much
        y = _WinogradConv.apply(x.permute(0, 2, 3, 4, 1), weight, bias, r, transformed)  # [N, D, H, W, K]
    return y.permute(0, 4, 1, 2, 3).contiguous(memory_format=fmt)


class WinogradConv3d(nn.Conv3d):
    """A stride-1 3³ Conv3d (padding = dilation), computed by :func:`winograd_conv3d` in float32.

    A volume with fewer than 4 voxels per phase along an axis (e.g. layer4 of a 64³ input: 8³ at r=4, two
    per phase) would spend most of each 6³ tile on padding: there the dilated conv runs tap by tap and the
    undilated one through oneDNN.  So do inputs in other dtypes or on other devices, under autocast, and
    unbatched ones.

    ``keep_transformed`` (set by :func:`keep_transformed_weights`): keep the transformed weight between
    calls while the weight is unchanged and receives no gradient, i.e. at inference.  It is 8x the
    weight's size; transforming layer4's 512→512 weight anew takes 40% of the time of the products it
    feeds (22 vs 53 ms for one 128³ scan on 2 AVX2 cores)."""

    keep_transformed = False

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        return is_same_padded_3x3x3(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.dilation[0]
        if (
            x.dim() != 5
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.is_autocast_enabled(x.device.type)
        ):
            return super().forward(x)
        if min(x.shape[2:]) < M * r:
            return tapwise_conv3d(x, self.weight, self.bias, r) if r > 1 else super().forward(x)
        return winograd_conv3d(x, self.weight, self.bias, r, self._kept_transform())

    def _kept_transform(self) -> torch.Tensor | None:
        if not self.keep_transformed or (torch.is_grad_enabled() and self.weight.requires_grad):
            return None
        key = (self.weight._version, self.weight.data_ptr())  # an in-place update bumps the version
        if getattr(self, "_kept_key", None) != key:
            self._kept = transform_weight(self.weight.detach())
            self._kept_key = key
        return self._kept


def transformed_weight_bytes(model: nn.Module) -> int:
    """Memory that :func:`keep_transformed_weights` would keep for ``model`` (216 floats per 27)."""
    return sum(m.weight.nbytes * A**3 // 27 for m in model.modules() if type(m) is WinogradConv3d)


def keep_transformed_weights(model: nn.Module, keep: bool = True) -> None:
    """Have ``model``'s Winograd convs keep their transformed weights between inference calls."""
    for m in model.modules():
        if type(m) is WinogradConv3d:
            m.keep_transformed = keep
            m._kept = m._kept_key = None
