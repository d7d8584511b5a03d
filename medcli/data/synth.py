"""A BraTS-like synthetic cohort: skull-stripped head MRI with HGG-like or LGG-like tumours.

Real BraTS volumes may never be shipped (research-use licence), so tests and demos generate these at run
time.  Each subject is a brain (white matter, cortex, CSF and ventricles) seen through four MRI contrasts
(t1, t1ce, t2, flair) with a smooth bias field and noise, zero outside the brain, plus a tumour:

- **HGG-like**: necrotic core, enhancing rim on t1ce, large oedema bright on t2/flair.
- **LGG-like**: homogeneous non-enhancing mass bright on t2/flair, little oedema.

Confounders keep the task learnable but not trivial: some LGG enhance faintly or have a cyst, some HGG lack
necrosis or enhance weakly, size/position/intensities vary, and ``label_noise`` flips recorded grades.

Files follow BraTS exactly: ``BraTS20_Training_001/BraTS20_Training_001_t1ce.nii.gz``, int16 images, a
uint8 seg with labels 0/1/2/4, the LPS affine ``[[-1,0,0,0],[0,-1,0,239],[0,0,1,0]]`` (voxel sizes scaled
when the grid is smaller than 240×240×155), and ``name_mapping.csv`` with the BraTS header.

Determinism: subject *i* depends only on (seed, i), so it is the same whatever ``n_subjects`` is; grades
follow a seeded balanced sequence, so any prefix of the cohort has ``lgg_fraction`` LGG, rounded.
Everything is vectorised numpy on the brain's bounding box; a full-size subject takes about a second.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcli.atomic import atomic_write_bytes, atomic_write_text
from medcli.data import CLASS_NAMES, MODALITIES
from medcli.errors import UsageError
from medcli.paths import folder_for_now, require_writable_dir

FULL_SHAPE: tuple[int, int, int] = (240, 240, 155)
SMALL_SHAPE: tuple[int, int, int] = (64, 64, 48)
LAYOUTS = ("2020", "2019", "csv")
GENERATOR = "medcli-synth/1"

NAME_MAPPING_HEADER_2020 = (
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
)
NAME_MAPPING_HEADER_2019 = NAME_MAPPING_HEADER_2020[:-1]
MANIFEST_HEADER = ("subject_id", "patient_id", "label", *MODALITIES, "seg")

# BraTS20_Training_355's segmentation has this name in the real release; a cohort that big imitates it.
ODD_SEG_INDEX = 355
ODD_SEG_NAME = "W39_1998.09.19_Segm.nii"

# Tissue classes of the label map the images are painted from.
BG, CSF, GM, WM, OEDEMA, TUMOUR, ENHANCING, NECROSIS = range(8)
# BraTS seg label per tissue class: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing tumour.
SEG_OF_TISSUE = np.array([0, 0, 0, 0, 2, 1, 4, 1], dtype=np.uint8)
# Relative intensity of each tissue class per contrast (white matter on t1 = 1).  The enhancing value on
# t1ce is set per subject: that is the strongest HGG signal, as in real data.
CONTRAST = {
    #        bg   CSF   GM    WM    oedema tumour enh   necrosis
    "t1": (0.0, 0.35, 0.70, 1.00, 0.62, 0.55, 0.62, 0.35),
    "t1ce": (0.0, 0.35, 0.72, 1.00, 0.64, 0.56, 0.62, 0.30),
    "t2": (0.0, 1.80, 0.85, 0.55, 1.25, 1.30, 1.05, 1.55),
    "flair": (0.0, 0.20, 0.85, 0.60, 1.35, 1.25, 1.10, 0.70),
}
INTENSITY_SCALE = 500.0  # white matter on t1 ≈ 500, in the range of real BraTS int16 volumes


@dataclass
class SyntheticSubject:
    """One generated subject, before it is written: arrays plus what was drawn (for synth_info.json)."""

    index: int
    grade: str  # the recorded grade (after label noise)
    true_grade: str  # the grade the images were drawn as
    images: dict[str, np.ndarray]  # modality → int16 [X, Y, Z]
    seg: np.ndarray  # uint8 [X, Y, Z], BraTS labels
    params: dict = field(default_factory=dict)

    @property
    def label_flipped(self) -> bool:
        return self.grade != self.true_grade


@dataclass
class SynthResult:
    out: Path
    layout: str
    shape: tuple[int, int, int]
    seed: int
    subjects: list[dict]
    seconds: float

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    def grade_counts(self) -> dict[str, int]:
        return {g: sum(1 for s in self.subjects if s["grade"] == g) for g in CLASS_NAMES}

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "layout": self.layout,
            "shape": list(self.shape),
            "seed": self.seed,
            "n_subjects": self.n_subjects,
            "grades": self.grade_counts(),
            "label_flips": sum(1 for s in self.subjects if s["label_flipped"]),
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------- geometry


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """The BraTS LPS affine, with voxel sizes scaled so a smaller grid still spans the 240×240×155 mm head."""
    sx, sy, sz = (FULL_SHAPE[i] / shape[i] for i in range(3))
    return np.array(
        [[-sx, 0, 0, 0], [0, -sy, 0, (shape[1] - 1) * sy], [0, 0, sz, 0], [0, 0, 0, 1]], dtype=np.float64
    )


def subject_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Generator for subject ``index`` (1-based) that depends on nothing but (seed, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, stream)))


def subject_grade(seed: int, index: int, lgg_fraction: float) -> str:
    """Grade of subject ``index``: a seeded balanced (Sturmian) sequence.

    Subject i is LGG when ``floor(i·f + θ)`` steps up, so the first n subjects hold ``n·f`` LGG rounded
    up or down, for every n, and subject i's grade does not depend on the cohort size.
    """
    theta = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, 7))).random()
    return (
        "LGG"
        if math.floor(index * lgg_fraction + theta) > math.floor((index - 1) * lgg_fraction + theta)
        else "HGG"
    )


def _smooth_field(rng: np.random.Generator, coords, n_terms: int, max_freq: float) -> np.ndarray:
    """A smooth random field ≈ N(0, 1) on the grid spanned by 1-D ``coords`` (each in about [-1, 1]).

    A sum of separable cosine products ``Σ_j fx_j(x) fy_j(y) fz_j(z)``: written as one matrix product
    ``[X·Y, n] × [n, Z]``, it costs about one pass over the volume, with no FFT or interpolation.
    """
    x, y, z = coords
    freq = rng.uniform(0.5, max_freq, size=(3, n_terms, 1)) * math.pi
    phase = rng.uniform(0, 2 * math.pi, size=(3, n_terms, 1))
    fx, fy, fz = (
        np.cos(freq[i] * np.asarray(c)[None, :] + phase[i]).astype(np.float32) for i, c in enumerate(coords)
    )
    fxy = (fx[:, :, None] * fy[:, None, :]).reshape(n_terms, -1)  # [n, X·Y]
    # einsum's own loops rather than BLAS: a BLAS thread pool would spin on every core for this tiny
    # inner dimension, and fight the subject-level threads of synth_cohort(workers=...).
    out = np.einsum("nq,nz->qz", fxy, fz, optimize=False).reshape(len(x), len(y), len(z))
    out *= math.sqrt(8.0 / n_terms)  # each term has variance 1/8
    return out


# ------------------------------------------------------------------------------------------- one subject


def synth_subject(
    index: int,
    shape: tuple[int, int, int] = FULL_SHAPE,
    seed: int = 0,
    lgg_fraction: float = 0.3,
    label_noise: float = 0.0,
) -> SyntheticSubject:
    """Generate subject ``index`` (1-based) of a cohort: pure computation, no I/O."""
    rng = subject_rng(seed, index)
    true_grade = subject_grade(seed, index, lgg_fraction)
    flip = subject_rng(seed, index, stream=1).random() < label_noise
    grade = CLASS_NAMES[1 - CLASS_NAMES.index(true_grade)] if flip else true_grade
    hgg = true_grade == "HGG"

    spacing = np.array([FULL_SHAPE[i] / shape[i] for i in range(3)])
    # Brain: an ellipsoid (semi-axes in mm: left-right, anterior-posterior, superior-inferior) whose
    # surface is perturbed by a smooth field; computed on its bounding box only.
    semi = np.array([68.0, 84.0, 58.0]) * rng.uniform(0.9, 1.05)
    centre = np.array([120.0, 120.0, 77.5]) + rng.uniform(-4, 4, size=3) * np.array([1, 1, 0.5])
    lo = np.maximum(np.floor((centre - semi * 1.08) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre + semi * 1.08) / spacing).astype(int) + 1, shape)
    mm = [(np.arange(lo[i], hi[i]) + 0.5) * spacing[i] - centre[i] for i in range(3)]  # voxel centres, mm
    unit = [mm[i] / semi[i] for i in range(3)]  # ≈ [-1.08, 1.08] over the box
    r = np.sqrt(
        (unit[0] ** 2)[:, None, None] + (unit[1] ** 2)[None, :, None] + (unit[2] ** 2)[None, None, :]
    ).astype(np.float32)
    r /= 1.0 + 0.035 * _smooth_field(rng, unit, 4, 3.0)  # normalised radius; brain = r < 1

    tissue = np.full(r.shape, BG, dtype=np.uint8)
    folds = _smooth_field(rng, unit, 6, 9.0)  # gyri: where cortex dips into white matter
    tissue[r < 1.0] = CSF
    tissue[r < 0.965] = GM
    tissue[r < 0.86 + 0.045 * folds] = WM
    # Lateral ventricles: two ellipsoids beside the midline, CSF.
    vent_semi = np.array([7.0, 24.0, 11.0]) * rng.uniform(0.7, 1.3)
    for side in (-1, 1):
        vc = np.array([side * 9.0, 4.0, 8.0])
        v = (
            ((mm[0] - vc[0]) / vent_semi[0])[:, None, None] ** 2
            + ((mm[1] - vc[1]) / vent_semi[1])[None, :, None] ** 2
            + ((mm[2] - vc[2]) / vent_semi[2])[None, None, :] ** 2
        )
        tissue[v < 1.0] = CSF

    params = _paint_tumour(rng, tissue, mm, semi, hgg)

    background = tissue == BG
    texture = 1.0 + 0.03 * _smooth_field(rng, unit, 6, 12.0)
    # One noise volume, a few voxels larger than the box: each contrast reads it at its own offset, which
    # looks independent and costs one random draw instead of four.
    noise = rng.standard_normal(tuple(n + 3 for n in tissue.shape), dtype=np.float32)
    images: dict[str, np.ndarray] = {}
    for k, modality in enumerate(MODALITIES):
        lut = np.array(CONTRAST[modality], dtype=np.float32)
        if modality == "t1ce":
            lut[ENHANCING] = CONTRAST["t1ce"][ENHANCING] + params["enhancement"]
        if not hgg and modality in ("t2", "flair"):  # LGG masses vary in how bright they are
            lut[TUMOUR] *= params["mass_t2_gain"]
        box = lut[tissue]
        bias = _smooth_field(rng, unit, 3, 1.5)  # smooth multiplicative bias field, one per contrast
        bias *= 0.12
        np.exp(bias, out=bias)
        bias *= texture
        box *= bias
        ox, oy, oz = ((0, 0, 0), (1, 2, 3), (3, 1, 2), (2, 3, 1))[k]
        sigma = rng.uniform(0.015, 0.04)
        box += sigma * noise[ox : ox + box.shape[0], oy : oy + box.shape[1], oz : oz + box.shape[2]]
        box *= INTENSITY_SCALE * rng.uniform(0.75, 1.3)  # scanner gain
        box += 0.5  # round to nearest on the cast below
        np.clip(box, 0, 32767, out=box)
        box[background] = 0.0  # skull-stripped: exactly zero outside the brain
        images[modality] = _place(box.astype(np.int16), shape, lo, hi)
    seg = _place(SEG_OF_TISSUE[tissue], shape, lo, hi)
    return SyntheticSubject(index, grade, true_grade, images, seg, params)


def _place(box: np.ndarray, shape, lo, hi) -> np.ndarray:
    full = np.zeros(shape, dtype=box.dtype)
    full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = box
    return full


def _paint_tumour(rng: np.random.Generator, tissue: np.ndarray, mm, semi, hgg: bool) -> dict:
    """Draw the tumour's parameters and paint it into ``tissue`` (in place); return the parameters."""
    # Centre: in one hemisphere's white matter (off the midline), anywhere front to back.
    side = rng.choice([-1.0, 1.0])
    centre = semi * np.array(
        [side * rng.uniform(0.2, 0.5), rng.uniform(-0.55, 0.55), rng.uniform(-0.35, 0.45)]
    )
    radius = rng.uniform(14, 26) if hgg else rng.uniform(12, 24)  # mm, overlapping on purpose
    necrosis = hgg and rng.random() < 0.8  # some HGG have no necrotic core
    if hgg:
        enhancement = rng.uniform(0.35, 0.8) if rng.random() > 0.15 else rng.uniform(0.12, 0.3)
        oedema_extent = rng.uniform(1.5, 2.2)
        faint_patch = False
        cyst = False
    else:
        faint_patch = rng.random() < 0.2  # some LGG enhance faintly in a small patch
        enhancement = rng.uniform(0.08, 0.25) if faint_patch else 0.0
        oedema_extent = rng.uniform(1.05, 1.3)
        cyst = rng.random() < 0.1  # a dark cystic core that is not necrosis (no enhancing rim)
    params = {
        "centre_mm": [round(float(c), 2) for c in centre],
        "radius_mm": round(float(radius), 2),
        "necrosis": bool(necrosis),
        "enhancement": round(float(enhancement), 4),
        "oedema_extent": round(float(oedema_extent), 3),
        "faint_enhancing_patch": bool(faint_patch),
        "cyst": bool(cyst),
        "mass_t2_gain": round(float(rng.uniform(0.85, 1.15)), 3),
    }
    # Work on the tumour's own bounding box: the oedema reaches at most ~1.5 × its nominal extent.
    reach = radius * oedema_extent * 1.5
    sl = []
    for i in range(3):
        idx = np.nonzero(np.abs(mm[i] - centre[i]) <= reach)[0]
        if idx.size == 0:
            return params
        sl.append(slice(idx[0], idx[-1] + 1))
    box = tissue[sl[0], sl[1], sl[2]]
    local = [mm[i][sl[i]] - centre[i] for i in range(3)]
    span = [c / reach for c in local]
    dist = np.sqrt(
        (local[0] ** 2)[:, None, None] + (local[1] ** 2)[None, :, None] + (local[2] ** 2)[None, None, :]
    ).astype(np.float32)
    # Irregular outlines: the radius varies smoothly with position (kept positive).
    d_core = dist / (radius * np.maximum(1.0 + 0.15 * _smooth_field(rng, span, 4, 3.0), 0.4))
    d_oedema = dist / (
        radius * oedema_extent * np.maximum(1.0 + 0.25 * _smooth_field(rng, span, 5, 4.0), 0.4)
    )
    patches = _smooth_field(rng, span, 4, 5.0)
    inside = box != BG
    # Oedema spreads along white matter (and less into cortex), not into CSF.
    box[(d_oedema < 1.0) & ((box == WM) | ((box == GM) & (d_oedema < 0.8)))] = OEDEMA
    core = (d_core < 1.0) & inside
    if hgg:
        if necrosis:
            box[core] = ENHANCING
            box[core & (d_core < rng.uniform(0.45, 0.7))] = NECROSIS
        else:  # solid tumour, patchy enhancement
            box[core] = TUMOUR
            box[core & (patches > -0.3)] = ENHANCING
    else:
        box[core] = TUMOUR
        if faint_patch:
            box[core & (patches > 1.0)] = ENHANCING
        if cyst:
            box[core & (d_core < 0.35)] = CSF
    return params


