"""Evaluation of trained folds and whole cross-validation runs.

What is evaluated is always the validation set the model was *not* trained on, taken from the split saved
with the run (``runs/<name>/splits.json``, checked against the checkpoint's ``split_hash``): never a split
recomputed differently by accident.

Sources of predictions, per fold:

* **stored** (default for fold and run directories): ``fold<k>/val_predictions.csv``, written by the
  trainer from the same epoch as ``best.pt`` (columns ``p_hgg`` and ``p_hgg_ema``).  Fast and exactly what
  training measured.
* **recomputed** (``recompute=True``, and always for a bare checkpoint): ``best.pt`` is run on the fold's
  validation subjects from the data folder with the checkpoint's own preprocessing.

``weights="auto"`` scores the weights that selected best.pt (the fold config's ``select``);
``"ema"`` uses the EMA weights/column where the run has them (else raw, with a note).

Thresholds: 0.5 unless ``tune_threshold="youden"``.  Youden's J is chosen on validation predictions only:
for a run, each fold's threshold is chosen on the *other* folds' out-of-fold predictions (cross-fitting, so
no fold is scored at a threshold tuned on itself), and the threshold to deploy is chosen on all out-of-fold
predictions.  For a single fold there is nothing else to tune on: the threshold comes from the fold itself
and the report says its threshold-dependent metrics are optimistic.

A run report has per-fold metrics, their mean ± sd, and pooled out-of-fold metrics with patient-level
bootstrap CIs.  :func:`evaluate_test` scores a labelled held-out set instead (a run's folds ensembled),
refusing one that shares subjects or patients with the split.  The library returns data;
``medcli.cli.evaluate`` renders it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcli.atomic import atomic_write_text
from medcli.engine import metrics as M
from medcli.engine.runs import fold_number, missing_folds, split_file_of
from medcli.errors import CheckpointError, DataError, UsageError

PREDICTIONS_FILE = "val_predictions.csv"
CHECKPOINT_FILE = "best.pt"
VALIDATION = "validation set"


@dataclass
class FoldPredictions:
    """Validation predictions of one fold (P(HGG) per scan) and where they came from."""

    fold: int | None
    subject_ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray
    p: np.ndarray
    source: str  # "stored" | "recomputed"
    weights: str  # "ema" | "raw"
    path: str


@dataclass
class FoldReport:
    fold: int | None
    source: str
    weights: str
    path: str
    threshold: float
    metrics: M.BinaryMetrics

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


@dataclass
class EvalReport:
    kind: str  # "run" | "fold" | "checkpoint" | "test" (a held-out set, see evaluate_test)
    target: str
    folds: list[FoldReport]
    pooled: M.BinaryMetrics | None  # run: out-of-fold metrics with CIs; single fold: same as folds[0]
    summary: dict[str, dict[str, float | int | None]]  # run: mean/sd/n per metric across folds
    threshold: dict[str, Any]
    n_boot: int
    seed: int
    ece_bins: int
    plots: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    missing_folds: list[int] = field(default_factory=list)  # a run's folds (by splits.json) not evaluated
    test: dict[str, Any] | None = None  # kind "test": the data and the models that scored it

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "test": self.test,
            "folds": [f.to_dict() for f in self.folds],
            "missing_folds": self.missing_folds,
            "pooled": self.pooled.to_dict() if self.pooled else None,
            "summary": self.summary,
            "threshold": self.threshold,
            "bootstrap": {"n": self.n_boot, "seed": self.seed, "unit": "patient", "level": 0.95},
            "ece_bins": self.ece_bins,
            "plots": self.plots,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------------------------------------
# What was passed
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    kind: str  # "run" | "fold" | "checkpoint"
    path: Path
    fold_dirs: list[Path]
    checkpoint: Path | None = None


def _is_fold_dir(d: Path) -> bool:
    return (d / PREDICTIONS_FILE).is_file() or (d / CHECKPOINT_FILE).is_file()


def resolve_target(path: Path) -> Target:
    """A checkpoint file, a fold directory, or a run directory (all ``fold*/`` below it)."""
    path = Path(path)
    if path.is_file():
        return Target("checkpoint", path, [], checkpoint=path)
    if not path.exists():
        raise UsageError(
            f"{path}: not found",
            hint="pass runs/<name> (all folds), runs/<name>/fold<k>, or a .pt checkpoint",
        )
    if _is_fold_dir(path):
        return Target("fold", path, [path])
    folds = sorted(
        (d for d in path.glob("fold*") if d.is_dir() and _is_fold_dir(d)), key=lambda d: fold_number(d.name)
    )
    if folds:
        return Target("run", path, folds)
    raise UsageError(
        f"{path}: no {PREDICTIONS_FILE} or {CHECKPOINT_FILE} in it or in fold*/ below it",
        hint="pass a run directory written by `medcli train` (runs/<name>), one of its folds, or a .pt file",
    )


# ----------------------------------------------------------------------------------------------------------
# Getting predictions
# ----------------------------------------------------------------------------------------------------------


def selected_weights(fold_dir: Path, weights: str) -> str:
    """``auto`` → the weights that picked the fold's best.pt (its config's ``select``: EMA when EMA was on),
    so eval scores the model that was kept; "ema"/"raw" pass through."""
    if weights != "auto":
        return weights
    from medcli.engine.checkpoint import selected_weights as from_config

    try:
        cfg = json.loads((Path(fold_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "ema"  # no config beside the checkpoint: EMA where present, raw otherwise (with a note)
    return from_config(cfg)


def read_val_predictions(fold_dir: Path, weights: str = "ema") -> tuple[FoldPredictions, str | None]:
    """``fold<k>/val_predictions.csv`` → predictions; the note says when EMA was asked for but absent."""
    path = Path(fold_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found (the fold has not finished a validation epoch)",
            hint="pass --recompute with --data to score best.pt, or finish training the fold",
        )
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    need = {"subject_id", "label", "p_hgg"}
    if not rows or not need <= set(rows[0]):
        raise DataError(
            f"{path}: expected columns {', '.join(sorted(need))} and at least one row",
            hint="the file is damaged; use --recompute with --data to score best.pt instead",
        )
    use_ema = weights == "ema" and all((r.get("p_hgg_ema") or "").strip() for r in rows)
    note = None
    if weights == "ema" and not use_ema:
        note = f"{path.parent.name}: no EMA predictions stored (EMA off in training); raw weights evaluated"
    column = "p_hgg_ema" if use_ema else "p_hgg"
    try:
        labels = np.array([int(float(r["label"])) for r in rows])
        p = np.array([float(r[column]) for r in rows])
    except ValueError as e:
        raise DataError(
            f"{path}: unreadable value ({e})", hint="use --recompute with --data instead"
        ) from None
    return (
        FoldPredictions(
            fold=fold_number(path.parent.name) if path.parent.name.startswith("fold") else None,
            subject_ids=[r["subject_id"] for r in rows],
            patient_ids=[(r.get("patient_id") or r["subject_id"]) for r in rows],
            labels=labels,
            p=p,
            source="stored",
            weights="ema" if use_ema else "raw",
            path=str(path),
        ),
        note,
    )


def _load_split(checkpoint: Path, meta: dict[str, Any], subjects) -> Any:
    """The split the checkpoint was trained with: the run's splits.json, checked against split_hash."""
    from medcli.data.splits import Splits, make_splits

    split_file = split_file_of(checkpoint.parent)
    if split_file is not None:
        splits = Splits.load(split_file)
        where = str(split_file)
    else:
        cfg = meta.get("config") or {}
        splits = make_splits(subjects, k=int(cfg.get("folds", 5)), seed=int(cfg.get("seed", 0)))
        where = "a split remade from the data folder"
    want = meta.get("split_hash")
    if want and splits.cohort_hash != want:
        raise CheckpointError(
            f"{checkpoint} was trained on another split than {where} (split hash differs)",
            hint="evaluate with the run directory the checkpoint came from and its original data folder",
        )
    return splits


