"""The shared preprocessing: config contract, orientation, crop, normalisation, resize, and the way back."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from helpers_nifti import LPS, SHAPE, make_subject, phantom, save_nifti
from scipy import ndimage

from medcli.data import preprocess as pp
from medcli.data.preprocess import PreprocessConfig, preprocess, to_original_grid
from medcli.errors import DataError, UsageError

SMALL = dict(input_size=(16, 16, 16), crop_margin=2)


# --- config ------------------------------------------------------------------------------------------


def test_config_defaults_and_json_round_trip():
    cfg = PreprocessConfig()
    assert cfg.modalities == ("t1ce",) and cfg.input_size == (128, 128, 128) and cfg.orientation == "RAS"
    d = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict(d).key() == cfg.key()


def test_config_normalises_spellings_so_keys_match():
    a = PreprocessConfig(modalities=["T1CE", "flair"], input_size=64, clip_percentiles=[1, 99])
    b = PreprocessConfig(modalities=("t1ce", "flair"), input_size=(64, 64, 64), clip_percentiles=(1.0, 99.0))
    c = PreprocessConfig(
        modalities=("t1c", "T2F"), input_size=64, clip_percentiles=(1, 99)
    )  # BraTS 2023 names
    assert a == b == c and a.key() == b.key() == c.key()
    assert a.in_channels == 2
    for bad, why in ((("t1ce", "seg"), "unknown modality 'seg'"), (("t1ce", "t1c"), "one sequence twice")):
        with pytest.raises(UsageError, match=why):
            PreprocessConfig(modalities=bad)


@pytest.mark.parametrize(
    "change",
    [
        {"modalities": ("flair",)},
        {"modalities": ("t1ce", "flair")},
        {"input_size": 96},
        {"crop_margin": 0},
        {"clip_percentiles": (1.0, 99.0)},
        {"orientation": "LPS"},
    ],
)
def test_every_setting_changes_the_key(change):
    assert PreprocessConfig(**change).key() != PreprocessConfig().key()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"modalities": ()},
        {"modalities": ("t1ce", "T1CE")},
        {"input_size": (128, 128)},
        {"input_size": 2},
        {"crop_margin": -1},
        {"clip_percentiles": (99.0, 1.0)},
        {"orientation": "RAR"},
    ],
)
def test_invalid_config_is_a_usage_error(kwargs):
    with pytest.raises(UsageError):
        PreprocessConfig(**kwargs)


def test_unknown_version_or_setting_is_refused():
    d = PreprocessConfig().to_dict()
    with pytest.raises(DataError, match="version 99"):
        PreprocessConfig.from_dict({**d, "version": 99})
    with pytest.raises(DataError, match="resample_mm"):
        PreprocessConfig.from_dict({**d, "resample_mm": 1.0})


# --- preprocess --------------------------------------------------------------------------------------


def test_output_shape_dtype_and_channel_order(tmp_path):
    paths = make_subject(tmp_path / "S1", ("t1", "t1ce", "flair"))
    cfg = PreprocessConfig(modalities=("flair", "t1ce"), **SMALL)
    out = preprocess(paths, cfg)
    assert out.array.shape == (2, 16, 16, 16) and out.array.dtype == np.float32
    single = preprocess(paths, PreprocessConfig(modalities=("t1ce",), **SMALL)).array
    np.testing.assert_array_equal(out.array[1], single[0])


def test_deterministic(tmp_path):
    paths = make_subject(tmp_path / "S1", ("t1ce", "flair"))
    cfg = PreprocessConfig(modalities=("t1ce", "flair"), **SMALL)
    a, b = preprocess(paths, cfg), preprocess(paths, cfg)
    assert a.array.tobytes() == b.array.tobytes()
    assert a.geometry == b.geometry


def test_orientation_does_not_change_the_input(tmp_path):
    data = phantom(seed=3, blob_at=(8, 10, 6)).astype(np.int16)
    lps = save_nifti(tmp_path / "lps_t1ce.nii.gz", data, LPS)
    ras_affine = LPS @ nib.orientations.inv_ornt_aff([[0, -1], [1, -1], [2, 1]], data.shape)
    ras = save_nifti(tmp_path / "ras_t1ce.nii.gz", data[::-1, ::-1, :], ras_affine)
    cfg = PreprocessConfig(**SMALL)
    a, b = preprocess({"t1ce": lps}, cfg).array, preprocess({"t1ce": ras}, cfg).array
    np.testing.assert_array_equal(a, b)


def test_crop_and_normalisation_before_resize(tmp_path):
    paths = make_subject(tmp_path / "S1", ("t1ce", "flair"))
    raw = np.stack([nib.as_closest_canonical(nib.load(str(paths[m]))).get_fdata() for m in ("t1ce", "flair")])
    brain = (raw != 0).any(axis=0)
    idx = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    margin = 2
    expect_box = tuple(
        (max(int(i[0]) - margin, 0), min(int(i[-1]) + 1 + margin, n))
        for i, n in zip(idx, brain.shape, strict=True)
    )
    # Resize is skipped when the target equals the crop, which exposes the normalised crop itself.
    crop_shape = tuple(b - a for a, b in expect_box)
    cfg = PreprocessConfig(modalities=("t1ce", "flair"), input_size=crop_shape, crop_margin=margin)
    out = preprocess(paths, cfg)
    assert out.geometry.crop == expect_box
    sl = tuple(slice(a, b) for a, b in expect_box)
    brain_crop = brain[sl]
    assert not brain_crop[0].any() or expect_box[0][0] == 0  # the margin holds background only
    for c in range(2):
        inside, outside = out.array[c][brain_crop], out.array[c][~brain_crop]
        assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4
        assert np.all(outside == 0.0)
        # Clipping: nothing beyond the brain's 0.5/99.5 percentiles survives.
        values = raw[c][sl][brain_crop]
        lo, hi = np.percentile(values, (0.5, 99.5))
        z_hi = (hi - np.clip(values, lo, hi).mean()) / np.clip(values, lo, hi).std()
        assert inside.max() == pytest.approx(z_hi, rel=1e-4)


def test_warnings_for_inputs_unlike_brats(tmp_path):
    """Skull-stripped and oriented: no warning; noise in the air (not skull-stripped) or a header without
    orientation: one warning each, naming what to do."""
    cfg = PreprocessConfig(modalities=("t1ce",), input_size=16)
    clean = make_subject(tmp_path / "clean")
    assert preprocess(clean, cfg).warnings == ()

    head = phantom(seed=1)
    head[head == 0] = 1 + np.abs(np.random.default_rng(0).normal(0, 3, head.shape))[head == 0]  # air: noise
    noisy = save_nifti(tmp_path / "head" / "head_t1ce.nii.gz", head)
    (warning,) = preprocess({"t1ce": noisy}, cfg).warnings
    assert "100% of the voxels are non-zero" in warning and "skull-strip it first" in warning

    bare = tmp_path / "bare" / "bare_t1ce.nii.gz"
    bare.parent.mkdir()
    nib.save(nib.Nifti1Image(phantom().astype(np.int16), None), str(bare))  # qform and sform codes 0
    (warning,) = preprocess({"t1ce": bare}, cfg).warnings
    assert warning.startswith("bare_t1ce.nii.gz: no orientation in its header") and "dcm2niix" in warning


def test_missing_modality_names_subject_and_needs(tmp_path):
    paths = make_subject(tmp_path / "BraTS20_Training_007", ("t1ce",))
    cfg = PreprocessConfig(modalities=("t1ce", "flair"), **SMALL)
    with pytest.raises(DataError, match="BraTS20_Training_007: missing modality flair") as info:
        preprocess(paths, cfg, subject_id="BraTS20_Training_007")
    assert "needs t1ce, flair" in str(info.value)


def test_modalities_on_different_grids_are_refused(tmp_path):
    t1ce = save_nifti(tmp_path / "s_t1ce.nii.gz", phantom())
    other_shape = save_nifti(tmp_path / "s_flair.nii.gz", phantom((24, 28, 22)))
    shifted = LPS.copy()
    shifted[0, 3] += 2.0
    other_affine = save_nifti(tmp_path / "s_t2.nii.gz", phantom(), shifted)
    with pytest.raises(DataError, match="flair .* has grid"):
        preprocess({"t1ce": t1ce, "flair": other_shape}, PreprocessConfig(modalities=("t1ce", "flair")))
    with pytest.raises(DataError, match="different affines"):
        preprocess({"t1ce": t1ce, "t2": other_affine}, PreprocessConfig(modalities=("t1ce", "t2")))


def test_bad_file_inside_a_subject_names_the_file(tmp_path):
    paths = make_subject(tmp_path / "S1", ("t1ce",))
    paths["t1ce"].write_bytes(paths["t1ce"].read_bytes()[:200])
    with pytest.raises(DataError, match="S1_t1ce.nii.gz"):
        preprocess(paths, PreprocessConfig(**SMALL))


def test_a_brain_of_a_single_intensity_is_refused_naming_the_file(tmp_path):
    """A brain mask or label map given as a scan (one value over the brain) would normalise to all zeros and
    be graded near the prior without a word; it is refused, naming the file and the modality wanted."""
    paths = make_subject(tmp_path / "S1", ("t1ce", "flair"))
    mask = (phantom() > 0).astype(np.int16)
    save_nifti(paths["flair"], mask)
    with pytest.raises(DataError, match=r"S1_flair.nii.gz: the brain holds a single intensity \(1\)") as e:
        preprocess(paths, PreprocessConfig(modalities=("t1ce", "flair"), input_size=(16, 16, 16)))
    assert "pass the flair scan itself" in e.value.hint
    preprocess(paths, PreprocessConfig(modalities=("t1ce",), input_size=(16, 16, 16)))  # the scan is fine


# --- back to the original grid -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "affine",
    [LPS, np.array([[0, 0, 1.2, 0], [-1.0, 0, 0, 30], [0, 1.0, 0, -4], [0, 0, 0, 1]])],
    ids=["lps", "permuted"],
)
def test_to_original_grid_round_trip_keeps_blob_centre(tmp_path, affine):
    blob = (7.0, 17.0, 12.0)
    data = phantom(seed=1, blob_at=blob)
    path = save_nifti(tmp_path / "b_t1ce.nii.gz", data, affine)
    out = preprocess({"t1ce": path}, PreprocessConfig(input_size=(20, 16, 24), crop_margin=1))
    back, back_affine = to_original_grid(out.array[0], out.geometry)
    assert back.shape == SHAPE and back.dtype == np.float32
    np.testing.assert_allclose(back_affine, affine)

    hot = np.where(back > 3.0, back, 0.0)  # the blob is many SDs above the brain
    assert hot.any()
    com = np.array(ndimage.center_of_mass(hot))
    assert np.linalg.norm(com - np.array(blob)) < 1.5, com
    # Outside the crop box (in the file's grid) everything is background.
    assert back[data == 0].max() <= back.max() * 0.5


def test_model_affine_places_model_voxels_in_world(tmp_path):
    blob = (7.0, 17.0, 12.0)
    path = save_nifti(tmp_path / "b_t1ce.nii.gz", phantom(seed=1, blob_at=blob), LPS)
    out = preprocess({"t1ce": path}, PreprocessConfig(input_size=(32, 32, 32), crop_margin=1))
    hot = np.where(out.array[0] > 3.0, out.array[0], 0.0)
    com_model = np.array([*ndimage.center_of_mass(hot), 1.0])
    world_from_model = out.geometry.model_affine @ com_model
    world_true = LPS @ np.array([*blob, 1.0])
    assert np.linalg.norm(world_from_model[:3] - world_true[:3]) < 1.5


def test_to_original_grid_rejects_a_wrong_shape(tmp_path):
    paths = make_subject(tmp_path / "S1")
    out = preprocess(paths, PreprocessConfig(**SMALL))
    with pytest.raises(DataError, match="does not match the model grid"):
        to_original_grid(np.zeros((8, 8, 8)), out.geometry)


def test_geometry_survives_json(tmp_path):
    paths = make_subject(tmp_path / "S1")
    geo = preprocess(paths, PreprocessConfig(**SMALL)).geometry
    again = pp.Geometry.from_dict(json.loads(json.dumps(geo.to_dict())))
    assert again == geo


@pytest.mark.slow
def test_full_size_four_modality_subject_is_preprocessed_and_timed():
    """A full-size 4-modality subject end to end.  Its speed target (1.5 s on one core) is the bench's
    (`medcli bench --sections data`), not a timed assertion on a shared machine."""
    details = {}
    seconds = pp.bench_preprocess(repeats=1, details=details)
    assert 0 < details["read_seconds"] < seconds, (seconds, details)


def test_label_maps_go_back_with_nearest(tmp_path):
    paths = make_subject(tmp_path / "S1")
    out = preprocess(paths, PreprocessConfig(input_size=(12, 20, 16), crop_margin=1))
    mask = (out.array[0] > 0.5).astype(np.float32)
    back, _ = to_original_grid(mask, out.geometry, mode="nearest")
    assert set(np.unique(back)) <= {0.0, 1.0} and back.sum() > 0
