"""Grad-CAM: the exact Grad-CAM formula on a real tiny model, normalisation, ensemble averaging, and the
PNG's views reoriented to RAS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcli.engine.saliency import ensemble_grad_cam, grad_cam, ras_views
from medcli.models import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # Non-zero residual gammas: every branch shapes the feature map, as in a trained model.
    return create_model("tiny", in_channels=1, num_classes=2, zero_init_last=False).eval()


def test_grad_cam_equals_the_formula_for_a_linear_head(model):
    """For pool -> linear, d logit_c / d A_k(x) = w_ck / |spatial|: Grad-CAM = ReLU(sum_k mean_grad_k A_k)."""
    x = torch.randn(2, 1, 16, 16, 16)
    target = 1
    cam = grad_cam(model, x, target)
    assert cam.shape == (2, 16, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        n_spatial = feats.shape[2] * feats.shape[3] * feats.shape[4]
        w = model.fc.weight[target] / n_spatial
        coarse = torch.relu((w[None, :, None, None, None] * feats).sum(1, keepdim=True))
        up = torch.nn.functional.interpolate(
            coarse, size=(16, 16, 16), mode="trilinear", align_corners=False
        )[:, 0]
        expected = up / up.flatten(1).amax(1)[:, None, None, None]
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=1e-4)
    assert cam.min() >= 0 and torch.allclose(cam.flatten(1).amax(1), torch.ones(2))


def test_grad_cam_targets_differ_and_leave_no_grad_state(model):
    x = torch.randn(1, 1, 16, 16, 16)
    lgg, hgg = grad_cam(model, x, 0), grad_cam(model, x, 1)
    assert not torch.allclose(lgg, hgg)
    assert all(p.grad is None for p in model.parameters())


def test_ensemble_cam_is_the_normalised_mean(model):
    torch.manual_seed(1)
    other = create_model("tiny", in_channels=1, num_classes=2, zero_init_last=False).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    a, b = grad_cam(model, x, 1), grad_cam(other, x, 1)
    mean = (a + b) / 2
    torch.testing.assert_close(ensemble_grad_cam([model, other], x, 1), mean / mean.max())


def test_cosine_head_cam(model):
    cos = create_model("tiny", in_channels=2, num_classes=2, head="cosine").eval()
    cam = grad_cam(cos, torch.randn(1, 2, 16, 16, 16), 1)
    assert cam.shape == (1, 16, 16, 16) and torch.isfinite(cam).all()


def test_tta_cam_is_the_mean_of_the_flipped_back_maps(model):
    from medcli.engine.predictor import FLIPS

    x = torch.randn(1, 1, 16, 16, 16)
    maps = [grad_cam(model, x.flip(d) if d else x, 1) for d in FLIPS]
    mean = torch.stack(
        [c.flip([k - 1 for k in d]) if d else c for c, d in zip(maps, FLIPS, strict=True)]
    ).mean(0)
    torch.testing.assert_close(ensemble_grad_cam([model], x, 1, flips=FLIPS), mean / mean.max())
    chunked = ensemble_grad_cam([model], x, 1, flips=FLIPS, max_batch=3)  # 8 copies in passes of 3
    torch.testing.assert_close(chunked, mean / mean.max())


def test_tta_cam_over_all_flips_is_flip_equivariant(model):
    """Mirror the scan, and the map mirrors with it: what the full flip group guarantees (and a map that
    forgot to flip its copies back would not do)."""
    from medcli.engine.predictor import FLIPS

    x = torch.randn(1, 1, 16, 16, 16)
    cam = ensemble_grad_cam([model], x, 1, flips=FLIPS)
    for dims in ((2,), (3, 4)):
        mirrored = ensemble_grad_cam([model], x.flip(dims), 1, flips=FLIPS)
        torch.testing.assert_close(mirrored, cam.flip([d - 1 for d in dims]), atol=1e-5, rtol=1e-4)
    plain = ensemble_grad_cam([model], x.flip((2,)), 1)
    assert not torch.allclose(plain, grad_cam(model, x, 1).flip([1]), atol=1e-3)  # without TTA it is not


def test_ras_views_draw_a_scan_the_same_however_it_is_stored():
    """One volume stored RAS and stored with its axes permuted and two of them flipped (the same voxels at
    the same world points): both come back as the same RAS arrays, with affines that agree."""
    rng = np.random.default_rng(0)
    ras = rng.random((6, 7, 5)).astype(np.float32)
    sal = rng.random((6, 7, 5)).astype(np.float32)
    affine = np.diag([1.0, 1.2, 2.5, 1.0])
    affine[:3, 3] = (-3.0, 4.0, 10.0)
    # Stored as [z, x, y] with x and z reversed: voxel (a, b, c) holds RAS voxel (5 - b, c, 4 - a).
    stored = ras.transpose(2, 0, 1)[::-1, ::-1, :].copy()
    stored_sal = sal.transpose(2, 0, 1)[::-1, ::-1, :].copy()
    to_ras = np.zeros((4, 4))
    to_ras[0, 1], to_ras[0, 3] = -1, 5  # RAS i = 5 - b
    to_ras[1, 2] = 1  # RAS j = c
    to_ras[2, 0], to_ras[2, 3] = -1, 4  # RAS k = 4 - a
    to_ras[3, 3] = 1
    stored_affine = affine @ to_ras
    assert stored[1, 2, 3] == ras[3, 3, 3]
    np.testing.assert_allclose(stored_affine @ [1, 2, 3, 1], affine @ [3, 3, 3, 1])  # same world point

    img, s, aff = ras_views(stored, stored_sal, stored_affine)
    np.testing.assert_array_equal(img, ras)
    np.testing.assert_array_equal(s, sal)
    np.testing.assert_allclose(aff, affine)
    img, s, aff = ras_views(ras, sal, affine)  # already RAS: unchanged
    np.testing.assert_array_equal(img, ras)
    np.testing.assert_allclose(aff, affine)
