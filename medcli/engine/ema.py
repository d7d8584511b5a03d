"""Exponential moving average of the weights, on PyTorch's own ``AveragedModel``.

``use_buffers=True`` averages BatchNorm running statistics too, so the EMA model can be evaluated as is.
The decay warms up like timm's ModelEmaV2 with warm-up: ``min(decay, (1 + n) / (10 + n))`` after ``n``
updates, so early EMA weights are not dominated by the random-initialised head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def effective_decay(decay: float, num_updates: int) -> float:
    """The decay used for the update that follows ``num_updates`` earlier ones."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def create_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An AveragedModel of ``model`` (unwrap DDP first) whose decay warms up to ``decay``."""

    @torch.no_grad()
    def multi_avg_fn(ema_params, model_params, num_averaged) -> None:
        n = int(num_averaged)  # updates already folded in; the first one copied the weights
        get_ema_multi_avg_fn(effective_decay(decay, n))(ema_params, model_params, num_averaged)

    ema = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)
    ema.requires_grad_(False)
    return ema


def ema_checkpoint(ema: AveragedModel | None) -> dict:
    """The checkpoint's EMA entries: ``"ema"`` (the averaged module's state_dict, loadable as a plain
    model) and ``"ema_updates"``, the EMA's own update count.  That count is not ``global_step``: fp16
    steps the GradScaler skipped advance the step count but not the EMA, and the decay warm-up depends
    on the count, so a resume must restore the count itself to continue exactly."""
    if ema is None:
        return {"ema": None, "ema_updates": 0}
    return {"ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)}


def restore_ema(ema: AveragedModel, checkpoint: dict) -> None:
    """Load :func:`ema_checkpoint`'s entries from ``checkpoint`` into ``ema``."""
    ema.module.load_state_dict(checkpoint["ema"])
    # Files written before "ema_updates" existed counted every step as an update.
    ema.n_averaged.fill_(int(checkpoint.get("ema_updates", checkpoint["global_step"])))
