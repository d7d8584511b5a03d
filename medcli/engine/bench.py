"""`medcli bench`: speed and memory figures for this machine, each section in a fresh process.

Every figure is the median of several timed repetitions after warm-up, with min–max kept; ratios are taken
within one run (the machine may be shared, so absolute numbers drift between runs, ratios much less).
Each section runs in its own spawned process so its peak RSS is its own (``ru_maxrss`` only grows).

A section is a function ``(opts: dict) -> dict`` registered in ``SECTIONS``; the figures it returns are plain
JSON values.  The compute ceiling is measured first and handed to later sections so they can report the
fraction of it they reach.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    median: float
    min: float
    max: float
    reps: int

    def rate(self, amount: float) -> dict[str, float]:
        """``amount`` per second at the median, and the min–max range of that rate."""
        return {"median": amount / self.median, "min": amount / self.max, "max": amount / self.min}


def time_it(fn: Callable[[], Any], *, warmup: int = 1, reps: int = 5, max_seconds: float | None = None) -> Timing:
    """Median/min/max wall time of ``fn`` after ``warmup`` calls; stops early past ``max_seconds``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds and len(times) >= 1:
            break
    return Timing(statistics.median(times), min(times), max(times), len(times))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_cpu_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def native_cpu_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX).  Elsewhere oneDNN emulates bf16
    convolutions and they run hundreds of times slower than fp32, so medcli's fast path stays fp32 there."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# --------------------------------------------------------------------------------------------- ceiling
def _dense_conv_flops(channels: int, size: int, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False, device="meta")
    x = torch.empty(batch, channels, size, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        conv(x)
    return counter.get_total_flops()


def conv_ceiling(opts: dict) -> dict:
    """Best achieved FLOP/s of a large dense Conv3d (256→256, 3³, 24³, batch 2): bf16 channels_last_3d, and
    fp32 (contiguous and channels_last_3d) for reference.  Without native bf16 the bf16 probe uses an 8³
    volume and one repetition: emulated bf16 would take minutes at full size."""
    device = torch.device(opts.get("device", "cpu"))
    size, batch, ch = opts.get("ceiling_size", 24), 2, 256
    results: dict[str, Any] = {}
    configs = [("fp32", torch.float32, False), ("fp32_cl", torch.float32, True), ("bf16_cl", torch.bfloat16, True)]
    for name, dtype, channels_last in configs:
        emulated = dtype == torch.bfloat16 and device.type == "cpu" and not native_cpu_bf16()
        s = 8 if emulated else size
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        conv = torch.nn.Conv3d(ch, ch, 3, padding=1, bias=False).to(device, dtype, memory_format=fmt)
        x = torch.randn(batch, ch, s, s, s, device=device, dtype=dtype).to(memory_format=fmt)
        flops = _dense_conv_flops(ch, s, batch)
        with torch.inference_mode():
            t = time_it(lambda conv=conv, x=x: conv(x), warmup=0 if emulated else 1, reps=1 if emulated else 5)
        results[name] = {
            "tflops": flops / t.min / 1e12,  # the ceiling is the *best* achieved rate
            "tflops_median": flops / t.median / 1e12,
            "volume": s,
            "emulated": emulated,
        }
    best = max(results, key=lambda k: results[k]["tflops"])
    results["ceiling_tflops"] = results[best]["tflops"]
    results["ceiling_from"] = best
    return results


SECTIONS: dict[str, Callable[[dict], dict]] = {"ceiling": conv_ceiling}


# --------------------------------------------------------------------------------------------- runner
def _child(name: str, opts: dict, queue) -> None:
    torch.set_num_threads(opts.get("threads") or torch.get_num_threads())
    try:
        figures = SECTIONS[name](opts)
        figures["peak_rss_mb"] = peak_rss_mb()
        queue.put(("ok", figures))
    except Exception as e:  # reported, not raised: one failing section must not hide the others
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_section(name: str, opts: dict) -> dict:
    """Run one section in a fresh spawned process and return its figures (or {"error": ...})."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, opts, queue))
    proc.start()
    status, payload = queue.get()
    proc.join()
    return payload if status == "ok" else {"error": payload}


def run_bench(opts: dict, sections: list[str] | None = None, on_section: Callable | None = None) -> dict:
    report: dict[str, Any] = {"machine": cpu_info(), "options": opts, "sections": {}}
    for name in sections or list(SECTIONS):
        if on_section:
            on_section(name, None)
        figures = run_section(name, opts) if opts.get("isolate", True) else SECTIONS[name](opts)
        if name == "ceiling" and "ceiling_tflops" in figures:
            opts = {**opts, "ceiling_tflops": figures["ceiling_tflops"]}
        report["sections"][name] = figures
        if on_section:
            on_section(name, figures)
    report["options"] = opts
    return report

