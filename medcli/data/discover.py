"""Find subjects on disk: BraTS 2017-2023 layouts and generic CSV manifests → a ``Cohort``.

What is recognised (see /work/shared/reference/brats.md):

- **Graded folders** (BraTS 2017/2018/2019): ``ROOT/HGG/<subject>/`` and ``ROOT/LGG/<subject>/``; the grade
  is the parent folder.  2019 adds ``name_mapping.csv``.
- **Flat folders** (BraTS 2020): ``ROOT/<subject>/`` with the grade only in ``ROOT/name_mapping.csv``
  (``Grade`` column, keyed by ``BraTS_2020_subject_ID``).
- **BraTS 2021+**: flat folders named ``BraTS2021_00000`` (2023: ``BraTS-GLI-00000-000`` with t1n/t1c/t2w/t2f
  files).  These carry *no grade*: usable for prediction, refused for training by ``Cohort.require_labels``.
- **CSV manifest**: one row per subject with a subject id, an optional label (LGG/HGG or 0/1), one path
  column per modality (relative to the CSV) and an optional patient id.  ROOT may be the CSV itself.
- A parent folder holding several of these (e.g. BraTS 2019 *and* 2020), or several roots at once.  BraTS
  2019 subjects all reappear in 2020: subjects linked by a ``name_mapping.csv`` row are kept once.

Discovery reads NIfTI *headers* only (shape, affine, and the gzip trailer to catch truncated downloads),
never voxel data, so indexing a full BraTS release takes seconds.  Anything wrong with a subject becomes a
``Problem`` record and the subject is set aside; discovery itself fails only when nothing was found.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from medcli.data import (
    CLASS_NAMES,
    MODALITIES,
    MODALITY_ALIASES,
    canonical_modality,
    grade_to_label,
    parse_grade,
)
from medcli.errors import DataError

DICOM_HINT = (
    "convert it to NIfTI first, e.g. `dcm2niix -z y -o OUT_DIR DICOM_DIR`; BraTS-trained models also expect "
    "scans skull-stripped and co-registered as BraTS's are"
)


def looks_like_dicom(path: Path, probe: int = 20) -> bool:
    """Whether ``path`` is a DICOM file, or a folder (searched to two levels, ``probe`` files at most) holding
    one: the ``DICM`` marker at byte 128 (Part 10 files) or a ``.dcm`` name."""
    path = Path(path)
    if path.is_dir():
        files = [f for pattern in ("*", "*/*") for f in path.glob(pattern) if f.is_file()]
        return any(looks_like_dicom(f) for f in files[:probe])
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


NAME_MAPPING = "name_mapping.csv"

# `BraTS20_Training_001_t1ce.nii.gz`, `Brats18_2013_0_1_seg.nii`, `BraTS-GLI-00000-000-t1c.nii.gz`.
# `<id>_<sequence>.nii.gz`: every spelling canonical_modality knows (BraTS's, BraTS 2023's, T1Gd as in
# UPenn-GBM), longest first so `_t2-flair` is one token, not `_t2` + `-flair`.
_FILE_TOKENS = sorted({*MODALITIES, *MODALITY_ALIASES, "seg"}, key=len, reverse=True)
MODALITY_FILE = re.compile(rf"[_-]({'|'.join(map(re.escape, _FILE_TOKENS))})\.nii(\.gz)?$", re.IGNORECASE)
# BraTS20_Training_355 names its segmentation `W39_1998.09.19_Segm.nii`.
ODD_SEG_FILE = re.compile(r"segm?\.nii(\.gz)?$", re.IGNORECASE)
NIFTI_FILE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)

# Subject-id prefix → BraTS release.  Used for the layout name and to prefer the newest copy on dedupe.
_RELEASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^brats17_", re.I), "brats2017"),
    (re.compile(r"^brats18_", re.I), "brats2018"),
    (re.compile(r"^brats19_", re.I), "brats2019"),
    (re.compile(r"^brats20_", re.I), "brats2020"),
    (re.compile(r"^brats2021_", re.I), "brats2021"),
    (re.compile(r"^brats-[a-z]+-\d", re.I), "brats2023"),
)
_UNGRADED_RELEASES = ("brats2021", "brats2023")

# CSV manifest column names (compared lower-case).
_ID_COLUMNS = ("subject_id", "subject", "case_id", "case", "id", "name")
_LABEL_COLUMNS = ("label", "grade", "class", "target")
_PATIENT_COLUMNS = ("patient_id", "patient", "patientid", "group")
_SEG_COLUMNS = ("seg", "segmentation", "mask")


class NoSubjectsFound(DataError):
    """A folder holding nothing :func:`discover` recognises; ``predict``, which needs no labels, words it
    its own way."""


@dataclass(frozen=True)
class Problem:
    """Something wrong with one subject (or the cohort, when ``subject`` is None).

    ``severity="error"``: the subject is set aside (``Cohort.excluded``).  ``"warning"``: it is kept, e.g. a
    scan without a grade stays usable for prediction but not for training.
    """

    subject: str | None
    file: str | None
    what: str
    hint: str
    severity: str = "error"

    def to_dict(self) -> dict:
        return {
            "subject": self.subject,
            "file": self.file,
            "what": self.what,
            "hint": self.hint,
            "severity": self.severity,
        }


@dataclass
class Subject:
    """One scan session: its MRI sequences, grade and patient.

    ``paths`` maps a canonical modality (t1, t1ce, t2, flair) to its file; the segmentation, when present,
    is ``seg``.  ``patient_id`` defaults to the subject id (BraTS has one scan per patient); CSV manifests
    may group several scans under one patient, which splits keep together.  ``source`` names the layout
    the subject came from (``brats2020``, ``csv``, ...).
    """

    subject_id: str
    grade: str | None = None
    label: int | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    patient_id: str | None = None
    source: str = ""
    seg: Path | None = None

    def __post_init__(self) -> None:
        if self.patient_id in (None, ""):
            self.patient_id = self.subject_id
        if self.grade is not None:
            self.grade = self.grade.upper()
            label = grade_to_label(self.grade)
            if self.label is not None and int(self.label) != label:
                raise ValueError(f"{self.subject_id}: grade {self.grade} contradicts label {self.label}")
            self.label = label
        elif self.label is not None:
            self.label = int(self.label)
            self.grade = CLASS_NAMES[self.label]

    @property
    def labelled(self) -> bool:
        return self.label is not None

    def to_dict(self) -> dict:
        return {
            "subject_id": self.subject_id,
            "patient_id": self.patient_id,
            "grade": self.grade,
            "label": self.label,
            "source": self.source,
            "paths": {m: str(p) for m, p in self.paths.items()},
            "seg": str(self.seg) if self.seg else None,
        }


@dataclass
class Cohort:
    """What ``discover`` found.  ``subjects`` are usable; ``excluded`` had an error-level problem."""

    roots: list[Path]
    layout: str
    subjects: list[Subject]
    excluded: list[Subject] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    required_modalities: tuple[str, ...] | None = None
    # Files and folders under the roots that are no subject's (said by every command, predict's included;
    # ``notes`` are about grades and merges, which prediction does not need).
    left_out: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.subjects)

    def labelled(self) -> list[Subject]:
        return [s for s in self.subjects if s.labelled]

    def grade_counts(self) -> dict[str, int]:
        """Usable subjects per grade; unlabelled ones under ``"unlabelled"``."""
        counts = Counter(s.grade or "unlabelled" for s in self.subjects)
        return {g: counts.get(g, 0) for g in (*CLASS_NAMES, "unlabelled")}

    def modality_counts(self) -> dict[str, int]:
        """How many usable subjects have each modality (and ``seg``)."""
        counts = Counter(m for s in self.subjects for m in s.paths)
        counts["seg"] = sum(1 for s in self.subjects if s.seg is not None)
        return {m: counts[m] for m in (*MODALITIES, "seg") if counts[m]}

    def reason(self, subject_id: str | None = None) -> Problem | None:
        """The problem that says most about ``subject_id`` (any subject when None): its first error (why it
        was set aside), else its first warning (e.g. no grade); None when it has none."""
        theirs = [p for p in self.problems if subject_id is None or p.subject == subject_id]
        return next((p for p in theirs if p.severity == "error"), theirs[0] if theirs else None)

    def require_usable(self) -> list[Subject]:
        """The usable subjects; ``DataError`` when every subject found had a problem."""
        if not self.subjects:
            where = ", ".join(str(r) for r in self.roots)
            first = self.reason()
            raise DataError(
                f"no usable subject under {where}: all {len(self.excluded)} found have problems "
                f"(first: {first.subject}: {first.what})"
                if first
                else f"no usable subject under {where}",
                hint="run `medcli data index` to see every problem and what to do",
            )
        return self.subjects

    def require_labels(self) -> list[Subject]:
        """The usable subjects that have a grade; ``DataError`` saying why when there are none.

        Unlabelled subjects among labelled ones were already reported as warnings; they are left out here.
        """
        subjects = self.require_usable()
        labelled = [s for s in subjects if s.labelled]
        if labelled:
            return labelled
        where = ", ".join(str(r) for r in self.roots)
        if any(part in _UNGRADED_RELEASES for part in self.layout.split("+")):
            raise DataError(
                f"{where}: BraTS 2021+ data carry no LGG/HGG grade (the challenge dropped grading), "
                "so they cannot be used for training",
                hint="use these scans with `medcli predict`, or train from BraTS 2017-2020 or a CSV "
                "manifest with a label column",
            )
        one = self.roots[0] if len(self.roots) == 1 and len(subjects) == 1 else None
        if self.layout.startswith("csv"):
            hint = "add a label column (LGG/HGG or 0/1) to the manifest"
        elif one is not None and (one.parent / NAME_MAPPING).is_file():  # one subject's folder of a cohort
            hint = f"this is one subject's folder: pass the dataset folder, {one.parent}"
        elif one is not None and one.parent.name.upper() in CLASS_NAMES:  # BraTS 2017-2019: HGG/<subject>
            hint = f"this is one subject's folder: pass the dataset folder, {one.parent.parent}"
        else:
            hint = (
                f"BraTS 2019/2020 keep the grade in {NAME_MAPPING} next to the subject folders; put it "
                "there, or use a CSV manifest with a label column"
            )
        raise DataError(f"{where}: none of the {len(subjects)} subjects has an LGG/HGG grade", hint=hint)

    def to_dict(self) -> dict:
        return {
            "roots": [str(r) for r in self.roots],
            "layout": self.layout,
            "n_subjects": len(self.subjects),
            "grades": self.grade_counts(),
            "modalities": self.modality_counts(),
            "required_modalities": list(self.required_modalities) if self.required_modalities else None,
            "subjects": [s.to_dict() for s in self.subjects],
            "excluded": [s.subject_id for s in self.excluded],
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
            "left_out": list(self.left_out),
        }


# --------------------------------------------------------------------------------------------- entry point


def discover(
    *roots: str | os.PathLike | Sequence[str | os.PathLike],
    modalities: Sequence[str] | None = None,
    check_headers: bool = True,
) -> Cohort:
    """Find every subject under ``roots`` (folders or CSV manifests) and check their files' headers.

    ``modalities``: the sequences each subject must have (e.g. a training config's ``("t1ce",)``); by
    default all four for BraTS layouts and every path column of a CSV manifest.  A subject lacking one is
    set aside with a problem record.  ``check_headers=False`` skips opening files (existence only).
    """
    flat: list[Path] = []
    for r in roots:
        if isinstance(r, (list, tuple)):
            flat.extend(Path(x) for x in r)
        else:
            flat.append(Path(r))
    if not flat:
        raise DataError("no data folder given", hint="pass a BraTS folder or a CSV manifest")
    required = _normalise_modalities(modalities) if modalities is not None else None

    found: list[_Source] = []
    for root in flat:
        if not root.exists():
            raise DataError(f"{root} does not exist", hint="check the path: a BraTS folder or a CSV manifest")
        sources = _scan(root, depth=0)
        if not sources:
            if looks_like_dicom(root):
                raise DataError(f"{root} holds DICOM files, not NIfTI", hint=DICOM_HINT)
            raise NoSubjectsFound(
                f"no BraTS subjects or CSV manifest found under {root}",
                hint="expected HGG/ and LGG/ folders (BraTS 2017-2019), subject folders with "
                "*_t1ce.nii.gz files and name_mapping.csv (BraTS 2020), or a CSV manifest",
            )
        found.extend(sources)

    problems = [p for src in found for p in src.problems]
    notes = [n for src in found for n in src.notes]
    candidates = _dedupe(found, notes, problems)

    # Errors found while scanning (two files for one sequence, an id used twice) also set a subject aside.
    flagged = {p.subject for p in problems if p.severity == "error" and p.subject}
    usable: list[Subject] = []
    excluded: list[Subject] = []
    for subject, declared in candidates:
        need = required if required is not None else declared
        subject_problems = _check_subject(subject, need, check_headers)
        problems.extend(subject_problems)
        if subject.subject_id in flagged or any(p.severity == "error" for p in subject_problems):
            excluded.append(subject)
        else:
            usable.append(subject)

    layouts = list(dict.fromkeys(src.layout for src in found))
    usable.sort(key=lambda s: s.subject_id)
    if required is None:  # report what was effectively required: the union of what the layouts promise
        promised = {m for _, declared in candidates for m in declared}
        required = tuple(m for m in MODALITIES if m in promised)
    return Cohort(
        roots=flat,
        layout="+".join(layouts),
        subjects=usable,
        excluded=excluded,
        problems=problems,
        notes=notes,
        required_modalities=required,
        left_out=[n for src in found for n in src.left_out],
    )


# ------------------------------------------------------------------------------------------------ scanning


@dataclass
class _Source:
    """Subjects from one recognised layout, before cross-root dedupe and header checks."""

    root: Path
    layout: str
    subjects: list[tuple[Subject, tuple[str, ...]]]  # (subject, modalities this layout promises)
    mapping: _NameMapping | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # Cohort.left_out


def _scan(root: Path, depth: int) -> list[_Source]:
    """Recognise the layout at ``root``; look one or two levels down when ``root`` is only a parent."""
    if root.is_file():
        if root.suffix.lower() in MANIFEST_SUFFIXES:
            return [_read_manifest(root, explicit=True)]
        if NIFTI_FILE.search(root.name):
            raise DataError(
                f"{root} is a single NIfTI file, not a cohort",
                hint="pass its subject folder, the dataset folder, or a CSV manifest",
            )
        if looks_like_dicom(root):
            raise DataError(f"{root} is a DICOM file, not NIfTI", hint=DICOM_HINT)
        raise DataError(f"{root} is neither a folder nor a CSV manifest", hint="pass a BraTS folder or a CSV")

    manifests = [m for m in _csv_files(root) if _looks_like_manifest(m)]
    if len(manifests) > 1:
        names = ", ".join(m.name for m in manifests)
        raise DataError(
            f"{root} holds several CSV manifests ({names})", hint="pass the one to use as the path itself"
        )
    if manifests:
        return [_read_manifest(manifests[0], explicit=False)]

    subdirs = _subdirs(root)
    graded = {d.name.upper(): d for d in subdirs if d.name.upper() in CLASS_NAMES}
    mapping = _NameMapping.read(root / NAME_MAPPING) if (root / NAME_MAPPING).is_file() else None
    if graded:
        return [_graded_source(root, graded, mapping)]
    if root.name.upper() in CLASS_NAMES and any(_has_modality_files(d) for d in subdirs):
        # One grade folder of a 2017-2019 release given on its own (e.g. .../HGG): the grade is its name.
        parent_mapping = root.parent / NAME_MAPPING
        mapping = _NameMapping.read(parent_mapping) if parent_mapping.is_file() else None
        return [_graded_source(root.parent, {root.name.upper(): root}, mapping, whole=False)]
    # A folder holding subject folders is a dataset, not a subject, even with a stray scan of its own (a
    # release unzipped one level down, one file dropped beside its subjects): looked into below.
    subject_dirs = [d for d in subdirs if _has_modality_files(d) and not _holds_subjects(d)]
    if subject_dirs:
        source = _flat_source(root, subject_dirs, mapping)
        source.left_out += _left_out_beside(root, [d for d in subdirs if d not in subject_dirs])
        return [source]
    if _has_modality_files(root):  # one subject's folder, or several subjects' files side by side
        return [_loose_files_source(root)]
    if depth < 2:
        return [src for d in subdirs for src in _scan(d, depth + 1)]
    return []


def _left_out_beside(folder: Path, others: Iterable[Path]) -> list[str]:
    """Lines naming what lies beside the subject folders in ``folder`` and became no subject: ``others``
    (its other sub-folders) that hold NIfTI files, and scans lying loose in ``folder`` itself."""
    lines = []
    others = list(others)
    unreadable = [d.name for d in others if _entries(d) is None]
    if unreadable:  # one subject's folder without read permission must not cost the whole cohort
        shown = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        lines.append(
            f"{folder}: left out {len(unreadable)} folder(s) that cannot be read ({shown}); check their "
            "permissions (ls -ld)"
        )
    unnamed = [d.name for d in others if _has_nifti(d)]
    if unnamed:  # folders whose scans say no sequence
        shown = ", ".join(unnamed[:3]) + (", ..." if len(unnamed) > 3 else "")
        lines.append(
            f"{folder}: left out {len(unnamed)} folder(s) whose NIfTI files are not named by sequence "
            f"({shown}); name them <id>_t1ce.nii.gz (t1, t1ce, t2, flair; t1c, t1gd, t2f, ... too)"
        )
    stray = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and MODALITY_FILE.search(p.name)
    )
    if stray:  # a subject's files beside the subject folders belong to no subject
        shown = ", ".join(stray[:3]) + (", ..." if len(stray) > 3 else "")
        lines.append(
            f"{folder}: left out {len(stray)} file(s) lying beside the subject folders ({shown}); "
            "move each into its subject's folder"
        )
    return lines


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _csv_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file()
        and p.suffix.lower() in MANIFEST_SUFFIXES
        and p.name.lower() != NAME_MAPPING
        and not p.name.lower().startswith("survival")
    )


def _entries(folder: Path) -> list[Path] | None:
    """What ``folder`` holds, or None when it cannot be listed (no permission)."""
    try:
        return list(folder.iterdir())
    except OSError:
        return None


def _has_modality_files(folder: Path) -> bool:
    return any(MODALITY_FILE.search(p.name) for p in _entries(folder) or () if not p.name.startswith("."))


def _holds_subjects(folder: Path) -> bool:
    """``folder`` is a dataset: its grade folders, ``name_mapping.csv`` or subject folders say so."""
    if (folder / NAME_MAPPING).is_file():
        return True
    subdirs = [p for p in _entries(folder) or () if p.is_dir() and not p.name.startswith(".")]
    return any(d.name.upper() in CLASS_NAMES or _has_modality_files(d) for d in subdirs)


def _has_nifti(folder: Path) -> bool:
    return any(NIFTI_FILE.search(p.name) for p in _entries(folder) or () if not p.name.startswith("."))


def _release_of(subject_id: str) -> str | None:
    for pattern, release in _RELEASES:
        if pattern.search(subject_id):
            return release
    return None


def _layout_name(subject_ids: Iterable[str], fallback: str) -> str:
    releases = Counter(_release_of(s) for s in subject_ids)
    release, _ = releases.most_common(1)[0] if releases else (None, 0)
    return release or fallback


def _subject_files(
    folder: Path, entries: Iterable[Path] | None = None, name: str | None = None
) -> tuple[dict[str, Path], Path | None, list[Problem]]:
    """The modality files and segmentation of one subject (by filename suffix): those in ``folder``, or
    ``entries`` (files of subject ``name`` lying beside other subjects' files)."""
    files: dict[str, list[Path]] = defaultdict(list)
    odd_seg: list[Path] = []
    for p in sorted((_entries(folder) or []) if entries is None else entries):  # unreadable: no subject
        if p.name.startswith(".") or not p.is_file():
            continue
        m = MODALITY_FILE.search(p.name)
        if m:
            token = m.group(1).lower()
            files["seg" if token == "seg" else canonical_modality(token)].append(p)
        elif ODD_SEG_FILE.search(p.name):
            odd_seg.append(p)
    problems = []
    paths: dict[str, Path] = {}
    for modality, candidates in files.items():
        if len(candidates) > 1:
            names = ", ".join(c.name for c in candidates)
            problems.append(
                Problem(
                    name or folder.name,
                    str(folder),
                    f"{len(candidates)} files for {modality} ({names})",
                    "keep one file per sequence (e.g. delete the uncompressed .nii copy)",
                )
            )
        paths[modality] = candidates[0]
    seg = paths.pop("seg", None)
    paths = {m: paths[m] for m in MODALITIES if m in paths}  # BraTS order
    if seg is None and len(odd_seg) == 1:
        seg = odd_seg[0]
    return paths, seg, problems


def _graded_source(
    root: Path, graded: dict[str, Path], mapping: _NameMapping | None, *, whole: bool = True
) -> _Source:
    """BraTS 2017/2018/2019: the parent folder is the grade (``whole``: ``root`` was given, not one of its
    grade folders alone, so what lies beside the grade folders is said too)."""
    subjects, problems = [], []
    others = [d for d in _subdirs(root) if d not in graded.values()]
    left_out = _left_out_beside(root, others) if whole else []
    for grade, folder in sorted(graded.items()):
        not_subjects = []
        for d in _subdirs(folder):
            paths, seg, file_problems = _subject_files(d)
            if not paths and seg is None:
                not_subjects.append(d)
                continue
            problems.extend(file_problems)
            if mapping is not None:
                mapped = mapping.grade_of(d.name)
                if mapped is not None and mapped != grade:
                    problems.append(
                        Problem(
                            d.name,
                            str(mapping.path),
                            f"{NAME_MAPPING} says {mapped} but the folder says {grade}",
                            "the folder grade is used; fix whichever is wrong",
                            severity="warning",
                        )
                    )
            subjects.append((Subject(d.name, grade=grade, paths=paths, seg=seg), MODALITIES))
        left_out += _left_out_beside(folder, not_subjects)
    layout = _layout_name((s.subject_id for s, _ in subjects), "brats-graded")
    for s, _ in subjects:
        s.source = layout
    notes = _absent_note(root, mapping, [s.subject_id for s, _ in subjects]) if mapping and whole else []
    return _Source(root, layout, subjects, mapping, problems, notes, left_out=left_out)


def _flat_source(root: Path, subject_dirs: list[Path], mapping: _NameMapping | None) -> _Source:
    """BraTS 2020 (grade from name_mapping.csv), 2021+ (no grade) and plain subject folders."""
    layout = _layout_name((d.name for d in subject_dirs), "folders")
    subjects, problems, notes = [], [], []
    for d in subject_dirs:
        paths, seg, file_problems = _subject_files(d)
        problems.extend(file_problems)
        grade = mapping.grade_of(d.name) if mapping is not None else None
        if mapping is not None and grade is None:
            problems.append(
                Problem(
                    d.name,
                    str(mapping.path),
                    f"not listed in {NAME_MAPPING}: no grade",
                    "usable for prediction only; add its row to name_mapping.csv to train on it",
                    severity="warning",
                )
            )
        subjects.append((Subject(d.name, grade=grade, paths=paths, seg=seg, source=layout), MODALITIES))
    if mapping is not None:
        notes += _absent_note(root, mapping, [d.name for d in subject_dirs])
    if layout in _UNGRADED_RELEASES:
        notes.append(f"{root}: {layout} data carry no LGG/HGG grade: usable for prediction, not for training")
    elif mapping is None:
        notes.append(
            f"{root}: no {NAME_MAPPING} here, so no grades: usable for prediction, not for training "
            "(BraTS 2020 keeps grades in name_mapping.csv)"
        )
    return _Source(root, layout, subjects, mapping, problems, notes)


def _loose_files_source(folder: Path) -> _Source:
    """NIfTI files directly in ``folder``: one subject when they share one prefix (a subject folder, named
    after the folder), else one subject per prefix (``p01_t1ce.nii.gz``, ``p02_t1ce.nii.gz``, ...)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in folder.iterdir():
        m = MODALITY_FILE.search(p.name)
        if m and not p.name.startswith(".") and p.is_file():
            groups[p.name[: m.start()]].append(p)
    if len(groups) == 1:
        source = _flat_source(folder.parent, [folder], None)
        mapping = folder.parent / NAME_MAPPING
        if mapping.is_file():  # the grade is there; the note must not say it is not
            source.notes = [
                f"{folder}: one subject's folder, without its grade (that is in {mapping}): usable for "
                f"prediction; pass the dataset folder, {folder.parent}, to train"
            ]
        return source
    layout = _layout_name(groups, "files")
    subjects, problems = [], []
    for prefix, entries in sorted(groups.items()):
        paths, seg, file_problems = _subject_files(folder, entries, name=prefix)
        problems.extend(file_problems)
        subjects.append((Subject(prefix, paths=paths, seg=seg, source=layout), MODALITIES))
    notes = [f"{folder}: loose NIfTI files grouped into {len(groups)} subjects by name; no grades"]
    return _Source(folder, layout, subjects, None, problems, notes)


# ---------------------------------------------------------------------------------------- name_mapping.csv


class _NameMapping:
    """BraTS ``name_mapping.csv``: each row links one patient's ids across releases, with its grade."""

    def __init__(self, path: Path, rows: list[dict[str, str]]):
        self.path = path
        self.rows = rows
        self._row_of: dict[str, int] = {}
        for i, row in enumerate(rows):
            for column, value in row.items():
                if column and column.lower().endswith("subject_id") and _present(value):
                    self._row_of[value.strip().lower()] = i

    @classmethod
    def read(cls, path: Path) -> _NameMapping:
        try:  # as a spreadsheet may have saved it: semicolons, another case in the header
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f, dialect=_dialect(path, f)))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"cannot read {path}: {e}", hint="restore the file from the BraTS release") from e
        columns = {(c or "").strip() for c in (rows[0].keys() if rows else [])}
        lower = {c.lower() for c in columns}
        if rows and ("grade" not in lower or not any(c.endswith("subject_id") for c in lower)):
            raise DataError(
                f"{path} is not a BraTS name_mapping.csv (columns: {', '.join(sorted(columns))})",
                hint="expected Grade,BraTS_2017_subject_ID,...,BraTS_2020_subject_ID",
            )

        def column(name: str) -> str:
            return "Grade" if name.strip().lower() == "grade" else name.strip()

        rows = [{column(k or ""): (v or "").strip() for k, v in row.items()} for row in rows]
        return cls(path, rows)

    def row_index(self, subject_id: str) -> int | None:
        return self._row_of.get(subject_id.lower())

    def grade_of(self, subject_id: str) -> str | None:
        i = self.row_index(subject_id)
        if i is None:
            return None
        try:
            return parse_grade(self.rows[i].get("Grade"), where=f"{self.path} row {i + 2}")
        except DataError:
            return None


