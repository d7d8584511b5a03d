#!/usr/bin/env python3
"""Where a one-scan forward pass spends its time: per top-level stage of the model, with FLOPs and the
achieved TFLOP/s, on medcli's fast path (BN folded, channels_last_3d; bf16 with the CPU rewrites).

    python scripts/profile_forward.py --precision bf16 --input-size 128       # on the machine at hand
    taskset -c 0,1 python scripts/profile_forward.py --threads 2 ...           # as a 2-core machine

Compare the TFLOP/s with `medcli bench --sections ceiling`: a stage far below the dense-conv ceiling is
where the time goes.  Timing uses forward hooks on the model's children (median of the timed passes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medcli.engine.bench import time_it
from medcli.engine.predictor import synthetic_predictor
from medcli.models import create_model


def profile(depth: str, input_size: int, precision: str, reps: int = 3, warmup: int = 2) -> dict:
    p = synthetic_predictor(depth, members=1, input_size=input_size, precision=precision, device="cpu")
    model = p.models[0]
    stages = [name for name, _ in model.named_children() if name not in ("fc", "head", "dropout")]
    x = torch.randn(1, 1, *[input_size] * 3)

    # The declared model's FLOPs (on the meta device, as `medcli bench` counts them): the rewritten one's
    # kernels do other work (Winograd's products, tap-wise GEMMs) or hide it from the counter (fused oneDNN
    # ops), so TFLOP/s here compare with the bench's and the ceiling.
    with torch.device("meta"):
        plain = create_model(depth, in_channels=x.shape[1])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        plain(x.to("meta"))
    # Keys are "Root.stage.block.conv": keep the model's direct children only.
    flops = {
        name.split(".")[1]: sum(c.values())
        for name, c in counter.get_flop_counts().items()
        if name.count(".") == 1
    }

    started: dict[str, float] = {}
    seconds: dict[str, list[float]] = {name: [] for name in stages}
    for name in stages:
        child = getattr(model, name)
        child.register_forward_pre_hook(lambda m, i, n=name: started.__setitem__(n, time.perf_counter()))
        child.register_forward_hook(
            lambda m, i, o, n=name: seconds[n].append(time.perf_counter() - started[n])
        )
    total = time_it(lambda: p.probabilities(x), warmup=warmup, reps=reps)  # the hooks see every pass
    rows = []
    for name in stages:
        s = statistics.median(seconds[name][warmup:])
        f = flops.get(name, 0)
        rows.append({"stage": name, "ms": s * 1e3, "gflop": f / 1e9, "tflops": f / s / 1e12 if s else 0.0})
    return {"precision": p.precision, "total_ms": total.median * 1e3, "stages": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", default="50")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = profile(args.depth, args.input_size, args.precision, reps=args.reps)
    print(
        f"ResNet-{args.depth} forward at {args.input_size}³, {r['precision']}, "
        f"{torch.get_num_threads()} threads: {r['total_ms']:.1f} ms"
    )
    for row in r["stages"]:
        print(
            f"  {row['stage']:8s} {row['ms']:8.1f} ms {row['gflop']:8.1f} GFLOP {row['tflops']:7.3f} TFLOP/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
