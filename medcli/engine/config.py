"""``TrainConfig``: every training setting in one validated dataclass.

The CLI builds it from flags (and an optional TOML file), the trainer reads only this, and its
``to_dict()`` is what ``config.json`` and every checkpoint hold, so a run can be inspected, compared with a
later invocation (``--resume`` safety) and rebuilt with ``from_dict``.  ``validate()`` runs before any data
is read or a model is built: a typo in ``--loss`` must not cost a preprocessing pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcli.errors import UsageError

DEPTHS = (10, 18, 34, 50, 101, 152, 200)
AMP_DTYPES = ("auto", "fp16", "bf16")

# Settings a fold may be resumed or restarted with changed (how long, where or how fast it runs, not what
# it learns: `--compile` and `--channels-last` change speed alone); everything else must match the fold's
# config.json.
RUN_CONTROL_FIELDS = frozenset(
    {
        "epochs",
        "patience",
        "max_steps",
        "num_workers",
        "device",
        "gpu",
        "multi_gpu",
        "nproc",
        "data",
        "compile",
        "channels_last",
    }
)


def parse_depth(value: int | str) -> int | str:
    """``50``, ``"50"`` or ``"tiny"`` → 50 / "tiny"; anything else is a UsageError."""
    text = str(value).strip().lower()
    if text == "tiny":
        return "tiny"
    if text.isdigit() and int(text) in DEPTHS:
        return int(text)
    raise UsageError(
        f"--depth {value!r} is not a MedicalNet ResNet depth",
        hint=f"choose one of {', '.join(map(str, DEPTHS))} or 'tiny'",
    )


def parse_input_size(value: int | str | list | tuple) -> tuple[int, int, int]:
    """``128`` → (128,128,128); ``"128,128,96"`` or ``"128x128x96"`` → (128,128,96)."""
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = str(value).replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p.strip()]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or min(sizes) < 8:
        raise UsageError(
            f"--input-size {value!r} is not a 3D size",
            hint="give one edge like 128 or three like 128,128,96 (each >= 8)",
        )
    return (sizes[0], sizes[1], sizes[2])


def parse_modalities(value: str | list | tuple) -> tuple[str, ...]:
    """--modalities in canonical names (``t1c`` → ``t1ce``), as discovery and preprocessing use them."""
    from medcli.data import canonical_modalities

    try:
        return canonical_modalities(value if isinstance(value, (list, tuple)) else str(value))
    except UsageError as e:
        raise UsageError(f"--modalities: {e.message}", hint=e.hint) from None


SEED_MAX = 2**32 - 1
"""The largest seed numpy's legacy generator (``np.random.seed``) accepts; seeds are 0..SEED_MAX."""