def recompute_predictions(
    checkpoint: Path,
    *,
    data: Path | None = None,
    fold: int | None = None,
    weights: str = "ema",
    precision: str = "auto",
    device: str = "auto",
    on_scan: Callable[[int, int], None] | None = None,
) -> tuple[FoldPredictions, list[str]]:
    """Run ``checkpoint`` on its fold's validation subjects (``data`` defaults to the training data path)."""
    from medcli.data.discover import discover
    from medcli.engine.checkpoint import load_for_inference
    from medcli.engine.predictor import Predictor, ScanInput

    model, pcfg, meta = load_for_inference(checkpoint, weights=weights)
    notes = []
    if weights == "ema" and meta.get("weights") != "ema":
        notes.append(f"{checkpoint}: no EMA weights in the checkpoint; raw weights evaluated")
    trained_fold = meta.get("fold")
    if fold is not None and trained_fold is not None and int(fold) != int(trained_fold):
        raise UsageError(
            f"{checkpoint} was trained for fold {trained_fold}; fold {fold}'s validation set overlaps its "
            "training data",
            hint=f"use --fold {trained_fold} (or leave --fold out), or pass fold {fold}'s own checkpoint",
        )
    fold = int(trained_fold if trained_fold is not None else (fold or 0))
    cfg = meta.get("config") or {}
    if data is None:
        data = Path(cfg.get("data") or "data")
        if not data.exists():  # moved; or relative (older runs stored it so) and another cwd
            raise DataError(
                f"the data {checkpoint} was trained on is not at {data} any more",
                hint="pass --data with the cohort's current folder or manifest",
            )
    data = Path(data)
    cohort = discover(data, modalities=tuple(pcfg.modalities))
    subjects = cohort.require_labels()
    splits = _load_split(Path(checkpoint), meta, subjects)
    _, val_ids = splits.fold(fold)
    by_id = {s.subject_id: s for s in cohort.subjects}
    missing = [i for i in val_ids if i not in by_id]
    if missing:
        excluded = {s.subject_id for s in cohort.excluded}
        why = "set aside by `medcli data index` (see its problems)" if missing[0] in excluded else "not found"
        raise DataError(
            f"{len(missing)} of fold {fold}'s {len(val_ids)} validation subjects are missing under {data} "
            f"(e.g. {missing[0]}: {why})",
            hint="point --data at the cohort the model was trained on",
        )
    relabelled = [i for i in val_ids if by_id[i].label != splits.labels.get(i, by_id[i].label)]
    if relabelled:
        raise DataError(
            f"{len(relabelled)} validation subjects have another grade under {data} than at training "
            f"(e.g. {relabelled[0]})",
            hint="evaluate against the data the model was trained on",
        )
    predictor = Predictor(
        [model], pcfg, precision=precision, device=device, logit_scales=[meta.get("logit_scale", 1.0)]
    )
    p = np.empty(len(val_ids))
    for i, sid in enumerate(val_ids):
        pre = predictor.preprocess(ScanInput.of_subject(by_id[sid]))
        import torch

        p[i] = predictor.probabilities(torch.from_numpy(pre.array)[None])[0, 0, 0]
        if on_scan is not None:
            on_scan(i + 1, len(val_ids))
    return (
        FoldPredictions(
            fold=fold,
            subject_ids=list(val_ids),
            patient_ids=[by_id[i].patient_id or i for i in val_ids],
            labels=np.array([int(by_id[i].label) for i in val_ids]),
            p=p,
            source="recomputed",
            weights=meta.get("weights", weights),
            path=str(checkpoint),
        ),
        notes,
    )


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def _youden_or_default(labels: np.ndarray, p: np.ndarray, default: float = 0.5) -> tuple[float, str | None]:
    try:
        return M.youden_threshold(labels, p), None
    except ValueError as e:
        return default, f"{e}; kept {default}"


