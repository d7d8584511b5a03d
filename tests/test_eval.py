"""`medcli eval`: run/fold/checkpoint targets, metrics equal to scikit-learn, CIs, thresholds, plots,
single-class folds, and recomputation from best.pt on real data with the run's saved split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_predict import tiny_checkpoint, write_cohort
from sklearn import metrics as skm

from medcli.engine import metrics as M
from medcli.engine.runs import FoldDir


def _has(text: str, needle: str) -> bool:
    return "".join(needle.split()) in "".join(text.split())


def _fold_rows(seed: int, n: int, ema: bool = True, only: int | None = None):
    rng = np.random.default_rng(seed)
    labels = np.full(n, only) if only is not None else (rng.random(n) < 0.7).astype(int)
    p = np.round(np.clip(0.3 * labels + 0.7 * rng.random(n), 0, 1), 4)
    p_ema = np.round(np.clip(p + 0.05 * rng.standard_normal(n), 0, 1), 4)
    rows = [
        {
            "subject_id": f"s{seed}_{i}",
            "patient_id": f"pat{seed}_{i // 2}",  # two scans per patient
            "label": int(labels[i]),
            "p_hgg": float(p[i]),
            "p_hgg_ema": float(p_ema[i]) if ema else None,
        }
        for i in range(n)
    ]
    return rows


@pytest.fixture
def run(tmp_path):
    """A 3-fold run directory with the trainer's own val_predictions.csv writer."""
    root = tmp_path / "runs" / "r"
    all_rows = {}
    for k in range(3):
        fd = FoldDir(root, k)
        fd.path.mkdir(parents=True)
        all_rows[k] = _fold_rows(k, 30)
        fd.write_predictions(all_rows[k])
    return root, all_rows


def _arrays(rows, column="p_hgg_ema"):
    return np.array([r["label"] for r in rows]), np.array([r[column] for r in rows])


def _json(result):
    assert result.stdout.lstrip().startswith("{"), result.stdout
    return json.loads(result.stdout)


