"""Which precision and memory layout training picks on the CPU (measured speed; see resolve_precision)."""

from __future__ import annotations

import pytest
import torch

from medcli.engine.config import TrainConfig
from medcli.engine.speed import cpu_has_fast_bf16
from medcli.engine.trainer import CPU_CHANNELS_LAST_MIN_SIZE, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "size, flag, expected",
    [
        (128, None, True),  # large volumes: channels_last_3d is the faster fp32 layout
        (CPU_CHANNELS_LAST_MIN_SIZE, None, True),
        (16, None, None),  # small volumes: contiguous, unless bf16 runs natively
        (128, False, False),  # an explicit flag always wins
        (16, True, True),
    ],
)
def test_cpu_channels_last_default_follows_input_size(size, flag, expected):
    cfg = TrainConfig(input_size=size, channels_last=flag, loss="ce")
    p = resolve_precision(cfg, CPU)
    if expected is None:
        expected = cpu_has_fast_bf16()
    assert p.channels_last is expected


def test_cpu_auto_precision_is_bf16_only_with_native_support():
    p = resolve_precision(TrainConfig(loss="ce"), CPU)
    assert (p.amp_dtype is torch.bfloat16) is cpu_has_fast_bf16()
    assert p.use_scaler is False