# ----------------------------------------------------------------------------------------------- cohort


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"240,240,155"`` (or ``240x240x155``) → (240, 240, 155); UsageError for anything else."""
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 16 or max(shape) > 512:
        raise UsageError(
            f"--shape {text!r} is not three sizes between 16 and 512",
            hint="e.g. --shape 240,240,155 (BraTS) or --small for 64,64,48",
        )
    return shape  # type: ignore[return-value]


def _subject_id(layout: str, index: int) -> str:
    if layout == "2020":
        return f"BraTS20_Training_{index:03d}"
    if layout == "2019":
        return f"BraTS19_SYN_{index:03d}_1"
    return f"case_{index:03d}"


def synth_cohort(
    out: str | os.PathLike,
    n_subjects: int = 60,
    shape: tuple[int, int, int] = FULL_SHAPE,
    layout: str = "2020",
    seed: int = 0,
    lgg_fraction: float = 0.3,
    label_noise: float = 0.0,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """Write a synthetic BraTS-like cohort to ``out`` (which must be empty or absent).

    ``layout``: ``"2020"`` (flat folders + name_mapping.csv), ``"2019"`` (HGG/ and LGG/ folders +
    name_mapping.csv) or ``"csv"`` (folders + manifest.csv).  ``progress(done, total)`` is called after each
    subject.  ``workers`` > 1 writes subjects on that many threads (numpy and zlib release the GIL).
    ``synth_info.json`` records the drawn parameters and true grades (for debugging label noise).
    """
    out = Path(out)
    layout = str(layout).lower()
    validate_options(out, n_subjects, shape, layout, lgg_fraction, label_noise, workers)
    with folder_for_now(out):  # OUT and the parents made for it go again if nothing stays in them
        try:
            return _synth_into(
                out, n_subjects, shape, layout, seed, lgg_fraction, label_noise, workers, progress
            )
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed: no half cohort stays behind for a training to find,
            # and the same command can run again.  OUT was new or empty (validate_options): nothing is lost.
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            raise


def _synth_into(
    out: Path,
    n_subjects: int,
    shape: tuple[int, int, int],
    layout: str,
    seed: int,
    lgg_fraction: float,
    label_noise: float,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> SynthResult:
    affine = brats_affine(shape)
    started = time.perf_counter()

    def one(index: int) -> dict:
        subject = synth_subject(index, shape, seed, lgg_fraction, label_noise)
        return _write_subject(out, layout, subject, affine)

    records: list[dict] = []
    indices = range(1, n_subjects + 1)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for record in pool.map(one, indices):
                records.append(record)
                if progress:
                    progress(len(records), n_subjects)
    else:
        for index in indices:
            records.append(one(index))
            if progress:
                progress(len(records), n_subjects)

    if layout in ("2020", "2019"):
        _write_name_mapping(out, layout, records)
    else:
        _write_manifest(out, records)
    seconds = time.perf_counter() - started
    info = {
        "generator": GENERATOR,
        "seed": seed,
        "shape": list(shape),
        "layout": layout,
        "lgg_fraction": lgg_fraction,
        "label_noise": label_noise,
        "subjects": [{k: v for k, v in r.items() if k != "files"} for r in records],
    }
    atomic_write_text(out / "synth_info.json", json.dumps(info, indent=1) + "\n", fsync=False)
    return SynthResult(out, layout, tuple(shape), seed, records, seconds)  # type: ignore[arg-type]


def validate_options(
    out: str | os.PathLike, n_subjects: int, shape, layout: str, lgg_fraction=0.3, label_noise=0.0, workers=1
) -> None:
    """UsageError for options ``synth_cohort`` cannot honour (callers may check before announcing work)."""
    out = Path(out)
    layout = str(layout).lower()
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}", hint=f"choose one of: {', '.join(LAYOUTS)}")
    if n_subjects < 1:
        raise UsageError(f"--subjects {n_subjects}: need at least 1 subject")
    if len(shape) != 3 or min(shape) < 16:
        raise UsageError(f"shape {tuple(shape)}: need three sizes of at least 16 voxels")
    if not 0.0 <= lgg_fraction <= 1.0:
        raise UsageError(f"--lgg-fraction {lgg_fraction}: must be between 0 and 1")
    if not 0.0 <= label_noise <= 0.5:
        raise UsageError(
            f"--label-noise {label_noise}: must be between 0 and 0.5 (the share of flipped grades)"
        )
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"{out} already exists and is not an empty folder",
            hint="choose a new folder, or delete this one first",
        )
    require_writable_dir(out, "OUT")


def _write_subject(out: Path, layout: str, subject: SyntheticSubject, affine: np.ndarray) -> dict:
    import nibabel as nib

    sid = _subject_id(layout, subject.index)
    folder = out / subject.grade / sid if layout == "2019" else out / sid  # 2019: grade folders
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for modality in subject.images:
        files[modality] = folder / f"{sid}_{modality}.nii.gz"
    odd = layout == "2020" and subject.index == ODD_SEG_INDEX
    files["seg"] = folder / (ODD_SEG_NAME if odd else f"{sid}_seg.nii.gz")
    for modality, path in files.items():
        array = subject.seg if modality == "seg" else subject.images[modality]
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        _save_nifti(img, path)
    return {
        "subject_id": sid,
        "index": subject.index,
        "grade": subject.grade,
        "true_grade": subject.true_grade,
        "label_flipped": subject.label_flipped,
        "params": subject.params,
        "files": {m: str(p.relative_to(out)) for m, p in files.items()},
    }


def _save_nifti(img, path: Path) -> None:
    """Write ``img`` atomically; ``.nii.gz`` with zlib's RLE strategy at level 1.

    RLE deflate suits these volumes (long zero runs outside the brain, noise inside): about 1.5× faster
    than nibabel's default gzip and slightly smaller.  The output is a standard single-member gzip file.
    """
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)  # wbits 31: gzip container
        data = compressor.compress(data) + compressor.flush()
    atomic_write_bytes(path, data, fsync=False)


def _write_name_mapping(out: Path, layout: str, records: list[dict]) -> None:
    """BraTS name_mapping.csv; the 2020 rows name the same patient's 2019 id, as the real file does."""
    header = NAME_MAPPING_HEADER_2020 if layout == "2020" else NAME_MAPPING_HEADER_2019
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        row = [r["grade"], "NA", "NA", "NA", _subject_id("2019", r["index"])]
        if layout == "2020":
            row.append(r["subject_id"])
        writer.writerow(row)
    atomic_write_text(out / "name_mapping.csv", buf.getvalue(), fsync=False)


