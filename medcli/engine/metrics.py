"""Binary LGG-vs-HGG metrics, patient-level bootstrap confidence intervals, calibration.

Conventions (used everywhere in medcli):

* labels: 0 = LGG, 1 = HGG; ``p`` is P(HGG); a scan is called HGG when ``p >= threshold``.
* "positive" class for sensitivity/specificity/F1/AUC is HGG.  Per-class figures are given for both:
  sensitivity of LGG = recall of LGG = specificity with HGG as positive, and vice versa.
* Metrics that need both classes (AUC, balanced accuracy, MCC, the missing class's recall) are ``None`` —
  never NaN — when the set holds only one class; ``undefined_reason`` says why ("only HGG in the set").
* Expected calibration error (ECE) is computed on P(HGG) with ``n_bins`` equal-width bins over [0, 1]
  (``[0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]``, the last bin closed):
  ``ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|``.  This is the reliability diagram's gap,
  weighted by bin size (Guo et al. 2017 use the top-label confidence; for two classes and P(HGG) the
  reliability diagram below is the one clinicians read).

Point estimates use :mod:`sklearn.metrics` directly.  The bootstrap is vectorised: a bootstrap replicate
*is* the original sample with integer multiplicity weights (how often each patient was drawn), so every
replicate's metric equals sklearn's metric with ``sample_weight`` set to those counts (tests check this).
Resampling is over patient ids, so scans of one patient stay together.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn import metrics as skm

CLASS_NAMES = (
    "LGG",
    "HGG",
)  # same tuple as medcli.data.CLASS_NAMES; kept local so metrics import nothing heavy

# Metrics that get a bootstrap CI, in display order.
CI_METRICS = (
    "auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "f1",
    "mcc",
    "accuracy",
    "brier",
    "ece",
)


def _as_arrays(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    q = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != q.shape:
        raise ValueError(f"y_true has {y.size} items but p has {q.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (LGG) or 1 (HGG)")
    if not np.isfinite(q).all():
        raise ValueError("probabilities contain NaN or Inf")
    return y, q


def single_class_reason(y_true, what: str = "set") -> str | None:
    """Why two-class metrics are undefined for this set ("only HGG in the validation set"), or None."""
    y = np.asarray(y_true).astype(int).ravel()
    if y.size == 0:
        return f"the {what} is empty"
    present = sorted(set(y.tolist()))
    if len(present) == 1:
        return f"only {CLASS_NAMES[present[0]]} in the {what}"
    return None


def roc_auc_or_none(y_true, p) -> float | None:
    """ROC AUC of P(HGG), or None when it is undefined (an empty or single-class set)."""
    y, q = _as_arrays(y_true, p)
    if single_class_reason(y) is not None:
        return None
    return float(skm.roc_auc_score(y, q))


def expected_calibration_error(y_true, p, n_bins: int = 10) -> float:
    """ECE of P(HGG) with equal-width bins (see the module docstring for the exact definition)."""
    y, q = _as_arrays(y_true, p)
    if y.size == 0:
        return float("nan")
    onehot = _bin_onehot(q, n_bins)
    return float(np.abs(onehot.T @ (y - q)).sum() / y.size)


def _bin_index(q: np.ndarray, n_bins: int) -> np.ndarray:
    # floor(p * n) puts p == 1.0 in bin n; it belongs to the last (closed) bin.
    return np.clip(np.floor(q * n_bins).astype(int), 0, n_bins - 1)


def _bin_onehot(q: np.ndarray, n_bins: int) -> np.ndarray:
    onehot = np.zeros((q.size, n_bins))
    onehot[np.arange(q.size), _bin_index(q, n_bins)] = 1.0
    return onehot


@dataclass
class ReliabilityBins:
    """What a reliability diagram draws: per equal-width bin, count, mean P(HGG) and fraction HGG."""

    edges: list[float]
    count: list[int]
    mean_p: list[float | None]
    frac_hgg: list[float | None]


def reliability_bins(y_true, p, n_bins: int = 10) -> ReliabilityBins:
    y, q = _as_arrays(y_true, p)
    idx = _bin_index(q, n_bins)
    count, mean_p, frac = [], [], []
    for b in range(n_bins):
        m = idx == b
        count.append(int(m.sum()))
        mean_p.append(float(q[m].mean()) if m.any() else None)
        frac.append(float(y[m].mean()) if m.any() else None)
    return ReliabilityBins(np.linspace(0, 1, n_bins + 1).tolist(), count, mean_p, frac)


def youden_threshold(y_true, p) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 on (y_true, p).

    Raises ValueError when the set has a single class (no ROC curve to choose from).
    """
    y, q = _as_arrays(y_true, p)
    reason = single_class_reason(y)
    if reason:
        raise ValueError(f"cannot tune a threshold: {reason}")
    fpr, tpr, thresholds = skm.roc_curve(y, q)
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum = the highest threshold achieving it
    # roc_curve's first threshold is +inf (nothing called HGG); clip to a usable probability.
    return float(min(thresholds[best], 1.0))


