"""Losses: ``get_loss(name, ...)`` builds a built-in or plugin loss, by the name users pass to ``--loss``.

Built-ins (``LOSSES``): ce, weighted-ce, focal, ldam, ldam-drw.  Plugins come from the entry-point group
``medcli.losses`` (see ``medcli.plugins`` and plugins/medcli-polyloss/README.md for the authoring contract).
Names are case-insensitive with ``-``/``_`` alike (``LDAM``, ``weighted_ce``); built-ins win over plugins.

Every loss is built with the same keyword arguments, ``num_classes`` and ``class_counts`` (the training
fold's per-class counts, in label order LGG, HGG), plus the user's options for that loss, and comes back as
an ``nn.Module`` called ``loss(logits, target) -> scalar`` with ``needs_cosine_head``, ``describe()`` and
``on_epoch_start(epoch, num_epochs)`` (defaults are filled in for plugins that leave them out).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medcli import plugins
from medcli.errors import MedcliError, PluginError, UsageError
from medcli.losses.base import Loss, check_class_counts
from medcli.losses.builtin import CrossEntropy, FocalLoss, WeightedCrossEntropy
from medcli.losses.ldam import LDAMDRWLoss, LDAMLoss
from medcli.registry import Registry, normalize, suggest, unknown_name_error

PLUGIN_GROUP = "medcli.losses"
CONTRACT_KWARGS = ("num_classes", "class_counts")
# What `plugins list --check` builds a plugin with: the class counts of ldam.md's worked example.
SAMPLE_COUNTS = (76, 259)

LOSSES = Registry("loss")
for _factory in (CrossEntropy, WeightedCrossEntropy, FocalLoss, LDAMLoss, LDAMDRWLoss):
    LOSSES.register(_factory.name, _factory)

__all__ = [
    "LOSSES",
    "PLUGIN_GROUP",
    "Loss",
    "available_losses",
    "check_loss_name",
    "get_loss",
    "list_losses",
    "parse_loss_options",
    "plugin_records",
]


def plugin_records() -> list[plugins.PluginRecord]:
    """Installed loss plugins (not imported), with statuses unchecked / shadowed / conflict."""
    return plugins.discover(PLUGIN_GROUP, builtin_names=LOSSES.names())


def available_losses() -> list[str]:
    """Every name ``--loss`` accepts now: built-ins, then plugins neither shadowed nor in conflict."""
    usable = [r.name for r in plugin_records() if r.status not in (plugins.SHADOWED, plugins.CONFLICT)]
    return LOSSES.names() + sorted(usable)


def check_loss_name(name: str) -> str:
    """Validate ``--loss NAME`` before any work, without importing plugin code; return the canonical name.

    Unknown → ``UnknownNameError`` with suggestions; a name several plugins claim → ``PluginError`` naming
    them.  (A plugin that fails to import is only found out by ``get_loss``.)
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"a loss name is a non-empty string, got {name!r}", hint="e.g. --loss ldam")
    return normalize(name) if name in LOSSES else _find_plugin(name).name


def _find_plugin(name: str) -> plugins.PluginRecord:
    """The one installed plugin called ``name`` (not imported), or the error to show instead."""
    records = [r for r in plugin_records() if r.key == normalize(name)]
    if not records:
        raise unknown_name_error("loss", name, available_losses())
    if records[0].status == plugins.CONFLICT:
        raise plugins.conflict_error(records[0])
    return records[0]


