"""Which precision and memory layout training picks on the CPU (measured speed; see resolve_precision)."""

from __future__ import annotations

import pytest
import torch

from medcli.engine import speed
from medcli.engine.config import TrainConfig
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


@pytest.fixture(params=[False, True], ids=["emulated-bf16", "native-bf16"])
def native(request, monkeypatch):
    """Run the test as on a CPU without, then with, native bf16 (the capability probe answers; the
    decision under test is resolve_precision's)."""
    monkeypatch.setattr(speed, "cpu_has_fast_bf16", lambda: request.param)
    return request.param


@pytest.mark.parametrize("size", [16, CPU_CHANNELS_LAST_MIN_SIZE, 128])
def test_cpu_auto_precision_is_bf16_where_native_on_large_volumes(native, size):
    # measured on AMX: bf16 + rewrites 2.35x fp32 at 128³, 1.22x at 64³, 0.89x at 32³; emulated: far slower
    large = size >= CPU_CHANNELS_LAST_MIN_SIZE
    p = resolve_precision(TrainConfig(loss="ce", input_size=size), CPU)
    assert p.amp_dtype is (torch.bfloat16 if native and large else None) and p.use_scaler is False
    assert p.channels_last is large


def test_cpu_amp_flag_wins_over_auto(native):
    p = resolve_precision(TrainConfig(loss="ce", amp=True, input_size=16), CPU)
    assert p.amp_dtype is torch.bfloat16 and p.use_scaler is False
    assert p.channels_last is native
    p = resolve_precision(TrainConfig(loss="ce", amp=False, input_size=16), CPU)
    assert p.amp_dtype is None and p.channels_last is False


def test_probe_matches_the_cpu_flags():
    # The probe must say what /proc/cpuinfo says (mkldnn's own probe is also true on AVX512 without bf16).
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert speed.cpu_has_fast_bf16() is bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)