def _write_manifest(out: Path, records: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_HEADER)
    for r in records:
        patient = f"patient_{r['index']:03d}"
        writer.writerow(
            [r["subject_id"], patient, r["grade"], *(r["files"][m] for m in (*MODALITIES, "seg"))]
        )
    atomic_write_text(out / "manifest.csv", buf.getvalue(), fsync=False)


# -------------------------------------------------------------------------------------------- benchmark


def bench_synth(shape: tuple[int, int, int] = FULL_SHAPE, n: int = 2, seed: int = 0) -> dict[str, float]:
    """Seconds per subject to generate and to write ``shape`` volumes on this machine.

    Wall-clock and CPU seconds are both reported: on a shared machine the CPU time is the stable figure.
    """
    affine = brats_affine(shape)
    wall = {"generate_s": 0.0, "write_s": 0.0}
    cpu = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, n + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            subject = synth_subject(i, shape, seed)
            t1 = time.perf_counter()
            _write_subject(Path(tmp), "2020", subject, affine)
            wall["generate_s"] += t1 - t0
            wall["write_s"] += time.perf_counter() - t1
            cpu += time.process_time() - c0
    result = {k: v / n for k, v in wall.items()}
    result["total_s"] = result["generate_s"] + result["write_s"]
    result["cpu_s"] = cpu / n
    return result
