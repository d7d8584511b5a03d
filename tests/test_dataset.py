"""VolumeDataset: items, labels, cache equivalence, and identical output with 0 or 2 DataLoader workers."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers_nifti import make_subject
from torch.utils.data import DataLoader

from medcli.data.augment import AugmentConfig
from medcli.data.cache import PreprocessCache
from medcli.data.dataset import VolumeDataset
from medcli.data.discover import Subject
from medcli.data.preprocess import PreprocessConfig, preprocess

CFG = PreprocessConfig(modalities=("t1ce", "flair"), input_size=(16, 16, 16), crop_margin=2)
AUG = AugmentConfig(p_affine=1.0, p_flip=0.5, p_intensity=1.0, p_gamma=0.5, p_noise=1.0)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    grades = ["HGG", "LGG", None, "HGG", "LGG"]
    return [
        Subject(
            f"S{i}",
            grade=g,
            label=None if g is None else int(g == "HGG"),
            paths=make_subject(root / f"S{i}", ("t1ce", "flair"), seed=i),
        )
        for i, g in enumerate(grades)
    ]


def _collect(loader) -> list[tuple[torch.Tensor, list[int], list[str]]]:
    return [(x.clone(), y.tolist(), list(ids)) for x, y, ids in loader]


def test_items_and_labels(subjects, tmp_path):
    ds = VolumeDataset(subjects, CFG, cache=PreprocessCache(tmp_path / "cache"))
    assert len(ds) == 5 and ds.labels == [1, 0, -1, 1, 0]
    x, label, sid = ds[2]
    assert x.dtype == torch.float32 and x.shape == (2, 16, 16, 16)
    assert label == -1 and sid == "S2"
    assert torch.equal(x, torch.from_numpy(preprocess(subjects[2].paths, CFG).array))
    x.add_(1.0)  # items are private copies: the cached memmap is untouched
    assert torch.equal(ds[2][0], torch.from_numpy(preprocess(subjects[2].paths, CFG).array))


def test_cached_and_uncached_agree(subjects, tmp_path):
    cached = VolumeDataset(subjects, CFG, cache=PreprocessCache(tmp_path / "cache"), augment=AUG, seed=3)
    direct = VolumeDataset(subjects, CFG, augment=AUG, seed=3)
    for i in range(len(subjects)):
        assert torch.equal(cached[i][0], direct[i][0])


def test_augmentation_follows_seed_and_epoch(subjects, tmp_path):
    ds = VolumeDataset(subjects, CFG, cache=PreprocessCache(tmp_path / "cache"), augment=AUG, seed=1)
    plain = VolumeDataset(subjects, CFG, cache=PreprocessCache(tmp_path / "cache"))
    a = ds[0][0]
    assert not torch.equal(a, plain[0][0])
    assert torch.equal(a, ds[0][0])
    ds.set_epoch(1)
    assert ds.epoch == 1 and not torch.equal(a, ds[0][0])
    assert not torch.equal(a, VolumeDataset(subjects, CFG, augment=AUG, seed=2)[0][0])
    assert torch.equal(
        VolumeDataset(subjects, CFG, augment=True, seed=1)[0][0],
        VolumeDataset(subjects, CFG, augment=AugmentConfig(), seed=1)[0][0],
    )


def test_pickles_without_arrays(subjects, tmp_path):
    ds = VolumeDataset(subjects, CFG, cache=PreprocessCache(tmp_path / "cache"), augment=AUG, seed=5)
    ds.set_epoch(4)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    again = pickle.loads(blob)
    assert again.epoch == 4 and torch.equal(again[1][0], ds[1][0])


def test_zero_and_two_workers_yield_the_same(subjects, tmp_path):
    cache = PreprocessCache(tmp_path / "cache")
    ds = VolumeDataset(subjects, CFG, cache=cache, augment=AUG, seed=11)
    serial = _collect(DataLoader(ds, batch_size=2, num_workers=0))
    parallel = _collect(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for (xs, ys, ids), (xp, yp, idp) in zip(serial, parallel, strict=True):
        assert torch.equal(xs, xp) and ys == yp and ids == idp


def test_set_epoch_reaches_persistent_workers(subjects, tmp_path):
    cache = PreprocessCache(tmp_path / "cache")
    ds = VolumeDataset(subjects, CFG, cache=cache, augment=AUG, seed=11)
    loader = DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(_collect(loader)[0][0])
    reference = VolumeDataset(subjects, CFG, augment=AUG, seed=11)
    for epoch, got in enumerate(epochs):
        reference.set_epoch(epoch)
        assert torch.equal(got, torch.stack([reference[i][0] for i in range(5)]))
    assert not torch.equal(epochs[0], epochs[1])


def test_bench_cache_read_reports_a_rate():
    from medcli.data.dataset import bench_cache_read

    details = {}
    rate = bench_cache_read(n_subjects=2, reads=6, input_size=16, shape=(32, 32, 24), details=details)
    assert rate > 0 and details["mb_per_sample"] == pytest.approx(16**3 * 4 / 1e6)
