"""Small real NIfTI files for the data tests: written with nibabel, a few thousand voxels each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

LPS = np.array([[-1.0, 0, 0, 23.0], [0, -1.0, 0, 27.0], [0, 0, 1.0, -5.0], [0, 0, 0, 1.0]])
"""BraTS-like: first two voxel axes run right→left and anterior→posterior."""

SHAPE = (24, 28, 20)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS, dtype=np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return path


def phantom(
    shape: Sequence[int] = SHAPE, seed: int = 0, blob_at: Sequence[float] | None = None
) -> np.ndarray:
    """An off-centre ellipsoid 'brain' (zero background) with noise and a bright blob."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [0.45 * n for n in shape]
    r2 = sum(((g - c) / (0.3 * n)) ** 2 for g, c, n in zip(grids, centre, shape, strict=True))
    brain = r2 < 1.0
    img = 300 + 40 * rng.standard_normal(shape)
    if blob_at is not None:
        b2 = sum((g - c) ** 2 for g, c in zip(grids, blob_at, strict=True))
        img = img + 900 * np.exp(-b2 / 4.0)
    img[~brain] = 0
    return img


def make_subject(
    folder: Path,
    modalities: Sequence[str] = ("t1ce",),
    shape: Sequence[int] = SHAPE,
    seed: int = 0,
    affine: np.ndarray = LPS,
    suffix: str = ".nii.gz",
) -> dict[str, Path]:
    """One subject folder in BraTS naming; each modality a slightly different phantom of the same brain."""
    paths = {}
    for i, m in enumerate(modalities):
        data = phantom(shape, seed=seed * 100 + i) * (1 + 0.5 * i)
        paths[m] = save_nifti(folder / f"{folder.name}_{m}{suffix}", data, affine)
    return paths
