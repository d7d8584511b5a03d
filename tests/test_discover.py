"""Discovery of BraTS layouts and CSV manifests from real (tiny) NIfTI trees, quirks and problems included."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_data import TINY, copy_tree, lps_affine, truncate, write_subject, write_volume

from medcli.data import MODALITIES
from medcli.data.discover import Subject, discover
from medcli.data.synth import synth_cohort
from medcli.errors import DataError

N = 12


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    """One synthetic cohort per layout (same seed: the 2019 and 2020 ones are the same patients)."""
    base = tmp_path_factory.mktemp("cohorts")
    out = {}
    for layout in ("2020", "2019", "csv"):
        out[layout] = synth_cohort(
            base / "both" / layout if layout != "csv" else base / "csv", N, TINY, layout
        ).out
    return out


def _truth(root: Path) -> dict[str, str]:
    info = json.loads((root / "synth_info.json").read_text())
    return {s["subject_id"]: s["grade"] for s in info["subjects"]}


def _problem(cohort, subject_id: str):
    hits = [p for p in cohort.problems if p.subject == subject_id]
    assert hits, f"no problem recorded for {subject_id}: {cohort.problems}"
    return hits[0]


# ----------------------------------------------------------------------------------------------- layouts


def test_brats2020_flat_layout_grades_from_name_mapping(cohorts):
    cohort = discover(cohorts["2020"])
    assert cohort.layout == "brats2020"
    assert not cohort.problems
    assert {s.subject_id: s.grade for s in cohort.subjects} == _truth(cohorts["2020"])
    s = cohort.subjects[0]
    assert s.subject_id == "BraTS20_Training_001"
    assert list(s.paths) == list(MODALITIES)
    assert s.paths["t1ce"].name == "BraTS20_Training_001_t1ce.nii.gz"
    assert s.seg is not None and s.seg.name.endswith("_seg.nii.gz")
    assert s.patient_id == s.subject_id and s.source == "brats2020"
    assert s.label == (1 if s.grade == "HGG" else 0)
    assert cohort.required_modalities == MODALITIES


def test_brats2019_graded_folders(cohorts):
    cohort = discover(cohorts["2019"])
    assert cohort.layout == "brats2019"
    truth = _truth(cohorts["2019"])
    assert {s.subject_id: s.grade for s in cohort.subjects} == truth
    for s in cohort.subjects:
        assert s.paths["t1"].parent.parent.name == s.grade  # the grade folder


def test_csv_manifest_in_folder_and_as_file(cohorts):
    by_folder = discover(cohorts["csv"])
    by_file = discover(cohorts["csv"] / "manifest.csv")
    assert by_folder.layout == by_file.layout == "csv"
    assert [s.to_dict() for s in by_folder.subjects] == [s.to_dict() for s in by_file.subjects]
    assert {s.subject_id: s.grade for s in by_folder.subjects} == _truth(cohorts["csv"])
    assert by_folder.subjects[0].patient_id == "patient_001"


def test_csv_with_numeric_labels_shared_patients_and_partial_columns(tmp_path):
    for sid in ("a1", "a2", "b1", "c1"):
        write_subject(tmp_path / "scans", sid, ("t1ce", "flair"))
    rows = [
        ("Subject_ID", "Patient", "Label", "T1c", "FLAIR"),  # aliases and capitals
        ("a1", "pa", "1", "scans/a1/a1_t1ce.nii.gz", "scans/a1/a1_flair.nii.gz"),
        ("a2", "pa", "1", "scans/a2/a2_t1ce.nii.gz", "scans/a2/a2_flair.nii.gz"),
        ("b1", "pb", "0", "scans/b1/b1_t1ce.nii.gz", "scans/b1/b1_flair.nii.gz"),
        ("c1", "", "", "scans/c1/c1_t1ce.nii.gz", "scans/c1/c1_flair.nii.gz"),
    ]
    manifest = tmp_path / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cohort = discover(manifest)
    by_id = {s.subject_id: s for s in cohort.subjects}
    assert set(by_id) == {"a1", "a2", "b1", "c1"}
    assert by_id["a1"].patient_id == by_id["a2"].patient_id == "pa"
    assert by_id["c1"].patient_id == "c1"  # defaults to the subject id
    assert (by_id["a1"].grade, by_id["b1"].grade, by_id["c1"].grade) == ("HGG", "LGG", None)
    assert cohort.required_modalities == ("t1ce", "flair")  # only the columns the manifest has
    assert by_id["b1"].paths["t1ce"] == tmp_path / "scans/b1/b1_t1ce.nii.gz"
    assert [s.subject_id for s in cohort.require_labels()] == ["a1", "a2", "b1"]
    assert _problem(cohort, "c1").severity == "warning"


@pytest.mark.parametrize(
    ("name", "delimiter", "bom"),
    [("cohort.csv", ";", True), ("cohort.tsv", "\t", False), ("cohort.csv", "\t", False)],
)
def test_a_spreadsheet_manifest_with_semicolons_or_tabs(tmp_path, name, delimiter, bom):
    """Excel where the comma is the decimal mark saves semicolons (with a byte-order mark); .tsv has tabs."""
    for sid in ("a1", "b1"):
        write_subject(tmp_path / "scans", sid, ("t1ce",))
    lines = (
        ["subject_id", "label", "t1ce"],
        ["a1", "HGG", "scans/a1/a1_t1ce.nii.gz"],
        ["b1", "0", "scans/b1/b1_t1ce.nii.gz"],
    )
    text = "\r\n".join(delimiter.join(row) for row in lines) + "\r\n"
    (tmp_path / name).write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    for root in (tmp_path / name, tmp_path):  # the file itself, or the folder holding it
        cohort = discover(root)
        assert {s.subject_id: s.grade for s in cohort.subjects} == {"a1": "HGG", "b1": "LGG"}, cohort.problems
        assert cohort.subjects[0].paths["t1ce"] == tmp_path / "scans/a1/a1_t1ce.nii.gz"


def test_a_manifest_written_on_windows(tmp_path, monkeypatch):
    """Relative paths with backslashes (a manifest saved on Windows) are the files they name with / (on Linux
    a backslash is part of a file name: "t1ce file not found"); a seg path is read as the scans' are (it
    skipped ~); a Windows drive path nothing can resolve says so."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for sid in ("a1", "b1"):
        write_subject(tmp_path / "scans", sid, ("t1ce",))
    write_subject(tmp_path / "home", "seg1", ("seg",))
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "subject_id,label,t1ce,seg\n"
        "a1,HGG,scans\\a1\\a1_t1ce.nii.gz,~/seg1/seg1_seg.nii.gz\n"
        "b1,LGG,scans/b1/b1_t1ce.nii.gz,\n"
        "c1,LGG,C:\\data\\c1_t1ce.nii.gz,\n"
    )
    cohort = discover(manifest)
    by_id = {s.subject_id: s for s in cohort.subjects}
    assert set(by_id) == {"a1", "b1"}
    assert by_id["a1"].paths["t1ce"] == tmp_path / "scans/a1/a1_t1ce.nii.gz"
    assert by_id["a1"].seg == tmp_path / "home/seg1/seg1_seg.nii.gz"
    problem = _problem(cohort, "c1")
    assert problem.what == "t1ce file not found" and "written for Windows" in problem.hint