def get_loss(
    name: str,
    *,
    num_classes: int = 2,
    class_counts: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    """Build the loss called ``name`` for a training fold with ``class_counts`` = (n_LGG, n_HGG).

    Raises ``UnknownNameError`` (with "did you mean") for an unknown name, ``UsageError`` for an option the
    loss does not take or a bad value, ``DataError`` for a class with no training subjects, and
    ``PluginError`` for a plugin that fails to import/build or whose name several plugins claim.
    """
    check_loss_name(name)
    options = {k.replace("-", "_"): v for k, v in options.items()}
    check_class_counts(class_counts, int(num_classes), name, required=False)
    if name in LOSSES:
        factory = LOSSES.get(name)
        _check_options(factory, options, name)
        return factory(num_classes=num_classes, class_counts=class_counts, **options)

    record = _find_plugin(name)
    factory = plugins.load(record)
    where = f"plugin loss {record.name!r} from {record.source}"
    try:
        _check_contract(factory)
    except plugins.InvalidPlugin as e:
        raise PluginError(f"{where} is invalid: {e}", hint=plugins.reinstall_hint(record)) from None
    _check_options(factory, options, name)
    counts = tuple(class_counts) if class_counts is not None else None
    try:
        obj = factory(num_classes=num_classes, class_counts=counts, **options)
    except MedcliError:
        raise
    except ValueError as e:
        if options:  # the documented way for a plugin to reject an option value
            raise UsageError(f"{where} rejected its options {options}: {plugins.first_line(e)}") from e
        raise PluginError(
            f"{where} failed to build: {plugins.first_line(e)}", hint=plugins.reinstall_hint(record)
        ) from e
    except Exception as e:
        raise PluginError(
            f"{where} failed to build: {plugins.first_line(e)}", hint=plugins.reinstall_hint(record)
        ) from e
    try:
        module = _as_loss_module(obj, record)
    except plugins.InvalidPlugin as e:
        raise PluginError(f"{where} is invalid: {e}", hint=plugins.reinstall_hint(record)) from None
    # Built with this run's options and class counts, the loss is called once on sample logits now, so a
    # loss that raises or returns a vector, NaN or no gradient stops here, named, not in the first training
    # step with a traceback.  A copy is called: the loss may keep state.
    try:
        try:
            probe = copy.deepcopy(module)
        except Exception:  # noqa: BLE001 - an uncopyable loss is probed itself
            probe = module
        with plugins.quiet_stdout():
            smoke_test(probe)
    except plugins.InvalidPlugin as e:
        raise PluginError(f"{where} is invalid: {e}", hint=plugins.reinstall_hint(record)) from None
    except MedcliError:
        raise
    except Exception as e:
        raise PluginError(
            f"{where} fails on sample logits: {plugins.first_line(e)}", hint=plugins.reinstall_hint(record)
        ) from e
    return module


def list_losses(*, check: bool = False, builtins: bool = True) -> list[plugins.PluginRecord]:
    """Records for every ``--loss`` name: built-ins (status "builtin") then plugins.

    With ``check=True`` each usable plugin is imported, built with sample arguments and smoke-tested on
    small logits (status ok / error / invalid); one plugin's failure never stops the others being checked.
    """
    rows = []
    if builtins:
        for n in LOSSES.names():
            factory = LOSSES.get(n)
            rows.append(
                plugins.PluginRecord(
                    group=PLUGIN_GROUP,
                    name=n,
                    distribution="medcli",
                    version=_medcli_version(),
                    value=f"{factory.__module__}:{factory.__qualname__}",
                    status=plugins.BUILTIN,
                    summary=(inspect.getdoc(factory) or "").splitlines()[0],
                )
            )
    for record in plugin_records():
        rows.append(plugins.check(record, validate_loss_factory) if check else record)
    return rows


def validate_loss_factory(factory: Any) -> None:
    """What ``plugins list --check`` demands of a loss plugin; raises ``InvalidPlugin`` on a violation.

    The factory accepts ``num_classes`` and ``class_counts``, builds an ``nn.Module`` (or a callable), and
    on small cosine-range logits returns a finite scalar whose gradient reaches the logits.
    """
    _check_contract(factory)
    smoke_test(_as_loss_module(factory(num_classes=2, class_counts=SAMPLE_COUNTS)))


def smoke_test(module: nn.Module) -> None:
    """One call of a built loss on six sample cosine-range logits: a finite scalar whose gradient reaches
    the logits, or ``InvalidPlugin`` saying what is wrong (an exception inside the loss propagates)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tanh(torch.randn(6, 2, generator=gen)).requires_grad_(True)
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    module.on_epoch_start(0, 10)
    out = module(logits, target)
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise plugins.InvalidPlugin(f"loss(logits, target) must return a scalar tensor, got {shape}")
    if not torch.isfinite(out).all():
        raise plugins.InvalidPlugin(f"loss(logits, target) is not finite ({out.item()}) on sample logits")
    if not out.requires_grad:
        raise plugins.InvalidPlugin("loss(logits, target) does not depend on the logits (no gradient)")
    out.reshape(()).backward()
    if logits.grad is None or not torch.isfinite(logits.grad).all():
        raise plugins.InvalidPlugin("the loss's gradient with respect to the logits is missing or not finite")


def parse_loss_options(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["gamma=2", "alpha=balanced", "drw-start=160"]`` → ``{"gamma": 2, "alpha": "balanced", ...}``.

    For the CLI's repeatable ``--loss-opt KEY=VALUE``: numbers become int/float, true/false/none become
    bool/None, anything else stays a string (each loss validates its own values).
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {str(k).replace("-", "_"): v for k, v in items.items()}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"loss option {item!r} is not KEY=VALUE", hint="e.g. --loss-opt gamma=2")
        out[key.strip().replace("-", "_")] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            value = cast(raw)
        except ValueError:
            continue
        return value if not (isinstance(value, float) and math.isnan(value)) else raw
    return raw


def _check_contract(factory: Any) -> None:
    """The factory must be callable with ``num_classes=`` and ``class_counts=`` (or take ``**kwargs``)."""
    if not callable(factory):
        raise plugins.InvalidPlugin(f"the entry point is a {type(factory).__name__}, not a class or factory")
    params = _keyword_params(factory)
    if params is None:
        return
    missing = [k for k in CONTRACT_KWARGS if k not in params]
    if missing:
        raise plugins.InvalidPlugin(
            f"the factory does not accept the keyword arguments medcli passes ({', '.join(missing)})"
        )


def _check_options(factory: Callable, options: Mapping[str, Any], loss_name: str) -> None:
    """An option the loss does not take is a usage error listing the ones it does."""
    params = _keyword_params(factory)
    if params is None or not options:
        return
    valid = [p for p in params if p not in CONTRACT_KWARGS]
    for key in options:
        if key not in valid:
            close = suggest(key, valid)
            raise UsageError(
                f"loss {loss_name!r} has no option {key!r}; valid options: {', '.join(valid) or 'none'}",
                hint=f"did you mean {close[0]!r}?" if close else None,
            )


def _keyword_params(factory: Any) -> list[str] | None:
    """Keyword-passable parameter names; None when anything goes (``**kwargs``) or it cannot be inspected."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]


class FunctionLoss(nn.Module):
    """Wraps a plain callable ``fn(logits, target)`` from a plugin so the trainer can ``.to()`` it."""

    def __init__(self, fn: Callable, name: str):
        super().__init__()
        self.fn = fn
        self.loss_name = name

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, target)


def _as_loss_module(obj: Any, record: plugins.PluginRecord | None = None) -> nn.Module:
    """An ``nn.Module`` with the attributes the trainer uses; defaults where a plugin left them out."""
    name = record.name if record else "plugin"
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise plugins.InvalidPlugin(
                f"the factory returned a {type(obj).__name__}, not an nn.Module or callable loss"
            )
        obj = FunctionLoss(obj, name)
    if not hasattr(obj, "needs_cosine_head"):
        obj.needs_cosine_head = False
    if not callable(getattr(obj, "on_epoch_start", None)):
        obj.on_epoch_start = lambda epoch, num_epochs: None
    if not callable(getattr(obj, "describe", None)):
        source = f" from {record.source}" if record else ""
        obj.describe = lambda: f"{name} (plugin{source})"
    return obj


def _medcli_version() -> str:
    from medcli import __version__

    return __version__
