"""Training-time augmentation of one ``[C, D, H, W]`` float32 tensor: pure torch, CPU-cheap, reproducible.

Each sample draws from its own ``torch.Generator`` seeded from ``(seed, epoch, index)``
(:func:`sample_generator`), so a run augments identically whatever the number of DataLoader workers or the
order they finish in.  Every random number is drawn whether or not its transform fires, so switching one
transform off does not reshuffle the others.

Transforms, in order, each with its own probability:

- a small rotation about the volume centre + isotropic scaling (``affine_grid`` + ``grid_sample``,
  trilinear, zero fill = the preprocessed background);
- mirroring along ``flip_axes`` (default axis 0 = left-right in RAS arrays: the brain's own symmetry;
  add 1, 2 for nnU-Net-style mirroring of every axis);
- per-channel intensity scale and shift, gamma (with the channel's mean/std kept), Gaussian noise.

Intensity transforms touch only foreground voxels (non-zero in any channel), so the background stays the
constant 0 the preprocessing promises.

Cost at 128³, one CPU thread: ~0.2 s with every transform firing (trilinear resampling dominates), so a
few DataLoader workers feed a GPU.  ``augment`` also runs on a CUDA tensor (same random parameters; the
noise stream is then drawn on the GPU), for a trainer that prefers to augment on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medcli.errors import UsageError


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; the defaults are mild (BraTS is co-registered and skull-stripped)."""

    p_affine: float = 0.5
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    flip_axes: tuple[int, ...] = (0,)
    p_flip: float = 0.5
    p_intensity: float = 0.5
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.3
    noise_std: tuple[float, float] = (0.0, 0.1)

    def __post_init__(self) -> None:
        for name in ("p_affine", "p_flip", "p_intensity", "p_gamma", "p_noise"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise UsageError(
                    f"augmentation {name}={p} is not a probability", hint="use a value in [0, 1]"
                )
            object.__setattr__(self, name, p)
        for name in ("scale_range", "intensity_scale", "gamma_range", "noise_std"):
            lo, hi = (float(v) for v in getattr(self, name))
            if lo > hi or (name != "noise_std" and lo <= 0) or lo < 0:
                raise UsageError(f"augmentation {name}=({lo}, {hi}) is invalid", hint="use 0 < low <= high")
            object.__setattr__(self, name, (lo, hi))
        axes = tuple(int(a) for a in self.flip_axes)
        if any(a not in (0, 1, 2) for a in axes):
            raise UsageError(f"flip axes {axes} are invalid", hint="spatial axes are 0, 1 and 2")
        object.__setattr__(self, "flip_axes", axes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentConfig:
        return cls(**dict(d))

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(p_affine=0.0, p_flip=0.0, p_intensity=0.0, p_gamma=0.0, p_noise=0.0)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for sample ``index`` in ``epoch``: independent streams via NumPy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF)


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _rotation(angles: Sequence[float]) -> torch.Tensor:
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).double()


