"""Patient-grouped, grade-stratified k-fold cross-validation splits, saved with the run.

Folds come from scikit-learn's ``StratifiedGroupKFold`` (shuffled, seeded): every fold's validation set has
close to the cohort's LGG/HGG ratio, and all scans of one patient land on the same side of every split
(no patient leaks from training into validation).  As in nnU-Net, the split is written once to
``runs/<name>/splits.json`` and reused by every fold and every resume; its ``cohort_hash`` (sha256 of the
sorted subject ids, labels and patient ids) catches a data folder that changed in between.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medcli.atomic import atomic_write_text
from medcli.data import CLASS_NAMES
from medcli.errors import DataError, UsageError

FORMAT = "medcli-splits/1"
DEFAULT_K = 5


def cohort_hash(records: Iterable[tuple[str, int, str]]) -> str:
    """sha256 over sorted ``(subject_id, label, patient_id)`` lines: the identity of a labelled cohort."""
    lines = sorted(f"{sid}\t{int(label)}\t{pid}" for sid, label, pid in records)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _records(subjects: Sequence) -> list[tuple[str, int, str]]:
    """(subject_id, label, patient_id) for each subject; DataError for unlabelled or duplicated ones."""
    records, seen = [], set()
    unlabelled = [s.subject_id for s in subjects if s.label is None]
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} subjects have no LGG/HGG grade (e.g. {unlabelled[0]}); splits need labels",
            hint="pass cohort.require_labels() (only labelled subjects) to make_splits",
        )
    for s in subjects:
        if s.subject_id in seen:
            raise DataError(f"subject id {s.subject_id} appears twice", hint="subject ids must be unique")
        seen.add(s.subject_id)
        records.append((s.subject_id, int(s.label), s.patient_id or s.subject_id))
    return records


@dataclass
class Splits:
    """k folds of (train_ids, val_ids) plus what is needed to check they still fit the data."""

    k: int
    seed: int
    folds: list[tuple[list[str], list[str]]]
    labels: dict[str, int]  # subject → 0/1
    patients: dict[str, str]  # subject → patient
    cohort_hash: str

    # -- access

    def fold(self, i: int) -> tuple[list[str], list[str]]:
        """(train_ids, val_ids) of fold ``i``; UsageError outside 0..k−1."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.k:
            raise UsageError(
                f"fold {i} does not exist: this split has k={self.k} folds",
                hint=f"choose --fold between 0 and {self.k - 1}",
            )
        train, val = self.folds[i]
        return list(train), list(val)

    @property
    def subject_ids(self) -> list[str]:
        return sorted(self.labels)

    def fold_summary(self) -> list[dict]:
        """Per fold: sizes and grade counts of train and validation (for tables and logs)."""
        out = []
        for i, (train, val) in enumerate(self.folds):
            row: dict = {"fold": i, "n_train": len(train), "n_val": len(val)}
            for part, ids in (("train", train), ("val", val)):
                counts = Counter(self.labels[s] for s in ids)
                for label, name in enumerate(CLASS_NAMES):
                    row[f"{part}_{name}"] = counts.get(label, 0)
            out.append(row)
        return out

    # -- cohort checks

    def check_cohort(self, subjects: Sequence, *, path: str | os.PathLike | None = None) -> None:
        """DataError when ``subjects`` is not the cohort this split was made for (ids, labels or patients)."""
        records = _records(subjects)
        if cohort_hash(records) == self.cohort_hash:
            return
        now = {sid: (label, pid) for sid, label, pid in records}
        added = len(now.keys() - self.labels.keys())
        removed = len(self.labels.keys() - now.keys())
        common = now.keys() & self.labels.keys()
        relabelled = sum(1 for s in common if now[s][0] != self.labels[s])
        regrouped = sum(1 for s in common if now[s][1] != self.patients.get(s, s))
        changes = [
            f"{n} subject{'s' if n != 1 else ''} {what}"
            for n, what in ((added, "added"), (removed, "removed"), (relabelled, "relabelled"))
            if n
        ]
        if regrouped:
            changes.append(f"{regrouped} with a different patient id")
        where = str(path) if path is not None else "the split file"
        raise DataError(
            f"the cohort changed since {where} was made ({', '.join(changes) or 'contents differ'})",
            hint="start a new run with --name, or delete the split file to split again",
        )

    # -- persistence

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "k": self.k,
            "seed": self.seed,
            "cohort_hash": self.cohort_hash,
            "n_subjects": len(self.labels),
            "class_names": list(CLASS_NAMES),
            "folds": [{"train": list(t), "val": list(v)} for t, v in self.folds],
            "subjects": {
                s: {"label": self.labels[s], "patient_id": self.patients.get(s, s)}
                for s in sorted(self.labels)
            },
        }

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "split data") -> Splits:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            subjects = d["subjects"]
            splits = cls(
                k=int(d["k"]),
                seed=int(d["seed"]),
                folds=[(list(f["train"]), list(f["val"])) for f in d["folds"]],
                labels={s: int(v["label"]) for s, v in subjects.items()},
                patients={s: str(v["patient_id"]) for s, v in subjects.items()},
                cohort_hash=str(d["cohort_hash"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(
                f"{source} is not a medcli split file ({e})", hint="delete it and run again to split afresh"
            ) from e
        splits._validate(source)
        return splits

    def _validate(self, source: str) -> None:
        """Every subject validated exactly once; train and validation disjoint; hash matches contents."""
        problem = None
        if len(self.folds) != self.k:
            problem = f"{len(self.folds)} folds listed for k={self.k}"
        else:
            val_counts = Counter(s for _, val in self.folds for s in val)
            if set(val_counts) != set(self.labels) or any(n != 1 for n in val_counts.values()):
                problem = "validation sets do not cover every subject exactly once"
            elif any(set(t) & set(v) or set(t) | set(v) != set(self.labels) for t, v in self.folds):
                problem = "a fold's train and validation sets overlap or miss subjects"
            elif cohort_hash((s, self.labels[s], self.patients[s]) for s in self.labels) != self.cohort_hash:
                problem = "its cohort_hash does not match the subjects it lists (edited by hand?)"
        if problem:
            raise DataError(
                f"{source} is inconsistent: {problem}", hint="delete it and run again to split afresh"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Splits:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"split file {path} not found", hint="train fold 0 first, or check --name"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(
                f"cannot read split file {path} ({e})", hint="delete it and run again to split afresh"
            ) from e
        if not isinstance(data, dict):
            raise DataError(
                f"{path} is not a medcli split file", hint="delete it and run again to split afresh"
            )
        return cls.from_dict(data, source=str(path))


# ------------------------------------------------------------------------------------------------ make


def make_splits(subjects: Sequence, k: int = DEFAULT_K, seed: int = 0) -> Splits:
    """Stratified (by grade), patient-grouped k-fold split of labelled ``subjects``.

    The result depends only on the cohort (ids, labels, patients), k and seed, not on the input order.
    Raises DataError (before any work) when a grade has fewer patients than folds: each validation fold
    must hold both grades for AUC to exist.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise UsageError(f"--folds {k}: cross-validation needs at least 2 folds", hint="use 5 (the default)")
    records = sorted(_records(subjects))
    if not records:
        raise DataError(
            "no labelled subjects to split", hint="check the data folder with `medcli data index`"
        )
    patients_per_class = {
        label: len({pid for _, lab, pid in records if lab == label}) for label in range(len(CLASS_NAMES))
    }
    for label, n in patients_per_class.items():
        name = CLASS_NAMES[label]
        if n == 0:
            raise DataError(
                f"the cohort has no {name} subjects ({len(records)} subjects, all "
                f"{CLASS_NAMES[1 - label]}); LGG-vs-HGG training needs both grades",
                hint="check the grades with `medcli data index`",
            )
        if n < k:
            raise DataError(
                f"only {n} {name} patient{'s' if n != 1 else ''} for {k} folds: some validation folds "
                f"would have no {name} case",
                hint=f"use fewer folds (--folds {max(2, n)}) or add {name} subjects",
            )

    from sklearn.model_selection import StratifiedGroupKFold  # imported here: slow, and only needed now

    ids = [sid for sid, _, _ in records]
    labels = [lab for _, lab, _ in records]
    groups = [pid for _, _, pid in records]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for train_idx, val_idx in splitter.split(ids, labels, groups):
        folds.append((sorted(ids[i] for i in train_idx), sorted(ids[i] for i in val_idx)))
    return Splits(
        k=k,
        seed=seed,
        folds=folds,
        labels={sid: lab for sid, lab, _ in records},
        patients={sid: pid for sid, _, pid in records},
        cohort_hash=cohort_hash(records),
    )


def ensure_splits(path: str | os.PathLike, subjects: Sequence, k: int = DEFAULT_K, seed: int = 0) -> Splits:
    """The run's split: load ``path`` and check it fits ``subjects`` (and k/seed), or make and save it.

    This is what ``train`` calls for ``runs/<name>/splits.json``, so every fold of a run, and every resume,
    uses the same split.
    """
    path = Path(path)
    if path.exists():
        splits = Splits.load(path)
        splits.check_cohort(subjects, path=path)
        if splits.k != k or splits.seed != seed:
            raise UsageError(
                f"{path} was made with k={splits.k}, seed={splits.seed}, not k={k}, seed={seed}",
                hint=f"pass --folds {splits.k} --seed {splits.seed}, or start a new run with --name",
            )
        return splits
    splits = make_splits(subjects, k=k, seed=seed)
    splits.save(path)
    return splits