@dataclass
class TrainConfig:
    """The resolved recipe.  Defaults are the seed's command (minus --gpu/--multi-gpu)."""

    # data and run layout
    data: str = "data"
    out: str = "runs"
    name: str | None = None  # None: derived from model/modalities/loss (see default_run_name)
    fold: int = 0
    folds: int = 5
    modalities: tuple[str, ...] = ("t1ce",)
    input_size: tuple[int, int, int] = (128, 128, 128)
    cache: bool = True
    # model
    depth: int | str = 50
    dropout: float = 0.4
    zero_init_last: bool = True  # random init: each residual block's last BN gamma at 0 (see resnet3d)
    # "auto": the local copy of the MedicalNet release for `depth` (see resolve_pretrained); None: random init
    pretrained_path: str | None = "auto"
    require_pretrained: bool = False
    # optimisation
    epochs: int = 60
    batch_size: int = 6
    lr: float = 2e-4
    optimizer: str = "adam"
    weight_decay: float = 1e-5
    head_lr_mult: float = 10.0
    freeze_backbone_epochs: int = 0
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.5  # max global grad norm; 0 turns clipping off
    gradient_accumulation_steps: int = 2
    ema_decay: float = 0.999  # 0 turns EMA off
    select: str = "auto"  # which weights pick best.pt: ema, raw, or auto (ema when EMA is on)
    # loss
    loss: str = "ldam"
    ldam_s: float = 30.0
    ldam_max_m: float = 0.5
    drw_start: float | None = None  # epoch (>=1) or fraction of training (<1) where DRW switches on
    loss_options: dict[str, Any] = field(default_factory=dict)  # --loss-opt KEY=VALUE (e.g. gamma, epsilon)
    # speed and hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpu: bool = False  # the seed's --gpu: demand CUDA
    multi_gpu: bool = False
    nproc: int | None = None  # processes for --multi-gpu (default: visible GPUs)
    amp: bool | None = None  # None: auto (on where it is faster, see medcli.engine.speed)
    amp_dtype: str = "auto"
    channels_last: bool | None = None  # None: auto
    compile: bool = False
    num_workers: int | None = None  # None: auto
    # control
    seed: int = 0
    deterministic: bool = False
    patience: int | None = None  # early stopping on the selection metric, in epochs
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    val_batch_size: int | None = None
    # filled in by the trainer once the loss is known (see model_dict)
    head: str = "linear"
    in_channels: int = field(init=False, default=1)
    num_classes: int = field(init=False, default=2)

    def __post_init__(self) -> None:
        from medcli.registry import normalize

        # "LDAM", "ldam" and "Ldam" are one loss: store the canonical spelling so configs compare equal.
        self.loss, self.optimizer, self.scheduler = (
            normalize(v) for v in (self.loss, self.optimizer, self.scheduler)
        )
        self.depth = parse_depth(self.depth)
        self.modalities = parse_modalities(self.modalities)
        self.input_size = parse_input_size(self.input_size)
        self.in_channels = len(self.modalities)

    # -- validation -------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise UsageError on anything wrong that can be known without data; returns self."""
        from medcli.engine.optim import OPTIMIZERS, SCHEDULERS

        OPTIMIZERS.get(self.optimizer)  # UnknownNameError with did-you-mean
        SCHEDULERS.get(self.scheduler)
        _check_loss_name(self.loss)

        def positive(name: str, value: float, kind: str = "number") -> None:
            if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive {kind}, got {value!r}")

        positive("lr", self.lr)
        positive("batch_size", self.batch_size, "integer")
        positive("epochs", self.epochs, "integer")
        positive("gradient_accumulation_steps", self.gradient_accumulation_steps, "integer")
        positive("head_lr_mult", self.head_lr_mult)
        positive("ldam_s", self.ldam_s)
        for name in ("weight_decay", "grad_clip", "warmup_epochs", "freeze_backbone_epochs", "ldam_max_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(
                f"--ema-decay must be in [0, 1), got {self.ema_decay!r}",
                hint="0.999 is typical; 0 disables EMA",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.seed <= SEED_MAX:  # numpy's and torch's generators take no other
            raise UsageError(f"--seed must be in 0..{SEED_MAX}, got {self.seed}")
        if self.folds < 2:
            raise UsageError(f"--folds must be >= 2, got {self.folds}")
        if not 0 <= self.fold < self.folds:
            raise UsageError(
                f"--fold {self.fold} is outside 0..{self.folds - 1}",
                hint=f"use a fold in 0..{self.folds - 1}, 'all', or change --folds",
            )
        if self.amp_dtype not in AMP_DTYPES:
            raise UsageError(f"--amp-dtype {self.amp_dtype!r} is not one of {', '.join(AMP_DTYPES)}")
        if self.select not in ("auto", "ema", "raw"):
            raise UsageError(f"--select {self.select!r} is not one of auto, ema, raw")
        if self.select == "ema" and self.ema_decay == 0:
            raise UsageError(
                "--select ema needs EMA", hint="set --ema-decay (e.g. 0.999) or use --select raw"
            )
        for name in ("patience", "max_steps", "nproc", "val_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.drw_start is not None and self.drw_start <= 0:
            raise UsageError(f"--drw-start must be > 0 (an epoch, or a fraction < 1), got {self.drw_start}")
        # Outside [0, 1] the lr rises, or turns negative and the optimiser climbs the loss.
        if not (math.isfinite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise UsageError(f"min_lr_ratio must be in [0, 1] (the lr's floor / lr): {self.min_lr_ratio!r}")
        shadowed = {"s": "--ldam-s", "max_m": "--ldam-max-m", "drw_start": "--drw-start"}
        twice = [k for k in self.loss_options if k in shadowed and self.loss in ("ldam", "ldam-drw")]
        if twice:  # the loss took the option, but the cosine head's logit scale and checkpoints read the flag
            flag = shadowed[twice[0]]
            raise UsageError(
                f"--loss-opt {twice[0]}=... sets what {flag} sets for {self.loss}",
                hint=f"use {flag} {self.loss_options[twice[0]]}",
            )
        if math.prod(_deepest_feature_map(self.input_size)) < 2:
            raise UsageError(
                f"--input-size {','.join(map(str, self.input_size))} leaves the ResNet's last stages one "
                "voxel: BatchNorm cannot train on one value per channel (in a batch of one: an epoch's last)",
                hint="use an input size of 16 or more",
            )
        if self.name is not None:
            _check_run_name(self.name)
        device = self.device.strip().lower()
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise UsageError(f"--device {self.device!r} is not auto, cpu, cuda or cuda:N")
        return self

    # -- derived values ---------------------------------------------------------------------------------
    @property
    def selection(self) -> str:
        """Which weights decide best.pt: "ema" or "raw"."""
        if self.select == "auto":
            return "ema" if self.ema_decay > 0 else "raw"
        return self.select

    def model_dict(self) -> dict[str, Any]:
        """The model part of the checkpoint contract: enough to rebuild the network."""
        return {
            "depth": self.depth,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "head": self.head,
            "dropout": self.dropout,
        }

    def run_name(self) -> str:
        return self.name or default_run_name(self)

    # -- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/pickle-safe types only (lists, not tuples), plus the "model" block."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        d["model"] = self.model_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys are a UsageError naming them (a typo in a config file)."""
        d = {k.replace("-", "_"): v for k, v in d.items()}
        model = d.pop("model", None) or {}
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        derived = {"in_channels", "num_classes"}
        unknown = sorted(set(d) - names - derived)
        if unknown:
            from medcli.registry import suggest

            close = [s for k in unknown for s in suggest(k, names, n=1)]
            raise UsageError(
                f"unknown training setting(s): {', '.join(unknown)}",
                hint=f"did you mean {', '.join(close)}?" if close else "see `medcli train --help`",
            )
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if "head" in model:
            cfg.head = model["head"]
        return cfg

    def differences(self, other: TrainConfig) -> list[str]:
        """Settings that differ (ignoring RUN_CONTROL_FIELDS): why a fold dir cannot be reused."""
        a, b = self.to_dict(), other.to_dict()
        skip = RUN_CONTROL_FIELDS | {"model", "head", "name", "out", "fold"}
        return sorted(k for k in a if k not in skip and a.get(k) != b.get(k))


def default_run_name(cfg: TrainConfig) -> str:
    """Deterministic, so `--fold 0` and `--fold 1` calls land in one run and share its split."""
    model = f"resnet{cfg.depth}"
    loss = cfg.loss.strip().lower().replace("_", "-")
    return f"{model}-{'+'.join(cfg.modalities)}-{loss}"


def load_toml(path: Path) -> dict[str, Any]:
    """Read a --config file; its keys are option names (hyphens or underscores)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UsageError("--config needs Python 3.11+ (tomllib)", hint="pass the settings as flags") from None

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist", hint="check the --config path") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path} is a folder", hint="pass a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8 text
        raise UsageError(f"config file {path} is not valid TOML: {e}", hint="fix the file") from None
    # An optional [train] table lets one file hold several commands' settings: the others' are not ours.
    if isinstance(data.get("train"), dict):
        data = data["train"]
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in settings:  # batch-size and batch_size: which one would win is no one's guess
            raise UsageError(f"config file {path} sets {name} twice (as {key} too)", hint="keep one of them")
        settings[name] = value
    return settings


_FLAG_OF = {"loss_options": "loss_opt"}  # settings whose flag has another name


def check_setting_types(path: Path, settings: dict[str, Any]) -> None:
    """A --config file's values against TrainConfig's field types: ``epochs = 2.5`` or ``lr = "fast"`` is a
    UsageError naming the key, not a TypeError deep in training.  (Flags are typed by the CLI parser.)"""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    hints.update({"fold": int | str, "no_pretrained": bool})  # `fold` also takes "all"
    for key, value in settings.items():
        hint = hints.get(key)
        if hint is not None and not _has_type(value, hint):
            raise UsageError(
                f"{path}: {key} = {value!r} is not {_type_words(hint)}",
                hint=f"see `medcli train --help` for --{_FLAG_OF.get(key, key).replace('_', '-')}",
            )


def _has_type(value: Any, hint: Any) -> bool:
    import types
    import typing

    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, a) for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:  # modalities, input_size: a list, "a,b" text, or one number
        single = isinstance(value, str) or (args[0] is int and _has_type(value, int))
        return single or (isinstance(value, list) and all(_has_type(v, args[0]) for v in value))
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict)
    return True


def _type_words(hint: Any) -> str:
    import types
    import typing

    if isinstance(hint, types.UnionType):
        return " or ".join(_type_words(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return "a list or comma-separated text"
    if typing.get_origin(hint) is dict:
        return "a table"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    return words.get(hint, str(hint))


def _deepest_feature_map(size: tuple[int, int, int]) -> tuple[int, ...]:
    """The spatial size layer3/layer4 work at: the MedicalNet stem (7³ conv, stride 2; 3³ max-pool, stride 2)
    and layer2's stride 2 (layer3 and layer4 dilate instead of striding)."""
    out = []
    for n in size:
        n = (n + 2 * 3 - 7) // 2 + 1
        n = (n + 2 * 1 - 3) // 2 + 1
        out.append((n - 1) // 2 + 1)
    return tuple(out)


def _check_run_name(name: str) -> None:
    """--name becomes one folder under --out: not a path (``a/b``, ``../x`` would write elsewhere), not
    hidden (medcli keeps its own lock files as dot-files there), not empty (an unset shell variable)."""
    if not name.strip():
        raise UsageError("--name is empty", hint="give the run a name, or leave --name out for the default")
    if "/" in name or "\\" in name or "\0" in name or name.startswith(".") or name != name.strip():
        raise UsageError(
            f"--name {name!r} is not a plain folder name",
            hint="use letters, digits, '-', '_' (no '/', no leading '.' or spaces); --out chooses the folder",
        )


def _check_loss_name(name: str) -> None:
    """Unknown loss (did-you-mean) or a name two plugins claim → an error before any work, without
    importing any plugin."""
    from medcli.losses import check_loss_name

    check_loss_name(name)
