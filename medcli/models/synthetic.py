"""Weights files in MedicalNet's exact released layout, with random values (for tests and benchmarks).

The real files cannot be downloaded on every machine, so tests and ``medcli bench`` generate stand-ins
with the same container, key names, prefix, dtypes and serialization (shared/reference/medicalnet.md §2):
``{'state_dict': OrderedDict('module.conv1.weight': ..., ...)}``, backbone only (no fc, no conv_seg),
BatchNorm ``num_batches_tracked`` int64 scalars included, legacy (pre-zip) torch serialization.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import torch

from medcli.atomic import atomic_write


def medicalnet_state_dict(
    depth: int | str = 50, *, seed: int = 0, in_channels: int = 1, prefix: str = "module."
) -> OrderedDict[str, torch.Tensor]:
    """A backbone state dict with MedicalNet's key names (plus ``prefix``) and plausible random values."""
    from medcli.models import create_model

    # Built on the meta device: names and shapes only, no memory and no initialisation cost.
    with torch.device("meta"):
        skeleton = create_model(depth, in_channels=in_channels)
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, meta in skeleton.state_dict().items():
        if key.startswith("fc."):
            continue  # the released files are backbone-only
        state[prefix + key] = _random_like(key, meta.shape, meta.dtype, gen)
    return state


def _random_like(key: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # In-place scaling: a ResNet-50 is 46M values, and temporaries double the time and memory.
    if key.endswith("num_batches_tracked"):
        return torch.randint(1, 10**6, (), generator=gen, dtype=torch.int64)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen, dtype=dtype).add_(0.5)
    values = torch.randn(shape, generator=gen, dtype=dtype)
    if len(shape) == 5:  # conv kernel: Kaiming-like scale (fan_out), as trained weights roughly have
        return values.mul_(math.sqrt(2.0 / (shape[0] * math.prod(shape[2:]))))
    if key.endswith(".weight"):  # BatchNorm gamma
        return values.mul_(0.1).add_(1.0)
    return values.mul_(0.1)  # BatchNorm beta and running mean


def write_medicalnet_checkpoint(
    path: str | os.PathLike,
    depth: int | str = 50,
    legacy: bool = True,
    seed: int = 0,
    *,
    in_channels: int = 1,
    prefix: str = "module.",
    container: str = "state_dict",
) -> Path:
    """Write a MedicalNet-layout weights file (atomically) and return its path.

    ``legacy=True`` writes the pre-zip format the released files use; ``container`` is "state_dict"
    (released layout), "model" or "direct" (a bare state dict), for testing the loader's variants.
    """
    path = Path(path)
    state = medicalnet_state_dict(depth, seed=seed, in_channels=in_channels, prefix=prefix)
    obj = state if container == "direct" else {container: state}
    atomic_write(path, lambda f: torch.save(obj, f, _use_new_zipfile_serialization=not legacy), fsync=False)
    return path