def _affine_grid(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``F.affine_grid(theta[None], [1, 1, *shape], align_corners=False)`` by broadcasting.

    Same values, ~7x faster on CPU: the built-in multiplies a [D*H*W, 4] base grid by theta in one skinny
    matmul, here each axis contributes a small [n, 3] table and one add makes the [D, H, W, 3] grid.
    """
    d, h, w = shape

    def coords(n: int) -> torch.Tensor:  # voxel centres in [-1, 1] (align_corners=False)
        return (torch.arange(n, dtype=theta.dtype, device=theta.device) * 2 + 1) / n - 1

    zs, ys, xs = coords(d).view(d, 1, 1, 1), coords(h).view(1, h, 1, 1), coords(w).view(1, 1, w, 1)
    return ((xs * theta[:, 0] + ys * theta[:, 1]) + (zs * theta[:, 2] + theta[:, 3]))[None]


def _affine(x: torch.Tensor, rotation: torch.Tensor, scale: float) -> torch.Tensor:
    """Rotate and zoom about the centre, in voxel units (so a non-cubic grid is not sheared)."""
    # affine_grid's normalised coordinates are ordered (W, H, D); convert voxel-space R/s into them.
    half = torch.tensor([x.shape[3], x.shape[2], x.shape[1]], dtype=torch.float64) / 2
    theta = torch.zeros(3, 4, dtype=torch.float64)
    theta[:, :3] = torch.diag(1 / half) @ (rotation / scale) @ torch.diag(half)
    grid = _affine_grid(theta.to(device=x.device, dtype=x.dtype), x.shape[1:])
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _masked_stats(x: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the foreground (vectorised: boolean indexing is slow on CPU)."""
    w = fg.to(x.dtype)
    n = w.sum(dim=(1, 2, 3), keepdim=True).clamp_min(2)
    mean = (x * w).sum(dim=(1, 2, 3), keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(dim=(1, 2, 3), keepdim=True) / (n - 1)
    return mean, var.sqrt()


def _gamma(x: torch.Tensor, fg: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """nnU-Net-style gamma on the foreground: rescale to [0, 1], power, back; then restore mean and std."""
    lo = torch.where(fg, x, torch.inf).amin(dim=(1, 2, 3), keepdim=True)
    hi = torch.where(fg, x, -torch.inf).amax(dim=(1, 2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    mean, std = _masked_stats(x, fg)
    y = ((x - lo) / span).clamp(0, 1) ** gamma * span + lo
    new_mean, new_std = _masked_stats(y, fg)
    return (y - new_mean) / new_std.clamp_min(1e-6) * std + mean


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """A randomly augmented copy of ``x`` (``[C, D, H, W]`` float32); ``x`` itself is not modified."""
    if x.ndim != 4:
        raise ValueError(f"augment expects [C, D, H, W], got shape {tuple(x.shape)}")
    g, c = generator, x.shape[0]
    # Draw everything up front, in a fixed order.
    fire = torch.rand(4, generator=g)  # affine, intensity, gamma, noise
    angles = _uniform(g, -1.0, 1.0, 3) * math.radians(cfg.max_rotation_deg)
    scale = float(_uniform(g, *cfg.scale_range))
    flips = torch.rand(3, generator=g)
    i_scale = _uniform(g, *cfg.intensity_scale, c).float()
    i_shift = _uniform(g, -cfg.intensity_shift, cfg.intensity_shift, c).float()
    gammas = _uniform(g, *cfg.gamma_range, c)
    sigma = float(_uniform(g, *cfg.noise_std))
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))

    out = x
    if fire[0] < cfg.p_affine:
        out = _affine(out, _rotation(angles.tolist()), scale)
    dims = [1 + a for a in cfg.flip_axes if flips[a] < cfg.p_flip]
    if dims:
        out = torch.flip(out, dims)
    fg = (out != 0).any(dim=0, keepdim=True).expand_as(out)
    if fire[1] < cfg.p_intensity:
        i_scale, i_shift = i_scale.to(out.device).view(c, 1, 1, 1), i_shift.to(out.device).view(c, 1, 1, 1)
        out = torch.where(fg, out * i_scale + i_shift, out)
    if fire[2] < cfg.p_gamma:
        out = torch.where(fg, _gamma(out, fg, gammas.to(out.device, out.dtype).view(c, 1, 1, 1)), out)
    if fire[3] < cfg.p_noise and sigma > 0:
        noise_gen = torch.Generator(device=out.device).manual_seed(noise_seed)
        noise = torch.randn(out.shape, generator=noise_gen, device=out.device, dtype=out.dtype) * sigma
        out = torch.where(fg, out + noise, out)
    return out if out is not x else x.clone()


class Augmenter:
    """``Augmenter(cfg, seed)(x, epoch, index)``: the reproducible per-sample augmentation."""

    def __init__(self, cfg: AugmentConfig | None = None, seed: int = 0):
        self.cfg = cfg or AugmentConfig()
        self.seed = int(seed)

    def __call__(self, x: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        return augment(x, self.cfg, sample_generator(self.seed, epoch, index))

    def batch(self, x: torch.Tensor, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        """Augment a batch ``[N, C, D, H, W]`` sample by sample, on the batch's device.

        For GPU training: at 128³ an H100 augments a sample in a few ms, a CPU core needs ~0.1-0.2 s, so
        CPU workers cannot keep up with a fast GPU.  Sample ``indices[i]`` gets the same random parameters
        as ``VolumeDataset(..., augment=cfg)[indices[i]]`` would.
        """
        return torch.stack([self(x[i], epoch, int(k)) for i, k in enumerate(indices)])