def _absent_note(root: Path, mapping: _NameMapping, found: Iterable[str]) -> list[str]:
    """A note when ``name_mapping.csv`` lists patients none of whose ids is a subject here: a download or
    unzip that stopped part-way looks like a smaller cohort otherwise."""
    have = {i.lower() for i in found}
    absent = []
    for row in mapping.rows:
        ids = [v for k, v in row.items() if k.lower().endswith("subject_id") and _present(v)]
        if ids and not any(i.lower() in have for i in ids):
            absent.append(ids[-1])  # the newest release's id: the one this folder would use
    if not absent:
        return []
    return [
        f"{root}: {len(absent)} of the {len(mapping.rows)} patients {NAME_MAPPING} lists are not here (e.g. "
        f"{absent[0]}): an incomplete download or unzip?"
    ]


def _present(value: str | None) -> bool:
    return value is not None and value.strip().upper() not in ("", "NA", "N/A", "NAN", "NONE")


_RELEASE_ORDER = ("brats2017", "brats2018", "brats2019", "brats2020", "brats2021", "brats2023")


def _dedupe(
    sources: list[_Source], notes: list[str], problems: list[Problem]
) -> list[tuple[Subject, tuple[str, ...]]]:
    """Merge subjects from all sources; the same patient from two BraTS releases is kept once (newest).

    Two subjects are the same when a ``name_mapping.csv`` row (from any root) names both, e.g. a 2020 row's
    ``BraTS_2019_subject_ID``.  Without this, 2019 + 2020 would count 335 patients twice and leak between
    training and validation folds.
    """
    # Union-find over ids (lower-case): every name_mapping row joins the ids it lists.
    parent: dict[str, str] = {}

    def find(i: str) -> str:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for mapping in (s.mapping for s in sources if s.mapping is not None):
        for row in mapping.rows:
            ids = [v.lower() for k, v in row.items() if k.lower().endswith("subject_id") and _present(v)]
            for other in ids[1:]:
                parent[find(other)] = find(ids[0])

    kept: dict[str, tuple[Subject, tuple[str, ...]]] = {}
    owner: dict[Path, str] = {}  # each scan file's subject: one file under two ids would sit in both folds
    dropped: Counter[tuple[str, str]] = Counter()
    for src in sources:
        for subject, declared in src.subjects:
            where = str(next(iter(subject.paths.values()), "")) or None
            key = find(subject.subject_id.lower())
            if key not in kept:
                kept[key] = (subject, declared)
                shared = [owner[f] for f in _resolved(subject.paths) if f in owner]
                if shared:
                    problems.append(
                        Problem(
                            subject.subject_id,
                            where,
                            f"its scan is also subject {shared[0]}'s (the same file under two ids)",
                            "give each scan one subject: remove or fix the duplicate row",
                        )
                    )
                owner.update(dict.fromkeys(_resolved(subject.paths), subject.subject_id))
                continue
            other = kept[key][0]
            if other.subject_id == subject.subject_id and _resolved(other.paths) == _resolved(subject.paths):
                if other.grade != subject.grade:  # one scan, two grades: which is true cannot be guessed
                    problems.append(
                        Problem(
                            other.subject_id,
                            where,
                            f"listed twice with different grades ({other.grade or 'none'} and "
                            f"{subject.grade or 'none'})",
                            "keep the row with the right grade and remove the other",
                        )
                    )
                continue  # the same folder reached twice (e.g. a root and its parent, a row repeated)
            if other.source == subject.source:
                # Said of the kept one: ids that differ only in case (c1, C1) are one subject's too.
                problems.append(
                    Problem(
                        other.subject_id,
                        where,
                        f"subject id found twice (also {subject.subject_id} in {subject.source})",
                        "remove the duplicate folder or manifest row",
                    )
                )
                continue
            newer, older = sorted((other, subject), key=lambda s: _release_rank(s.source), reverse=True)
            kept[key] = (newer, declared if newer is subject else kept[key][1])
            dropped[(older.source, newer.source)] += 1
    for (old, new), n in sorted(dropped.items()):
        what = f"{n} {old} subjects reappear" if n != 1 else f"1 {old} subject reappears"
        notes.append(f"{what} in {new} (linked by {NAME_MAPPING}); kept the {new} copy once")
    return list(kept.values())


