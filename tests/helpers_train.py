"""Fixtures for the training tests: a tiny synthetic cohort and the flags of a seconds-long training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# A real training, only small: the tiny MedicalNet-topology ResNet on 16³ inputs, 2 folds of 5 subjects.
TINY = [
    "--depth",
    "tiny",
    "--input-size",
    "16",
    "--folds",
    "2",
    "--batch-size",
    "2",
    "--num-workers",
    "0",
]


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """10 BraTS-2020-layout subjects (5 LGG / 5 HGG-ish), 32×32×24 voxels, written once per session."""
    from medcli.data.synth import synth_cohort

    root = tmp_path_factory.mktemp("cohort") / "data"
    synth_cohort(root, n_subjects=10, shape=(32, 32, 24), seed=0, lgg_fraction=0.5)
    return root


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One preprocessed-array cache for the session: each subject is preprocessed once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def train_env(monkeypatch, tmp_path, shared_cache, tiny_cohort) -> dict:
    """Environment for in-process and subprocess trainings: isolated runs/ and cache, no colour."""
    env = {"MEDCLI_CACHE": str(shared_cache), "MEDCLI_HOME": str(tmp_path / "home"), "NO_COLOR": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # the seed's relative pretrained/ path is absent here: random init
    # Tiny convolutions gain nothing from a second thread, and on a busy shared machine OpenMP's
    # spin-waiting makes two threads ~10x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {
        "env": {**env, "OMP_NUM_THREADS": "1"},
        "data": tiny_cohort,
        "out": tmp_path / "runs",
        "tiny": list(TINY),
    }
    torch.set_num_threads(threads)
