"""Reading NIfTI volumes: one place that turns a file into a checked float32 array on a known grid.

Every image medcli reads goes through :func:`read_nifti`, so a broken file fails the same way in ``data
prepare``, ``train`` and ``predict``: a :class:`~medcli.errors.DataError` naming the file and saying what
to do.  Volumes are reoriented to a canonical axis order (RAS by default: array axis 0 runs to the Right,
1 to Anterior, 2 to Superior) because redistributed BraTS copies disagree on orientation (LPS, RAS, ...);
the orientation transform is kept so model-space maps can be written back onto the original file's grid.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from medcli.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class NiftiVolume:
    """A volume reoriented to ``orientation``, plus what is needed to go back to the file's own grid.

    ``data`` may be a view on the file's (possibly integer) voxels; :func:`load_volume` returns a
    contiguous float32 copy.  ``ornt`` is nibabel's orientation transform from the file's voxel axes to the
    canonical ones (rows ``[new axis, flip]``); ``original_shape``/``original_affine`` describe the file.
    """

    data: np.ndarray
    affine: np.ndarray
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    ornt: np.ndarray
    path: Path
    # False when the header holds no orientation (qform and sform codes 0): nibabel then reads the voxel
    # axes as LAS, a guess that may mirror the scan against others.
    oriented: bool = True


def _fail(path: Path, what: str, todo: str) -> DataError:
    return DataError(f"{path}: {what}", hint=todo)


def misnamed_compression(path: Path) -> tuple[str, str] | None:
    """(what, what to do) when the file's bytes and its name disagree about gzip: nibabel decides by the
    name alone, so a scan saved as ``.nii.gz`` without compression (or the reverse) reads as corrupt."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    gzipped = head[:2] == b"\x1f\x8b"
    named_gz = path.name.lower().endswith(".gz")
    nifti = any(int.from_bytes(head, order) in (348, 540) for order in ("little", "big"))
    if named_gz and not gzipped and nifti:
        return "is an uncompressed NIfTI file named .gz", "rename it to end in .nii (or gzip it)"
    if gzipped and not named_gz:
        return "is gzip-compressed but its name does not end in .gz", "rename it to end in .nii.gz"
    return None


def _check_data_size(img: Any, path: Path) -> None:
    """An uncompressed file must hold the voxels its header describes: checked before they are read, so
    a truncated copy (or a damaged header claiming 2000³ voxels) is named as such instead of failing as
    "out of memory" once the array is allocated.  A compressed file's size says nothing about its content;
    its decompression fails on a truncated stream instead."""
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":  # gzip, whatever the suffix says
            return
    header = img.header
    shape = header.get_data_shape()
    need = int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    offset = getattr(img.dataobj, "offset", None)  # nibabel's: vox_offset 0 in a .nii means 352
    have = path.stat().st_size - int(header.get_data_offset() if offset is None else offset)
    if have < need:
        raise _fail(
            path,
            f"is truncated: its header describes {'×'.join(map(str, shape))} voxels ({need:,} bytes), "
            f"the file holds {max(have, 0):,} bytes of them",
            "re-copy or re-download the file",
        )


def _squeeze_to_3d(raw: np.ndarray, path: Path) -> np.ndarray:
    """Accept 3D, or 4D+ whose extra dimensions are all 1 (common for NIfTI written by some tools)."""
    if raw.ndim > 3 and all(n == 1 for n in raw.shape[3:]):
        raw = raw.reshape(raw.shape[:3])
    if raw.ndim > 3:
        raise _fail(
            path,
            f"is a {raw.ndim}D image of shape {tuple(raw.shape)}, expected one 3D volume",
            "split the series and pass one 3D volume per modality",
        )
    if raw.ndim < 3 or min(raw.shape) < 2:
        raise _fail(
            path,
            f"is a 2D image (shape {tuple(raw.shape)}), expected a 3D volume",
            "pass the full 3D scan, not a single slice",
        )
    return raw


