"""Patient-grouped stratified k-fold splits: balance, grouping, stability, persistence, cohort checks."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from medcli.data.discover import Subject
from medcli.data.splits import Splits, cohort_hash, ensure_splits, make_splits
from medcli.errors import DataError, UsageError


def cohort(n: int = 100, n_lgg: int = 30, pairs: int = 0) -> list[Subject]:
    """``n`` subjects, the first ``n_lgg`` LGG; the first ``pairs`` patients of each grade have two scans."""
    subjects = []
    for i in range(n):
        lgg = i < n_lgg
        first = i if lgg else i - n_lgg  # index within the grade
        patient = f"{'L' if lgg else 'H'}{first // 2}" if first < 2 * pairs else None
        subjects.append(Subject(f"s{i:03d}", grade="LGG" if lgg else "HGG", patient_id=patient))
    return subjects


def test_every_subject_validated_exactly_once_and_folds_disjoint():
    subjects = cohort()
    splits = make_splits(subjects, k=5, seed=0)
    all_ids = {s.subject_id for s in subjects}
    val_counts = Counter(sid for i in range(5) for sid in splits.fold(i)[1])
    assert set(val_counts) == all_ids and set(val_counts.values()) == {1}
    for i in range(5):
        train, val = splits.fold(i)
        assert not set(train) & set(val)
        assert set(train) | set(val) == all_ids


def test_folds_are_stratified_by_grade():
    subjects = cohort(n=100, n_lgg=30)
    splits = make_splits(subjects, k=5, seed=3)
    for row in splits.fold_summary():
        assert row["n_val"] == 20
        assert abs(row["val_LGG"] / row["n_val"] - 0.3) <= 0.05  # 6 of 20, give or take one
        assert row["train_LGG"] + row["val_LGG"] == 30


def test_scans_of_one_patient_never_straddle_a_split():
    subjects = cohort(n=60, n_lgg=20, pairs=8)
    patient_of = {s.subject_id: s.patient_id for s in subjects}
    assert len(set(patient_of.values())) == 60 - 16  # 16 patients with two scans
    splits = make_splits(subjects, k=5, seed=0)
    for i in range(5):
        train, val = splits.fold(i)
        assert not {patient_of[s] for s in train} & {patient_of[s] for s in val}


def test_stable_for_a_seed_and_independent_of_input_order():
    subjects = cohort()
    shuffled = subjects[:]
    random.Random(1).shuffle(shuffled)
    a, b = make_splits(subjects, seed=7), make_splits(shuffled, seed=7)
    assert a.folds == b.folds and a.cohort_hash == b.cohort_hash
    assert make_splits(subjects, seed=8).folds != a.folds


def test_save_load_roundtrip_is_atomic_and_validated(tmp_path):
    splits = make_splits(cohort(), k=5, seed=0)
    path = splits.save(tmp_path / "run" / "splits.json")
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left behind
    loaded = Splits.load(path)
    assert loaded == splits
    data = json.loads(path.read_text())
    assert data["format"] == "medcli-splits/1" and data["cohort_hash"] == splits.cohort_hash

    data["folds"][0]["val"].append(data["folds"][1]["val"][0])  # a subject validated twice
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="exactly once"):
        Splits.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read split file"):
        Splits.load(path)
    with pytest.raises(DataError, match="not found"):
        Splits.load(tmp_path / "missing.json")


def test_cohort_change_is_detected_with_what_changed(tmp_path):
    subjects = cohort(n=40, n_lgg=12)
    splits = make_splits(subjects)
    splits.check_cohort(list(reversed(subjects)))  # same cohort, other order: fine

    added = [
        *subjects,
        Subject("new1", grade="HGG"),
        Subject("new2", grade="LGG"),
        Subject("new3", grade="HGG"),
    ]
    with pytest.raises(DataError) as e:
        splits.check_cohort(added, path="runs/x/splits.json")
    assert "the cohort changed since runs/x/splits.json was made (3 subjects added)" in str(e.value)
    assert "--name" in str(e.value)

    relabelled = [Subject(s.subject_id, grade="HGG") if s.subject_id == "s000" else s for s in subjects]
    with pytest.raises(DataError, match="1 subject relabelled"):
        splits.check_cohort(relabelled)
    with pytest.raises(DataError, match="2 subjects removed"):
        splits.check_cohort(subjects[2:])
    regrouped = [
        Subject(s.subject_id, grade=s.grade, patient_id="P") if s.subject_id == "s039" else s
        for s in subjects
    ]
    with pytest.raises(DataError, match="different patient id"):
        splits.check_cohort(regrouped)


def test_cohort_hash_covers_ids_labels_and_patients():
    base = [("a", 0, "a"), ("b", 1, "b")]
    assert cohort_hash(base) == cohort_hash(reversed(base))
    assert cohort_hash(base) != cohort_hash([("a", 1, "a"), ("b", 1, "b")])
    assert cohort_hash(base) != cohort_hash([("a", 0, "p"), ("b", 1, "b")])


def test_too_few_of_a_grade_absent_grade_and_unlabelled_fail_early():
    with pytest.raises(DataError, match="only 4 LGG patients for 5 folds") as e:
        make_splits(cohort(n=40, n_lgg=4), k=5)
    assert "--folds 4" in str(e.value)
    # Patients count, not scans: 6 LGG scans from 3 patients cannot fill 5 folds.
    with pytest.raises(DataError, match="only 3 LGG patients"):
        make_splits(cohort(n=40, n_lgg=6, pairs=3), k=5)
    with pytest.raises(DataError, match="no LGG subjects"):
        make_splits(cohort(n=20, n_lgg=0))
    with pytest.raises(DataError, match="no LGG/HGG grade"):
        make_splits([*cohort(n=20, n_lgg=10), Subject("u")])
    with pytest.raises(DataError, match="appears twice"):
        make_splits([*cohort(n=20, n_lgg=10), Subject("s000", grade="HGG")])
    with pytest.raises(UsageError):
        make_splits(cohort(), k=1)


def test_fold_index_out_of_range_is_a_usage_error():
    splits = make_splits(cohort(), k=5)
    for bad in (-1, 5, 17):
        with pytest.raises(UsageError, match="choose --fold between 0 and 4"):
            splits.fold(bad)


def test_ensure_splits_makes_once_then_reuses_and_checks(tmp_path):
    path = tmp_path / "runs" / "r1" / "splits.json"
    subjects = cohort(n=30, n_lgg=10)
    first = ensure_splits(path, subjects, k=5, seed=0)
    assert path.is_file()
    again = ensure_splits(path, list(reversed(subjects)), k=5, seed=0)
    assert again == first
    with pytest.raises(UsageError, match="k=5, seed=0, not k=3"):
        ensure_splits(path, subjects, k=3, seed=0)
    with pytest.raises(DataError, match="1 subject added"):
        ensure_splits(path, [*subjects, Subject("late", grade="LGG")], k=5, seed=0)