def _resolved(paths: dict[str, Path]) -> list[Path]:
    """A subject's scan files as absolute real paths: a folder given as ``data`` and ``$PWD/data`` is one."""
    return [Path(os.path.realpath(p)) for p in paths.values()]


def _release_rank(layout: str) -> int:
    return _RELEASE_ORDER.index(layout) if layout in _RELEASE_ORDER else -1


# -------------------------------------------------------------------------------------------- CSV manifest


def _manifest_columns(header: Sequence[str]) -> dict[str, str | dict[str, str]]:
    """Map a manifest header onto roles: id, label, patient, seg, and modality → column."""
    lower = {h.strip().lower(): h for h in header if h}
    roles: dict[str, str | dict[str, str]] = {}
    for role, names in (
        ("id", _ID_COLUMNS),
        ("label", _LABEL_COLUMNS),
        ("patient", _PATIENT_COLUMNS),
        ("seg", _SEG_COLUMNS),
    ):
        for name in names:
            if name in lower:
                roles[role] = lower[name]
                break
    modality_columns: dict[str, str] = {}
    for low, original in lower.items():
        m = canonical_modality(low)
        if m and m not in modality_columns:
            modality_columns[m] = original
    roles["modalities"] = modality_columns
    return roles


# A manifest saved by a spreadsheet: commas, or semicolons where the comma is the decimal mark (Excel in
# much of Europe), or tabs (.tsv); a byte-order mark in front (utf-8-sig).
MANIFEST_SUFFIXES = (".csv", ".tsv")


