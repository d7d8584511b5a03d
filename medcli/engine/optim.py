"""Optimisers, parameter groups and learning-rate schedules.

Fine-tuning a pretrained backbone with a fresh head wants two learning rates (the head learns
``head_lr_mult`` times faster) and no weight decay on norms and biases (decaying BN scales towards zero only
hurts).  Both registries below resolve names the same way losses do (``--optimizer AdamW`` works, a typo
gets "did you mean").

Schedules are stepped once per *optimiser* step (after gradient accumulation), not per micro-batch, so
``--gradient-accumulation-steps`` does not stretch the warm-up; ``plateau`` is the exception and steps
per epoch on the validation AUC.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medcli.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")

HEAD_PREFIX = "fc."


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, head_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Split parameters into backbone/head × decay/no-decay groups.

    No decay for 1-D tensors (norm weights, biases): the rule timm and most fine-tuning recipes use.
    Each group carries ``name`` (e.g. ``"head/decay"``) and ``base_lr`` for logging and schedules.
    """
    buckets: dict[str, list[nn.Parameter]] = {}
    for pname, p in model.named_parameters():
        part = "head" if pname.startswith(HEAD_PREFIX) else "backbone"
        decay = "no_decay" if p.ndim <= 1 else "decay"
        buckets.setdefault(f"{part}/{decay}", []).append(p)
    groups = []
    for key in ("backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"):
        if key not in buckets:
            continue
        group_lr = lr * (head_lr_mult if key.startswith("head") else 1.0)
        groups.append(
            {
                "params": buckets[key],
                "name": key,
                "lr": group_lr,
                "initial_lr": group_lr,
                "weight_decay": weight_decay if key.endswith("/decay") else 0.0,
            }
        )
    return groups


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def create_optimizer(
    name: str, model: nn.Module, *, lr: float, weight_decay: float = 0.0, head_lr_mult: float = 1.0
) -> torch.optim.Optimizer:
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult)
    return OPTIMIZERS.get(name)(groups, lr)


def backbone_params(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIX))


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze/unfreeze everything but the head (``--freeze-backbone-epochs``): the new head settles first.
    Call :func:`train_mode` rather than ``model.train()`` so frozen BatchNorm layers stay frozen in full."""
    for p in backbone_params(model):
        p.requires_grad_(not frozen)


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except BatchNorm layers whose weights are frozen: those run in eval mode, so a
    frozen backbone is the pretrained function itself (its running statistics, not each batch's, and not
    updated), as timm's and torchvision's frozen BatchNorm are."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            if not module.weight.requires_grad:
                module.eval()


# -- schedules ------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """A torch scheduler plus when to step it: "step" (per optimiser step), "epoch", or "plateau"."""

    scheduler: Any | None
    interval: str

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """lr multiplier at optimiser step ``s``: linear warm-up from 1/(warmup+1), then cosine to min_ratio.

    Step 0 (before the first update) already has a non-zero lr so the first update is not wasted.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@SCHEDULERS.register("cosine")
def _cosine(optimizer, *, total_steps: int, warmup_steps: int, min_ratio: float, **_) -> Schedule:
    lam = warmup_cosine(total_steps, warmup_steps, min_ratio)
    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, lam), "step")


@SCHEDULERS.register("step")
def _step(optimizer, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, epochs: int, **_):
    """×0.1 at 1/2 and 3/4 of training (after a linear warm-up), in optimiser steps."""
    milestones = [int(total_steps * 0.5), int(total_steps * 0.75)]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return 0.1 ** sum(step >= m for m in milestones)

    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step")


@SCHEDULERS.register("plateau")
def _plateau(optimizer, **_) -> Schedule:
    """×0.5 after 5 epochs without validation-AUC improvement."""
    return Schedule(
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5), "plateau"
    )


@SCHEDULERS.register("none")
def _none(optimizer, **_) -> Schedule:
    return Schedule(None, "step")


def create_schedule(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_ratio: float = 0.0,
) -> Schedule:
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    return SCHEDULERS.get(name)(
        optimizer,
        total_steps=total,
        warmup_steps=warmup,
        min_ratio=min_ratio,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
    )