@dataclass
class BinaryMetrics:
    """All point metrics of one set of predictions at one threshold (``to_dict`` is JSON-ready)."""

    n: int
    n_lgg: int
    n_hgg: int
    threshold: float | None  # None: per-scan thresholds (e.g. cross-fitted per fold), reported by the caller
    auc: float | None
    balanced_accuracy: float | None
    sensitivity: float | None  # recall of HGG
    specificity: float | None  # recall of LGG
    f1: float | None  # F1 of HGG; None where 0/0 (no HGG in the set and none predicted)
    f1_macro: float
    mcc: float | None
    accuracy: float
    brier: float
    ece: float
    ece_bins: int
    confusion: list[list[int]]  # rows: true LGG, HGG; columns: predicted LGG, HGG
    per_class: dict[str, dict[str, float | int | None]]
    undefined_reason: str | None = None
    ci: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _thresholds(threshold, n: int) -> np.ndarray | float:
    """A scalar threshold, or one per scan (same length as the predictions)."""
    if np.ndim(threshold) == 0:
        return float(threshold)
    t = np.asarray(threshold, dtype=np.float64).ravel()
    if t.size != n:
        raise ValueError(f"{t.size} thresholds for {n} predictions")
    return t


def binary_metrics(
    y_true, p, threshold: float | np.ndarray = 0.5, n_bins: int = 10, what: str = "set"
) -> BinaryMetrics:
    """Point metrics with scikit-learn; two-class metrics are None (with the reason) on a single-class set.

    ``threshold`` may be one value or one per scan; ``what`` names the set in the undefined-reason text.
    """
    y, q = _as_arrays(y_true, p)
    if y.size == 0:
        raise ValueError("no predictions to evaluate")
    t = _thresholds(threshold, y.size)
    pred = (q >= t).astype(int)
    reason = single_class_reason(y, what)
    cm = skm.confusion_matrix(y, pred, labels=[0, 1])
    with warnings.catch_warnings():
        # zero_division is explicit below; sklearn still warns about single-class inputs we already handle.
        warnings.simplefilter("ignore")
        prec, rec, f1s, support = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
        two_class = reason is None
        auc = float(skm.roc_auc_score(y, q)) if two_class else None
        bacc = float(skm.balanced_accuracy_score(y, pred)) if two_class else None
        mcc = float(skm.matthews_corrcoef(y, pred)) if two_class else None
        # A class with undefined F1 (below) is left out of the mean (sklearn >= 1.3's zero_division=nan).
        f1_macro = float(skm.f1_score(y, pred, average="macro", labels=[0, 1], zero_division=np.nan))
    recall = [float(rec[c]) if support[c] > 0 else None for c in (0, 1)]
    # F1 = 2TP / (2TP + FP + FN) is 0/0 for a class neither in the set nor ever predicted: undefined, not the
    # 0 sklearn's zero_division puts there (an all-HGG test set predicted all HGG showed LGG F1 0.000).
    class_f1 = [float(f1s[c]) if support[c] + cm[:, c].sum() > 0 else None for c in (0, 1)]
    per_class = {
        CLASS_NAMES[c]: {
            "support": int(support[c]),
            "sensitivity": recall[c],
            "specificity": recall[1 - c],
            "precision": float(prec[c]) if cm[:, c].sum() > 0 else None,
            "f1": class_f1[c],
        }
        for c in (0, 1)
    }
    return BinaryMetrics(
        n=int(y.size),
        n_lgg=int((y == 0).sum()),
        n_hgg=int((y == 1).sum()),
        threshold=t if isinstance(t, float) else None,
        auc=auc,
        balanced_accuracy=bacc,
        sensitivity=recall[1],
        specificity=recall[0],
        f1=class_f1[1],
        f1_macro=f1_macro,
        mcc=mcc,
        accuracy=float(skm.accuracy_score(y, pred)),
        brier=float(skm.brier_score_loss(y, q, pos_label=1)),
        ece=expected_calibration_error(y, q, n_bins),
        ece_bins=n_bins,
        confusion=cm.astype(int).tolist(),
        per_class=per_class,
        undefined_reason=reason,
    )


# ----------------------------------------------------------------------------------------------------------
# Bootstrap over patients
# ----------------------------------------------------------------------------------------------------------