def _dialect(path: Path, f) -> type[csv.Dialect] | csv.Dialect:
    """The delimiter the manifest's header line uses (comma when it cannot tell, e.g. one column)."""
    header = f.readline()
    f.seek(0)
    if path.suffix.lower() == ".tsv":
        return csv.excel_tab
    try:
        return csv.Sniffer().sniff(header, delimiters=",;\t")
    except csv.Error:
        return csv.excel


def _read_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, _dialect(path, f)), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _looks_like_manifest(path: Path) -> bool:
    roles = _manifest_columns(_read_header(path))
    return "id" in roles and bool(roles["modalities"])


def _read_manifest(path: Path, *, explicit: bool) -> _Source:
    """A generic CSV manifest: subject id, optional label and patient id, one path column per modality."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, dialect=_dialect(path, f))
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {path}: {e}", hint="save it as a UTF-8 CSV file") from e
    roles = _manifest_columns(header)
    modality_columns: dict[str, str] = roles["modalities"]  # type: ignore[assignment]
    if "id" not in roles or not modality_columns:
        if path.name.lower() == NAME_MAPPING:  # BraTS's own grade table, passed for the dataset
            raise DataError(
                f"{path} is BraTS's grade table, not a subject manifest",
                hint=f"pass the folder that holds it and the subject folders: {path.parent}",
            )
        raise DataError(
            f"{path} is not a subject manifest (columns: {', '.join(header) or 'none'})",
            hint="expected a subject_id column, optionally label (LGG/HGG or 0/1) and patient_id, and one "
            f"path column per modality ({', '.join(MODALITIES)}), paths relative to the CSV",
        )
    base = path.parent
    subjects, problems = [], []
    declared = tuple(m for m in MODALITIES if m in modality_columns)
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path.name} row {i}"
        subject_id = (row.get(roles["id"]) or "").strip()  # type: ignore[arg-type]
        if not subject_id:
            if any((v or "").strip() for v in row.values()):
                problems.append(Problem(None, str(path), f"{where}: empty subject id", "fill in subject_id"))
            continue
        grade = None
        if "label" in roles:
            try:
                grade = parse_grade(row.get(roles["label"]), where=where)  # type: ignore[arg-type]
            except DataError as e:
                problems.append(Problem(subject_id, str(path), e.message, e.hint or "", severity="warning"))
            if grade is None:
                problems.append(
                    Problem(
                        subject_id,
                        str(path),
                        f"{where}: no label",
                        "usable for prediction only; write LGG/HGG (or 0/1) to train on it",
                        severity="warning",
                    )
                )
        paths = {}
        for modality, column in modality_columns.items():
            value = (row.get(column) or "").strip()
            if value:
                paths[modality] = _manifest_path(value, base)
        seg_value = (row.get(roles["seg"]) or "").strip() if "seg" in roles else ""  # type: ignore[arg-type]
        seg = _manifest_path(seg_value, base) if seg_value else None
        patient = (row.get(roles["patient"]) or "").strip() if "patient" in roles else ""  # type: ignore[arg-type]
        subject = Subject(
            subject_id, grade=grade, paths=paths, patient_id=patient or None, source="csv", seg=seg
        )
        subjects.append((subject, declared))
    notes = [] if "label" in roles else [f"{path}: no label column: usable for prediction, not for training"]
    return _Source(path, "csv", subjects, None, problems, notes)


def _manifest_path(value: str, base: Path) -> Path:
    """A manifest cell's file: ``~`` expanded, a relative path taken from the manifest's folder.  A manifest
    written on Windows has ``case_001\\t1.nii.gz``: on Linux a backslash is part of a file name, so where no
    file has that name the path is read with ``/`` separators."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if "\\" in value and not path.exists():
        posix = _manifest_path(value.replace("\\", "/"), base)
        if posix.exists():
            return posix
    return path


