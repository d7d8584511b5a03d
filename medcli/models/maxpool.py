"""The stem's max-pool, reproducible on CUDA under ``--deterministic``.

PyTorch's CUDA backward of ``max_pool3d`` scatters each output's gradient to its argmax with atomic adds;
where windows overlap (3³ windows at stride 2 do) two gradients reach one input voxel in whatever order
the GPU's threads finish, so two identical training runs drift apart from the first step.  Under
``torch.use_deterministic_algorithms(True, warn_only=True)`` PyTorch only warns about it.

:class:`MaxPool3d` is ``nn.MaxPool3d`` (same forward, no parameters, no state-dict keys) whose backward,
when deterministic algorithms are on and the input is a CUDA tensor that needs a gradient, adds the
gradients window offset by window offset instead: k³ strided additions in a fixed order, each writing
distinct voxels.  The gradient is the native one (each output's gradient goes to the argmax that
``max_pool3d`` returned), only summed in a fixed order.  Elsewhere the native kernels run.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class _MaxPool3dFixedOrder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
        out, argmax = F.max_pool3d(x, kernel, stride, padding, return_indices=True)
        ctx.save_for_backward(argmax)
        ctx.geometry = (x.shape, kernel, stride, padding)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (argmax,) = ctx.saved_tensors
        shape, k, s, p = ctx.geometry
        size_in = shape[2:]
        size_out = grad.shape[2:]
        # The gradient on the zero-padded grid, so every window offset is one strided slice of it.
        padded = grad.new_zeros(*shape[:2], *(n + 2 * p for n in size_in))
        grad = grad.contiguous()
        for offset in itertools.product(range(k), repeat=3):
            # The flat index (over the unpadded D·H·W grid, as max_pool3d reports it) of the voxel at this
            # offset in each output's window.  Where that voxel is padding the index may name a real voxel,
            # but what such a hit adds lands in the padding band of `padded`, which is cropped below.
            flat = torch.zeros((), dtype=torch.long, device=grad.device)
            for axis, (n_out, n_in, o) in enumerate(zip(size_out, size_in, offset, strict=True)):
                view = [1, 1, 1]
                view[axis] = n_out
                flat = flat * n_in + (torch.arange(n_out, device=grad.device) * s - p + o).view(view)
            hit = argmax == flat
            d, h, w = (slice(o, o + s * (n - 1) + 1, s) for o, n in zip(offset, size_out, strict=True))
            padded[:, :, d, h, w].add_(torch.where(hit, grad, 0.0))
        unpadded = tuple(slice(p, p + n) for n in size_in)
        return padded[(slice(None), slice(None), *unpadded)], None, None, None


class MaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` with a fixed-order backward on CUDA under deterministic algorithms (see module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.is_cuda
            and torch.is_grad_enabled()
            and x.requires_grad
            and torch.are_deterministic_algorithms_enabled()
            and _plain_geometry(self)
        ):
            return _MaxPool3dFixedOrder.apply(x, self.kernel_size, self.stride, self.padding)
        return super().forward(x)


def _plain_geometry(pool: nn.MaxPool3d) -> bool:
    """Cubic integer kernel/stride/padding, no dilation or ceil mode: the case the fixed-order backward
    handles (and the only one the ResNets use)."""
    return (
        all(isinstance(v, int) for v in (pool.kernel_size, pool.stride, pool.padding))
        and pool.dilation in (1, (1, 1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
    )
