#!/usr/bin/env python3
"""MedicalNet's dilated 3³ convs computed six ways, timed on the machine at hand (CPU).

layer3 convolves 256 channels at dilation 2 and layer4 512 channels at dilation 4, both on a 16³ grid for a
128³ input.  oneDNN has no fast bf16 kernel for some of them, so medcli's CPU paths rewrite them
(``medcli.engine.cpu_kernels``).  This script compares, for one such conv:

* ``dilated``: ``F.conv3d(..., dilation=r)``, what the model declares;
* ``phase``:   medcli's phase-batched undilated conv (r³ sub-grids as a batch);
* ``im2col``:  the 27 shifted copies side by side, one GEMM (``[voxels, 27·C] @ [27·C, K]``);
* ``gemm27``:  27 GEMMs of a shifted view each (``[voxels, C] @ [C, K]``), summed;
* ``tapwise``: medcli's tap-wise conv: the 27 GEMMs over in-volume voxels only, no padding, with its own
  backward (``medcli.engine.tap_conv``);
* ``winograd``: medcli's fp32 default, F(4³, 3³) over the phase sub-grids (``medcli.engine.winograd``).

    taskset -c 0,1 python scripts/bench_dilated_conv.py --threads 2 --dtype bf16          # inference
    python scripts/bench_dilated_conv.py --dtype bf16 --train --batch 2                    # fwd + bwd

Measured on 2 Sapphire Rapids (AMX) cores in bf16 (ms; inference batch 1 / training batch 2):
C=512 r=4: dilated 714 / 3121, phase 78 / 628, im2col 113 / 1031, gemm27 46 / 557;
C=256 r=2: dilated 5.8 / 97, phase 10 / 75, im2col 29 / 295, gemm27 16 / 162 (before ``tapwise`` existed).
On a 2-core AVX2 EPYC in fp32 (best of 16 / 6 interleaved runs, ms): C=512 r=4 dilated 256 / 2105,
tapwise 245 / 1794; C=256 r=2 dilated 99 / 707, tapwise 86 / 618.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medcli.engine.bench import time_it
from medcli.engine.cpu_kernels import PhaseBatchedConv3d
from medcli.engine.tap_conv import tapwise_conv3d
from medcli.engine.winograd import winograd_conv3d

Conv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _shifted(x: torch.Tensor, r: int) -> list[torch.Tensor]:
    """The 27 taps of a 3³ kernel at dilation r, as [N, D, H, W, C] views of the zero-padded input."""
    _, _, d, h, w = x.shape
    xl = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, r, r, r, r, r, r))
    taps = [(i, j, k) for i in range(3) for j in range(3) for k in range(3)]
    return [xl[:, i * r : i * r + d, j * r : j * r + h, k * r : k * r + w, :] for i, j, k in taps]


def _weight_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K, C, 3, 3, 3] -> [27·C, K], tap-major like _shifted."""
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, weight.shape[0]).to(dtype)


def _to_ncdhw(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n, _, d, h, w = x.shape
    return y.reshape(n, d, h, w, -1).permute(0, 4, 1, 2, 3)  # a channels_last_3d view


def dilated(x, weight, bias, r):
    return F.conv3d(x, weight, bias, 1, r, r)


def phase(x, weight, bias, r):
    conv = PhaseBatchedConv3d(
        weight.shape[1], weight.shape[0], 3, padding=r, dilation=r, bias=bias is not None
    )
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(conv, params, (x,))  # gradients reach weight and bias


def im2col(x, weight, bias, r):
    dt = _compute_dtype(x)
    cols = torch.cat([t.to(dt) for t in _shifted(x, r)], dim=-1).reshape(-1, 27 * x.shape[1])
    y = cols @ _weight_matrix(weight, dt)
    return _to_ncdhw(y if bias is None else y + bias.to(dt), x)


def gemm27(x, weight, bias, r):
    dt = _compute_dtype(x)
    c = x.shape[1]
    wm = _weight_matrix(weight, dt).reshape(27, c, -1)
    y = sum(tap.reshape(-1, c) @ wm[t] for t, tap in enumerate(_shifted(x.to(dt), r)))
    return _to_ncdhw(y if bias is None else y + bias.to(dt), x)


VARIANTS: dict[str, Conv] = {
    "dilated": dilated,
    "phase": phase,
    "im2col": im2col,
    "gemm27": gemm27,
    "tapwise": tapwise_conv3d,
    "winograd": winograd_conv3d,  # float32 even under --dtype bf16 (medcli uses it in fp32 only)
}


def time_variants(
    channels: int,
    r: int,
    *,
    size: int = 16,
    batch: int = 1,
    dtype: str = "fp32",
    train: bool = False,
    reps: int = 3,
) -> dict[str, dict[str, float]]:
    """Median seconds and TFLOP/s of each variant for one conv (forward, or forward + backward)."""
    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    x = torch.randn(batch, channels, size, size, size).contiguous(memory_format=fmt).requires_grad_(train)
    weight = torch.randn(channels, channels, 3, 3, 3).contiguous(memory_format=fmt).requires_grad_(train)
    bias = torch.randn(channels).requires_grad_(train)
    flops = 2 * batch * channels**2 * 27 * size**3 * (3 if train else 1)
    out = {}
    for name, conv in VARIANTS.items():

        def run(conv=conv):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                y = conv(x, weight, bias, r)
            if train:
                y.float().sum().backward()

        with torch.enable_grad() if train else torch.inference_mode():
            t = time_it(run, warmup=1, reps=reps)
        out[name] = {"seconds": t.median, "tflops": flops / t.median / 1e12}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--train", action="store_true", help="time forward + backward")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=16, help="grid side (16 for a 128³ input)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for channels, r in ((512, 4), (256, 2)):
        res = time_variants(
            channels, r, size=args.size, batch=args.batch, dtype=args.dtype, train=args.train, reps=args.reps
        )
        cells = " | ".join(
            f"{k} {v['seconds'] * 1e3:.1f} ms {v['tflops']:.3f} TFLOP/s" for k, v in res.items()
        )
        print(f"{args.dtype} C={channels} r={r} {'train' if args.train else 'infer'} b{args.batch}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