# --------------------------------------------------------------------------------------- per-subject checks


def _normalise_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    out = []
    for m in modalities:
        c = canonical_modality(m)
        if c is None:
            raise DataError(f"unknown modality {m!r}", hint=f"choose from {', '.join(MODALITIES)}")
        out.append(c)
    return tuple(dict.fromkeys(out))


def _check_subject(subject: Subject, required: Sequence[str], check_headers: bool) -> list[Problem]:
    """Missing sequences, unreadable/truncated files, and sequences whose grids disagree."""
    sid = subject.subject_id
    problems = []
    for modality in required:
        if modality not in subject.paths:
            problems.append(
                Problem(
                    sid,
                    None,
                    f"missing {modality}",
                    f"add the {modality} file, or train with --modalities that leave it out",
                )
            )
    reference: tuple[str, tuple[int, ...], object] | None = None
    # Compare every file against t1ce (the sequence models rely on most), else the first one.
    files = sorted(subject.paths.items(), key=lambda item: item[0] != "t1ce")
    for modality, path in [*files, *([("seg", subject.seg)] if subject.seg else [])]:
        severity = "warning" if modality == "seg" else "error"  # a bad seg does not block classification
        if not path.is_file():
            todo = "fix the path"
            if "\\" in str(path):  # a Windows path (C:\\...), or a Windows-written one with no file behind it
                todo += " (written for Windows: give a path on this machine, / separated)"
            problems.append(Problem(sid, str(path), f"{modality} file not found", todo, severity=severity))
            continue
        if not check_headers:
            continue
        header = _read_nifti_header(path)
        if isinstance(header, _Unreadable):
            problems.append(Problem(sid, str(path), f"{modality}: {header.what}", header.todo, severity))
            continue
        shape, affine, oriented = header
        if not oriented:
            from medcli.data.nifti import NO_ORIENTATION, NO_ORIENTATION_HINT  # nibabel: only when needed

            problems.append(
                Problem(sid, str(path), f"{modality}: {NO_ORIENTATION}", NO_ORIENTATION_HINT, "warning")
            )
        if reference is None:
            reference = (modality, shape, affine)
            continue
        ref_modality, ref_shape, ref_affine = reference
        if shape != ref_shape:
            problems.append(
                Problem(
                    sid,
                    str(path),
                    f"{modality} shape {shape} differs from {ref_modality} {ref_shape}",
                    "resample all sequences of a subject onto one grid (BraTS sequences are co-registered)",
                    severity,
                )
            )
        else:
            diff = _affine_difference(affine, ref_affine)
            if diff > 1e-3:
                problems.append(
                    Problem(
                        sid,
                        str(path),
                        f"{modality} affine differs from {ref_modality}'s (by up to {diff:.3g} mm)",
                        "co-register the sequences, or fix the header with the affine of the others",
                        severity,
                    )
                )
    if subject.seg is not None and any(p.file == str(subject.seg) for p in problems):
        subject.seg = None  # the warning says why; the subject stays usable without it
    return problems