# Below this many scans in a class, percentile-bootstrap intervals mostly show which few scans were drawn.
FEW_IN_A_CLASS = 10


def _few_in_a_class(m: M.BinaryMetrics, n_boot: int, *, pooled: bool = False) -> str | None:
    """A note when the smaller class is small enough to make the intervals unreliable (None otherwise;
    a class with no scans at all is the metrics' ``undefined_reason``).  ``pooled``: ``m`` already pools
    a run's folds, so more subjects are the only remedy."""
    fewest, name = min((m.n_lgg, "LGG"), (m.n_hgg, "HGG"))
    if not 0 < fewest < FEW_IN_A_CLASS:
        return None
    note = f"only {fewest} {name} scan{'s' if fewest > 1 else ''} of {m.n}: the 95% intervals are unreliable"
    auc = m.ci.get("auc") or {}
    if n_boot and auc.get("n_valid") is not None:
        note += (
            f" (AUC's interval comes from the {auc['n_valid']} of {n_boot} resamples that drew both classes)"
        )
    if pooled:
        return note + "; more subjects give firmer ones"
    return note + "; more validation data, or a whole run's pooled predictions, give firmer ones"


def _check_weights(weights: str) -> None:
    if weights not in ("auto", "ema", "raw"):
        raise UsageError(
            f"weights {weights!r} is not auto, ema or raw", hint="use --weights auto, ema or raw"
        )


