"""Real tiny inputs for eval/predict tests: NIfTI scans on small grids and medcli checkpoints of a tiny
model after a few real optimisation steps (written in the trainer's checkpoint format)."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medcli.data.synth import NAME_MAPPING_HEADER_2020

LPS = np.array([[-1.0, 0, 0, 23], [0, -1.0, 0, 23], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])


def brain_volume(shape=(24, 24, 24), seed=0, hgg=False) -> np.ndarray:
    """An ellipsoid 'brain' (zero background) with a bright blob; HGG-like blobs get a dark core."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - n / 2) / (0.4 * n)) ** 2 for g, n in zip(grids, shape, strict=True))
    vol = 300 + 40 * rng.standard_normal(shape)
    centre = [rng.integers(n // 3, 2 * n // 3) for n in shape]
    t2 = sum(((g - c) / 3.0) ** 2 for g, c in zip(grids, centre, strict=True))
    vol = vol + 400 * (t2 < 1.0)
    if hgg:
        vol = vol - 500 * (t2 < 0.3)
    vol[r2 >= 1.0] = 0
    return np.clip(vol, 0, None).astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def write_subject(
    root: Path, sid: str, modalities: Sequence[str] = ("t1ce",), shape=(24, 24, 24), seed=0, hgg=False
) -> dict[str, Path]:
    folder = root / sid
    return {
        m: write_nifti(folder / f"{sid}_{m}.nii.gz", brain_volume(shape, seed * 10 + i, hgg))
        for i, m in enumerate(modalities)
    }


def write_cohort(root: Path, n: int = 6, modalities=("t1ce",), shape=(24, 24, 24)) -> dict[str, int]:
    """A flat BraTS-2020-style cohort with name_mapping.csv; returns subject id → label."""
    labels = {}
    for i in range(n):
        sid = f"BraTS20_Training_{i + 1:03d}"
        labels[sid] = int(i % 3 != 0)  # 1/3 LGG
        write_subject(root, sid, modalities, shape, seed=i, hgg=bool(labels[sid]))
    with open(root / "name_mapping.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(NAME_MAPPING_HEADER_2020)
        for sid, y in labels.items():
            w.writerow(["HGG" if y else "LGG", "NA", "NA", "NA", "NA", sid])
    return labels


def tiny_checkpoint(
    path: Path,
    *,
    modalities: Sequence[str] = ("t1ce",),
    input_size: int = 16,
    head: str = "linear",
    steps: int = 2,
    ema: bool = True,
    fold: int = 0,
    seed: int = 0,
    depth: str | int = "tiny",
) -> Path:
    """Train a tiny model a few real steps and save a ``medcli-checkpoint/1`` file at ``path``."""
    from medcli import __version__
    from medcli.data.preprocess import PreprocessConfig
    from medcli.engine.checkpoint import FORMAT, atomic_save
    from medcli.models import create_model

    torch.manual_seed(seed)
    c = len(modalities)
    # Non-zero residual gammas: after two steps a zero-initialised branch would still be almost silent,
    # and the predictor's numerics (folding, bf16, flips, saliency) must be tested on branches that count.
    model = create_model(depth, in_channels=c, num_classes=2, head=head, zero_init_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, c, input_size, input_size, input_size)
        y = torch.tensor([0, 1, 0, 1])
        loss = torch.nn.functional.cross_entropy(model(x) * (30.0 if head == "cosine" else 1.0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ema_state = None
    if ema:
        # A distinct EMA state (weights slightly shrunk) so raw vs EMA evaluation can be told apart.
        ema_state = {
            k: (v * 0.9 if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()
        }
    pre = PreprocessConfig(modalities=tuple(modalities), input_size=(input_size,) * 3)
    ckpt = {
        "format": FORMAT,
        "model": model.state_dict(),
        "ema": ema_state,
        "optimizer": opt.state_dict(),
        "scheduler": None,
        "scaler": None,
        "epoch": 0,
        "global_step": steps,
        "rng": {},
        "best_metric": 0.5,
        "config": {
            "model": {"depth": depth, "in_channels": c, "num_classes": 2, "head": head, "dropout": 0.0},
            "modalities": list(modalities),
            "ldam_s": 30.0,
            "fold": fold,
        },
        "preprocess": pre.to_dict(),
        "class_names": ["LGG", "HGG"],
        "fold": fold,
        "split_hash": "test",
        "provenance": {
            "pretrained_sha256": None,
            "medcli_version": __version__,
            "torch_version": str(torch.__version__),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        },
    }
    atomic_save(ckpt, path)
    return path