def test_run_per_fold_mean_sd_and_pooled_equal_sklearn(cli, run):
    root, rows = run
    r = cli("eval", root, "--json", "--n-boot", "200")
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    assert out["kind"] == "run" and [f["fold"] for f in out["folds"]] == [0, 1, 2]
    aucs = []
    for f in out["folds"]:
        y, p = _arrays(rows[f["fold"]])
        assert f["weights"] == "ema" and f["source"] == "stored"
        assert f["metrics"]["auc"] == pytest.approx(skm.roc_auc_score(y, p))
        assert f["metrics"]["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p >= 0.5))
        aucs.append(skm.roc_auc_score(y, p))
    assert out["summary"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert out["summary"]["auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))
    y, p = _arrays([row for k in range(3) for row in rows[k]])
    pooled = out["pooled"]
    assert pooled["n"] == 90
    assert pooled["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert pooled["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p >= 0.5))
    assert pooled["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert pooled["confusion"] == skm.confusion_matrix(y, p >= 0.5).tolist()
    groups = [row["patient_id"] for k in range(3) for row in rows[k]]
    assert pooled["ci"] == M.bootstrap_ci(y, p, groups, n_boot=200, seed=0)
    assert out["bootstrap"] == {"n": 200, "seed": 0, "unit": "patient", "level": 0.95}
    for name in ("roc", "reliability", "confusion", "json"):
        assert (root / "eval").joinpath(out["plots"][name]).exists()
    assert json.loads((root / "eval" / "eval.json").read_text())["pooled"]["auc"] == pooled["auc"]


def test_a_row_per_scan_says_which_the_model_got_wrong(cli, run):
    """predictions.csv: every pooled scan once, with its fold, true grade, P(HGG) of the weights scored and
    the grade its fold's threshold gives; its counts are the pooled confusion matrix (--no-plots too)."""
    import csv

    root, rows = run
    out = _json(cli("eval", root, "--json", "--n-boot", "0", "--no-plots", "--tune-threshold", "youden"))
    table = list(csv.DictReader((root / "eval" / "predictions.csv").open()))
    assert out["plots"]["predictions"] == str(root / "eval" / "predictions.csv")
    expected = {r["subject_id"]: (k, r) for k in range(3) for r in rows[k]}
    assert sorted(t["subject_id"] for t in table) == sorted(expected) and len(table) == 90
    per_fold = out["threshold"]["per_fold"]
    for t in table:
        k, r = expected[t["subject_id"]]
        assert int(t["fold"]) == k and t["patient_id"] == r["patient_id"] and int(t["label"]) == r["label"]
        assert float(t["p_hgg"]) == pytest.approx(r["p_hgg_ema"], abs=1e-6)
        assert float(t["threshold"]) == pytest.approx(per_fold[str(k)], rel=1e-5)
        assert t["grade"] == ("HGG" if r["p_hgg_ema"] >= per_fold[str(k)] else "LGG")
        assert t["true_grade"] == ("LGG", "HGG")[r["label"]]
        assert int(t["correct"]) == (t["grade"] == t["true_grade"])
    confusion = [[sum(t["true_grade"] == g and t["grade"] == q for t in table) for q in ("LGG", "HGG")]
                 for g in ("LGG", "HGG")]  # fmt: skip
    assert confusion == out["pooled"]["confusion"]


def test_run_table_and_plot_paths(cli, run):
    root, _ = run
    r = cli("eval", root, "--n-boot", "100")
    assert r.exit_code == 0, r.stderr
    assert "mean ± sd" in r.stdout and "Pooled out-of-fold" in r.stdout and "95% CI" in r.stdout
    assert "ROC AUC" in r.stdout and "Confusion matrix" in r.stdout and "sensitivity (HGG)" in r.stdout
    assert _has(r.stderr, str(root / "eval" / "roc.png"))


def test_raw_weights_use_the_raw_column(cli, run):
    root, rows = run
    out = _json(cli("eval", root / "fold1", "--json", "--weights", "raw", "--n-boot", "0"))
    y, p = _arrays(rows[1], "p_hgg")
    assert out["kind"] == "fold" and out["folds"][0]["weights"] == "raw"
    assert out["pooled"]["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert out["pooled"]["ci"] == {}


@pytest.mark.parametrize(
    "config, expected",
    [({"select": "raw", "ema_decay": 0.999}, "raw"), ({"select": "auto", "ema_decay": 0.9}, "ema")],
)
def test_default_weights_follow_the_folds_selection(cli, run, config, expected):
    """By default eval scores the weights that picked best.pt, as recorded in the fold's config.json."""
    root, rows = run
    (root / "fold1" / "config.json").write_text(json.dumps(config))
    out = _json(cli("eval", root / "fold1", "--json", "--n-boot", "0", "--no-plots"))
    y, p = _arrays(rows[1], "p_hgg" if expected == "raw" else "p_hgg_ema")
    assert out["folds"][0]["weights"] == expected
    assert out["pooled"]["auc"] == pytest.approx(skm.roc_auc_score(y, p))


def test_missing_ema_falls_back_to_raw_with_a_note(cli, tmp_path):
    fd = FoldDir(tmp_path / "r", 0)
    fd.path.mkdir(parents=True)
    rows = _fold_rows(5, 20, ema=False)
    fd.write_predictions(rows)
    r = cli("eval", fd.path, "--json", "--n-boot", "0", "--no-plots")
    out = _json(r)
    assert out["folds"][0]["weights"] == "raw"
    assert any("no EMA predictions" in n for n in out["notes"])


def test_single_class_fold_auc_is_undefined_not_nan(cli, tmp_path):
    root = tmp_path / "r"
    for k, only in ((0, None), (1, 1)):
        fd = FoldDir(root, k)
        fd.path.mkdir(parents=True)
        fd.write_predictions(_fold_rows(k, 12, only=only))
    r = cli("eval", root, "--json", "--n-boot", "100")
    assert r.exit_code == 0, r.stderr
    assert "NaN" not in r.stdout
    out = _json(r)
    f1 = out["folds"][1]["metrics"]
    assert f1["auc"] is None and f1["undefined_reason"] == "only HGG in the validation set"
    assert out["summary"]["auc"]["n"] == 1
    assert out["pooled"]["auc"] is not None
    table = cli("eval", root / "fold1", "--n-boot", "0", "--no-plots")
    assert table.exit_code == 0
    assert _has(table.stdout, "n/a (only HGG in the validation set)")


def test_youden_is_cross_fitted_across_folds(cli, run):
    root, rows = run
    out = _json(cli("eval", root, "--json", "--tune-threshold", "youden", "--n-boot", "0", "--no-plots"))
    t = out["threshold"]
    assert t["method"] == "youden"
    for k in range(3):
        y, p = _arrays([row for j in range(3) if j != k for row in rows[j]])
        assert t["per_fold"][str(k)] == pytest.approx(M.youden_threshold(y, p))
        assert out["folds"][k]["threshold"] == pytest.approx(t["per_fold"][str(k)])
        yk, pk = _arrays(rows[k])
        want = skm.balanced_accuracy_score(yk, pk >= t["per_fold"][str(k)])
        assert out["folds"][k]["metrics"]["balanced_accuracy"] == pytest.approx(want)
    y, p = _arrays([row for k in range(3) for row in rows[k]])
    assert t["deploy"] == pytest.approx(M.youden_threshold(y, p))
    # A single fold can only tune on itself, and the report says so.
    one = _json(
        cli("eval", root / "fold0", "--json", "--tune-threshold", "youden", "--n-boot", "0", "--no-plots")
    )
    assert any("optimistic" in n for n in one["notes"])


def test_bad_targets(cli, tmp_path):
    r = cli("eval", tmp_path / "nope")
    assert r.exit_code == 2 and _has(r.stderr, "not found")
    (tmp_path / "emptyrun").mkdir()
    r = cli("eval", tmp_path / "emptyrun")
    assert r.exit_code == 2 and _has(r.stderr, "val_predictions.csv")
    r = cli("eval", tmp_path / "emptyrun", "--tune-threshold", "magic")
    assert r.exit_code == 2
    for flag in ("--precision", "--device"):  # they set how a model runs; stored predictions run none
        r = cli("eval", tmp_path / "emptyrun", flag, "fp8")
        assert r.exit_code == 2 and _has(r.stderr, f"{flag} applies to --recompute and --test")
    for n in ("-1", "3"):  # 3 resamples gave every interval n/a, unexplained
        r = cli("eval", tmp_path / "emptyrun", "--n-boot", n)
        assert r.exit_code == 2 and _has(r.stderr, f"--n-boot {n}: an interval takes at least 10 resamples")


def test_a_fold_the_run_does_not_have_names_those_it_has(cli, run):
    root, _ = run
    r = cli("eval", root, "--fold", "9")
    assert r.exit_code == 2 and _has(r.stderr, f"{root} has no fold 9 (its folds: 0, 1, 2)"), r.stderr


# ------------------------------------------------------------------------------------ recompute from best.pt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cohort, its saved 2-fold split and a tiny checkpoint per fold (real preprocessing at predict)."""
    from medcli.data.discover import discover
    from medcli.data.splits import make_splits

    root = tmp_path_factory.mktemp("recompute")
    data = root / "data"
    write_cohort(data, n=6)
    subjects = discover(data, modalities=("t1ce",)).require_labels()
    splits = make_splits(subjects, k=2, seed=0)
    run = root / "runs" / "r"
    splits.save(run / "splits.json")
    for k in range(2):
        path = tiny_checkpoint(run / f"fold{k}" / "best.pt", fold=k, seed=k)
        import torch

        ckpt = torch.load(path, weights_only=True)
        ckpt["split_hash"] = splits.cohort_hash
        ckpt["config"].update({"data": str(data), "folds": 2, "seed": 0})
        torch.save(ckpt, path)
    return {"data": data, "run": run, "splits": splits}


def test_recompute_uses_the_saved_split_and_matches_predict(cli, trained):
    run, splits = trained["run"], trained["splits"]
    r = cli("eval", run, "--recompute", "--json", "--n-boot", "0", "--no-plots", "--weights", "raw")
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    for k in range(2):
        fold = out["folds"][k]
        assert fold["source"] == "recomputed" and fold["metrics"]["n"] == len(splits.fold(k)[1])
    # The recomputed P(HGG) of a validation subject equals what `predict` says with the same checkpoint.
    from medcli.engine.evaluator import recompute_predictions

    fp, _ = recompute_predictions(run / "fold1" / "best.pt", weights="raw")
    assert fp.subject_ids == splits.fold(1)[1]
    sid = fp.subject_ids[0]
    pr = cli("predict", trained["data"] / sid, "--model", run / "fold1", "--weights", "raw", "--json")
    assert pr.exit_code == 0, pr.stderr
    assert json.loads(pr.stdout)["predictions"][0]["p_hgg"] == pytest.approx(fp.p[0], abs=1e-6)


def test_checkpoint_target_refuses_another_fold(cli, trained):
    ckpt = trained["run"] / "fold0" / "best.pt"
    r = cli("eval", ckpt, "--fold", "1", "--data", trained["data"], "--n-boot", "0")
    assert r.exit_code == 2 and _has(r.stderr, "trained for fold 0")
    r = cli(
        "eval", ckpt, "--data", trained["data"], "--json", "--n-boot", "50", "--out", trained["run"] / "e"
    )
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    assert out["kind"] == "checkpoint" and out["folds"][0]["fold"] == 0
    assert (trained["run"] / "e" / "roc.png").stat().st_size > 2000


def test_checkpoint_with_another_split_is_refused(cli, trained, tmp_path):
    import torch

    path = tmp_path / "other.pt"
    ckpt = torch.load(trained["run"] / "fold0" / "best.pt", weights_only=True)
    ckpt["split_hash"] = "0" * 64
    torch.save(ckpt, path)
    r = cli("eval", path, "--data", trained["data"], "--n-boot", "0", "--no-plots")
    assert r.exit_code == 8 and _has(r.stderr, "another split")


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_then_eval_and_predict_agree(cli, tmp_path):
    """A real 2-fold tiny training; eval's stored and recomputed predictions agree (same preprocessing, same
    weights, exact fast path), and the run ensemble in predict is the mean of its folds."""
    from pathlib import Path

    from medcli.engine.evaluator import read_val_predictions, recompute_predictions

    data, runs = tmp_path / "data", tmp_path / "runs"
    write_cohort(data, n=8)
    args = ["--data", data, "--out", runs, "--name", "t", "--depth", "tiny", "--input-size", "16"]
    args += ["--epochs", "1", "--folds", "2", "--fold", "all", "--no-pretrained", "--batch-size", "2"]
    r = cli("train", *args, "--loss", "ce")
    assert r.exit_code == 0, r.stderr
    run = runs / "t"
    for k in (0, 1):
        stored, _ = read_val_predictions(run / f"fold{k}", "ema")
        again, _ = recompute_predictions(run / f"fold{k}" / "best.pt", weights="ema")
        assert stored.subject_ids == again.subject_ids
        np.testing.assert_allclose(stored.p, again.p, atol=1e-4)
    out = _json(cli("eval", run, "--json", "--n-boot", "100"))
    assert out["kind"] == "run" and out["pooled"]["n"] == 8
    # `medcli train` then `medcli eval`: no argument means the newest run, as predict's --model does.
    newest = cli("eval", "--json", "--n-boot", "100", env={"MEDCLI_RUNS": str(runs)})
    assert _json(newest) == out and f"Using the newest run: {run}" in newest.stderr
    none = cli("eval", env={"MEDCLI_RUNS": str(tmp_path / "empty")})
    assert none.exit_code == 8 and "no trained run found under" in none.stderr
    scan = Path(data) / "BraTS20_Training_001"
    ps = [
        _json(cli("predict", scan, "--model", m, "--json"))["predictions"][0]["p_hgg"]
        for m in (run / "fold0", run / "fold1")
    ]
    both = cli("predict", scan, "--model", run, "--json")
    assert _json(both)["predictions"][0]["p_hgg"] == pytest.approx(np.mean(ps), abs=1e-6)
    # A subject of the run's own split: its prediction is graded, and said to be no held-out estimate.
    assert _has(
        both.stderr,
        f"1 of the 1 scans share an id with subjects of the split the model was trained with "
        f"({run / 'splits.json'}; e.g. BraTS20_Training_001): trained or validated on",
    )


def test_predict_uses_the_threshold_eval_tuned(cli, trained, tmp_path):
    """`eval --tune-threshold youden` saves a threshold; `predict --threshold tuned` applies it, and refuses
    when there is none, when it was not tuned, or when the checkpoints are newer than the evaluation."""
    import os
    import shutil

    run = tmp_path / "r"
    shutil.copytree(trained["run"], run)
    sid = trained["splits"].fold(1)[1][0]
    scan = trained["data"] / sid
    predict = ("predict", scan, "--model", run, "--weights", "raw", "--json", "--threshold", "tuned")

    missing = cli(*predict)
    assert missing.exit_code == 2 and _has(missing.stderr, "--tune-threshold youden")

    fixed = cli("eval", run, "--recompute", "--n-boot", "0", "--no-plots", "--weights", "raw", "--json")
    assert fixed.exit_code == 0, fixed.stderr
    untuned = cli(*predict)
    assert untuned.exit_code == 2 and _has(untuned.stderr, "fixed threshold")

    args = ("eval", run, "--recompute", "--n-boot", "0", "--no-plots", "--weights", "raw", "--json")
    tuned = cli(*args, "--tune-threshold", "youden")
    assert tuned.exit_code == 0, tuned.stderr
    deploy = _json(tuned)["threshold"]["deploy"]
    result = cli(*predict)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["threshold"] == pytest.approx(deploy)
    p = out["predictions"][0]
    assert p["grade"] == ("HGG" if p["p_hgg"] >= deploy else "LGG")
    assert _has(result.stderr, f"Threshold {deploy:.3f}: Youden")

    later = os.stat(run / "eval" / "eval.json").st_mtime + 10
    os.utime(run / "fold0" / "best.pt", (later, later))  # retrained after the evaluation
    stale = cli(*predict)
    assert stale.exit_code == 2 and _has(stale.stderr, "older than the model's checkpoints")


def test_few_scans_in_a_class_get_a_note_on_the_intervals(cli, tmp_path, run):
    fd = FoldDir(tmp_path / "r", 0)
    fd.path.mkdir(parents=True)
    rows = _fold_rows(7, 16, only=1)
    rows[0]["label"] = rows[1]["label"] = 0  # 2 LGG scans (one patient) among 16
    fd.write_predictions(rows)
    out = _json(cli("eval", fd.path, "--json", "--n-boot", "200", "--no-plots"))
    note = [n for n in out["notes"] if n.startswith("only 2 LGG scans of 16")]
    assert note, out["notes"]
    n_valid = out["folds"][0]["metrics"]["ci"]["auc"]["n_valid"]
    assert 0 < n_valid < 200 and f"the {n_valid} of 200 resamples" in note[0]
    # A whole run pools 90 scans with dozens in each class: no such note.
    pooled = _json(cli("eval", run[0], "--json", "--n-boot", "50", "--no-plots"))
    assert min(pooled["pooled"]["n_lgg"], pooled["pooled"]["n_hgg"]) >= 10
    assert not any(n.startswith("only ") for n in pooled["notes"])


def test_a_run_with_untrained_folds_says_what_its_pooled_metrics_cover(cli, run):
    """splits.json has 4 folds, three are trained: the pooled table and the notes say so (and the JSON);
    the few-in-a-class note of a pooled run does not send users to the pooled predictions they have."""
    from types import SimpleNamespace

    from medcli.data.splits import make_splits

    root, _ = run
    subjects = [SimpleNamespace(subject_id=f"s{i}", label=i % 2, patient_id=None) for i in range(12)]
    make_splits(subjects, k=4).save(root / "splits.json")
    out = _json(cli("eval", root, "--json", "--n-boot", "50", "--no-plots"))
    assert out["missing_folds"] == [3]
    assert any(n.startswith("fold 3 of the run's 4 not trained yet") for n in out["notes"]), out["notes"]
    shown = cli("eval", root, "--n-boot", "50", "--no-plots")
    assert shown.exit_code == 0 and _has(shown.stdout, "Pooled out-of-fold (90 scans of 3/4 folds")
    make_splits(subjects, k=3).save(root / "splits.json")  # all trained: nothing said
    out = _json(cli("eval", root, "--json", "--n-boot", "50", "--no-plots"))
    assert out["missing_folds"] == [] and not any("not trained yet" in n for n in out["notes"])
    # Three folds of 5 scans, 2 LGG among the 15 pooled: more subjects, not "pooled predictions", help.
    for k in range(3):
        rows = _fold_rows(10 + k, 5, only=1)
        if k < 2:
            rows[0]["label"] = 0
        FoldDir(root, k).write_predictions(rows)
    out = _json(cli("eval", root, "--json", "--n-boot", "50", "--no-plots"))
    note = [n for n in out["notes"] if n.startswith("only 2 LGG scans of 15")]
    assert note and note[0].endswith("more subjects give firmer ones"), out["notes"]


def _held_out_set(root, n=4):
    """Labelled subjects outside any training split, as a CSV manifest (subject_id, t1ce, grade)."""
    from helpers_predict import write_subject

    rows = ["subject_id,t1ce,grade"]
    for i in range(n):
        sid, hgg = f"Held_{i:03d}", i % 2 == 1
        path = write_subject(root, sid, ("t1ce",), seed=100 + i, hgg=hgg)["t1ce"]
        rows.append(f"{sid},{path},{'HGG' if hgg else 'LGG'}")
    manifest = root / "held.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_a_held_out_folder_says_what_it_did_not_score(cli, trained, tmp_path):
    """A test folder with a folder of scans not named by sequence: that folder is no subject, so the metrics
    are over the others; eval said nothing of it (data prepare neither)."""
    import csv

    from helpers_predict import write_subject

    from medcli.data.synth import NAME_MAPPING_HEADER_2020

    root = tmp_path / "held"
    with open(root.parent / "mapping.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(NAME_MAPPING_HEADER_2020)
        for i in range(4):
            write_subject(root, f"Held_{i:03d}", ("t1ce",), seed=100 + i, hgg=i % 2 == 1)
            w.writerow(["HGG" if i % 2 else "LGG", "NA", "NA", "NA", "NA", f"Held_{i:03d}"])
    (root.parent / "mapping.csv").rename(root / "name_mapping.csv")
    write_subject(root, "Held_004", ("scan",))  # Held_004/Held_004_scan.nii.gz: no sequence named
    r = cli(
        "eval",
        trained["run"],
        "--test",
        root,
        "--json",
        "--n-boot",
        "0",
        "--no-plots",
        "--out",
        tmp_path / "e",
    )
    assert r.exit_code == 0, r.stderr
    assert _json(r)["pooled"]["n"] == 4
    note = f"{root}: left out 1 folder(s) whose NIfTI files are not named by sequence (Held_004)"
    assert _has(r.stderr, note)
    r = cli("data", "prepare", root, "--cache", tmp_path / "cache", "--input-size", "16")
    assert r.exit_code == 0, r.stderr
    assert _has(r.stderr, note)


def test_a_held_out_set_is_scored_by_the_fold_ensemble(cli, trained, tmp_path):
    """`eval RUN --test DATA`: each scan's P(HGG) is predict's ensemble mean, the metrics are scikit-learn's
    on them, and the output goes beside (not over) the run's own evaluation."""
    import csv
    import shutil

    run = shutil.copytree(trained["run"], tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    held = _held_out_set(tmp_path / "held")
    r = cli("eval", run, "--test", held, "--json", "--n-boot", "100", "--no-plots")
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    assert out["kind"] == "test" and out["test"]["members"] == 2 and out["pooled"]["n"] == 4
    table = list(csv.DictReader((run / "eval" / "test-held" / "predictions.csv").open()))
    p = {t["subject_id"]: float(t["p_hgg"]) for t in table}
    held_pr = cli("predict", held, "--model", run, "--json")
    pr = _json(held_pr)
    assert {q["scan_id"]: q["p_hgg"] for q in pr["predictions"]} == pytest.approx(p, abs=1e-6)
    assert "trained or validated on" not in held_pr.stderr  # held out: nothing to say
    y = [int(t["label"]) for t in table]
    assert out["pooled"]["auc"] == pytest.approx(skm.roc_auc_score(y, [float(t["p_hgg"]) for t in table]))
    assert out["pooled"]["ci"]["auc"]["low"] <= out["pooled"]["auc"] <= out["pooled"]["ci"]["auc"]["high"]
    assert not (run / "eval" / "eval.json").exists()  # the run's own (validation) evaluation untouched
    # --tta: each scan's P(HGG) is predict --tta's (the members' 8 flips averaged).
    flipped = _json(cli("eval", run, "--test", held, "--tta", "--json", "--n-boot", "0", "--no-plots"))
    assert flipped["test"]["flips"] == 8 and out["test"]["flips"] == 1
    table = list(csv.DictReader((run / "eval" / "test-held" / "predictions.csv").open()))
    pr = _json(cli("predict", held, "--model", run, "--tta", "--json"))
    p_tta = {t["subject_id"]: float(t["p_hgg"]) for t in table}
    assert {q["scan_id"]: q["p_hgg"] for q in pr["predictions"]} == pytest.approx(p_tta, abs=1e-6)
    assert p_tta != pytest.approx(p, abs=1e-6)
    assert cli("eval", run, "--tta").exit_code == 2  # validation scores are training's, without flips
    shown = cli("eval", run / "fold0", "--test", held, "--n-boot", "0", "--no-plots")
    assert shown.exit_code == 0 and _has(
        shown.stdout, f"held-out test set {held} (1 model of {run / 'fold0'}"
    )


def test_an_output_folder_that_cannot_be_made_is_one_error_line(cli, trained, tmp_path):
    """Where the default <run>/eval cannot be made (a file in its place): the OSError is one line naming
    the path (exit 1), not a traceback."""
    import shutil

    run = shutil.copytree(trained["run"], tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    (run / "eval").write_text("in the way")
    r = cli("eval", run, "--n-boot", "0", "--recompute", "--weights", "raw")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(run / "eval") in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.output


def test_a_test_set_is_scored_whole_or_not_at_all(cli, trained, tmp_path):
    """Metrics over part of the set a user named would mislead: a scan unusable from its header (truncated)
    or only once read (NaN voxels) stops `eval --test` with the subject named; a row without a grade is
    not a failure (it cannot be scored) and is named in a note.  A truncated scan used to be dropped with
    an INFO line and exit 0."""
    import shutil

    import nibabel as nib

    run = shutil.copytree(trained["run"], tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    held = _held_out_set(tmp_path / "held", n=5)
    rows = held.read_text().splitlines()
    scans = {r.split(",")[0]: Path(r.split(",")[1]) for r in rows[1:]}

    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join([*rows[:-1], rows[-1].rsplit(",", 1)[0] + ","]) + "\n")
    r = cli("eval", run, "--test", unlabelled, "--json", "--n-boot", "0", "--no-plots")
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    assert out["pooled"]["n"] == 4 and any("1 subject under" in n and "no grade" in n for n in out["notes"])

    truncated = scans["Held_001"]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    r = cli("eval", run, "--test", held, "--n-boot", "0", "--no-plots")
    assert r.exit_code == 3, r.output
    assert _has(r.stderr, "1 of the 5 test subjects under") and _has(
        r.stderr, "(e.g. Held_001: t1ce: truncated"
    )
    assert _has(r.stderr, "metrics over the rest would not be over the set you named")
    truncated.write_bytes(data)

    img = nib.load(scans["Held_002"])
    voxels = np.asarray(img.dataobj, dtype=np.float32)
    voxels[voxels != 0] = np.nan
    nib.save(nib.Nifti1Image(voxels, img.affine), scans["Held_002"])
    r = cli("eval", run, "--test", held, "--n-boot", "0", "--no-plots")
    assert r.exit_code == 3, r.output
    assert _has(r.stderr, "1 of 5 test scans could not be scored (e.g. Held_002:")
    assert not (run / "eval" / "test-held" / "eval.json").exists()


def test_a_test_set_is_held_out_and_its_threshold_chosen_on_validation(cli, trained, tmp_path):
    import shutil

    run = shutil.copytree(trained["run"], tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    # The training cohort itself: every fold trained on some of it.
    r = cli("eval", run, "--test", trained["data"], "--n-boot", "0", "--no-plots")
    assert r.exit_code == 3 and _has(r.stderr, "are in the split the model was trained with")
    held = _held_out_set(tmp_path / "held")
    r = cli("eval", run, "--test", held, "--tune-threshold", "youden")
    assert r.exit_code == 2 and _has(r.stderr, "would choose the threshold on the test set")
    r = cli("eval", run, "--test", held, "--threshold", "tuned")
    assert r.exit_code == 2 and _has(r.stderr, "eval.json does not exist")
    r = cli("eval", run, "--threshold", "tuned")
    assert r.exit_code == 2 and _has(r.stderr, "--threshold tuned applies to --test")
    for bad in ("2", "high"):  # parsed as predict parses it
        r = cli("eval", run, "--test", held, "--threshold", bad)
        assert r.exit_code == 2 and _has(r.stderr, f"--threshold {bad} is not in [0, 1] or `tuned`")
    for bad in ("--recompute", "--fold"):
        args = [bad] if bad == "--recompute" else [bad, "0"]
        r = cli("eval", run, "--test", held, *args)
        assert r.exit_code == 2 and _has(r.stderr, "are for validation data")
    tuned = _json(cli("eval", run, "--recompute", "--tune-threshold", "youden", "--json", "--n-boot", "0"))
    r = cli("eval", run, "--test", held, "--threshold", "tuned", "--json", "--n-boot", "0", "--no-plots")
    assert r.exit_code == 0, r.stderr
    out = _json(r)
    assert out["threshold"]["value"] == pytest.approx(tuned["threshold"]["deploy"])
    assert out["pooled"]["threshold"] == pytest.approx(tuned["threshold"]["deploy"])
