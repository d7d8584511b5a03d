"""Builders for small on-disk cohorts: real NIfTI files written with nibabel, tiny grids."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

TINY = (24, 24, 16)  # voxels per side in unit tests: real files, millisecond writes


def lps_affine(shape=TINY) -> np.ndarray:
    from medcli.data.synth import brats_affine

    return brats_affine(shape)


def write_volume(path: Path, shape=TINY, affine=None, dtype=np.int16, value: int = 100) -> Path:
    """A real NIfTI volume (zero background, a bright cube) at ``path`` (.nii or .nii.gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, dtype=dtype)
    data[2:-2, 2:-2, 2:-2] = value
    nib.save(nib.Nifti1Image(data, lps_affine(shape) if affine is None else affine), str(path))
    return path


def write_subject(
    folder: Path,
    subject_id: str,
    tokens: Iterable[str] = ("t1", "t1ce", "t2", "flair", "seg"),
    *,
    sep: str = "_",
    ext: str = ".nii.gz",
    shape=TINY,
) -> Path:
    """A subject folder with one file per token, BraTS-named: ``<folder>/<id>/<id><sep><token><ext>``."""
    d = folder / subject_id
    for token in tokens:
        dtype = np.uint8 if token == "seg" else np.int16
        write_volume(
            d / f"{subject_id}{sep}{token}{ext}", shape, dtype=dtype, value=1 if token == "seg" else 100
        )
    return d


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
