"""`medcli predict` on real tiny checkpoints and real NIfTI files: ensembles, TTA, reorientation,
Grad-CAM on the original grid, partial failures and every kind of bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers_predict import LPS, brain_volume, tiny_checkpoint, write_cohort, write_nifti, write_subject

from medcli.engine import predictor as P
from medcli.errors import UsageError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny folds of one run (t1ce, input 16) and a few 24^3 subjects."""
    root = tmp_path_factory.mktemp("predict")
    run = root / "runs" / "tiny-t1ce"
    tiny_checkpoint(run / "fold0" / "best.pt", fold=0, seed=0)
    tiny_checkpoint(run / "fold1" / "best.pt", fold=1, seed=1)
    data = root / "data"
    for i in range(3):
        write_subject(data, f"BraTS20_Training_{i + 1:03d}", ("t1ce",), seed=i, hgg=bool(i % 2))
    return {"root": root, "run": run, "data": data}


def _scan(world, i=1) -> Path:
    return world["data"] / f"BraTS20_Training_{i:03d}" / f"BraTS20_Training_{i:03d}_t1ce.nii.gz"


def _has(text: str, needle: str) -> bool:
    """Whitespace-insensitive containment: Rich wraps long stderr lines at the terminal width."""
    return "".join(str(needle).split()) in "".join(text.split())


def _json(result):
    assert result.stdout.strip().startswith("{"), result.stdout
    return json.loads(result.stdout)


def test_single_nifti_json_and_csv(cli, world, tmp_path):
    csv_path = tmp_path / "out" / "pred.csv"
    r = cli("predict", _scan(world), "--model", world["run"] / "fold0", "--json", "--csv", csv_path)
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    (pred,) = out["predictions"]
    assert pred["scan_id"] == "BraTS20_Training_001"
    assert 0.0 <= pred["p_hgg"] <= 1.0
    assert pred["grade"] == ("HGG" if pred["p_hgg"] >= 0.5 else "LGG")
    # The tiny model's input is below 64³: fp32 on every CPU (and never emulated bf16).
    assert out["precision"] == "fp32"
    text = csv_path.read_text().splitlines()
    assert text[0].startswith("scan_id,grade,p_hgg") and text[1].startswith("BraTS20_Training_001,")


def test_csv_dash_is_the_csv_alone_on_stdout(cli, world, tmp_path, monkeypatch):
    """`--csv -` pipes: stdout holds the CSV and nothing else (no table), no file named "-" appears; with
    --json, which wants stdout too, it is a usage error before any model loads."""
    import csv
    import io

    monkeypatch.chdir(tmp_path)
    r = cli("predict", world["data"], "--model", world["run"], "--csv", "-")
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["scan_id"] for row in rows] == sorted(row["scan_id"] for row in rows) and len(rows) >= 3
    assert all(0.0 <= float(row["p_hgg"]) <= 1.0 and row["n_members"] == "2" for row in rows)
    assert not (tmp_path / "-").exists() and "P(HGG)" not in r.stdout
    both = cli("predict", world["data"], "--model", world["run"], "--csv", "-", "--json")
    assert both.exit_code == 2 and "--json and --csv - both print on stdout" in both.stderr
    assert both.stdout == ""


def test_table_output(cli, world, tmp_path):
    r = cli("predict", world["data"], "--model", world["run"], "--tta")
    assert r.exit_code == 0, r.stderr
    assert "BraTS20_Training_003" in r.stdout and "P(HGG)" in r.stdout and "min–max" in r.stdout
    assert _has(r.stderr, "8-flip TTA")
    short = tmp_path / "p.nii.gz"
    short.write_bytes(_scan(world).read_bytes())
    one = cli("predict", short, "--model", world["run"] / "fold0")  # a narrow table: one scan, short name
    assert one.exit_code == 0, one.stderr
    assert "Predictions (1 model, threshold 0.5)" in one.stdout.splitlines()[0]  # its title on one line


def test_ensemble_and_tta_equal_mean_of_members(world):
    """The batched ensemble x 8-flip TTA equals the mean of every member on every flipped copy."""
    from medcli.engine.checkpoint import load_for_inference

    source = P.find_checkpoints(world["run"], world["root"])
    assert source.kind == "run" and len(source.checkpoints) == 2
    pred = P.load_predictor(source, tta=True, precision="fp32", device="cpu", max_batch=3)
    x = torch.from_numpy(pred.preprocess(P.ScanInput("s", {"t1ce": _scan(world)})).array)[None]
    x = torch.cat([x, x.flip(2) * 0.5])  # two different scans in one batch
    probs = pred.probabilities(x)
    assert probs.shape == (2, 8, 2)

    expected = np.zeros((2, 8, 2))
    for m, path in enumerate(source.checkpoints):
        model, _, _ = load_for_inference(path)
        for f, dims in enumerate(P.FLIPS):
            with torch.no_grad():
                xf = x.flip(dims) if dims else x
                expected[m, f] = torch.softmax(model(xf), 1)[:, 1].numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert len(set(P.FLIPS)) == 8

    scan = P.ScanInput("s", {"t1ce": _scan(world)})
    (result,) = pred.predict([scan]).predictions
    np.testing.assert_allclose(result.p_hgg, expected[:, :, 0].mean(), atol=1e-5)
    np.testing.assert_allclose(result.p_members, expected[:, :, 0].mean(axis=1), atol=1e-5)
    assert result.p_min == pytest.approx(expected[:, :, 0].min(), abs=1e-5)
    assert result.p_sd == pytest.approx(expected[:, :, 0].std(), abs=1e-5)


