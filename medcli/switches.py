"""``MEDCLI_*`` environment variables that turn one of medcli's defaults off (``0``, ``false``, ``no`` or
``off``), for comparing with plain PyTorch or working around a machine where a default misbehaves."""

from __future__ import annotations

import os

from medcli.errors import UsageError

KEEP_FREED_MEMORY = "MEDCLI_KEEP_FREED_MEMORY"  # medcli.allocator
CPU_KERNELS = "MEDCLI_CPU_KERNELS"  # medcli.engine.cpu_kernels
# Not an on/off switch: which fp32 CPU kernels run, "all" or "onednn" (unset: this CPU's choice,
# medcli.engine.cpu_kernels.fp32_kernels_here).
FP32_KERNELS = "MEDCLI_FP32_KERNELS"
FP32_KERNELS_CHOICES = ("all", "onednn")


def switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def fp32_kernels_choice() -> str | None:
    """``MEDCLI_FP32_KERNELS``, checked: one of :data:`FP32_KERNELS_CHOICES`, or None where unset.  The CLI
    checks it before any command starts, so a typo fails before a training writes anything."""
    choice = os.environ.get(FP32_KERNELS, "").strip().lower()
    if choice and choice not in FP32_KERNELS_CHOICES:
        raise UsageError(
            f"{FP32_KERNELS}={choice} is not one of {', '.join(FP32_KERNELS_CHOICES)}",
            hint="set it to all or onednn, or unset it to let medcli choose for this CPU",
        )
    return choice or None