def read_nifti(path: str | Path, orientation: str = "RAS") -> NiftiVolume:
    """Read ``path`` and reorient it to ``orientation`` without casting (a view where possible).

    Checks: the file exists and is NIfTI, decompresses completely, is 3D, has only finite values and is
    not all zero.  Voxel scaling (scl_slope/scl_inter) is applied in float32, never float64.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(
            path, "file not found", "check the path, or re-run `medcli data index` on the data folder"
        )
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, OSError, EOFError, ...
        if misnamed := misnamed_compression(path):
            raise _fail(path, *misnamed) from e
        raise _fail(
            path, f"is not a readable NIfTI file ({type(e).__name__}: {e})", "pass a .nii or .nii.gz image"
        ) from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise _fail(
            path, f"is a {type(img).__name__}, not NIfTI", "convert it to .nii.gz (e.g. with dcm2niix)"
        )
    _check_data_size(img, path)
    try:
        proxy = img.dataobj
        if hasattr(proxy, "get_unscaled"):
            raw = np.asanyarray(proxy.get_unscaled())
            slope, inter = float(proxy.slope), float(proxy.inter)
        else:  # an in-memory image
            raw, slope, inter = np.asanyarray(proxy), 1.0, 0.0
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise _fail(
            path,
            f"is truncated or corrupt ({type(e).__name__}: {e})",
            "re-copy or re-download the file; check it with `gzip -t`",
        ) from e
    except MemoryError:  # a compressed file whose header claims more voxels than fit in memory
        shape = "×".join(map(str, img.header.get_data_shape()))
        raise _fail(
            path,
            f"does not fit in memory: its header describes a {shape} volume",
            "check the file (a damaged header?), or crop or resample it before medcli reads it",
        ) from None
    raw = _squeeze_to_3d(raw, path)
    if slope != 1.0 or inter != 0.0:
        raw = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    if raw.dtype.kind == "f":
        n_bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if n_bad:
            raise _fail(
                path, f"has {n_bad} NaN/Inf voxels", "fix or re-export the image, or drop this subject"
            )
    elif raw.dtype.kind not in "iub":
        raise _fail(
            path, f"has unsupported voxel type {raw.dtype}", "re-export it as integer or float voxels"
        )
    if not raw.any():
        raise _fail(path, "is all zeros (empty image)", "re-export the image, or drop this subject")

    affine = img.affine
    if not usable_affine(affine):
        raise _fail(path, *DEGENERATE_AFFINE)
    ornt = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(tuple(orientation))
    )
    data = orientations.apply_orientation(raw, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, raw.shape)
    return NiftiVolume(
        data=data,
        affine=new_affine,
        original_shape=tuple(int(n) for n in raw.shape),
        original_affine=np.asarray(affine, dtype=np.float64),
        ornt=ornt,
        path=path,
        oriented=has_orientation(img.header),
    )


def usable_affine(affine: Any) -> bool:
    """Finite, with three voxel axes of non-zero length in independent directions (a broken converter can
    write NaN or a zero matrix; nibabel cannot tell the orientation from either)."""
    a = np.asarray(affine, dtype=np.float64)
    return bool(np.all(np.isfinite(a))) and abs(float(np.linalg.det(a[:3, :3]))) > 1e-12


DEGENERATE_AFFINE = (
    "has a degenerate affine in its header (NaN, or voxel axes of zero length or in one plane)",
    "re-export the scan with its geometry (e.g. from DICOM with dcm2niix)",
)


def has_orientation(header: Any) -> bool:
    """Whether a NIfTI header says how its voxel axes lie in the scanner (a qform or sform code > 0)."""
    return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0


NO_ORIENTATION = (
    "no orientation in its header (qform and sform codes 0): its axes are read as nibabel's default (LAS), "
    "which may mirror it"
)
NO_ORIENTATION_HINT = "re-export it with its orientation, e.g. from DICOM with dcm2niix"


def load_volume(path: str | Path, orientation: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """``(float32 array, affine)`` of ``path`` reoriented to ``orientation`` (RAS canonical by default)."""
    vol = read_nifti(path, orientation)
    return np.ascontiguousarray(vol.data, dtype=np.float32), vol.affine


def invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The transform undoing ``ornt`` (input axis i went to axis ``ornt[i, 0]``, flipped or not)."""
    ornt = np.asarray(ornt, dtype=float)
    inverse = np.empty_like(ornt)
    for i, (axis, flip) in enumerate(ornt):
        inverse[int(axis)] = (i, flip)
    return inverse


def to_file_grid(canonical: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`read_nifti`'s reorientation: put an array on the canonical grid back on the file's grid."""
    return np.ascontiguousarray(orientations.apply_orientation(canonical, invert_ornt(ornt)))