def test_run_ensemble_cli_equals_mean_of_folds(cli, world):
    def p(model):
        r = cli("predict", _scan(world, 2), "--model", model, "--json", "--tta")
        assert r.exit_code == 0, r.stderr
        return _json(r)["predictions"][0]

    folds = [p(world["run"] / f"fold{k}") for k in (0, 1)]
    both = p(world["run"])
    assert both["n_members"] == 2 and both["n_flips"] == 8
    assert both["p_hgg"] == pytest.approx(np.mean([f["p_hgg"] for f in folds]), abs=1e-6)


def test_default_model_is_newest_run(cli, world, tmp_path):
    runs = tmp_path / "runs"
    old = tiny_checkpoint(runs / "old" / "fold0" / "best.pt", seed=5)
    new = tiny_checkpoint(runs / "new" / "fold0" / "best.pt", seed=6)
    os.utime(old, (1_000_000, 1_000_000))
    r = cli("predict", _scan(world), "--json", env={"MEDCLI_RUNS": str(runs)})
    assert r.exit_code == 0, r.stderr
    assert _has(r.stderr, f"newest run: {new.parent.parent}")
    r = cli("predict", _scan(world), env={"MEDCLI_RUNS": str(tmp_path / "empty")})
    assert r.exit_code == 8 and _has(r.stderr, "no trained run found")


def test_a_partial_ensemble_says_which_folds_it_lacks(cli, world, tmp_path):
    """A run whose splits.json has 3 folds but only folds 0 and 1 trained: predicted, and said so."""
    import shutil
    from types import SimpleNamespace

    from medcli.data.splits import make_splits

    run = shutil.copytree(world["run"], tmp_path / "run")
    subjects = [SimpleNamespace(subject_id=f"s{i}", label=i % 2, patient_id=None) for i in range(12)]
    make_splits(subjects, k=3).save(run / "splits.json")
    r = cli("predict", _scan(world), "--model", run)
    assert r.exit_code == 0, r.stderr
    assert _has(r.stderr, f"Model: 2 of 3 folds of {run} (fold 2: no checkpoint yet)")
    source = P.find_checkpoints(run, tmp_path)
    assert source.untrained == [2] and len(source.checkpoints) == 2
    make_splits(subjects, k=2).save(run / "splits.json")
    assert P.find_checkpoints(run, tmp_path).describe() == f"2 folds of {run}"
    (run / "splits.json").write_text("{not json")  # unreadable: nothing to compare with, still predicts
    assert P.find_checkpoints(run, tmp_path).untrained == []


def test_reoriented_scan_gets_same_probability(cli, world, tmp_path):
    """The same image stored LPS and RAS (data flipped, affine flipped) is the same scan to medcli."""
    data = brain_volume((24, 20, 18), seed=7, hgg=True)
    lps = write_nifti(tmp_path / "a" / "S_t1ce.nii.gz", data, LPS)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    ras = write_nifti(tmp_path / "b" / "S_t1ce.nii.gz", data[::-1, ::-1].copy(), LPS @ flip)
    assert np.allclose(nib.load(lps).affine @ [0, 0, 0, 1], nib.load(ras).affine @ [23, 19, 0, 1])
    ps = []
    for path in (lps, ras):
        r = cli("predict", path, "--model", world["run"], "--json", "--tta")
        assert r.exit_code == 0, r.stderr
        ps.append(_json(r)["predictions"][0]["p_hgg"])
    assert ps[0] == pytest.approx(ps[1], abs=1e-6)


@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_saliency_on_original_grid(cli, world, tmp_path, tta):
    data = np.zeros((34, 30, 26), dtype=np.int16)
    data[6:32, 5:27, 4:22] = brain_volume((26, 22, 18), seed=3, hgg=True)  # brain away from the corners
    affine = np.array(
        [[0, 0, 1.2, -10], [-1.0, 0, 0, 30], [0, 1.1, 0, -5], [0, 0, 0, 1]]
    )  # oblique axis order
    scan = write_nifti(tmp_path / "in" / "X_t1ce.nii.gz", data, affine)
    out = tmp_path / "sal"
    r = cli("predict", scan, "--model", world["run"], "--saliency", out, "--json", *tta)
    assert r.exit_code == 0, r.stderr
    pred = _json(r)["predictions"][0]
    img = nib.load(pred["saliency_nifti"])
    assert img.shape == data.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    sal = np.asarray(img.dataobj)
    assert np.isfinite(sal).all() and sal.min() >= 0 and 0.9 < sal.max() <= 1.0 + 1e-5
    # The map lives inside the brain's bounding box plus the crop margin (4): zero beyond it.
    nz = np.argwhere(sal > 0)
    assert (nz.min(axis=0) >= [6 - 4, 5 - 4, 4 - 4]).all() and (
        nz.max(axis=0) < [32 + 4, 27 + 4, 22 + 4]
    ).all()
    assert sal[0, 0, 0] == 0 and sal[-1, -1, -1] == 0
    assert (sal[data == 0] == 0).all() and sal[data != 0].max() == pytest.approx(1.0)  # brain only
    png = Path(pred["saliency_png"])
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 2000
    assert sorted(p.name for p in out.iterdir()) == ["X_gradcam.nii.gz", "X_gradcam.png"]


