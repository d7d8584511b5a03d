"""Data: finding subjects on disk, splitting them into folds, preprocessing, and a synthetic cohort.

Class labels are fixed across medcli: ``0 = LGG``, ``1 = HGG`` (the positive class, so "p_hgg" and AUC
are about HGG).  This module stays import-light (standard library only): the CLI imports it for names and
helpers without pulling numpy, nibabel or torch.

Submodules: ``discover`` (BraTS layouts and CSV manifests → ``Cohort``), ``splits`` (patient-grouped
stratified k-fold), ``synth`` (BraTS-like synthetic volumes), and the preprocessing/dataset modules.
"""

from __future__ import annotations

from collections.abc import Sequence

from medcli.errors import DataError, UsageError

CLASS_NAMES: tuple[str, str] = ("LGG", "HGG")
"""Index = label: 0 = LGG (WHO grade II/III), 1 = HGG (glioblastoma, grade IV)."""

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""The four BraTS MRI sequences, in BraTS order.  ``t1ce`` (post-contrast T1) carries the most signal."""

MODALITY_ALIASES: dict[str, str] = {
    # BraTS 2023 renamed the sequences; manifests in the wild use these spellings too.
    "t1n": "t1",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t1-gd": "t1ce",
    "t2w": "t2",
    "t2f": "flair",
    "t2-flair": "flair",
}


def canonical_modality(name: str) -> str | None:
    """``"T1c"`` → ``"t1ce"``; ``None`` for a name that is not an MRI sequence medcli knows."""
    key = name.strip().lower()
    key = MODALITY_ALIASES.get(key, key)
    return key if key in MODALITIES else None


def canonical_modalities(names: str | Sequence[str]) -> tuple[str, ...]:
    """``"T1c, t2f"`` or ``["t1c", "t2f"]`` → ``("t1ce", "flair")``: the one spelling that discovery,
    preprocessing, cache keys, checkpoints and run names share.  Unknown, empty or repeated names are a
    UsageError."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    given = [str(p).strip() for p in parts if str(p).strip()]
    if not given:
        raise UsageError("no modality given", hint="e.g. --modalities t1ce or --modalities t1ce,flair")
    out = []
    for name in given:
        canonical = canonical_modality(name)
        if canonical is None:
            raise UsageError(
                f"unknown modality {name!r}",
                hint=f"choose from {', '.join(MODALITIES)} (BraTS 2023's t1n, t1c, t2w, t2f work too)",
            )
        out.append(canonical)
    if len(set(out)) != len(out):
        raise UsageError(
            f"modalities {', '.join(given)} name one sequence twice",
            hint="give distinct names, e.g. t1ce,flair",
        )
    return tuple(out)


def grade_to_label(grade: str) -> int:
    """``"HGG"`` → 1, ``"LGG"`` → 0 (case-insensitive)."""
    return CLASS_NAMES.index(grade.strip().upper())


def label_to_grade(label: int) -> str:
    """1 → ``"HGG"``, 0 → ``"LGG"``."""
    return CLASS_NAMES[int(label)]


def parse_grade(value: object, *, where: str = "") -> str | None:
    """Read a grade written as LGG/HGG (any case) or 0/1; empty/NA → ``None`` (unlabelled).

    Raises ``DataError`` naming ``where`` (e.g. "manifest.csv row 7") for anything else.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.upper() in ("", "NA", "N/A", "NAN", "NONE", "?"):
        return None
    if text.upper() in CLASS_NAMES:
        return text.upper()
    if text in ("0", "1", "0.0", "1.0"):
        return CLASS_NAMES[int(float(text))]
    prefix = f"{where}: " if where else ""
    raise DataError(
        f"{prefix}grade {text!r} is not LGG/HGG or 0/1",
        hint="write LGG or HGG (0 = LGG, 1 = HGG), or leave it empty for an unlabelled scan",
    )


__all__ = [
    "CLASS_NAMES",
    "MODALITIES",
    "MODALITY_ALIASES",
    "canonical_modalities",
    "canonical_modality",
    "grade_to_label",
    "label_to_grade",
    "parse_grade",
]