def bootstrap_weights(groups: Sequence | None, n: int, n_boot: int, seed: int) -> np.ndarray:
    """Multiplicity weights [n_boot, n]: replicate b draws patients with replacement; a scan's weight is how
    often its patient was drawn.  ``groups`` = patient id per scan (None: every scan is its own patient)."""
    if groups is None:
        inverse = np.arange(n)
    else:
        _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_pat = int(inverse.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_pat, size=(n_boot, n_pat))
    flat = (draws + np.arange(n_boot)[:, None] * n_pat).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_pat).reshape(n_boot, n_pat)
    return counts[:, inverse].astype(np.float64)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def weighted_metrics(
    y_true, p, weights: np.ndarray, threshold: float | np.ndarray = 0.5, n_bins: int = 10
) -> dict:
    """Each metric of ``CI_METRICS`` for every row of ``weights`` [B, n] at once (NaN where undefined).

    Row b equals sklearn's metric with ``sample_weight=weights[b]``; degenerate cases follow sklearn
    (0 for MCC with a constant prediction) except that two-class metrics are NaN when a replicate holds one
    class, and F1 is NaN where it is 0/0 (no HGG drawn, none predicted).
    """
    y, q = _as_arrays(y_true, p)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pos, pred = y == 1, q >= _thresholds(threshold, y.size)
    tp = w @ (pos & pred)
    fn = w @ (pos & ~pred)
    fp = w @ (~pos & pred)
    tn = w @ (~pos & ~pred)
    total = tp + fn + fp + tn
    both = ((tp + fn) > 0) & ((tn + fp) > 0)
    sens = _safe_div(tp, tp + fn)
    spec = _safe_div(tn, tn + fp)
    out: dict[str, np.ndarray] = {}
    out["sensitivity"], out["specificity"] = sens, spec
    out["balanced_accuracy"] = np.where(both, (sens + spec) / 2, np.nan)
    out["accuracy"] = _safe_div(tp + tn, total)
    f1_den = 2 * tp + fp + fn
    out["f1"] = _safe_div(2 * tp, f1_den)  # NaN where 0/0 (no HGG drawn, none predicted), as binary_metrics
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.where(mcc_den > 0, _safe_div(tp * tn - fp * fn, mcc_den), 0.0)
    out["mcc"] = np.where(both, mcc, np.nan)
    out["brier"] = _safe_div(w @ (q - y) ** 2, total)
    onehot = _bin_onehot(q, n_bins)
    out["ece"] = _safe_div(np.abs(w @ (onehot * (y - q)[:, None])).sum(axis=1), total)
    out["auc"] = np.where(both, _weighted_auc(pos, q, w), np.nan)
    return out


def _weighted_auc(pos: np.ndarray, q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC with ties counted 1/2, for each weight row: P(p_hgg > p_lgg) over weighted pairs."""
    order = np.argsort(q, kind="mergesort")
    qs, pos_s, ws = q[order], pos[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, qs[1:] != qs[:-1]])  # first index of each distinct value
    wpos = np.add.reduceat(ws * pos_s, starts, axis=1)
    wneg = np.add.reduceat(ws * ~pos_s, starts, axis=1)
    neg_below = np.cumsum(wneg, axis=1) - wneg
    num = (wpos * (neg_below + 0.5 * wneg)).sum(axis=1)
    return _safe_div(num, wpos.sum(axis=1) * wneg.sum(axis=1))


MIN_BOOT = 10
"""The fewest defined bootstrap replicates a metric's interval is taken from."""


def bootstrap_ci(
    y_true,
    p,
    groups: Sequence | None = None,
    *,
    threshold: float | np.ndarray = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
) -> dict[str, dict[str, float | int | None]]:
    """Percentile bootstrap CIs over patients: ``{metric: {"low", "high", "n_valid"}}``.

    Replicates in which a metric is undefined (e.g. AUC when only one class was drawn) are left out of
    that metric's interval; ``n_valid`` says how many remained.  Reproducible for a given ``seed``.
    """
    y, q = _as_arrays(y_true, p)
    w = bootstrap_weights(groups, y.size, n_boot, seed)
    reps = weighted_metrics(y, q, w, threshold=threshold, n_bins=n_bins)
    alpha = (1 - level) / 2
    cis: dict[str, dict[str, float | int | None]] = {}
    for name in CI_METRICS:
        vals = reps[name][np.isfinite(reps[name])]
        if vals.size < max(MIN_BOOT, n_boot // 10):  # too few defined replicates for an interval
            cis[name] = {"low": None, "high": None, "n_valid": int(vals.size)}
            continue
        lo, hi = np.quantile(vals, [alpha, 1 - alpha])
        cis[name] = {"low": float(lo), "high": float(hi), "n_valid": int(vals.size)}
    return cis


def evaluate_predictions(
    y_true,
    p,
    groups: Sequence | None = None,
    *,
    threshold: float | np.ndarray = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    what: str = "set",
) -> BinaryMetrics:
    """Point metrics plus patient-level bootstrap CIs (``n_boot=0`` skips the bootstrap)."""
    m = binary_metrics(y_true, p, threshold=threshold, n_bins=n_bins, what=what)
    if n_boot > 0:
        m.ci = bootstrap_ci(y_true, p, groups, threshold=threshold, n_boot=n_boot, seed=seed, n_bins=n_bins)
    return m


def summarize_folds(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample sd (ddof=1) of per-fold values, ignoring undefined folds."""
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(vals.std(ddof=1)) if vals.size > 1 else None
    return {"mean": float(vals.mean()), "sd": sd, "n": int(vals.size)}
