"""Measured speed: train-step throughput per precision mode, and the machine's Conv3d ceiling.

Used by the trainer to pick the default CPU precision (``auto``) and by ``medcli bench``.  Modes:

- ``fp32``     plain eager fp32, contiguous (NCDHW) memory: the baseline;
- ``fp32-cl``  fp32 with ``torch.channels_last_3d`` weights and inputs;
- ``bf16``     ``torch.autocast`` bf16 (CPU or CUDA), contiguous;
- ``bf16-cl``  bf16 autocast + channels_last_3d;
- ``fp16``/``fp16-cl``  CUDA only, with a GradScaler.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of one step), so
"achieved TFLOP/s" is comparable with :func:`conv3d_ceiling` on the same machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("fp32", "fp32-cl", "bf16", "bf16-cl", "fp16", "fp16-cl")

# Smallest input edge from which channels_last_3d (and, where native, bf16) is faster on a CPU: the
# trainer's and the predictor's ``auto`` precision both follow it (see trainer.resolve_precision).
CPU_CHANNELS_LAST_MIN_SIZE = 64


def cpu_has_fast_bf16() -> bool:
    """True on CPUs that compute bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast pays off.

    Elsewhere oneDNN emulates bf16: on an AVX2-only EPYC a bf16 Conv3d ran hundreds of times slower than
    fp32.  (``torch.ops.mkldnn._is_mkldnn_bf16_supported`` is no test: it is also true on AVX512 CPUs
    without bf16 instructions, where oneDNN emulates it too.)  The trainer's and predictor's ``auto``
    precision and ``medcli bench`` all ask this one function.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(mode: str) -> torch.dtype | None:
    if mode.startswith("bf16"):
        return torch.bfloat16
    if mode.startswith("fp16"):
        return torch.float16
    return None


@dataclass
class StepSpeed:
    mode: str
    batch_size: int
    step_s: float
    samples_per_s: float
    flops_per_step: float
    tflops: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_train_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward + backward on ``x`` (FlopCounterMode counts convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train_step_throughput(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    mode: str = "fp32",
    *,
    steps: int = 3,
    warmup: int = 1,
    flops: float | None = None,
) -> StepSpeed:
    """Time full training steps (forward, CE loss, backward, Adam step) in ``mode``; returns samples/s.

    The model is trained in place (use a copy if its weights matter).  ``flops``: pass a precomputed
    count to skip the counting pass.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")
    x, y = batch
    device = next(model.parameters()).device
    channels_last = mode.endswith("-cl")
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    x = x.to(device).contiguous(memory_format=fmt)
    y = y.to(device)
    if flops is None:
        flops = count_train_flops(model, x)
    dtype = autocast_dtype(mode)
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("fp16 autocast is measured on CUDA only")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    return StepSpeed(mode, int(x.shape[0]), step_s, x.shape[0] / step_s, flops, flops / step_s / 1e12)


def conv3d_ceiling(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    channels: int = 128,
    size: int = 24,
    batch: int = 2,
    repeats: int = 5,
    channels_last: bool = True,
) -> float:
    """TFLOP/s of a large 3³ Conv3d forward (the kernel ResNet-3D spends its time in) in ``dtype``.

    A practical ceiling for this machine: oneDNN's best case for the shapes that dominate our models.
    """
    device = torch.device(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(device, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch, channels, size, size, size, device=device, dtype=dtype).contiguous(
        memory_format=fmt
    )
    flops = 2.0 * batch * channels * channels * 27 * size**3
    with torch.no_grad():
        conv(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e12
