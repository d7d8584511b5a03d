"""``MEDCLI_*`` environment variables that turn one of medcli's defaults off (``0``, ``false``, ``no`` or
``off``), for comparing with plain PyTorch or working around a machine where a default misbehaves."""

from __future__ import annotations

import os

KEEP_FREED_MEMORY = "MEDCLI_KEEP_FREED_MEMORY"  # medcli.allocator
CPU_KERNELS = "MEDCLI_CPU_KERNELS"  # medcli.engine.cpu_kernels
# Not an on/off switch: which fp32 CPU kernels run, "all" or "onednn" (unset: this CPU's choice,
# medcli.engine.cpu_kernels.fp32_kernels_here).
FP32_KERNELS = "MEDCLI_FP32_KERNELS"


def switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")
