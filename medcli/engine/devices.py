"""``--device`` for every command (train, eval, predict, bench): auto, cpu, cuda or cuda:N.

One function, so that each command accepts the same spellings, refuses the same impossible requests with the
same message (CUDA on a machine without it, a GPU index beyond those visible, a device type medcli does not
run on) and makes the same CUDA device current.  Making it current matters beyond tidiness: PyTorch puts
new CUDA state on the current device (cuDNN handles, the caching allocator's peak-memory statistics that
``medcli bench`` reports, streams of libraries that ask for "the" device), so ``--device cuda:1`` that only
moved the tensors would still start a context on GPU 0 and report GPU 0's memory.

Training under ``torchrun`` picks each process's GPU from ``LOCAL_RANK`` instead
(:func:`medcli.engine.distributed.init`).
"""

from __future__ import annotations

import torch

from medcli.errors import DeviceError, UsageError

SPELLINGS = "auto, cpu, cuda or cuda:N"


def select_device(spec: str, *, asked: str | None = None, make_current: bool = True) -> torch.device:
    """``spec`` → a ``torch.device`` this machine has; a CUDA device becomes the current one.

    ``auto`` is the current CUDA device when a GPU is visible, else the CPU; ``cuda`` is the current CUDA
    device (GPU 0 unless something chose another).  ``asked``: how errors name the request (default
    ``--device SPEC``; training's ``--gpu`` says ``--gpu``).  ``make_current=False`` only checks: making a
    GPU current creates its CUDA context (~0.5 GB of its memory), which a process that will not compute
    there must not hold (the ``--multi_gpu`` launcher, a torchrun rank that trains on another GPU)."""
    asked = asked or f"--device {spec}"
    text = (spec or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise UsageError(f"{asked}: not a device", hint=f"use {SPELLINGS}") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UsageError(f"{asked}: medcli runs on CPUs and CUDA GPUs only", hint=f"use {SPELLINGS}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"{asked} needs a CUDA GPU, but none is visible (torch {torch.__version__}, {build})",
            hint="use --device cpu (or auto), or install a CUDA build of PyTorch",
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise DeviceError(
            f"{asked}: only {count} GPU(s) visible",
            hint=f"use cuda:0..cuda:{count - 1}" if count > 1 else "use cuda (or cuda:0)",
        )
    if make_current:
        torch.cuda.set_device(index)
    return torch.device("cuda", index)
