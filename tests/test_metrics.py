"""Metrics: equal to scikit-learn, reproducible patient-level bootstrap, ECE, single-class handling."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medcli.engine import metrics as M


@pytest.fixture
def preds():
    # A fixed, imperfect classifier with ties (rounded probabilities) and a 3:1 class imbalance.
    rng = np.random.default_rng(123)
    y = (rng.random(160) < 0.75).astype(int)
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random(160), 0, 1), 2)
    return y, p


def test_point_metrics_equal_sklearn(preds):
    y, p = preds
    t = 0.55
    m = M.binary_metrics(y, p, threshold=t)
    pred = (p >= t).astype(int)
    assert m.auc == pytest.approx(skm.roc_auc_score(y, p))
    assert m.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m.sensitivity == pytest.approx(skm.recall_score(y, pred, pos_label=1))
    assert m.specificity == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m.per_class["LGG"]["sensitivity"] == m.specificity
    assert m.per_class["HGG"]["specificity"] == m.specificity
    assert m.f1 == pytest.approx(skm.f1_score(y, pred))
    assert m.mcc == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m.brier == pytest.approx(skm.brier_score_loss(y, p))
    assert m.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert m.confusion == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert (m.n, m.n_lgg, m.n_hgg) == (160, int((y == 0).sum()), int((y == 1).sum()))


def test_ece_known_case():
    # Bin [0.2, 0.3): two scans at p=0.2, one HGG -> |0.5 - 0.2| = 0.3, weight 2/4.
    # Bin [0.9, 1.0]: p = 0.9 and p = 1.0 (the closed last bin), both HGG -> |1 - 0.95| = 0.05, weight 2/4.
    y = [0, 1, 1, 1]
    p = [0.2, 0.2, 0.9, 1.0]
    assert M.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    # Perfectly calibrated within bins -> 0.
    assert M.expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    bins = M.reliability_bins(y, p)
    assert bins.count[2] == 2 and bins.count[9] == 2 and sum(bins.count) == 4
    assert bins.frac_hgg[2] == pytest.approx(0.5) and bins.mean_p[9] == pytest.approx(0.95)


@pytest.mark.parametrize("only", [0, 1])
def test_single_class_auc_is_none_with_reason(only):
    y = [only] * 5
    p = [0.1, 0.4, 0.5, 0.7, 0.9]
    assert M.roc_auc_or_none(y, p) is None
    m = M.binary_metrics(y, p)
    name = M.CLASS_NAMES[only]
    assert m.auc is None and m.balanced_accuracy is None and m.mcc is None
    assert m.undefined_reason == f"only {name} in the set"
    assert m.per_class[name]["support"] == 5
    # No NaN anywhere in the JSON-ready dict.
    flat = [v for v in _walk(m.to_dict()) if isinstance(v, float)]
    assert all(np.isfinite(flat))
    youden_msg = "only .* in the set"
    with pytest.raises(ValueError, match=youden_msg):
        M.youden_threshold(y, p)


def _walk(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _walk(v)
    elif isinstance(d, list):
        for v in d:
            yield from _walk(v)
    else:
        yield d


def test_roc_auc_or_none_two_classes(preds):
    y, p = preds
    assert M.roc_auc_or_none(y, p) == pytest.approx(skm.roc_auc_score(y, p))


def test_bootstrap_replicates_equal_sklearn_with_sample_weight(preds):
    y, p = preds
    groups = [f"pat{i // 2}" for i in range(len(y))]  # two scans per patient
    w = M.bootstrap_weights(groups, len(y), n_boot=4, seed=7)
    # Scans of one patient always share a weight (they are drawn together).
    assert np.array_equal(w[:, 0::2], w[:, 1::2])
    reps = M.weighted_metrics(y, p, w, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    for b in range(4):
        sw = w[b]
        assert reps["auc"][b] == pytest.approx(skm.roc_auc_score(y, p, sample_weight=sw))
        assert reps["mcc"][b] == pytest.approx(skm.matthews_corrcoef(y, pred, sample_weight=sw))
        assert reps["f1"][b] == pytest.approx(skm.f1_score(y, pred, sample_weight=sw))
        assert reps["balanced_accuracy"][b] == pytest.approx(
            skm.balanced_accuracy_score(y, pred, sample_weight=sw)
        )
        assert reps["brier"][b] == pytest.approx(skm.brier_score_loss(y, p, sample_weight=sw))
        assert reps["sensitivity"][b] == pytest.approx(skm.recall_score(y, pred, sample_weight=sw))


def test_bootstrap_ci_reproducible_and_contains_estimate(preds):
    y, p = preds
    groups = [f"pat{i // 2}" for i in range(len(y))]
    a = M.bootstrap_ci(y, p, groups, n_boot=1000, seed=3)
    b = M.bootstrap_ci(y, p, groups, n_boot=1000, seed=3)
    c = M.bootstrap_ci(y, p, groups, n_boot=1000, seed=4)
    assert a == b
    assert a != c
    point = M.binary_metrics(y, p).to_dict()
    for name in M.CI_METRICS:
        assert a[name]["n_valid"] == 1000
        assert a[name]["low"] <= point[name] <= a[name]["high"], name
        assert a[name]["low"] < a[name]["high"]


def test_bootstrap_single_class_gives_no_auc_interval():
    ci = M.bootstrap_ci([1, 1, 1, 1], [0.2, 0.5, 0.6, 0.9], n_boot=200)
    assert ci["auc"] == {"low": None, "high": None, "n_valid": 0}
    assert ci["sensitivity"]["low"] is not None


def test_youden_threshold_separates_perfectly():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.35, 0.8, 0.9]
    t = M.youden_threshold(y, p)
    m = M.binary_metrics(y, p, threshold=t)
    assert m.balanced_accuracy == 1.0 and 0.3 < t <= 0.35


def test_summarize_folds_ignores_undefined():
    s = M.summarize_folds([0.8, None, 0.9])
    assert (
        s["n"] == 2
        and s["mean"] == pytest.approx(0.85)
        and s["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    )
    assert M.summarize_folds([None])["mean"] is None


def test_f1_of_a_class_neither_present_nor_predicted_is_undefined():
    """F1 = 2TP / (2TP + FP + FN) is 0/0 for a class absent from the set and never predicted: n/a, not the
    0.000 sklearn's zero_division gave (an all-HGG test set graded all HGG showed LGG F1 0.000, as if every
    LGG had been missed).  Absent but predicted (false positives) is a defined 0."""
    m = M.binary_metrics([1, 1, 1], [0.9, 0.8, 0.7])
    assert m.per_class["LGG"]["f1"] is None and m.per_class["HGG"]["f1"] == 1.0
    assert m.f1 == 1.0 and m.f1_macro == 1.0  # the undefined class is left out of the mean
    m = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert m.f1 is None and m.per_class["LGG"]["f1"] == 1.0
    m = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.9])  # one false HGG call
    assert m.f1 == 0.0 and m.per_class["LGG"]["f1"] == pytest.approx(0.8)
    # The bootstrap agrees: a replicate that drew no HGG and called none has no F1.
    y, p = [0, 0, 1], [0.1, 0.2, 0.9]
    reps = M.weighted_metrics(y, p, np.array([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))
    assert np.isnan(reps["f1"][0]) and reps["f1"][1] == 1.0
