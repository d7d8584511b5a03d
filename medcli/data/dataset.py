"""``VolumeDataset``: subjects → ``(float32 [C, D, H, W], label, subject_id)`` for a torch DataLoader.

With a :class:`~medcli.data.cache.PreprocessCache` each item is a memory-mapped read of an array
prepared once (``medcli data prepare`` fills it ahead of time; a miss is preprocessed and stored on the
spot); without one, every item runs :func:`~medcli.data.preprocess.preprocess` (fine for eval/predict of a
few scans).  Augmentation (training only) is seeded per ``(seed, epoch, index)``.

The epoch lives in a one-element shared-memory tensor, so ``set_epoch`` in the main process reaches
DataLoader workers even with ``persistent_workers=True`` (call it before iterating the loader, as with
``DistributedSampler.set_epoch``).  The dataset pickles (subjects, config, cache root, seed) and holds
no arrays, so workers and DDP ranks start cheaply.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medcli.data.augment import AugmentConfig, Augmenter
from medcli.data.cache import PreprocessCache
from medcli.data.preprocess import PreprocessConfig, preprocess


class VolumeDataset(Dataset):
    """Items are ``(tensor [C, D, H, W] float32, label int (-1 when unknown), subject_id str)``.

    ``subjects`` are objects with ``subject_id``, ``label`` (0 = LGG, 1 = HGG, or None) and ``paths``
    (modality → file), such as ``medcli.data.discover.Subject``.
    """

    def __init__(
        self,
        subjects: Sequence[Any],
        cfg: PreprocessConfig,
        cache: PreprocessCache | None = None,
        augment: bool | AugmentConfig = False,
        seed: int = 0,
    ):
        self.subjects = list(subjects)
        self.cfg = cfg
        self.cache = cache
        if augment is True:
            augment = AugmentConfig()
        self.augmenter = Augmenter(augment, seed) if isinstance(augment, AugmentConfig) else None
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def labels(self) -> list[int]:
        return [-1 if s.label is None else int(s.label) for s in self.subjects]

    @property
    def subject_ids(self) -> list[str]:
        return [s.subject_id for s in self.subjects]

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation for ``epoch`` (also seen by already-running DataLoader workers)."""
        self._epoch.fill_(int(epoch))

    def load_array(self, index: int) -> np.ndarray:
        """The preprocessed (un-augmented) array of subject ``index``: a memmap when cached."""
        s = self.subjects[index]
        if self.cache is not None:
            return self.cache.get_or_create(s.subject_id, s.paths, self.cfg)
        return preprocess(s.paths, self.cfg, subject_id=s.subject_id).array

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        s = self.subjects[index]
        x = torch.from_numpy(np.array(self.load_array(index), dtype=np.float32, copy=True))
        if self.augmenter is not None:
            x = self.augmenter(x, self.epoch, index)
        label = -1 if s.label is None else int(s.label)
        return x, label, s.subject_id


# --- benchmark -------------------------------------------------------------------------------------------


class _BenchSubject:
    def __init__(self, subject_id: str, paths: dict[str, Path]):
        self.subject_id, self.paths, self.label = subject_id, paths, 0


def bench_cache_read(
    n_subjects: int = 4,
    reads: int = 32,
    input_size: int | Sequence[int] = 128,
    modalities: Sequence[str] = ("t1ce",),
    augment: bool = False,
    shape: tuple[int, int, int] = (240, 240, 155),
    threads: int = 1,
    details: dict | None = None,
) -> float:
    """Samples per second that ``VolumeDataset`` delivers from a warm cache, in one process.

    Writes ``n_subjects`` phantom subjects and fills a temporary cache (not timed), then times ``reads``
    items.  Compare with a training step's samples/s: the loader must stay well ahead (DataLoader workers
    multiply this figure).
    """
    from medcli.data.preprocess import write_phantom_subject

    cfg = PreprocessConfig(modalities=tuple(modalities), input_size=input_size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="medcli-bench-") as tmp:
            subjects = [
                _BenchSubject(
                    f"Bench_{i:03d}",
                    write_phantom_subject(Path(tmp) / f"Bench_{i:03d}", modalities, shape, i),
                )
                for i in range(n_subjects)
            ]
            cache = PreprocessCache(Path(tmp) / "cache")
            ds = VolumeDataset(subjects, cfg, cache=cache, augment=augment)
            for i in range(len(ds)):
                ds[i]  # fill the cache and the page cache
            t0 = time.perf_counter()
            for k in range(reads):
                ds[k % len(ds)]
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    if details is not None:
        details["mb_per_sample"] = float(np.prod(cfg.input_size)) * cfg.in_channels * 4 / 1e6
    return reads / seconds
