"""NIfTI reading: canonical orientation, scaling, and one clear DataError per kind of broken file."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers_nifti import LPS, SHAPE, phantom, save_nifti

from medcli.data.nifti import load_volume, read_nifti, to_file_grid
from medcli.errors import DataError


def test_loads_float32_3d_in_ras(tmp_path):
    data = phantom()
    arr, affine = load_volume(save_nifti(tmp_path / "a.nii.gz", data))
    assert arr.dtype == np.float32 and arr.ndim == 3 and arr.flags.c_contiguous
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # LPS on disk: the first two axes come back reversed, values unchanged.
    np.testing.assert_array_equal(arr, data.astype(np.int16)[::-1, ::-1, :])


def test_same_scan_stored_in_two_orientations_reads_identically(tmp_path):
    data = phantom().astype(np.int16)
    lps = save_nifti(tmp_path / "lps.nii.gz", data, LPS)
    # The same voxels in RAS storage: flip the data and move the origin to the other corner.
    ras_affine = LPS @ nib.orientations.inv_ornt_aff([[0, -1], [1, -1], [2, 1]], data.shape)
    ras = save_nifti(tmp_path / "ras.nii", data[::-1, ::-1, :], ras_affine)
    a, aff_a = load_volume(lps)
    b, aff_b = load_volume(ras)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(aff_a, aff_b)


def test_transposed_storage_is_reoriented_and_invertible(tmp_path):
    data = phantom().astype(np.int16)
    # Axes stored as (S, R, A) with a permuted affine: still the same world.
    perm_affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    stored = np.transpose(data, (2, 0, 1))
    vol = read_nifti(save_nifti(tmp_path / "t.nii.gz", stored, perm_affine))
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_array_equal(to_file_grid(np.asarray(vol.data), vol.ornt), stored)
    assert vol.original_shape == stored.shape


def test_scale_slope_and_intercept_are_applied_in_float32(tmp_path):
    img = nib.Nifti1Image(np.full(SHAPE, 7, dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    arr, _ = load_volume(path)
    assert arr.dtype == np.float32
    assert np.all(arr == 24.0)


def test_singleton_fourth_dimension_is_squeezed(tmp_path):
    data = phantom()[..., None]
    arr, _ = load_volume(save_nifti(tmp_path / "4d1.nii.gz", data))
    assert arr.shape == SHAPE


@pytest.mark.parametrize(
    "name, data, dtype, message",
    [
        ("series.nii.gz", np.ones((*SHAPE, 3)), np.int16, "4D image"),
        ("slice.nii.gz", np.ones((24, 28)), np.int16, "2D image"),
        ("thin.nii.gz", np.ones((24, 28, 1)), np.int16, "2D image"),
        ("empty.nii.gz", np.zeros(SHAPE), np.int16, "all zeros"),
        ("nan.nii.gz", np.where(phantom() > 0, np.nan, 0), np.float32, "NaN/Inf"),
        ("inf.nii", np.where(phantom() > 0, np.inf, 1), np.float32, "NaN/Inf"),
    ],
)
def test_bad_images_raise_data_error_naming_the_file(tmp_path, name, data, dtype, message):
    path = save_nifti(tmp_path / name, data, dtype=dtype)
    with pytest.raises(DataError, match=message) as info:
        load_volume(path)
    assert name in str(info.value)


def test_truncated_gzip_is_a_data_error(tmp_path):
    path = save_nifti(tmp_path / "cut.nii.gz", phantom())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_volume(path)
    assert "cut.nii.gz" in str(info.value) and "re-copy" in str(info.value)


def test_truncated_uncompressed_file_is_a_data_error(tmp_path):
    path = save_nifti(tmp_path / "cut.nii", phantom())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(DataError, match="cut.nii"):
        load_volume(path)


def test_a_header_claiming_more_voxels_than_the_file_holds_is_refused_before_reading(tmp_path):
    """A damaged header of an uncompressed file (2000³ float32 voxels, 32 GB, in a 4 kB file) is named as a
    truncated file before any array is allocated; it was "out of memory (leave out --tta ...)" in predict."""
    import resource

    path = save_nifti(tmp_path / "huge.nii", phantom())
    blob = bytearray(path.read_bytes())
    blob[40:56] = np.array([3, 2000, 2000, 2000, 1, 1, 1, 1], dtype="<i2").tobytes()  # dim[0..7]
    path.write_bytes(bytes(blob))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"huge.nii: is truncated: its header describes 2000×2000×2000") as e:
        load_volume(path)
    assert "re-copy" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing allocated


def test_corrupt_gzip_stream_is_a_data_error(tmp_path):
    path = save_nifti(tmp_path / "bad.nii.gz", phantom())
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\x00" * 64  # damage the deflate stream mid-file
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="bad.nii.gz"):
        load_volume(path)


@pytest.mark.parametrize("name", ["notes.nii.gz", "notes.txt", "page.nii"])
def test_non_nifti_files_are_data_errors(tmp_path, name):
    path = tmp_path / name
    content = b"<html>not an image</html>" * 20
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=name):
        load_volume(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found") as info:
        load_volume(tmp_path / "nope_t1ce.nii.gz")
    assert "nope_t1ce.nii.gz" in str(info.value)