def evaluate(
    target_path: Path,
    *,
    data: Path | None = None,
    fold: int | None = None,
    recompute: bool = False,
    weights: str = "auto",
    tune_threshold: str | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    out_dir: Path | None = None,
    plots: bool = True,
    precision: str = "auto",
    device: str = "auto",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> EvalReport:
    """Evaluate a run, a fold or a checkpoint; plots go to ``out_dir`` (default ``<target>/eval``)."""
    _check_weights(weights)
    if tune_threshold not in (None, "none", "youden"):
        raise UsageError(
            f"--tune-threshold {tune_threshold!r} is unknown", hint="use youden (or leave it out)"
        )
    tune = tune_threshold == "youden"
    target = resolve_target(Path(target_path))
    notes: list[str] = []

    if target.kind == "run" and fold is not None:
        wanted = [d for d in target.fold_dirs if fold_number(d.name) == fold]
        if not wanted:
            have = ", ".join(str(fold_number(d.name)) for d in target.fold_dirs)
            raise UsageError(f"{target.path} has no fold {fold}", hint=f"its folds: {have}")
        target = Target("fold", wanted[0], wanted)

    folds: list[FoldPredictions] = []
    if target.kind == "checkpoint":
        fp, n = recompute_predictions(
            target.checkpoint,
            data=data,
            fold=fold,
            weights=selected_weights(target.checkpoint.parent, weights),
            precision=precision,
            device=device,
            on_scan=_progress(on_progress, "fold"),
        )
        folds.append(fp)
        notes += n
    else:
        for d in target.fold_dirs:
            if recompute or not (d / PREDICTIONS_FILE).is_file():
                if not recompute:
                    notes.append(f"{d.name}: no {PREDICTIONS_FILE}; recomputed from {CHECKPOINT_FILE}")
                fp, n = recompute_predictions(
                    d / CHECKPOINT_FILE,
                    data=data,
                    weights=selected_weights(d, weights),
                    precision=precision,
                    device=device,
                    on_scan=_progress(on_progress, d.name),
                )
            else:
                fp, note = read_val_predictions(d, selected_weights(d, weights))
                n = [note] if note else []
            folds.append(fp)
            notes += n
    notes.append(
        "best.pt was selected on these validation predictions, so the estimates are somewhat optimistic; "
        f"confirm on a held-out test set (`medcli eval {target.path} --test DATA`)"
    )

    # Thresholds (validation data only, cross-fitted across folds for a run).
    thresholds = [float(threshold)] * len(folds)
    threshold_info: dict[str, Any] = {"method": "fixed", "value": float(threshold)}
    if tune:
        if len(folds) > 1:
            for i in range(len(folds)):
                others_y = np.concatenate([f.labels for j, f in enumerate(folds) if j != i])
                others_p = np.concatenate([f.p for j, f in enumerate(folds) if j != i])
                thresholds[i], why = _youden_or_default(others_y, others_p, threshold)
                if why:
                    notes.append(f"fold {folds[i].fold}: {why}")
            deploy, why = _youden_or_default(
                np.concatenate([f.labels for f in folds]), np.concatenate([f.p for f in folds]), threshold
            )
            threshold_info = {
                "method": "youden",
                "per_fold": {str(f.fold): t for f, t in zip(folds, thresholds, strict=True)},
                "chosen_on": "each fold's threshold on the other folds' out-of-fold predictions",
                "deploy": deploy,
                "deploy_chosen_on": "all out-of-fold predictions (use with `medcli predict --threshold`)",
            }
        else:
            thresholds[0], why = _youden_or_default(folds[0].labels, folds[0].p, threshold)
            threshold_info = {"method": "youden", "value": thresholds[0], "chosen_on": "this validation set"}
            notes.append(
                "the Youden threshold was tuned on the same validation set it is scored on: "
                "threshold-dependent metrics are optimistic (evaluate the whole run for cross-fitted "
                "thresholds)"
            )
        if why:
            notes.append(why)

    reports = []
    for f, t in zip(folds, thresholds, strict=True):
        m = M.evaluate_predictions(
            f.labels,
            f.p,
            f.patient_ids,
            threshold=t,
            n_boot=n_boot,
            seed=seed,
            n_bins=n_bins,
            what=VALIDATION,
        )
        reports.append(FoldReport(f.fold, f.source, f.weights, f.path, t, m))

    pooled, summary = (reports[0].metrics if reports else None), {}
    if len(folds) > 1:
        labels = np.concatenate([f.labels for f in folds])
        p = np.concatenate([f.p for f in folds])
        groups = [pid for f in folds for pid in f.patient_ids]
        per_scan_t = np.concatenate([np.full(len(f.p), t) for f, t in zip(folds, thresholds, strict=True)])
        pooled = M.evaluate_predictions(
            labels,
            p,
            groups,
            threshold=per_scan_t if tune else threshold,
            n_boot=n_boot,
            seed=seed,
            n_bins=n_bins,
            what="out-of-fold predictions",
        )
        for name in M.CI_METRICS:
            summary[name] = M.summarize_folds([getattr(r.metrics, name) for r in reports])
    missing = missing_folds(target.path, target.fold_dirs) if target.kind == "run" else []
    if missing:
        which = ("fold " if len(missing) == 1 else "folds ") + ", ".join(map(str, missing))
        notes.append(
            f"{which} of the run's {len(folds) + len(missing)} not trained yet: the metrics cover the "
            f"validation scans of {len(folds)} fold{'s' if len(folds) > 1 else ''}, not the whole cohort "
            f"(`medcli train --fold {missing[0]}`{' and so on' if len(missing) > 1 else ''} completes it)"
        )
    if pooled is not None and (note := _few_in_a_class(pooled, n_boot, pooled=len(folds) > 1)):
        notes.append(note)

    report = EvalReport(
        kind=target.kind,
        target=str(target.path),
        folds=reports,
        pooled=pooled,
        summary=summary,
        threshold=threshold_info,
        n_boot=n_boot,
        seed=seed,
        ece_bins=n_bins,
        notes=notes,
        missing_folds=missing,
    )
    out = Path(out_dir) if out_dir is not None else _default_out(target)
    return _write_outputs(report, folds, thresholds, out, plots)


def evaluate_test(
    target_path: Path,
    test_data: Path,
    *,
    weights: str = "auto",
    threshold: float | str = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    out_dir: Path | None = None,
    plots: bool = True,
    precision: str = "auto",
    device: str = "auto",
    tta: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> EvalReport:
    """Score a run (its folds ensembled, probabilities averaged, as `medcli predict` does), a fold or a
    checkpoint on a labelled held-out set: the same metrics, CIs and plots as :func:`evaluate`.  ``tta``:
    predict's 8-flip test-time augmentation.

    The threshold is fixed or ``"tuned"``: the Youden threshold that `medcli eval --tune-threshold youden`
    chose on the run's validation data, never one chosen on the test set.  A test subject or patient that is
    in the run's split (``splits.json``) was trained on (or, for one fold's model, selected on), so the set
    is refused as not held out.
    Output goes to ``<target>/eval/test-<data folder or manifest name>`` by default, beside the validation
    evaluation.
    """
    from medcli.data.discover import discover
    from medcli.data.splits import Splits
    from medcli.engine.predictor import ScanInput, find_checkpoints, load_predictor

    _check_weights(weights)
    target_path, test_data = Path(target_path), Path(test_data)
    source = find_checkpoints(target_path, target_path.parent)
    if isinstance(threshold, str):
        cut, origin = tuned_threshold(source.root, source.checkpoints)
        threshold_info = {"method": "youden", "value": cut, "chosen_on": origin}
    else:
        cut = float(threshold)
        threshold_info = {"method": "fixed", "value": cut}

    predictor = load_predictor(source, weights=weights, precision=precision, device=device, tta=tta)
    cohort = discover(test_data, modalities=tuple(predictor.preprocess_cfg.modalities))
    subjects = cohort.require_labels()
    if cohort.excluded:  # as for a scan that fails at prediction (below): no metrics over a subset
        first = cohort.excluded[0]
        problem = cohort.reason(first.subject_id)
        why = problem.what if problem else "unreadable"
        found = len(cohort.excluded) + len(cohort.subjects)
        raise DataError(
            f"{len(cohort.excluded)} of the {found} test subjects under {test_data} are unusable "
            f"(e.g. {first.subject_id}: {why})",
            hint=f"fix or remove them (`medcli data index {test_data}` lists each): metrics over the rest "
            "would not be over the set you named",
        )
    notes: list[str] = list(cohort.left_out)  # what under the test folder is no subject's: not scored
    unlabelled = len(cohort.subjects) - len(subjects)
    if unlabelled:
        notes.append(
            f"{unlabelled} subject{'s' if unlabelled > 1 else ''} under {test_data} not scored: no grade "
            f"(`medcli data index {test_data}` lists them)"
        )
    split_file = split_file_of(source.root)
    if split_file is not None:
        split = Splits.load(split_file)
        seen_patients = set(split.patients.values())
        shared = [
            s.subject_id
            for s in subjects
            if s.subject_id in split.labels or (s.patient_id or s.subject_id) in seen_patients
        ]
        if shared:
            raise DataError(
                f"{len(shared)} of the {len(subjects)} test subjects (e.g. {shared[0]}) are in the split the "
                f"model was trained with ({split_file}): trained or validated on, so the set is not held out",
                hint="evaluate on subjects (and patients) outside the training cohort; `medcli eval "
                f"{source.root}` gives the cross-validated estimate",
            )
    else:
        notes.append(f"no splits.json beside {source.describe()}: could not check the test set is held out")

    scans = [ScanInput.of_subject(s) for s in subjects]
    done = 0

    def tick(scan, outcome) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress("test", done, len(scans))

    result = predictor.predict(scans, on_scan=tick)
    if result.failures:
        first = result.failures[0]
        raise DataError(
            f"{len(result.failures)} of {len(scans)} test scans could not be scored (e.g. {first.scan_id}: "
            f"{first.error})",
            hint="fix or remove them: metrics over the rest would not be over the set you named",
        )
    by_id = {s.subject_id: s for s in subjects}
    ids = [p.scan_id for p in result.predictions]
    fp = FoldPredictions(
        fold=None,
        subject_ids=ids,
        patient_ids=[by_id[i].patient_id or i for i in ids],
        labels=np.array([int(by_id[i].label) for i in ids]),
        p=np.array([p.p_hgg for p in result.predictions]),
        source="test",
        weights=", ".join(sorted({w for w in predictor.member_weights if w})) or weights,
        path=str(test_data),
    )
    m = M.evaluate_predictions(
        fp.labels,
        fp.p,
        fp.patient_ids,
        threshold=cut,
        n_boot=n_boot,
        seed=seed,
        n_bins=n_bins,
        what="test set",
    )
    if note := _few_in_a_class(m, n_boot, pooled=True):
        notes.append(note)
    if source.untrained:
        notes.append(f"the ensemble is {source.describe()}")
    report = EvalReport(
        kind="test",
        target=str(target_path),
        folds=[FoldReport(None, "test", fp.weights, str(test_data), cut, m)],
        pooled=m,
        summary={},
        threshold=threshold_info,
        n_boot=n_boot,
        seed=seed,
        ece_bins=n_bins,
        notes=notes,
        test={
            "data": str(test_data),
            "models": [str(p) for p in source.checkpoints],
            "members": len(source.checkpoints),
            "flips": len(predictor.flips),
            "precision": predictor.precision,
        },
    )
    named = test_data.resolve()
    name = named.stem if named.is_file() else named.name  # held.csv -> test-held
    out = Path(out_dir) if out_dir is not None else source.root / "eval" / f"test-{name}"
    return _write_outputs(report, [fp], [cut], out, plots)


def _write_outputs(
    report: EvalReport, folds: list[FoldPredictions], thresholds: list[float], out: Path, plots: bool
) -> EvalReport:
    """Plots (unless ``plots`` is False), predictions.csv and eval.json into ``out``; their paths in
    ``report.plots``."""
    if plots:
        report.plots = write_plots(report, folds, out)
    report.plots["predictions"] = str(write_scan_predictions(folds, thresholds, out / SCANS_FILE))
    write_json(report, out / "eval.json")
    report.plots["json"] = str(out / "eval.json")
    return report


def _progress(cb, label):
    if cb is None:
        return None
    return lambda done, total: cb(label, done, total)


def _default_out(target: Target) -> Path:
    base = target.path.parent if target.kind == "checkpoint" else target.path
    return base / "eval"


def write_plots(report: EvalReport, folds: list[FoldPredictions], out: Path) -> dict[str, str]:
    from medcli.engine.plots import plot_confusion, plot_reliability, plot_roc

    single = "test set" if report.kind == "test" else "validation"
    curves = [(f"fold {f.fold}" if f.fold is not None else single, f.labels, f.p) for f in folds]
    labels = np.concatenate([f.labels for f in folds])
    p = np.concatenate([f.p for f in folds])
    if len(folds) > 1:
        curves.append(("pooled out-of-fold", labels, p))
    what = "pooled out-of-fold" if len(folds) > 1 else single
    return {
        "roc": str(plot_roc(curves, out / "roc.png", title=f"ROC, P(HGG) ({Path(report.target).name})")),
        "reliability": str(
            plot_reliability(
                labels, p, out / "reliability.png", n_bins=report.ece_bins, title=f"Reliability ({what})"
            )
        ),
        "confusion": str(
            plot_confusion(report.pooled.confusion, out / "confusion.png", title=f"Confusion ({what})")
        ),
    }


SCANS_FILE = "predictions.csv"
SCAN_FIELDS = (
    "subject_id",
    "patient_id",
    "fold",
    "label",
    "true_grade",
    "p_hgg",
    "threshold",
    "grade",
    "correct",
)


def write_scan_predictions(folds: list[FoldPredictions], thresholds: list[float], path: Path) -> Path:
    """One row per scan scored (every fold's, i.e. the pooled out-of-fold set of a run): its true and
    predicted grade under the threshold its fold used, for finding which scans the model gets wrong."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCAN_FIELDS, lineterminator="\n")
    writer.writeheader()
    for f, t in zip(folds, thresholds, strict=True):
        for sid, pid, label, p in zip(f.subject_ids, f.patient_ids, f.labels, f.p, strict=True):
            predicted = int(p >= t)
            writer.writerow(
                {
                    "subject_id": sid,
                    "patient_id": pid,
                    "fold": "" if f.fold is None else f.fold,
                    "label": int(label),
                    "true_grade": M.CLASS_NAMES[int(label)],
                    "p_hgg": f"{float(p):.6f}",
                    "threshold": f"{t:.6g}",
                    "grade": M.CLASS_NAMES[predicted],  # the model's call, named as in predict's output
                    "correct": int(predicted == int(label)),
                }
            )
    atomic_write_text(path, buf.getvalue())
    return path


def write_json(report: EvalReport, path: Path) -> Path:
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2, default=str))
    return path


def tuned_threshold(root: Path, checkpoints: list[Path]) -> tuple[float, str]:
    """The Youden threshold `medcli eval ROOT --tune-threshold youden` saved in ``ROOT/eval/eval.json``, and
    where it came from.  Refused when absent, untuned, or older than the checkpoints it was tuned for."""
    root = Path(root)
    path = root / "eval" / "eval.json"
    hint = f"run `medcli eval {root} --tune-threshold youden` first, or pass a number (e.g. --threshold 0.5)"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--threshold tuned: {path} does not exist", hint=hint) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--threshold tuned: {path} is unreadable ({e})", hint=hint) from None
    info = report.get("threshold") or {}
    if info.get("method") != "youden":
        raise UsageError(f"--threshold tuned: {path} was evaluated at a fixed threshold", hint=hint)
    newest = max(p.stat().st_mtime for p in checkpoints)
    if path.stat().st_mtime < newest:
        raise UsageError(
            f"--threshold tuned: {path} is older than the model's checkpoints (retrained since?)", hint=hint
        )
    value = float(info["deploy"] if "deploy" in info else info["value"])
    return value, f"Youden, chosen on {info.get('deploy_chosen_on') or info.get('chosen_on')} ({path})"