def test_same_files_once_and_same_names_told_apart(cli, world, tmp_path):
    """A scan given twice (itself and in its folder) is predicted once; two different scans both named
    scan.nii.gz get distinct ids, rows and saliency maps (neither overwrites the other)."""
    a = tmp_path / "a" / "scan.nii.gz"
    b = tmp_path / "b" / "scan.nii.gz"
    for path, i in ((a, 1), (b, 2)):
        path.parent.mkdir()
        path.write_bytes(_scan(world, i).read_bytes())
    sal = tmp_path / "sal"
    r = cli("predict", _scan(world), _scan(world).parent, a, b, "--model", world["run"] / "fold0",
            "--saliency", sal, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    preds = {p["scan_id"]: p for p in _json(r)["predictions"]}
    assert sorted(preds) == ["BraTS20_Training_001", "a_scan", "b_scan"]
    assert preds["a_scan"]["p_hgg"] != preds["b_scan"]["p_hgg"]  # really the two different scans
    assert sorted(p.name for p in sal.iterdir()) == sorted(
        f"{i}_gradcam.{ext}" for i in preds for ext in ("nii.gz", "png")
    )


def test_a_folder_of_freely_named_scans_is_predicted_file_by_file(cli, world, tmp_path):
    """patient1.nii.gz, patient2.nii.gz in one folder: for a one-modality model, the folder means its
    scans, with the same probabilities as the files given one by one."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in (1, 2):
        (folder / f"patient{i}.nii.gz").write_bytes(_scan(world, i).read_bytes())
    (folder / "notes.txt").write_text("not a scan")
    r = cli("predict", folder, "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 0, r.stderr
    by_folder = {p["scan_id"]: p["p_hgg"] for p in _json(r)["predictions"]}
    r = cli("predict", _scan(world, 1), _scan(world, 2), "--model", world["run"] / "fold0", "--json")
    by_file = [p["p_hgg"] for p in _json(r)["predictions"]]
    assert by_folder == {"patient1": by_file[0], "patient2": by_file[1]}


def test_a_scan_name_with_brackets_is_printed_as_it_is(cli, world, tmp_path):
    """Rich read `[/x]` in a subject id as a closing tag (a MarkupError traceback instead of the table) and
    `[post]` in a file name as a style (dropped from the name)."""
    shutil.copy(_scan(world), tmp_path / "T1 [post].nii.gz")
    manifest = tmp_path / "m.csv"  # a manifest's subject id may hold what a file name cannot
    manifest.write_text(f"subject_id,t1ce\ncase[/x],{_scan(world, 2)}\n")
    r = cli("predict", tmp_path / "T1 [post].nii.gz", manifest, "--model", world["run"] / "fold0")
    assert r.exit_code == 0, r.output
    assert "T1 [post]" in r.stdout and "case[/x]" in r.stdout


def test_freely_named_scans_beside_their_masks_are_predicted(cli, world, tmp_path):
    """patient1.nii.gz with patient1_seg.nii.gz: the masks made subjects with no scan ("missing t1ce") and
    the scans were left out, so nothing was predicted.  Each scan is its mask's subject; a mask alone is
    still set aside."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in (1, 2):
        (folder / f"patient{i}.nii.gz").write_bytes(_scan(world, i).read_bytes())
        shutil.copy(_scan(world, i), folder / f"patient{i}_seg.nii.gz")  # any image stands for a mask here
    shutil.copy(_scan(world, 3), folder / "patient3_seg.nii.gz")
    r = cli("predict", folder, "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 10, r.stderr  # patient3: a mask without a scan
    out = _json(r)
    by_folder = {p["scan_id"]: p["p_hgg"] for p in out["predictions"]}
    assert [f["scan_id"] for f in out["failures"]] == ["patient3"]
    assert "left out" not in r.stderr
    r = cli("predict", _scan(world, 1), _scan(world, 2), "--model", world["run"] / "fold0", "--json")
    by_file = [p["p_hgg"] for p in _json(r)["predictions"]]
    assert by_folder == {"patient1": by_file[0], "patient2": by_file[1]}
    # The same pairs in subject folders (case1/patient1.nii.gz + case1/patient1_seg.nii.gz).
    nested = tmp_path / "cases"
    for i in (1, 2):
        (nested / f"case{i}").mkdir(parents=True)
        for name in (f"patient{i}.nii.gz", f"patient{i}_seg.nii.gz"):
            shutil.copy(folder / name, nested / f"case{i}" / name)
    r = cli("predict", nested, "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 0, r.stderr
    assert {p["scan_id"]: p["p_hgg"] for p in _json(r)["predictions"]} == {
        "case1": by_file[0],
        "case2": by_file[1],
    }


def test_freely_named_files_beside_sequence_named_ones_are_said_to_be_left_out(cli, world, tmp_path):
    folder = tmp_path / "S1"
    folder.mkdir()
    (folder / "S1_t1ce.nii.gz").write_bytes(_scan(world, 1).read_bytes())
    (folder / "brain_mask.nii.gz").write_bytes(_scan(world, 2).read_bytes())
    r = cli("predict", folder, "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 0, r.stderr
    assert [p["scan_id"] for p in _json(r)["predictions"]] == ["S1"]
    assert _has(r.stderr, "left out 1 NIfTI file(s) that are no subject's (brain_mask.nii.gz)")


def test_a_subjects_files_beside_subject_folders_are_said_to_be_left_out(cli, world, tmp_path):
    """A directory of subject folders with one subject's scan lying loose at its top: the folders are
    predicted, and the loose file is named rather than silently skipped."""
    shutil.copytree(world["data"] / "BraTS20_Training_001", tmp_path / "d" / "BraTS20_Training_001")
    shutil.copy(_scan(world, 2), tmp_path / "d")
    r = cli("predict", tmp_path / "d", "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 0, r.stderr
    assert [p["scan_id"] for p in _json(r)["predictions"]] == ["BraTS20_Training_001"]
    assert _has(
        r.stderr, "left out 1 file(s) lying beside the subject folders (BraTS20_Training_002_t1ce.nii.gz)"
    )
    assert (
        r.stderr.count("BraTS20_Training_002_t1ce.nii.gz") == 1
    )  # said once (by discovery, not predict too)


def test_a_folder_of_freely_named_scans_for_a_multimodal_model(cli, two_channel_run, tmp_path):
    folder = tmp_path / "scans"
    write_nifti(folder / "a.nii.gz", brain_volume())
    write_nifti(folder / "b.nii.gz", brain_volume())
    r = cli("predict", folder, "--model", two_channel_run)
    assert r.exit_code == 3
    assert _has(r.stderr, "2 NIfTI files not named by sequence") and _has(r.stderr, "<id>_flair.nii.gz")


def test_prefetch_keeps_order_and_bounds_the_scans_in_flight():
    """``ahead`` scans are preprocessed at once (threads), never more; results come back in input order."""
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return i * i

    for ahead in (1, 3):
        peak[0] = 0
        got = []
        for item, future in P._prefetched(list(range(10)), work, ahead=ahead):
            got.append((item, future.result()))
            time.sleep(0.03)  # the "forward pass": the next scans are preprocessed meanwhile
        assert got == [(i, i * i) for i in range(10)]
        assert peak[0] == ahead


def test_more_scans_ahead_predict_the_same(world):
    source = P.find_checkpoints(world["run"], world["root"])
    scans, _ = P.collect_scans([world["data"]], ("t1ce",))
    one = P.load_predictor(source, device="cpu", prefetch=1).predict(scans).predictions
    three = P.load_predictor(source, device="cpu", prefetch=3).predict(scans).predictions
    assert [(p.scan_id, p.p_hgg) for p in one] == [(p.scan_id, p.p_hgg) for p in three]


def test_a_scan_without_orientation_is_predicted_with_a_warning(cli, world, tmp_path):
    img = nib.load(_scan(world))
    bare = tmp_path / "bare.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None), bare)  # qform and sform codes 0
    csv_path = tmp_path / "p.csv"
    r = cli("predict", bare, _scan(world), "--model", world["run"] / "fold0", "--json", "--csv", csv_path)
    assert r.exit_code == 0, r.stderr
    warned, fine = _json(r)["predictions"]
    assert (
        len(warned["warnings"]) == 1 and "bare.nii.gz: no orientation in its header" in warned["warnings"][0]
    )
    assert fine["warnings"] == []
    assert _has(r.stderr, "WARNING: bare: bare.nii.gz: no orientation in its header")
    rows = list(csv.DictReader(csv_path.open()))
    assert "no orientation" in rows[0]["warnings"] and rows[1]["warnings"] == ""


def test_a_dicom_file_is_named_as_such(cli, world, tmp_path):
    dcm = tmp_path / "IM0001.dcm"
    dcm.write_bytes(bytes(128) + b"DICM" + bytes(64))
    r = cli("predict", dcm, "--model", world["run"] / "fold0")
    assert r.exit_code == 3, r.output
    assert _has(r.stderr, "a DICOM file, not NIfTI") and _has(r.stderr, "dcm2niix")


def test_labelled_scans_point_to_the_held_out_evaluation(cli, world, tmp_path):
    """A folder whose subjects carry grades: how many were graded as labelled, and `eval --test`."""
    labels = write_cohort(tmp_path / "graded", n=3)
    assert set(labels.values()) == {0, 1}
    csv_path = tmp_path / "graded.csv"
    r = cli("predict", tmp_path / "graded", "--model", world["run"], "--json", "--csv", csv_path)
    assert r.exit_code == 0, r.stderr
    preds = _json(r)["predictions"]
    # The input's grade by name (true_grade) in JSON and CSV alike, as in the table: no 0/1 to decode.
    assert {p["scan_id"]: p["true_grade"] for p in preds} == {s: ("LGG", "HGG")[y] for s, y in labels.items()}
    with csv_path.open() as fh:
        assert {row["scan_id"]: row["true_grade"] for row in csv.DictReader(fh)} == {
            p["scan_id"]: p["true_grade"] for p in preds
        }
    agree = sum(p["grade"] == p["true_grade"] for p in preds)
    r = cli("predict", tmp_path / "graded", "--model", world["run"])
    assert _has(r.stderr, f"{agree} of 3 labelled scans graded as labelled")
    assert _has(r.stderr, f"`medcli eval {world['run']} --test {tmp_path / 'graded'}`")
    single = cli("predict", _scan(world), "--model", world["run"])  # a bare file: no label, no such line
    assert single.exit_code == 0 and "labelled scans" not in single.stderr


def test_a_file_named_as_another_sequence_is_refused(cli, world, tmp_path):
    """A t1ce model given X_flair.nii.gz or X_seg.nii.gz would grade it as a t1ce scan without a word: each
    is refused by name (the rest still predicted, exit 10); an alias of the model's own sequence (BraTS
    2023's ``-t1c``) is accepted and loses its suffix in the scan id."""
    import shutil

    flair = shutil.copy(_scan(world), tmp_path / "X_flair.nii.gz")
    seg = shutil.copy(_scan(world), tmp_path / "X_seg.nii.gz")
    t1c = shutil.copy(_scan(world), tmp_path / "BraTS-GLI-00001-000-t1c.nii.gz")
    r = cli("predict", flair, seg, t1c, "--model", world["run"], "--json")
    assert r.exit_code == 10, r.stderr
    out = _json(r)
    assert [p["scan_id"] for p in out["predictions"]] == ["BraTS-GLI-00001-000"]
    assert _has(r.stderr, "X_flair.nii.gz: named as a flair scan, but the model reads t1ce")
    assert _has(r.stderr, "X_seg.nii.gz: named as a segmentation (label map), not a t1ce image")
    assert len(out["failures"]) == 2


def test_bf16_close_to_fp32(world):
    """The fold ensemble with TTA on every synthetic subject: bf16 P(HGG) within 0.02 of fp32."""
    source = P.find_checkpoints(world["run"], world["root"])
    scans, failures = P.collect_scans([world["data"]], ("t1ce",))
    assert len(scans) == 3 and not failures
    fp32 = P.load_predictor(source, precision="fp32", device="cpu", tta=True).predict(scans).predictions
    bf16_pred = P.load_predictor(source, precision="bf16", device="cpu", tta=True)
    assert bf16_pred.channels_last
    bf16 = bf16_pred.predict(scans).predictions
    assert [p.scan_id for p in bf16] == [p.scan_id for p in fp32]
    assert max(abs(b.p_hgg - f.p_hgg) for b, f in zip(bf16, fp32, strict=True)) < 0.02
    assert len({round(f.p_hgg, 4) for f in fp32}) > 1  # the subjects really differ


def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16():
    from medcli.engine.speed import cpu_has_fast_bf16

    cpu = torch.device("cpu")
    assert P.resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert P.resolve_precision("auto", cpu, (128, 128, 128)) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    # Below 64³ the trainer validates in fp32 (bf16 was slower there), so eval and predict do too.
    assert P.resolve_precision("auto", cpu, (32, 32, 32)) == "fp32"
    assert P.resolve_precision("auto", cpu, (128, 128, 32)) == "fp32"
    assert P.resolve_precision("bf16", cpu, (32, 32, 32)) == "bf16"  # asked for: given
    assert P.resolve_precision("auto", torch.device("cuda")) == "fp32"  # measured faster at batch 1
    assert P.resolve_precision("BF16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match="unknown precision"):
        P.resolve_precision("fp8", torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ failures


def _truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def test_batch_with_a_bad_scan_predicts_the_rest_and_exits_10(cli, world, tmp_path):
    data = tmp_path / "cohort"
    for i in range(3):
        write_subject(data, f"S{i}", ("t1ce",), seed=i)
    bad = _truncate(data / "S1" / "S1_t1ce.nii.gz")
    r = cli("predict", data, "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 10, r.stderr
    out = _json(r)
    assert [p["scan_id"] for p in out["predictions"]] == ["S0", "S2"]
    assert [f["scan_id"] for f in out["failures"]] == ["S1"]
    assert _has(r.stderr, str(bad)) and _has(r.stderr, "1 of 3 scans failed")


def test_a_batch_where_every_scan_fails_still_prints_its_json(cli, world, tmp_path):
    """--json when nothing could be predicted: the failures on stdout (as in a partial failure), the error
    on stderr, the failure's exit code; stdout was empty."""
    cases = _bad_inputs(tmp_path)
    r = cli("predict", cases["2d"][0], cases["nan"][0], "--model", world["run"] / "fold0", "--json")
    assert r.exit_code == 3, r.stderr
    out = _json(r)
    assert out["predictions"] == [] and [f["scan_id"] for f in out["failures"]] == ["2d", "nan"]
    assert "2D" in out["failures"][0]["error"] and all(f["exit_code"] == 3 for f in out["failures"])
    assert _has(r.stderr, "none of the 2 inputs could be predicted")
    one = cli("predict", tmp_path / "missing.nii.gz", "--model", world["run"] / "fold0", "--json")
    assert one.exit_code == 3 and "no such file or directory" in _json(one)["failures"][0]["error"]
    assert cli("predict", tmp_path / "missing.nii.gz", "--model", world["run"] / "fold0").stdout == ""


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input path, text the error must contain)."""
    good = brain_volume((24, 24, 24), seed=1)
    cases = {}
    p = write_nifti(tmp / "4d_t1ce.nii.gz", np.stack([good, good], axis=-1))
    cases["4d"] = (p, "4D")
    p = write_nifti(tmp / "2d_t1ce.nii.gz", good[:, :, 12])
    cases["2d"] = (p, "2D")
    nan = good.astype(np.float32)
    nan[5, 5, 5] = np.nan
    cases["nan"] = (write_nifti(tmp / "nan_t1ce.nii.gz", nan), "NaN")
    inf = good.astype(np.float32)
    inf[5, 5, 5] = np.inf
    cases["inf"] = (write_nifti(tmp / "inf_t1ce.nii.gz", inf), "NaN/Inf")
    cases["zeros"] = (write_nifti(tmp / "zero_t1ce.nii.gz", np.zeros_like(good)), "all zeros")
    cases["corrupt"] = (_truncate(write_nifti(tmp / "cut_t1ce.nii.gz", good)), "truncated")
    junk = tmp / "junk_t1ce.nii.gz"
    junk.write_bytes(b"<html>not a scan</html>")
    cases["not nifti"] = (junk, "not a readable NIfTI")
    empty = tmp / "empty_dir"
    empty.mkdir()
    cases["empty dir"] = (empty, "no scans found (pass <id>_t1ce.nii.gz files")
    return cases


@pytest.mark.parametrize("case", ["4d", "2d", "nan", "inf", "zeros", "corrupt", "not nifti", "empty dir"])
def test_bad_input_is_one_clear_error(cli, world, tmp_path, case):
    path, text = _bad_inputs(tmp_path)[case]
    r = cli("predict", path, "--model", world["run"] / "fold0")
    assert r.exit_code == 3, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1
    assert _has(r.stderr, path.name) and _has(r.stderr, text)
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("twochan") / "run"
    tiny_checkpoint(run / "fold0" / "best.pt", modalities=("t1ce", "flair"))
    return run


def test_missing_modality(cli, two_channel_run, tmp_path):
    write_subject(tmp_path / "d", "S0", ("t1ce",))
    r = cli("predict", tmp_path / "d" / "S0", "--model", two_channel_run)
    assert r.exit_code == 3 and _has(r.stderr, "missing flair")


def test_single_file_for_a_multimodal_model(cli, two_channel_run, tmp_path):
    paths = write_subject(tmp_path / "d", "S0", ("t1ce", "flair"))
    r = cli("predict", paths["t1ce"], "--model", two_channel_run)
    assert r.exit_code == 3 and _has(r.stderr, "needs 2 modalities (t1ce, flair)")


def test_modalities_on_different_grids(cli, two_channel_run, tmp_path):
    folder = tmp_path / "d" / "S0"
    write_nifti(folder / "S0_t1ce.nii.gz", brain_volume((24, 24, 24)))
    write_nifti(folder / "S0_flair.nii.gz", brain_volume((24, 24, 20)))
    r = cli("predict", folder, "--model", two_channel_run)
    assert r.exit_code == 3 and _has(r.stderr, "S0_flair.nii.gz") and _has(r.stderr, "differs")


def test_two_modalities_predict(cli, two_channel_run, tmp_path):
    write_subject(tmp_path / "d", "S0", ("t1ce", "flair", "t2"))
    r = cli("predict", tmp_path / "d" / "S0", "--model", two_channel_run, "--json")
    assert r.exit_code == 0, r.stderr
    assert _json(r)["predictions"][0]["scan_id"] == "S0"


def test_ensemble_of_mismatched_folds(cli, world, tmp_path):
    run = tmp_path / "mixed"
    tiny_checkpoint(run / "fold0" / "best.pt")
    tiny_checkpoint(run / "fold1" / "best.pt", modalities=("t1ce", "flair"))
    r = cli("predict", _scan(world), "--model", run)
    assert r.exit_code == 8 and _has(r.stderr, "fold1") and _has(r.stderr, "preprocessing differs")


def test_checkpoint_whose_weights_do_not_fit_its_depth(cli, world, tmp_path):
    path = tiny_checkpoint(tmp_path / "x.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["depth"] = 10  # a ResNet-10 claim with tiny weights
    torch.save(ckpt, path)
    r = cli("predict", _scan(world), "--model", path)
    assert r.exit_code == 8 and _has(r.stderr, "x.pt") and _has(r.stderr, "do not fit")


def test_pretrained_weights_file_is_not_a_model(cli, world, tmp_path):
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, path)
    r = cli("predict", _scan(world), "--model", path)
    assert (
        r.exit_code == 8
        and _has(r.stderr, "not a medcli training checkpoint")
        and _has(r.stderr, "pretrained")
    )


def test_usage_errors(cli, world):
    r = cli("predict", _scan(world), "--model", world["run"], "--precision", "fp8")
    assert r.exit_code == 2 and _has(r.stderr, "fp8")
    r = cli("predict", _scan(world), "--model", world["run"], "--weights", "best")
    assert r.exit_code == 2


# ------------------------------------------------------------------------------------------- the fast path


def test_fast_path_rewrites_compute_the_same_function():
    """BN folding and the CPU kernels (fp32 stem, phase-batched and tap-wise dilated convs) change speed,
    not outputs (checked in fp32, on sizes where layer3's phase split applies (32, 40) and falls back
    (16: a 2³ grid), and where layer4's off-centre taps all lie in padding (16, 32))."""
    import copy

    from medcli.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    for m in model.modules():  # non-trivial BN statistics, so folding is really exercised
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    from medcli.engine.cpu_kernels import Float32Conv3d, PhaseBatchedConv3d, rewrite_for_cpu
    from medcli.engine.tap_conv import TapwiseConv3d
    from medcli.engine.winograd import WinogradConv3d

    for bf16 in (False, True):  # the rewrites of either precision, run here in fp32
        fast = rewrite_for_cpu(P.fuse_conv_bn(copy.deepcopy(model)), bf16=bf16, fp32_kernels="all")
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
        assert any(isinstance(m, TapwiseConv3d) for m in fast.modules()) is bf16
        assert any(isinstance(m, WinogradConv3d) for m in fast.modules()) is not bf16
        assert any(isinstance(m, PhaseBatchedConv3d) for m in fast.modules()) is bf16
        assert isinstance(fast.conv1, Float32Conv3d) is bf16
        for size in (16, 32, 40, 64):
            x = torch.randn(2, 1, size, size, size)
            with torch.no_grad():
                want = model(x)
                torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(
                    fast(x.contiguous(memory_format=torch.channels_last_3d)), want, atol=1e-5, rtol=1e-5
                )


def test_bn_folding_is_exact_and_writes_the_requested_memory_format():
    """Folded in float64, conv+BN and the folded conv agree to rounding; the folded weights come out
    channels_last_3d when asked (no second copy needed), with BN gone and the input untouched."""
    import copy

    from medcli.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny").double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    x = torch.randn(2, 1, 24, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        fused = P.fuse_conv_bn(copy.deepcopy(model), memory_format=fmt)
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
        convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv3d)]
        assert all(c.weight.is_contiguous(memory_format=fmt) and c.bias is not None for c in convs)
        assert all(c.weight.dtype == torch.float64 for c in convs)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), want, atol=1e-10, rtol=1e-10)


def test_cpu_members_keep_winograd_transforms_only_while_they_fit(monkeypatch):
    """Kept transformed weights make repeated forward passes cheaper; an ensemble too large for the
    budget transforms them per pass instead (memory over speed), with the same probabilities."""
    from medcli.engine.winograd import WinogradConv3d

    monkeypatch.setenv("MEDCLI_FP32_KERNELS", "all")  # Winograd's convs, whatever this CPU would choose

    def kept(p):
        convs = [m for model in p.models for m in model.modules() if type(m) is WinogradConv3d]
        return {m.keep_transformed for m in convs}

    x = torch.randn(1, 1, 32, 32, 32)
    one = P.synthetic_predictor("tiny", members=2, input_size=32, device="cpu", precision="fp32")
    assert kept(one) == {True}
    monkeypatch.setattr(P, "KEPT_TRANSFORMS_BYTES", 0)
    other = P.synthetic_predictor("tiny", members=2, input_size=32, device="cpu", precision="fp32")
    assert kept(other) == {False}
    np.testing.assert_allclose(other.probabilities(x), one.probabilities(x), atol=1e-6)
    np.testing.assert_allclose(one.probabilities(x), one.probabilities(x))  # kept: same result again


def test_one_forward_pass_does_not_keep_transforms_more_do(world, monkeypatch):
    """One scan without TTA is one pass per member: transforming each weight as it is used beats keeping
    1 GB (for a ResNet-50) of fresh memory; two scans, or TTA, reuse what is kept."""
    from medcli.engine.winograd import WinogradConv3d

    monkeypatch.setenv("MEDCLI_FP32_KERNELS", "all")  # Winograd's convs, whatever this CPU would choose

    source = P.find_checkpoints(world["run"], world["root"])
    scans, _ = P.collect_scans([world["data"]], ("t1ce",))

    def kept_after(predictor, items):
        predictor.predict(items)
        convs = [m for model in predictor.models for m in model.modules() if type(m) is WinogradConv3d]
        assert convs
        return {m.keep_transformed for m in convs}

    p = P.load_predictor(source, device="cpu", precision="fp32")
    assert p.keeps_transforms  # a tiny model's transforms fit the budget
    assert kept_after(p, scans[:1]) == {False}
    assert kept_after(p, scans[:2]) == {True}
    tta = P.load_predictor(source, device="cpu", precision="fp32", tta=True)
    assert kept_after(tta, scans[:1]) == {True}  # 8 flips in batches of 2: four passes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs resource limits (POSIX)")
def test_running_out_of_memory_is_one_line_with_what_to_do(world, tmp_path):
    """A real allocation failure: predict in a process whose address space is capped at 2 GB, with a model
    whose 512³ input needs more.  One error line (what could not be allocated, what to change), exit 1, no
    traceback; it was PyTorch's C++ assertion in a traceback."""
    import resource
    import subprocess
    import sys

    # Trained at 16³ (the model is fully convolutional), then told to take 512³ inputs.
    model = tiny_checkpoint(tmp_path / "huge-input.pt")
    checkpoint = torch.load(model, weights_only=True)
    checkpoint["preprocess"]["input_size"] = [512, 512, 512]
    torch.save(checkpoint, model)
    limit = 2 * 1024**3

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "medcli", "predict", str(_scan(world)), "--model", str(model)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"},
        preexec_fn=cap,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: out of memory: could not allocate "), (
        result.stderr
    )
    assert "MiB more on the CPU (leave out --tta" in errors[0] and "Traceback" not in result.stderr


def test_a_gpu_out_of_memory_message_is_shortened_to_what_was_asked():
    from medcli.cli.app import out_of_memory

    cuda = RuntimeError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
        "1.20 GiB is free. Including non-PyTorch memory, this process has 77.9 GiB memory in use."
    )
    assert out_of_memory(cuda) == "out of memory on the GPU: tried to allocate 2.00 GiB"
    assert out_of_memory(MemoryError()) == "out of memory"
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_folds_still_training_are_said(cli, world):
    """A fold that a training holds right now (its lock) may still change its best.pt: predict says so;
    a lock file a killed training left behind says nothing."""
    from medcli.engine.runs import FoldDir, folds_in_training

    run = world["run"]
    assert folds_in_training(run) is None
    with FoldDir(run, 1).exclusive():
        r = cli("predict", _scan(world), "--model", run, "--json")
        assert r.exit_code == 0, r.stderr
        assert _has(r.stderr, f"fold 1 (pid {os.getpid()}) is still training")
        assert folds_in_training(run / "fold1" / "best.pt") == folds_in_training(run)
        assert folds_in_training(run / "fold0") is None
    (run / ".fold1.lock").write_text("12345")  # left by a SIGKILLed training: nobody holds it
    try:
        assert folds_in_training(run) is None
    finally:
        (run / ".fold1.lock").unlink()


def test_predictions_never_overwrite_their_input_manifest(cli, world, tmp_path):
    manifest = tmp_path / "scans.csv"
    manifest.write_text(f"subject_id,t1ce\nS1,{_scan(world)}\n")
    before = manifest.read_bytes()
    r = cli("predict", manifest, "--model", world["run"] / "fold0", "--csv", manifest)
    assert r.exit_code == 2 and _has(r.stderr, "is one of the inputs: the predictions would overwrite it")
    assert manifest.read_bytes() == before


def test_saliency_maps_written_among_the_scans_are_not_taken_for_scans(cli, world, tmp_path):
    """`predict scans/ --saliency scans/`, then `predict scans/` again: the maps stay maps."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "patient1.nii.gz").write_bytes(_scan(world, 1).read_bytes())
    for _ in range(2):
        r = cli("predict", folder, "--model", world["run"] / "fold0", "--saliency", folder, "--json")
        assert r.exit_code == 0, r.stderr
        assert [p["scan_id"] for p in _json(r)["predictions"]] == ["patient1"]
    assert (folder / "patient1_gradcam.nii.gz").is_file()


def test_a_scan_whose_name_lies_about_its_compression_says_what_to_rename(cli, world, tmp_path):
    """nibabel goes by the name: an uncompressed file named .nii.gz (or a gzipped one named .nii) reads as
    corrupt.  The message says which it is and the rename that fixes it."""
    import gzip

    plain = tmp_path / "plain_t1ce.nii.gz"
    plain.write_bytes(gzip.decompress(_scan(world).read_bytes()))
    zipped = tmp_path / "zipped_t1ce.nii"
    zipped.write_bytes(_scan(world).read_bytes())
    r = cli("predict", plain, zipped, "--model", world["run"] / "fold0")
    assert r.exit_code == 3
    assert _has(
        r.stderr, "plain_t1ce.nii.gz: is an uncompressed NIfTI file named .gz (rename it to end in .nii"
    )
    assert _has(
        r.stderr, "zipped_t1ce.nii: is gzip-compressed but its name does not end in .gz (rename it to"
    )
    (tmp_path / "S1").mkdir()
    plain.rename(tmp_path / "S1" / "S1_t1ce.nii.gz")  # in a subject folder: discovery says the same
    r = cli("predict", tmp_path / "S1", "--model", world["run"] / "fold0")
    assert r.exit_code == 3 and _has(
        r.stderr, "is an uncompressed NIfTI file named .gz (rename it to end in .nii"
    )


def test_a_degenerate_header_affine_is_one_clear_error(cli, world, tmp_path):
    """A converter that wrote a zero (or NaN) sform and no qform: nibabel cannot orient the scan, and its
    ValueError came out as a traceback."""
    img = nib.load(_scan(world))
    cases = {"zero": np.zeros((4, 4)), "nan": np.full((4, 4), np.nan)}
    paths = []
    for name, sform in cases.items():
        header = img.header.copy()
        header.set_qform(None, code=0)
        header.set_sform(np.eye(4), code=1)
        for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
            header[row] = sform[i]
        broken = nib.Nifti1Image(np.asarray(img.dataobj), None, header)  # the affine read from that header
        path = tmp_path / name / f"{name}_t1ce.nii.gz"
        path.parent.mkdir()
        nib.save(broken, path)
        paths.append(path)
    r = cli("predict", *paths, "--model", world["run"] / "fold0")
    assert r.exit_code == 3 and "Traceback" not in r.stderr
    for path in paths:
        assert _has(r.stderr, f"{path.name}: has a degenerate affine in its header")
    r = cli("predict", paths[0].parent, "--model", world["run"] / "fold0")  # through discovery: the same
    assert r.exit_code == 3 and _has(r.stderr, "has a degenerate affine in its header")


@pytest.mark.slow
def test_an_interrupted_prediction_keeps_the_scans_it_did(world, tmp_path):
    """SIGTERM (or Ctrl-C) midway through a folder of scans: the predictions made so far are written to
    --csv and printed as a finished run's would be, and one line says how many of how many (exit 143).
    Everything computed was thrown away: hours, for a large folder on a CPU."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "many"
    for i in range(120):
        write_subject(data, f"S{i:03d}", ("t1ce",), seed=i, hgg=bool(i % 2))
    maps, csv_path = tmp_path / "maps", tmp_path / "pred.csv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcli", "predict", str(data), "--model", str(world["run"]),
         "--saliency", str(maps), "--csv", str(csv_path)],
        env={**os.environ, "NO_COLOR": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while len(list(maps.glob("*.png"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # Grad-CAM maps are written scan by scan: two scans are (nearly) done
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    rows = list(csv.DictReader(csv_path.open()))
    assert 1 <= len(rows) < 120  # the signal may come between a scan's map and its row
    assert [r["scan_id"] for r in rows] == [f"S{i:03d}" for i in range(len(rows))]  # in input order
    assert all(r["scan_id"] in out for r in rows)  # the table, as a finished run prints it
    (line,) = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert _has(
        line,
        f"Error: terminated (SIGTERM) after {len(rows)} of 120 scans; the predictions of those are in "
        f"{csv_path} and above (run the same command again to predict every scan)",
    )
