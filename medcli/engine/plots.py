"""PNG plots for evaluation and saliency: ROC curves, reliability diagram, confusion matrix, slice overlays.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas: no pyplot global state, no display
needed, safe in tests and on headless servers.  Every file is written atomically (temp file + os.replace).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from medcli.atomic import atomic_write
from medcli.engine.metrics import CLASS_NAMES, reliability_bins, roc_auc_or_none, single_class_reason


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), fsync=False)
    return path


def plot_roc(
    curves: Sequence[tuple[str, Sequence[int], Sequence[float]]],
    path: Path,
    title: str = "ROC",
    what: str = "validation set",
) -> Path:
    """ROC curves of P(HGG), one per (label, y_true, p); a single-class set is listed as n/a, not drawn.

    The last curve is drawn bold when there are several (pass the pooled out-of-fold curve last).
    """
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for i, (label, y, p) in enumerate(curves):
        auc = roc_auc_or_none(y, p)
        if auc is None:
            ax.plot([], [], " ", label=f"{label}: AUC n/a ({single_class_reason(y, what)})")
            continue
        fpr, tpr, _ = roc_curve(np.asarray(y).astype(int), np.asarray(p, dtype=float))
        bold = len(curves) > 1 and i == len(curves) - 1
        ax.plot(
            fpr,
            tpr,
            lw=2.5 if bold else 1.2,
            color="black" if bold else None,
            label=f"{label}: AUC {auc:.3f}",
        )
    ax.set(xlabel="1 - specificity (LGG called HGG)", ylabel="sensitivity (HGG)", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(y_true, p, path: Path, n_bins: int = 10, title: str = "Reliability") -> Path:
    """Reliability diagram of P(HGG): fraction HGG per equal-width bin vs mean predicted, with counts."""
    bins = reliability_bins(y_true, p, n_bins)
    fig = Figure(figsize=(5, 6))
    ax, axh = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    width = 1.0 / n_bins
    lefts = np.asarray(bins.edges[:-1])
    frac = np.array([np.nan if f is None else f for f in bins.frac_hgg])
    ax.bar(
        lefts,
        np.nan_to_num(frac),
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="fraction HGG",
    )
    mp = [(m, f) for m, f in zip(bins.mean_p, bins.frac_hgg, strict=True) if m is not None]
    if mp:
        ax.plot(*zip(*mp, strict=True), "o-", color="C3", label="mean P(HGG) vs fraction HGG")
    ax.set(ylabel="fraction HGG", title=title, ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(lefts, bins.count, width=width, align="edge", edgecolor="black", color="0.7")
    axh.set(xlabel="predicted P(HGG)", ylabel="scans", xlim=(0, 1))
    return _save(fig, path)


def plot_confusion(
    confusion: Sequence[Sequence[int]], path: Path, title: str = "Confusion matrix", class_names=CLASS_NAMES
) -> Path:
    """Confusion matrix counts with row-normalised shading (rows: true class, columns: predicted)."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=(4, 3.6))
    ax = fig.add_subplot()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n({norm[i, j]:.0%})",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_saliency_slices(
    image: np.ndarray,
    saliency: np.ndarray,
    peak: Sequence[int],
    path: Path,
    title: str = "Grad-CAM",
    affine: np.ndarray | None = None,
) -> Path:
    """Sagittal, coronal and axial slices of ``image`` through ``peak`` (voxel index) with ``saliency``
    overlaid.

    Both arrays are on one voxel grid in RAS+ order (:func:`medcli.engine.saliency.ras_views`); ``affine``
    (that grid's) gives each slice's position in mm and the voxels' aspect ratio (identity: 1 mm voxels).
    Axial and coronal views follow the radiological convention (the patient's right on the left); letters
    on the sides say so.
    """
    img = np.asarray(image, dtype=np.float32)
    sal = np.asarray(saliency, dtype=np.float32)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # mm per voxel along each axis
    mm = affine[:3, :3] @ np.asarray(peak, dtype=np.float64) + affine[:3, 3]
    lo, hi = np.percentile(img[img != 0], [1, 99]) if (img != 0).any() else (0.0, 1.0)
    i, j, k = (int(v) for v in peak)
    # (name, position, 2-D slice as [horizontal, vertical], the RAS axes those are, letters left and right).
    # Axial and coronal slices are mirrored left-right: radiological convention.
    views = [
        ("sagittal", f"x = {mm[0]:.0f} mm", img[i], sal[i], (1, 2), ("P", "A")),
        ("coronal", f"y = {mm[1]:.0f} mm", img[::-1, j], sal[::-1, j], (0, 2), ("R", "L")),
        ("axial", f"z = {mm[2]:.0f} mm", img[::-1, :, k], sal[::-1, :, k], (0, 1), ("R", "L")),
    ]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (name, where, a, s, (h, v), (left, right)) in zip(axes, views, strict=True):
        # Transposed with origin="lower": the second axis (superior, or anterior in axial) points up.
        aspect = spacing[v] / spacing[h]
        ax.imshow(a.T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect)
        overlay = np.ma.masked_less_equal(s.T, 0.2)
        ax.imshow(overlay, cmap="jet", origin="lower", alpha=0.4, vmin=0, vmax=1, aspect=aspect)
        ax.set_title(f"{name} · {where}", fontsize=9)
        for x, letter in ((0.02, left), (0.98, right)):
            ha = "left" if x < 0.5 else "right"
            ax.text(x, 0.5, letter, transform=ax.transAxes, color="white", fontsize=9, ha=ha, va="center")
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