class _Unreadable(NamedTuple):
    """Why a file cannot be used as a scan, and what to do about it."""

    what: str
    todo: str = "re-download or re-export the file"


def _read_nifti_header(path: Path) -> tuple[tuple[int, ...], object, bool] | _Unreadable:
    """(3-D shape, affine, whether it has an orientation) from the header alone, or what is wrong with the
    file and what to do.

    Reads the first 540 bytes (gunzipped on the fly) and parses them with nibabel's header classes:
    about 5× cheaper than ``nibabel.load``, which also builds an image and sniffs for sidecar files.
    """
    import gzip

    import nibabel as nib  # imported here: `medcli data --help` stays instant

    from medcli.data.nifti import DEGENERATE_AFFINE, has_orientation, misnamed_compression, usable_affine

    if misnamed := misnamed_compression(path):
        return _Unreadable(*misnamed)
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read(540)
        header_class, size = None, 0
        for order in ("little", "big"):
            size = int.from_bytes(raw[:4], order)
            if size in (348, 540):
                header_class = nib.Nifti1Header if size == 348 else nib.Nifti2Header
                endianness = "<" if order == "little" else ">"
                break
        if header_class is None or len(raw) < size:
            return _Unreadable("not a NIfTI file (no NIfTI-1/2 header at its start)")
        header = header_class(raw[:size], endianness=endianness, check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        affine = header.get_best_affine()
        oriented = has_orientation(header)
        # Single-file NIfTI data start at vox_offset, never before the header (+4 extension bytes) ends.
        offset = max(int(header["vox_offset"]), size + 4)
        itemsize = header.get_data_dtype().itemsize
    except Exception as e:  # gzip/nibabel raise many kinds for a bad file; all mean "unreadable"
        if _starts_like_html(path):
            return _Unreadable(
                "is an HTML/text page, not a NIfTI file (a login or error page saved as the download?)"
            )
        return _Unreadable(f"not a readable NIfTI file ({type(e).__name__}: {e})")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        return _Unreadable(f"is {len(shape)}-D with shape {shape}, expected one 3-D volume")
    if not usable_affine(affine):
        return _Unreadable(*DEGENERATE_AFFINE)
    expected = offset + itemsize * shape[0] * shape[1] * shape[2]
    if _looks_truncated(path, expected):
        return _Unreadable(
            "truncated: the file ends before its image data does (an interrupted download or copy?)"
        )
    return shape, affine, oriented


def _starts_like_html(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            start = f.read(64).lstrip().lower()
    except OSError:
        return False
    return start.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def _looks_truncated(path: Path, expected: int) -> bool:
    """Whether the file holds fewer bytes than its header promises, without decompressing in the usual case.

    ``.nii``: the file size.  ``.nii.gz``: the gzip trailer (ISIZE: uncompressed size mod 2**32), which a
    cut-off file lacks.  nibabel, ITK and gzip write a single gzip member, so ISIZE is the whole size; when
    it is not (a cut-off file, or several members: bgzip, ``cat a.gz b.gz``) the file is decompressed once
    to tell the two apart.
    """
    try:
        if path.name.lower().endswith(".gz"):
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if int.from_bytes(f.read(4), "little") == expected % (1 << 32):
                    return False
            length = _gzip_length(path)
            return length is None or length < expected
        return path.stat().st_size < expected
    except OSError:
        return True


def _gzip_length(path: Path) -> int | None:
    """Uncompressed length over all gzip members; None when the stream is cut off or corrupt."""
    import gzip
    import zlib

    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return n


def _affine_difference(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
