"""Weights-file fixtures shared by the model, pretrained-loading and ``weights verify`` tests.

Files in MedicalNet's released layout are written once per test session (the ResNet-50 one is ~185 MB
and takes seconds to generate) under pytest's session temp directory, then reused by every module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED

REFERENCE_KEYS = SHARED / "reference" / "medicalnet_resnet50_keys.json"

# shared/reference/medicalnet.md, table in §1: entries in file, without num_batches_tracked,
# backbone params, params with a 2-class fc.
REFERENCE_TABLE = {
    10: (72, 60, 14_355_520, 14_356_546),
    18: (102, 85, 32_986_176, 32_987_202),
    34: (198, 165, 63_295_808, 63_296_834),
    50: (318, 265, 46_155_072, 46_159_170),
    101: (624, 520, 85_201_216, 85_205_314),
    152: (930, 775, 117_359_936, 117_364_034),
    200: (1218, 1015, 126_559_552, 126_563_650),
}


def medicalnet_file(tmp_path_factory: pytest.TempPathFactory, depth: int | str, **options) -> Path:
    """A MedicalNet-layout weights file for ``depth`` (released layout unless ``options`` say otherwise),
    generated once per session and cached by its parameters."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    suffix = "".join(f"_{k}-{v}" for k, v in sorted(options.items()))
    path = tmp_path_factory.getbasetemp() / "medicalnet-weights" / f"resnet{depth}{suffix}.pth"
    if not path.exists():
        write_medicalnet_checkpoint(path, depth=depth, **options)
    return path


def reference_keys() -> list[tuple[str, list[int]]]:
    if not REFERENCE_KEYS.is_file():
        pytest.skip(f"shared reference folder not found ({REFERENCE_KEYS}); it holds the released key list")
    return [(key, shape) for key, shape in json.loads(REFERENCE_KEYS.read_text())]
