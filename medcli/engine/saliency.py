"""Grad-CAM saliency on the scan's own voxel grid.

Grad-CAM (Selvaraju et al. 2017) at the last ResNet stage: the class score's gradient with respect to the
feature map, averaged over space, weights the feature channels; their ReLU'd sum is a coarse map
(``input/8`` per axis) that is upsampled trilinearly to model space.  For an ensemble each member's map is
normalised to [0, 1] and the maps are averaged.  The model-space map then goes back through the
preprocessing (resize, crop, reorientation; ``medcli.data.preprocess.to_original_grid``) so the NIfTI we
write has the input file's shape and affine and overlays the scan in any viewer (ITK-SNAP, 3D Slicer,
FSLeyes).  The map is zeroed outside the brain (voxels that are 0 in every modality) and renormalised.
A PNG shows sagittal, coronal and axial slices through the saliency peak, reoriented to RAS for display
(radiological convention: the patient's right on the left of axial and coronal views, letters on the sides).

Only the head needs gradients: the backbone runs once without autograd and the feature map is the leaf.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medcli.atomic import atomic_path

if TYPE_CHECKING:
    from medcli.engine.predictor import Predictor, ScanInput


def grad_cam(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM of class ``target`` for a batch ``x [N,C,D,H,W]`` → ``[N, D, H, W]`` in [0, 1] (model space).

    Uses ``model.forward_features`` (last stage) and ``model.classify``; runs in float32.
    """
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x.float())
    feats = feats.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.classify(feats)
        (grads,) = torch.autograd.grad(logits[:, target].sum(), feats)
    weights = grads.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * feats.detach()).sum(dim=1, keepdim=True))  # [N, 1, d, h, w]
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak[:, None, None, None]


def ensemble_grad_cam(
    models: list[nn.Module],
    x: torch.Tensor,
    target: int,
    flips: tuple[tuple[int, ...], ...] = ((),),
    max_batch: int | None = None,
) -> torch.Tensor:
    """Mean of the members' normalised Grad-CAMs over the flipped copies of ``x`` (``predict --tta``: the
    dims of ``x [N,C,D,H,W]`` each copy flips), each map flipped back first; renormalised to [0, 1].

    Over the full flip group the map is exactly flip-equivariant, like the TTA probability is invariant.
    ``max_batch`` bounds the volumes per backbone pass (the predictor's), so memory does not grow with TTA."""
    from medcli.engine.predictor import flipped_copies

    n = x.shape[0]
    batch = flipped_copies(x, flips)
    maps = []
    for m in models:
        chunks = batch.split(max_batch or len(batch))
        cams = torch.cat([grad_cam(m, chunk, target) for chunk in chunks]).split(n)  # F x [N, D, H, W]
        # A flipped copy's map is flipped back; spatial dims of the map are those of x minus the channel.
        maps += [
            cam.flip([d - 1 for d in dims]) if dims else cam for cam, dims in zip(cams, flips, strict=True)
        ]
    mean = torch.stack(maps).mean(dim=0)
    peak = mean.flatten(1).amax(dim=1).clamp_min(1e-12)
    return mean / peak[:, None, None, None]


def write_saliency(
    predictor: Predictor, x: torch.Tensor, pre: Any, scan: ScanInput, out_dir: Path, target: int
) -> tuple[Path, Path]:
    """Write ``<scan_id>_gradcam.nii.gz`` (original grid and affine) and ``<scan_id>_gradcam.png``."""
    import nibabel as nib

    from medcli.data.preprocess import to_original_grid
    from medcli.engine.plots import plot_saliency_slices

    out_dir.mkdir(parents=True, exist_ok=True)
    models = predictor.models
    x = x.to(predictor.device).contiguous()
    cam = ensemble_grad_cam(models, x, target, flips=predictor.flips, max_batch=predictor.max_batch)
    cam = cam[0].cpu().numpy()
    volume, affine = to_original_grid(cam.astype(np.float32), pre.geometry)
    volume = np.asarray(volume, dtype=np.float32)

    modalities = predictor.preprocess_cfg.modalities
    reference_path = scan.paths[modalities[0]]
    reference = nib.load(str(reference_path))
    image = np.asarray(reference.dataobj, dtype=np.float32).reshape(volume.shape)
    # Only the brain can be salient: zero outside it (BraTS background is exactly 0 in every modality, the
    # same mask preprocessing normalises over).  The upsampled coarse map otherwise bleeds into the air.
    brain = image != 0
    for m in modalities[1:]:
        brain |= np.asarray(nib.load(str(scan.paths[m])).dataobj).reshape(volume.shape) != 0
    volume[~brain] = 0.0
    if volume.max() > 0:
        volume /= volume.max()
    img = nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64))
    # Keep the scan's coordinate-system codes so viewers place the overlay exactly on it.
    img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    img.set_sform(img.affine, code=int(reference.header["sform_code"]) or 1)
    img.set_qform(img.affine, code=int(reference.header["qform_code"]) or 1)
    nii_path = out_dir / f"{scan.scan_id}_gradcam.nii.gz"
    with atomic_path(nii_path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)

    image_ras, volume_ras, affine_ras = ras_views(image, volume, affine)
    peak = np.unravel_index(int(np.argmax(volume_ras)), volume_ras.shape)
    grade = ("LGG", "HGG")[target]
    png_path = plot_saliency_slices(
        image_ras,
        volume_ras,
        peak,
        out_dir / f"{scan.scan_id}_gradcam.png",
        title=f"{scan.scan_id}: Grad-CAM for {grade} ({reference_path.name})",
        affine=affine_ras,
    )
    return nii_path, png_path


def ras_views(
    image: np.ndarray, saliency: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image`` and ``saliency`` (one voxel grid, ``affine``) with their axes permuted and flipped to the
    closest RAS+ order (axis 0 from the patient's left to right, axis 1 posterior to anterior, axis 2
    inferior to superior), and that grid's affine: a scan is drawn the same way however it is stored."""
    import nibabel as nib

    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    inverse = nib.orientations.inv_ornt_aff(transform, image.shape)
    return (
        nib.orientations.apply_orientation(image, transform),
        nib.orientations.apply_orientation(saliency, transform),
        np.asarray(affine, dtype=np.float64) @ inverse,
    )