def test_csv_bad_label_missing_file_and_not_a_manifest(tmp_path):
    write_subject(tmp_path, "x", ("t1ce",))
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,grade,t1ce\nx,GBM,x/x_t1ce.nii.gz\ny,LGG,y/missing_t1ce.nii.gz\n")
    cohort = discover(manifest)
    assert [s.subject_id for s in cohort.subjects] == ["x"] and cohort.subjects[0].grade is None
    assert "'GBM'" in _problem(cohort, "x").what
    assert "not found" in _problem(cohort, "y").what
    assert [s.subject_id for s in cohort.excluded] == ["y"]

    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a subject manifest"):
        discover(other)


def test_brats2018_capitalisation_and_uncompressed_nii(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    write_subject(root / "HGG", "Brats18_CBICA_AAB_1", ext=".nii")
    write_subject(root / "LGG", "Brats18_2013_0_1")
    (root / "survival_data.csv").write_text("Brats18ID,Age,Survival\nBrats18_CBICA_AAB_1,60,289\n")
    cohort = discover(root)
    assert cohort.layout == "brats2018"
    assert {s.subject_id: s.grade for s in cohort.subjects} == {
        "Brats18_CBICA_AAB_1": "HGG",
        "Brats18_2013_0_1": "LGG",
    }
    hgg = next(s for s in cohort.subjects if s.grade == "HGG")
    assert hgg.paths["flair"].name == "Brats18_CBICA_AAB_1_flair.nii"
    # One grade folder on its own keeps its grade.
    assert [(s.subject_id, s.grade) for s in discover(root / "LGG").subjects] == [("Brats18_2013_0_1", "LGG")]


def test_odd_segmentation_name_of_training_355(tmp_path, cohorts):
    root = copy_tree(cohorts["2020"], tmp_path / "b20")
    folder = root / "BraTS20_Training_003"
    (folder / "BraTS20_Training_003_seg.nii.gz").rename(folder / "W39_1998.09.19_Segm.nii.gz")
    cohort = discover(root)
    s = next(s for s in cohort.subjects if s.subject_id == "BraTS20_Training_003")
    assert s.seg is not None and s.seg.name == "W39_1998.09.19_Segm.nii.gz"
    assert not cohort.problems


def test_brats2021_has_no_grade_and_is_refused_for_training(tmp_path):
    root = tmp_path / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData"
    for sid in ("BraTS2021_00000", "BraTS2021_00002"):
        write_subject(root, sid)
    cohort = discover(root)
    assert cohort.layout == "brats2021"
    assert len(cohort.subjects) == 2 and all(s.grade is None and s.label is None for s in cohort.subjects)
    assert any("no LGG/HGG grade" in n for n in cohort.notes)
    with pytest.raises(DataError, match="no LGG/HGG grade") as e:
        cohort.require_labels()
    assert "predict" in str(e.value)


def test_brats2023_modality_names_map_to_canonical(tmp_path):
    write_subject(tmp_path / "gli", "BraTS-GLI-00000-000", ("t1n", "t1c", "t2w", "t2f", "seg"), sep="-")
    cohort = discover(tmp_path / "gli")
    assert cohort.layout == "brats2023"
    s = cohort.subjects[0]
    assert s.paths["t1ce"].name == "BraTS-GLI-00000-000-t1c.nii.gz"
    assert s.paths["flair"].name.endswith("-t2f.nii.gz") and s.paths["t1"].name.endswith("-t1n.nii.gz")


def test_flat_folders_without_name_mapping_are_unlabelled(tmp_path, cohorts):
    root = copy_tree(cohorts["2020"], tmp_path / "b20")
    (root / "name_mapping.csv").unlink()
    cohort = discover(root)
    assert len(cohort.subjects) == N and cohort.grade_counts()["unlabelled"] == N
    with pytest.raises(DataError, match="name_mapping.csv"):
        cohort.require_labels()


def test_2019_and_2020_are_deduplicated_through_name_mapping(cohorts):
    parent = cohorts["2020"].parent  # holds both years
    for cohort in (discover(parent), discover(cohorts["2019"], cohorts["2020"])):
        assert len(cohort.subjects) == N
        assert {s.source for s in cohort.subjects} == {"brats2020"}  # the newer copy is kept
        assert set(cohort.layout.split("+")) == {"brats2019", "brats2020"}
        assert any(f"{N} brats2019 subjects reappear in brats2020" in n for n in cohort.notes)


def test_same_root_twice_is_not_a_duplicate(cohorts):
    assert len(discover(cohorts["2020"], cohorts["2020"]).subjects) == N


# ----------------------------------------------------------------------------------------------- problems


def test_problem_subjects_are_reported_and_set_aside(tmp_path, cohorts):
    root = copy_tree(cohorts["2020"], tmp_path / "b20")

    def f(i: int, modality: str) -> Path:
        return root / f"BraTS20_Training_{i:03d}" / f"BraTS20_Training_{i:03d}_{modality}.nii.gz"

    f(1, "flair").unlink()  # missing modality
    truncate(f(2, "t1ce"))  # interrupted download
    f(3, "t2").write_text("<html>Access denied</html>")  # not a NIfTI at all
    write_volume(f(4, "t1"), shape=(20, 24, 16))  # a different grid
    shifted = lps_affine()
    shifted[0, 3] += 5.0
    write_volume(f(5, "t2"), affine=shifted)  # same shape, different position
    write_volume(f(6, "t1").with_name("BraTS20_Training_006_t1.nii"))  # a second t1 file

    cohort = discover(root)
    expected = {
        "BraTS20_Training_001": "missing flair",
        "BraTS20_Training_002": "truncated",
        "BraTS20_Training_003": "HTML",
        "BraTS20_Training_004": "shape (20, 24, 16) differs",
        "BraTS20_Training_005": "affine differs",
        "BraTS20_Training_006": "2 files for t1",
    }
    for sid, what in expected.items():
        problem = _problem(cohort, sid)
        assert what in problem.what and problem.hint and problem.severity == "error"
    assert sorted(s.subject_id for s in cohort.excluded) == sorted(expected)
    assert len(cohort.subjects) == N - len(expected)
    assert not set(expected) & {s.subject_id for s in cohort.subjects}
    json.dumps(cohort.to_dict())  # JSON-ready, problems included


def test_required_modalities_decide_what_is_missing(tmp_path, cohorts):
    root = copy_tree(cohorts["2020"], tmp_path / "b20")
    (root / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz").unlink()
    assert len(discover(root).subjects) == N - 1
    cohort = discover(root, modalities=["T1c"])  # alias accepted
    assert len(cohort.subjects) == N and cohort.required_modalities == ("t1ce",)
    with pytest.raises(DataError, match="unknown modality"):
        discover(root, modalities=["dwi"])


def test_truncated_uncompressed_file_is_caught_from_its_size(tmp_path):
    root = tmp_path / "flat"
    write_subject(root, "case1", ext=".nii")
    truncate(root / "case1" / "case1_t2.nii", keep=0.8)
    cohort = discover(root)
    assert "truncated" in _problem(cohort, "case1").what
    with pytest.raises(DataError, match="no usable subject"):
        cohort.require_usable()


def test_bad_segmentation_is_a_warning_only(tmp_path):
    root = tmp_path / "flat"
    write_subject(root, "case1")
    write_volume(root / "case1" / "case1_seg.nii.gz", shape=(16, 16, 16), dtype=np.uint8)
    cohort = discover(root)
    assert len(cohort.subjects) == 1 and cohort.subjects[0].seg is None
    assert _problem(cohort, "case1").severity == "warning"


def _unoriented(path: Path) -> Path:
    """A volume whose header says nothing about orientation (qform and sform codes 0)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(TINY, dtype=np.int16)
    data[2:-2, 2:-2, 2:-2] = 100
    nib.save(nib.Nifti1Image(data, None), str(path))
    assert int(nib.load(str(path)).header["sform_code"]) == 0
    return path


def test_scan_without_orientation_is_a_warning_and_an_unusable_cohort_names_its_error(tmp_path):
    root = tmp_path / "flat"
    for m in MODALITIES:
        _unoriented(root / "case1" / f"case1_{m}.nii.gz")
    cohort = discover(root)
    assert len(cohort.subjects) == 1  # kept: a warning, not an error
    warnings = [p for p in cohort.problems if p.severity == "warning"]
    assert len(warnings) == 4 and all("no orientation in its header" in p.what for p in warnings)
    assert "dcm2niix" in warnings[0].hint

    write_volume(root / "case1" / "case1_t1ce.nii.gz")  # an oriented t1ce: the others no longer align
    with pytest.raises(DataError, match="t1 affine differs from t1ce"):  # the error, not the warnings
        discover(root).require_usable()


def test_nothing_found_and_missing_path_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BraTS subjects or CSV manifest"):
        discover(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    single = write_volume(tmp_path / "scan_t1ce.nii.gz")
    with pytest.raises(DataError, match="single NIfTI file"):
        discover(single)


def test_dicom_is_recognised_and_the_conversion_named(tmp_path):
    series = tmp_path / "dicom" / "series1"
    series.mkdir(parents=True)
    for i in range(3):  # Part-10 files: 128-byte preamble, then "DICM"; no extension, as scanners write them
        (series / f"IM{i:04d}").write_bytes(bytes(128) + b"DICM" + bytes(200))
    with pytest.raises(DataError, match="holds DICOM files, not NIfTI") as e:
        discover(tmp_path / "dicom")
    assert "dcm2niix" in e.value.hint
    with pytest.raises(DataError, match="is a DICOM file, not NIfTI"):
        discover(series / "IM0000")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no BraTS subjects"):  # not DICOM: the usual message
        discover(tmp_path / "other")


def test_subject_folder_itself_is_one_subject(tmp_path):
    folder = write_subject(tmp_path, "BraTS20_Training_042")
    cohort = discover(folder)
    assert [s.subject_id for s in cohort.subjects] == ["BraTS20_Training_042"]


def test_subject_grade_and_label_agree():
    assert Subject("a", grade="hgg").label == 1
    assert Subject("b", label=0).grade == "LGG"
    with pytest.raises(ValueError):
        Subject("c", grade="HGG", label=0)


def test_discovery_reads_headers_only(tmp_path, monkeypatch):
    """Voxel data are never read: a file whose image bytes are garbage (size intact) still indexes."""
    root = tmp_path / "flat"
    write_subject(root, "case1", ext=".nii")
    path = root / "case1" / "case1_t1.nii"
    raw = bytearray(path.read_bytes())
    raw[400:] = b"\xff" * (len(raw) - 400)
    path.write_bytes(bytes(raw))
    import nibabel

    def no_data(*a, **k):  # any attempt to load an image's voxels fails the test
        raise AssertionError("discover read voxel data")

    monkeypatch.setattr(nibabel.Nifti1Image, "get_fdata", no_data)
    monkeypatch.setattr(nibabel, "load", no_data)
    assert len(discover(root).subjects) == 1


def test_loose_files_of_several_subjects_are_grouped_by_name(tmp_path):
    for sid in ("p01", "p02"):
        for token in ("t1ce", "flair"):
            write_volume(tmp_path / "scans" / f"{sid}_{token}.nii.gz")
    cohort = discover(tmp_path / "scans", modalities=["t1ce", "flair"])
    assert [s.subject_id for s in cohort.subjects] == ["p01", "p02"]
    assert cohort.subjects[1].paths["flair"].name == "p02_flair.nii.gz"
    assert all(s.grade is None for s in cohort.subjects)


def test_2018_and_2020_linked_through_the_2020_mapping(tmp_path):
    old = tmp_path / "b18"
    write_subject(old / "HGG", "Brats18_CBICA_AAB_1")
    write_subject(old / "LGG", "Brats18_2013_0_1")
    new = tmp_path / "b20"
    write_subject(new, "BraTS20_Training_001")
    write_subject(new, "BraTS20_Training_002")
    (new / "name_mapping.csv").write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID\n"
        "HGG,NA,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
        "LGG,NA,NA,NA,NA,BraTS20_Training_002\n"
    )
    cohort = discover(old, new)
    assert sorted(s.subject_id for s in cohort.subjects) == [
        "BraTS20_Training_001",
        "BraTS20_Training_002",
        "Brats18_2013_0_1",  # not in the 2020 mapping: a patient of its own
    ]
    assert any("1 brats2018 subject reappears in brats2020" in n for n in cohort.notes)


def test_multi_member_gzip_is_not_mistaken_for_truncated(tmp_path):
    """bgzip or `cat a.gz b.gz` write several gzip members; the last trailer then sizes only the last one."""
    import gzip

    import nibabel as nib

    root = tmp_path / "flat"
    write_subject(root, "case1")
    path = root / "case1" / "case1_t2.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    half = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    assert nib.load(str(path)).get_fdata().shape == TINY  # readers accept it
    cohort = discover(root)
    assert [s.subject_id for s in cohort.subjects] == ["case1"], cohort.problems
    truncate(path, keep=0.7)  # cut inside the second member: still caught
    assert "truncated" in _problem(discover(root), "case1").what


def test_files_beside_subject_folders_are_noted_as_left_out(tmp_path):
    root = tmp_path / "data"
    for sid in ("S1", "S2"):
        write_subject(root, sid)
    write_volume(root / "S3_t1ce.nii.gz")  # one subject's scan lying loose beside the folders
    cohort = discover(root, modalities=("t1ce",))
    assert [s.subject_id for s in cohort.subjects] == ["S1", "S2"]
    assert any(
        "left out 1 file(s) lying beside the subject folders (S3_t1ce.nii.gz)" in n for n in cohort.left_out
    )


def test_every_sequence_spelling_medcli_knows_names_a_file(tmp_path):
    """`--modalities t1gd` was accepted (an alias of t1ce) but a file `S1_T1Gd.nii.gz` (UPenn-GBM's naming)
    was no sequence's, so its subject silently vanished; likewise `_t2-flair`."""
    root = tmp_path / "data"
    write_subject(root, "S1", ("T1Gd", "t2-flair"))
    write_subject(root, "S2", ("t1-gd", "FLAIR"), sep="-")
    cohort = discover(root, modalities=("t1ce", "flair"))
    by_id = {s.subject_id: s for s in cohort.subjects}
    assert set(by_id) == {"S1", "S2"}, cohort.problems
    assert by_id["S1"].paths == {"t1ce": root / "S1/S1_T1Gd.nii.gz", "flair": root / "S1/S1_t2-flair.nii.gz"}
    assert by_id["S2"].paths == {"t1ce": root / "S2/S2-t1-gd.nii.gz", "flair": root / "S2/S2-FLAIR.nii.gz"}


def test_folders_of_scans_not_named_by_sequence_beside_subject_folders_are_left_out_aloud(tmp_path):
    """S3/S3_t1_ce.nii.gz beside S1/ and S2/: a folder no subject came from was passed over without a word
    (data index counted 2 subjects and no problem)."""
    root = tmp_path / "data"
    for sid in ("S1", "S2"):
        write_subject(root, sid, ("t1ce",))
    write_volume(root / "S3" / "S3_t1_ce.nii.gz")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not scans")
    cohort = discover(root, modalities=("t1ce",))
    assert [s.subject_id for s in cohort.subjects] == ["S1", "S2"]
    assert cohort.left_out == [
        f"{root}: left out 1 folder(s) whose NIfTI files are not named by sequence (S3); name them "
        "<id>_t1ce.nii.gz (t1, t1ce, t2, flair; t1c, t1gd, t2f, ... too)"
    ]


@pytest.mark.parametrize("layout", ["2020", "2019"])
def test_one_subjects_folder_given_for_training_names_the_dataset_folder(cohorts, layout):
    """`--data cohort/BraTS20_Training_001` (one subject, no grade there): the hint named name_mapping.csv
    as something to put there; it is one subject of a cohort, whose folder is the one to pass."""
    root = cohorts[layout]
    subject = sorted(p for p in root.glob("*/" if layout == "2020" else "HGG/*/") if p.is_dir())[0]
    with pytest.raises(DataError) as caught:
        discover(subject).require_labels()
    assert str(caught.value).endswith(f"(this is one subject's folder: pass the dataset folder, {root})")


def test_brats_name_mapping_given_as_a_manifest_names_its_folder(cohorts):
    with pytest.raises(DataError) as caught:
        discover(cohorts["2020"] / "name_mapping.csv")
    assert str(caught.value) == (
        f"{cohorts['2020'] / 'name_mapping.csv'} is BraTS's grade table, not a subject manifest (pass the "
        f"folder that holds it and the subject folders: {cohorts['2020']})"
    )


@pytest.mark.parametrize("layout", ["2020", "2019"])
def test_a_stray_scan_in_a_dataset_one_level_down_keeps_its_subjects(cohorts, layout, tmp_path):
    """A release unzipped one level down (dl/MICCAI_BraTS2020_TrainingData/) with one scan dropped beside its
    subjects: the dataset folder itself was taken for one (ungraded) subject and the cohort vanished."""
    dataset = copy_tree(cohorts[layout], tmp_path / "dl" / "MICCAI_BraTS2020_TrainingData")
    write_volume(dataset / "stray_t1ce.nii.gz")
    cohort = discover(tmp_path / "dl", modalities=("t1ce",))
    assert sorted((s.subject_id, s.grade) for s in cohort.subjects) == sorted(_truth(dataset).items())
    if layout == "2020":
        assert any("lying beside the subject folders (stray_t1ce.nii.gz)" in n for n in cohort.left_out)


def test_graded_layouts_name_what_they_leave_out(cohorts, tmp_path):
    """BraTS 2017-2019 (HGG/, LGG/): a stray scan, a folder of scans not named by sequence, beside the grade
    folders or inside one, became no subject without a word (the flat 2020 layout said so)."""
    root = copy_tree(cohorts["2019"], tmp_path / "g")
    write_volume(root / "HGG" / "Odd_1" / "scan.nii.gz")
    write_volume(root / "HGG" / "Loose_t1ce.nii.gz")
    write_volume(root / "Extra" / "foo.nii.gz")
    write_volume(root / "Top_t2.nii.gz")
    (root / "._Top_t1ce.nii.gz").write_bytes(b"\0" * 4096)  # macOS's resource fork of a copy: not a scan
    cohort = discover(root, modalities=("t1ce",))
    assert len(cohort.subjects) == N
    assert sorted(cohort.left_out) == sorted(
        [
            f"{root}: left out 1 folder(s) whose NIfTI files are not named by sequence (Extra); name them "
            "<id>_t1ce.nii.gz (t1, t1ce, t2, flair; t1c, t1gd, t2f, ... too)",
            f"{root}: left out 1 file(s) lying beside the subject folders (Top_t2.nii.gz); move each into "
            "its subject's folder",
            f"{root / 'HGG'}: left out 1 folder(s) whose NIfTI files are not named by sequence (Odd_1); "
            "name them <id>_t1ce.nii.gz (t1, t1ce, t2, flair; t1c, t1gd, t2f, ... too)",
            f"{root / 'HGG'}: left out 1 file(s) lying beside the subject folders (Loose_t1ce.nii.gz); move "
            "each into its subject's folder",
        ]
    )
    hgg_alone = discover(root / "HGG", modalities=("t1ce",))
    assert len(hgg_alone.left_out) == 2 and all(n.startswith(f"{root / 'HGG'}:") for n in hgg_alone.left_out)


def test_manifest_duplicates_never_pass_silently(tmp_path):
    """One row repeated with another grade was kept with the first grade without a word; ids differing in
    case (c1, C1) were reported yet c1 stayed usable; one scan under two ids could sit in train and val."""
    for sid in ("c1", "c2", "c3", "c4"):
        write_volume(tmp_path / sid / f"{sid}_t1ce.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "subject_id,label,t1ce\n"
        "c1,HGG,c1/c1_t1ce.nii.gz\n"
        "c1,LGG,c1/c1_t1ce.nii.gz\n"  # the same row, another grade
        "c2,LGG,c2/c2_t1ce.nii.gz\n"
        "C2,LGG,c3/c3_t1ce.nii.gz\n"  # c2 again, in another case
        "c4,HGG,c4/c4_t1ce.nii.gz\n"
        "c5,HGG,c4/c4_t1ce.nii.gz\n"  # c4's scan under another id
        "c4,HGG,c4/c4_t1ce.nii.gz\n"  # a row repeated as it is: harmless, said nothing
    )
    cohort = discover(manifest)
    assert [s.subject_id for s in cohort.subjects] == ["c4"]
    assert "different grades (HGG and LGG)" in _problem(cohort, "c1").what
    assert "found twice (also C2 in csv)" in _problem(cohort, "c2").what
    assert "also subject c4's" in _problem(cohort, "c5").what
    assert not [p for p in cohort.problems if p.subject == "c4"]


def test_one_folder_given_twice_by_two_spellings_is_one_cohort(cohorts, monkeypatch):
    monkeypatch.chdir(cohorts["2020"].parent)
    cohort = discover(cohorts["2020"].name, cohorts["2020"])
    assert len(cohort.subjects) == N and not cohort.excluded, cohort.problems


@pytest.mark.parametrize("edit", ["lower", "upper", "semicolons"])
def test_name_mapping_as_a_spreadsheet_saved_it(cohorts, tmp_path, edit):
    """name_mapping.csv opened and saved in a spreadsheet (header case changed, or semicolons): the whole
    cohort was refused as 'not a BraTS name_mapping.csv'."""
    root = copy_tree(cohorts["2020"], tmp_path / "c")
    path = root / "name_mapping.csv"
    header, *rows = path.read_text().splitlines()
    if edit == "semicolons":
        lines = [line.replace(",", ";") for line in (header, *rows)]
    else:
        lines = [header.lower() if edit == "lower" else header.upper(), *rows]
    path.write_text("\n".join(lines) + "\n")
    cohort = discover(root)
    assert {s.subject_id: s.grade for s in cohort.subjects} == _truth(root)


def test_one_subjects_folder_is_not_said_to_lack_the_name_mapping_beside_it(cohorts):
    root = cohorts["2020"]
    subject = sorted(p for p in root.iterdir() if p.is_dir())[0]
    cohort = discover(subject)
    assert len(cohort.subjects) == 1
    assert cohort.notes == [
        f"{subject}: one subject's folder, without its grade (that is in {root / 'name_mapping.csv'}): "
        f"usable for prediction; pass the dataset folder, {root}, to train"
    ]


def test_a_subject_folder_that_cannot_be_read_is_left_out_not_fatal(cohorts):
    """chmod 000 on one subject's folder: discovery raised PermissionError for the whole cohort.  In a real
    process; as root, one without the capabilities that let root read any folder."""
    import os
    import shutil
    import subprocess
    import sys

    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every folder, and setpriv (util-linux) is not here to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    for layout in ("2020", "2019"):
        root = cohorts[layout]
        locked = sorted(root.glob("*/BraTS*" if layout == "2019" else "BraTS*"))[0]
        locked.chmod(0o000)
        try:
            result = subprocess.run(
                [*prefix, sys.executable, "-m", "medcli", "data", "index", str(root), "--json"],
                capture_output=True,
                text=True,
            )
        finally:
            locked.chmod(0o755)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert len(report["subjects"]) == N - 1
        assert report["left_out"] == [
            f"{locked.parent}: left out 1 folder(s) that cannot be read ({locked.name}); check their "
            "permissions (ls -ld)"
        ]


@pytest.mark.parametrize("layout", ["2020", "2019"])
def test_patients_name_mapping_lists_but_the_folder_lacks_are_noted(cohorts, tmp_path, layout):
    """An unzip that stopped part-way looked like a smaller cohort, without a word."""
    root = copy_tree(cohorts[layout], tmp_path / "c")
    gone = sorted(p for p in root.glob("BraTS*" if layout == "2020" else "*/BraTS*"))[:2]
    for folder in gone:
        shutil.rmtree(folder)
    cohort = discover(root)
    assert len(cohort.subjects) == N - 2
    [note] = [n for n in cohort.notes if "are not here" in n]
    assert note == (
        f"{root}: 2 of the {N} patients name_mapping.csv lists are not here (e.g. {gone[0].name}): an "
        "incomplete download or unzip?"
    )
    assert not [n for n in discover(cohorts[layout]).notes if "are not here" in n]
