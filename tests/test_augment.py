"""Augmentation: reproducible per (seed, epoch, index), shape-preserving, background kept constant."""

from __future__ import annotations

import pytest
import torch
from scipy import ndimage

from medcli.data.augment import AugmentConfig, Augmenter, augment, sample_generator
from medcli.errors import UsageError

ONLY = AugmentConfig.off()


def _volume(c: int = 2, shape=(20, 24, 16), seed: int = 0) -> torch.Tensor:
    """A z-scored-looking 'brain' ball with a zero background."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    centre = torch.tensor([n / 2 for n in shape]).view(3, 1, 1, 1)
    brain = ((grid - centre) ** 2).sum(0) < (min(shape) * 0.4) ** 2
    x = torch.randn(c, *shape, generator=g)
    return x * brain


def test_same_seed_epoch_index_is_reproducible_and_others_differ():
    x = _volume()
    aug = Augmenter(AugmentConfig(p_affine=1, p_flip=1, p_intensity=1, p_gamma=1, p_noise=1), seed=7)
    a, b = aug(x, epoch=3, index=5), aug(x, epoch=3, index=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, epoch=3, index=6))
    assert not torch.equal(a, aug(x, epoch=4, index=5))
    assert not torch.equal(a, Augmenter(aug.cfg, seed=8)(x, epoch=3, index=5))
    assert a.shape == x.shape and a.dtype == torch.float32


def test_input_is_not_modified_and_off_is_identity():
    x = _volume()
    before = x.clone()
    out = augment(x, ONLY, sample_generator(0, 0, 0))
    assert torch.equal(out, x) and out is not x
    augment(x, AugmentConfig(p_affine=1, p_intensity=1, p_gamma=1, p_noise=1), sample_generator(0, 0, 0))
    assert torch.equal(x, before)


def test_flip_mirrors_the_configured_axis():
    x = _volume()
    out = augment(
        x, AugmentConfig(**{**ONLY.to_dict(), "p_flip": 1.0, "flip_axes": [0]}), sample_generator(0, 0, 0)
    )
    assert torch.equal(out, torch.flip(x, [1]))


def test_identity_affine_changes_nothing_and_zoom_enlarges():
    x = torch.zeros(1, 24, 24, 24)
    x[0, 9:15, 9:15, 9:15] = 1.0
    same = AugmentConfig(
        **{**ONLY.to_dict(), "p_affine": 1.0, "max_rotation_deg": 0.0, "scale_range": [1, 1]}
    )
    torch.testing.assert_close(augment(x, same, sample_generator(0, 0, 0)), x, atol=1e-5, rtol=0)
    zoom = AugmentConfig(**{**same.to_dict(), "scale_range": [1.3, 1.3]})
    bigger = augment(x, zoom, sample_generator(0, 0, 0))
    assert (bigger > 0.5).sum() > 1.5 * (x > 0.5).sum()


def test_rotation_keeps_a_centred_blob_centred():
    x = torch.zeros(1, 24, 28, 20)
    x[0, 10:14, 12:16, 8:12] = 1.0
    rot = AugmentConfig(**{**ONLY.to_dict(), "p_affine": 1.0, "max_rotation_deg": 15.0})
    for i in range(3):
        out = augment(x, rot, sample_generator(0, 0, i))
        assert not torch.equal(out, x)
        com = torch.tensor(ndimage.center_of_mass(out[0].numpy()))
        assert torch.linalg.norm(com - torch.tensor([11.5, 13.5, 9.5])) < 0.5


def test_intensity_transforms_keep_background_zero():
    x = _volume()
    cfg = AugmentConfig(
        **{**ONLY.to_dict(), "p_intensity": 1, "p_gamma": 1, "p_noise": 1, "noise_std": [0.2, 0.2]}
    )
    out = augment(x, cfg, sample_generator(1, 2, 3))
    background = (x == 0).all(0)
    assert torch.all(out[:, background] == 0)
    assert not torch.equal(out[:, ~background], x[:, ~background])


def test_gamma_keeps_channel_statistics():
    x = _volume(c=1)
    cfg = AugmentConfig(**{**ONLY.to_dict(), "p_gamma": 1, "gamma_range": [1.4, 1.4]})
    out = augment(x, cfg, sample_generator(0, 0, 0))
    fg = x[0] != 0
    assert not torch.allclose(out[0][fg], x[0][fg])
    assert out[0][fg].mean().item() == pytest.approx(x[0][fg].mean().item(), abs=1e-4)
    assert out[0][fg].std().item() == pytest.approx(x[0][fg].std().item(), rel=1e-4)


def test_generators_are_independent_of_call_order():
    a = torch.rand(4, generator=sample_generator(0, 1, 2))
    torch.rand(4, generator=sample_generator(0, 1, 3))
    assert torch.equal(a, torch.rand(4, generator=sample_generator(0, 1, 2)))


@pytest.mark.parametrize(
    "kwargs", [{"p_flip": 1.5}, {"scale_range": (1.1, 0.9)}, {"flip_axes": (3,)}, {"gamma_range": (0, 1)}]
)
def test_invalid_settings_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        AugmentConfig(**kwargs)


def test_fast_affine_grid_matches_torch():
    import torch.nn.functional as F

    from medcli.data.augment import _affine_grid

    theta = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    ours = _affine_grid(theta, (6, 7, 9))
    ref = F.affine_grid(theta[None], [1, 1, 6, 7, 9], align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_batch_matches_per_sample_calls():
    x = torch.stack([_volume(seed=i) for i in range(3)])
    aug = Augmenter(AugmentConfig(p_affine=1, p_intensity=1), seed=4)
    indices = [5, 0, 9]
    out = aug.batch(x, epoch=2, indices=indices)
    assert out.shape == x.shape
    for i, k in enumerate(indices):
        assert torch.equal(out[i], aug(x[i], 2, k))
