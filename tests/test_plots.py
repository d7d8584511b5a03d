"""Plots are real PNG files with content, written atomically, and cope with single-class sets."""

from __future__ import annotations

import numpy as np
import pytest

from medcli.engine import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


@pytest.fixture
def preds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.4 * y + 0.6 * rng.random(80), 0, 1)
    return y, p


def test_roc_reliability_confusion_are_pngs(tmp_path, preds):
    y, p = preds
    roc = plots.plot_roc(
        [("fold 0", y[:40], p[:40]), ("fold 1", y[40:], p[40:]), ("pooled", y, p)],
        tmp_path / "sub" / "roc.png",
    )
    rel = plots.plot_reliability(y, p, tmp_path / "reliability.png")
    cm = plots.plot_confusion([[10, 3], [4, 20]], tmp_path / "confusion.png")
    for path in (roc, rel, cm):
        assert _is_png(path), path
    # Nothing but the three plots (no temp files left behind).
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == [
        "confusion.png",
        "reliability.png",
        "roc.png",
    ]


def test_roc_with_a_single_class_fold_does_not_crash(tmp_path, preds):
    y, p = preds
    path = plots.plot_roc([("fold 0", [1, 1, 1], [0.2, 0.5, 0.9]), ("pooled", y, p)], tmp_path / "roc.png")
    assert _is_png(path)


def test_saliency_slices_png(tmp_path):
    img = np.random.default_rng(0).random((20, 22, 18)).astype(np.float32)
    sal = np.zeros_like(img)
    sal[8:12, 9:13, 7:10] = 1.0
    path = plots.plot_saliency_slices(img, sal, (10, 11, 8), tmp_path / "s.png")
    assert _is_png(path)
    # 1 x 1 x 5 mm voxels, shifted so every slice keeps its position in mm (the titles are the same): the
    # figure differs only because the slices are drawn at their true aspect.
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    affine[2, 3] = 8 - 5 * 8
    thick = plots.plot_saliency_slices(img, sal, (10, 11, 8), tmp_path / "t.png", affine=affine)
    assert _is_png(thick) and thick.read_bytes() != path.read_bytes()
