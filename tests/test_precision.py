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
        (16, None, False),  # small volumes: contiguous
        (128, False, False),  # an explicit flag always wins
        (16, True, True),
    ],
)
def test_cpu_channels_last_default_follows_input_size(size, flag, expected):
    cfg = TrainConfig(input_size=size, channels_last=flag, loss="ce")
    p = resolve_precision(cfg, CPU)
    assert p.channels_last is expected


def test_cpu_auto_precision_is_fp32_and_amp_opts_into_bf16():
    # bf16 training measured slower than fp32 + channels_last even on AMX CPUs (see resolve_precision).
    p = resolve_precision(TrainConfig(loss="ce"), CPU)
    assert p.amp_dtype is None and p.use_scaler is False
    p = resolve_precision(TrainConfig(loss="ce", amp=True, input_size=16), CPU)
    assert p.amp_dtype is torch.bfloat16 and p.use_scaler is False
    assert p.channels_last is cpu_has_fast_bf16()  # bf16 wants channels_last where it runs natively
