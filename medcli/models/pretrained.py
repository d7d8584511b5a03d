"""Loading MedicalNet (or any compatible) weights into a model, with a report that cannot lie.

The failure modes this module exists for (shared/reference/medicalnet.md §4): an HTML page or a Git LFS
pointer saved instead of the file; truncated downloads; untrusted pickles; the ``module.`` prefix left on
so a non-strict load "succeeds" with random weights; a file for another depth.  Hence:

* the first bytes are sniffed before anything is deserialised, and every failure is a ``WeightsError``
  whose message says what the file is and what to do;
* files are read with ``torch.load(..., weights_only=True)`` only; zip-format files are memory-mapped;
* keys and shapes are compared on the file's dict itself (``load_state_dict`` silently back-fills
  ``num_batches_tracked``, so its own missing-key list undercounts);
* a load that matches less than half of the backbone, or a file of another depth, raises
  ``IncompleteLoadError`` *before* the model is touched: never a silent random initialisation.

``load_pretrained`` returns a ``LoadReport``; the CLI renders it (``medcli.cli.weights``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import time
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcli.errors import IncompleteLoadError, WeightsError

LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # pickle protocol 2 + torch's magic number
ZIP_MAGIC = b"PK\x03\x04"
FETCH_HINT = "re-download it with `medcli weights fetch`"
_MIN_BACKBONE_FRACTION = 0.5  # below this a load is "almost nothing": an error, not a warning
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- file level
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sniff_format(path: str | os.PathLike) -> str:
    """``"zip"`` or ``"legacy pickle"`` from the first bytes; ``WeightsError`` for anything else."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise WeightsError(f"{path} is empty (0 bytes)", hint=FETCH_HINT)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(LEGACY_MAGIC):
        return "legacy pickle"
    if stripped.startswith(b"<"):
        raise WeightsError(
            f"{path} is a web page (HTML), not weights: the download saved an error or login page",
            hint=FETCH_HINT,
        )
    if stripped.startswith(b"version https://git-lfs"):
        raise WeightsError(
            f"{path} is a Git LFS pointer file, not the weights",
            hint=f"run `git lfs pull` in its repository, or {FETCH_HINT}",
        )
    if stripped.startswith((b"{", b"[")):
        raise WeightsError(f"{path} is a JSON text (an error response?), not weights", hint=FETCH_HINT)
    if head.startswith(b"\x80"):
        raise WeightsError(
            f"{path} is a plain Python pickle, not a PyTorch checkpoint; medcli does not unpickle arbitrary "
            "objects",
            hint="save the weights with torch.save(state_dict, path), or " + FETCH_HINT,
        )
    raise WeightsError(
        f"{path} is not a PyTorch weights file (unrecognised first bytes {head[:8].hex(' ')})",
        hint=FETCH_HINT,
    )


def _torch_load(path: Path, fmt: str) -> Any:
    """``torch.load`` with ``weights_only=True`` and every failure turned into a ``WeightsError``."""
    try:
        # mmap: tensors stay in the page cache instead of being copied (zip format only; the legacy format
        # cannot be memory-mapped and is read into memory, ~1x the file size).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "zip")
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"{path} contains Python objects other than tensors{what}, which would run code if "
                "unpickled; medcli loads weights with weights_only=True and refuses it",
                hint="use a file from a trusted source: " + FETCH_HINT,
            ) from None
        raise _corrupt(path, fmt, text) from None
    except (EOFError, RuntimeError, ValueError, OSError, AttributeError, ImportError, KeyError) as e:
        raise _corrupt(path, fmt, str(e) or type(e).__name__) from None


def _check_zip_members(path: Path) -> None:
    """A zip that is not a torch checkpoint (e.g. Tencent's 2.8 GB release archive) gets its own message;
    reading the central directory costs one seek."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _corrupt(path, "zip", str(e)) from None
    if not any(name.endswith("data.pkl") for name in names):
        inner = next((n for n in names if n.endswith((".pth", ".pt"))), None)
        found = f"; it holds {inner}" if inner else ""
        raise WeightsError(
            f"{path} is a zip archive but not a PyTorch checkpoint{found}",
            hint="extract the .pth file from it and pass that, or " + FETCH_HINT,
        )


def _corrupt(path: Path, fmt: str, detail: str) -> WeightsError:
    detail = detail.splitlines()[0][:120]
    size = path.stat().st_size
    return WeightsError(
        f"{path} is truncated or corrupt ({fmt} format, {size:,} bytes: {detail})", hint=FETCH_HINT
    )


def _find_state_dict(obj: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """The tensor dict inside a checkpoint, and which container held it."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, key
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, "direct"
        found = ", ".join(map(str, list(obj)[:6])) or "nothing"
    else:
        found = type(obj).__name__
    raise WeightsError(
        f"{path} holds no state dict (found {found}); expected {{'state_dict': ...}}, {{'model': ...}} or a "
        "dict of tensors",
        hint="point to a MedicalNet .pth file or a medcli checkpoint",
    )


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> tuple[dict, str]:
    """Remove a DataParallel ``module.`` prefix, only where a key starts with it."""
    if not any(k.startswith(prefix) for k in state):
        return dict(state), ""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}, prefix


# ---------------------------------------------------------------------------------- known releases
def known_releases() -> list[dict]:
    """The known weight files (name, depth, file, size, sha256, ...) from the weights manifest
    (``medcli.weights.manifest``, which honours ``$MEDCLI_WEIGHTS_MANIFEST``)."""
    from medcli.weights.manifest import load_manifest

    return [entry.to_dict() for entry in load_manifest().entries]


def identify_release(sha256: str, size: int) -> tuple[dict | None, str | None]:
    """The known release with this SHA-256 (or None), plus a warning for a same-size, other-hash file."""
    try:
        releases = known_releases()
    except WeightsError as e:  # a broken manifest must not stop a load; say so instead
        return None, f"known releases unavailable: {e}"
    for entry in releases:
        if entry["sha256"].lower() == sha256:
            return entry, None
    for entry in releases:
        if entry.get("size") == size:
            return None, (
                f"same size as the known release {entry['file']} but a different SHA-256: "
                "a modified or corrupt copy"
            )
    return None, None


def release_label(entry: dict | None) -> str:
    if not entry:
        return "unknown release"
    return f"{entry['name']} ({entry['file']})"


# ------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class DetectedArch:
    """What a state dict's keys and shapes say about the network that produced it."""

    name: str | None  # registry name ("resnet18", "tiny") or None if no known member matches
    block: str
    layers: tuple[int, ...]
    shortcut: str
    stem_width: int
    in_channels: int

    @property
    def label(self) -> str:
        return display_name(self.name) if self.name else f"{self.block} {self.layers} ResNet"


def display_name(arch: str) -> str:
    """``resnet18`` → ``ResNet-18``; ``tiny`` → ``tiny``."""
    return f"ResNet-{arch[6:]}" if arch.startswith("resnet") else arch


def detect_architecture(state: Mapping[str, torch.Tensor]) -> DetectedArch | None:
    """Recognise a MedicalNet-family network from its (prefix-free) keys: block type, blocks per stage,
    presence of ``downsample`` (shortcut B) and stem width.  None when the keys are not a 3D ResNet's."""
    from medcli.models.resnet3d import ARCHS

    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.dim() != 5:
        return None
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for key in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    if not blocks[1]:
        return None
    layers = tuple(max(b) + 1 if b else 0 for b in blocks.values())
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    shortcut = "B" if any(".downsample.0.weight" in k for k in state) else "A"
    stem, in_ch = int(conv1.shape[0]), int(conv1.shape[1])
    name = next(
        (
            s.name
            for s in ARCHS.values()
            if (s.block, s.layers, s.stem_width, s.shortcut) == (block, layers, stem, shortcut)
        ),
        None,
    )
    return DetectedArch(name, block, layers, shortcut, stem, in_ch)


def depth_hint(arch: str) -> str:
    depth = arch[6:] if arch.startswith("resnet") else arch
    return f"use --depth {depth}"


# ---------------------------------------------------------------------------------------- the report
@dataclass
class LoadReport:
    """What happened when a weights file was loaded into a model, key by key."""

    path: str
    exists: bool = True
    size: int | None = None
    sha256: str | None = None
    format: str | None = None  # "legacy pickle" | "zip"
    container: str | None = None  # "state_dict" | "model" | "direct"
    # A medcli checkpoint's own training: the fold and data it was trained on (None for other files).
    medcli_fold: int | None = None
    medcli_data: str | None = None
    prefix_stripped: str = ""
    release: dict | None = None
    detected_arch: str | None = None
    detected_in_channels: int | None = None
    model_arch: str | None = None
    model_keys: list[str] = field(default_factory=list)
    head_keys: list[str] = field(default_factory=list)
    file_entries: int = 0
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, file, model
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    params_total: int = 0
    params_trainable: int = 0
    seconds: float = 0.0

    # -- verdicts
    @property
    def backbone_missing(self) -> list[str]:
        """Missing keys that matter: not the new head, not BatchNorm's ``num_batches_tracked`` counters."""
        head = set(self.head_keys)
        return [k for k in self.missing if k not in head and not k.endswith("num_batches_tracked")]

    @property
    def ok(self) -> bool:
        """The whole backbone loaded, nothing unexpected or mismatched; only head keys are missing."""
        return self.exists and not (self.backbone_missing or self.unexpected or self.mismatched)

    @property
    def backbone_fraction(self) -> float:
        head = set(self.head_keys)
        backbone = [k for k in self.model_keys if k not in head and not k.endswith("num_batches_tracked")]
        loaded = set(self.loaded)
        return sum(k in loaded for k in backbone) / len(backbone) if backbone else 0.0

    # -- rendering helpers (plain text; the CLI adds colour)
    def summary_line(self) -> str:
        params = f"{self.params_total / 1e6:.2f}M params"
        if not self.exists:
            return f"weights file not found: {self.path} · random initialization · {params}"
        return " · ".join(
            [
                f"{len(self.loaded)}/{len(self.model_keys)} keys loaded",
                f"missing {len(self.missing)}{_key_preview(self.missing)}",
                f"unexpected {len(self.unexpected)}{_key_preview(self.unexpected)}",
                f"shape mismatches {len(self.mismatched)}{_key_preview([m[0] for m in self.mismatched])}",
                params,
            ]
        )

    def by_layer(self) -> list[tuple[str, dict[str, int]]]:
        """Counts per layer group (stem, layer1..4, fc, ...), in network order, for the CLI's table."""
        kinds = {
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": [m[0] for m in self.mismatched],
            "ignored": self.ignored,
        }
        rows: dict[str, dict[str, int]] = {}
        for key in [*self.model_keys, *self.unexpected, *self.ignored]:
            rows.setdefault(layer_group(key), dict.fromkeys(kinds, 0))
        for kind, keys in kinds.items():
            for key in keys:
                rows.setdefault(layer_group(key), dict.fromkeys(kinds, 0))[kind] += 1
        return list(rows.items())

    def keys_by_layer(self, kind: str) -> dict[str, list[str]]:
        """The keys of one kind ("loaded", "missing", "unexpected", "mismatched", "ignored") per group."""
        keys = [m[0] for m in self.mismatched] if kind == "mismatched" else getattr(self, kind)
        return group_keys(keys)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: lists, ints, strings; plus the verdict and the summary line."""
        data = asdict(self)
        data["mismatched"] = [
            {"key": k, "file_shape": list(f), "model_shape": list(m)} for k, f, m in self.mismatched
        ]
        data["counts"] = {
            "model_entries": len(self.model_keys),
            "file_entries": self.file_entries,
            "loaded": len(self.loaded),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "mismatched": len(self.mismatched),
            "ignored": len(self.ignored),
        }
        data["release_label"] = release_label(self.release)
        data["ok"] = self.ok
        data["summary"] = self.summary_line()
        return data


def _key_preview(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    more = f", … +{len(keys) - n}" if len(keys) > n else ""
    return f" ({', '.join(keys[:n])}{more})"


def layer_group(key: str) -> str:
    """``layer3.4.conv1.weight`` → ``layer3``; ``conv1.*``/``bn1.*`` → ``stem``; ``fc.bias`` → ``fc``."""
    first = key.split(".", 1)[0]
    return "stem" if first in ("conv1", "bn1") else first


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(layer_group(key), []).append(key)
    return groups


# ------------------------------------------------------------------------------------------ loading
def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    require: bool = False,
    strict: bool = False,
    fetch: str = "medcli weights fetch",
) -> LoadReport:
    """Load a MedicalNet-style weights file into ``model`` and report exactly what happened.

    * ``{'state_dict': ...}``, ``{'model': ...}`` (medcli checkpoints) and bare state dicts; legacy and zip
      serialization; a leading ``module.`` is stripped.
    * ``conv_seg.*`` (MedicalNet's segmentation head) and a file ``fc.*`` that does not fit the model's head
      are ignored (listed in ``report.ignored``).
    * A 1-channel ``conv1`` is adapted to ``in_channels = N`` by repeating the kernel and scaling by 1/N.
    * Missing file: a warning in the report and the model keeps its random init, unless ``require`` (then
      ``WeightsError``); both name ``fetch``, the command that downloads it.  Unusable file:
      ``WeightsError``.  Another depth's file, or less than half of the backbone matched:
      ``IncompleteLoadError``, raised before the model is modified.  With ``strict``, any load that is not
      ``report.ok`` raises ``IncompleteLoadError``.
    """
    start = time.perf_counter()
    path = Path(path)
    model = unwrap_model(model)
    report = LoadReport(path=str(path), model_arch=getattr(model, "arch", None))
    model_state = model.state_dict()
    report.model_keys = list(model_state)
    if hasattr(model, "head_keys"):
        report.head_keys = model.head_keys()
    else:  # any other nn.Module: by the family's convention the new head is ``fc``
        report.head_keys = [k for k in model_state if k.startswith("fc.")]
    report.params_total = sum(p.numel() for p in model.parameters())
    report.params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if not path.exists():
        if require:
            raise WeightsError(
                f"pretrained weights not found: {path}",
                hint=f"run `{fetch}`, or pass the file's path",
            )
        report.exists = False
        report.missing = list(report.model_keys)
        report.warnings.append(
            f"pretrained weights not found: {path}; using random initialization (run `{fetch}`)"
        )
        report.seconds = time.perf_counter() - start
        return report
    if not path.is_file():
        raise WeightsError(f"{path} is a directory, not a weights file", hint="pass the .pth file's path")

    report.size = path.stat().st_size
    report.format = sniff_format(path)
    if report.format == "zip":
        _check_zip_members(path)
    # Hash on a second thread while torch deserialises: both are I/O-bound and hashlib releases the GIL.
    with ThreadPoolExecutor(max_workers=1) as pool:
        sha_future = pool.submit(file_sha256, path)
        obj = _torch_load(path, report.format)
        report.sha256 = sha_future.result()
    report.release, release_warning = identify_release(report.sha256, report.size)
    if release_warning:
        report.warnings.append(release_warning)

    raw_state, report.container = _find_state_dict(obj, path)
    if report.container == "model" and isinstance(obj.get("config"), dict):
        report.medcli_fold = obj.get("fold", obj["config"].get("fold"))
        report.medcli_data = obj["config"].get("data")
    state, report.prefix_stripped = _strip_prefix(raw_state)
    report.file_entries = len(state)
    detected = detect_architecture(state)
    report.detected_arch = detected.name if detected else None
    report.detected_in_channels = detected.in_channels if detected else None

    to_load = _plan(model_state, state, report)
    _check_plan(report, detected)
    _check_finite(to_load, path)
    if strict and not report.ok:
        raise IncompleteLoadError(f"{path}: {report.summary_line()}", hint=incomplete_hint(report))

    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # _plan only passes keys the model has
    if state and not any(k.endswith("num_batches_tracked") for k in state):
        report.warnings.append(
            "the file has no BatchNorm num_batches_tracked entries (harmless: the counters start at 0)"
        )
    report.seconds = time.perf_counter() - start
    return report


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers (whose state-dict
    keys carry ``module.`` or ``_orig_mod.`` prefixes the weights files do not have)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _plan(
    model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], report: LoadReport
) -> dict[str, torch.Tensor]:
    """Sort every file entry into loaded / adapted / ignored / unexpected / mismatched; fill ``report``."""
    head = set(report.head_keys)
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("conv_seg.") or not isinstance(tensor, torch.Tensor):
            report.ignored.append(key)  # MedicalNet's segmentation head, or a non-tensor entry
            continue
        target = model_state.get(key)
        if target is None:
            # A file head of another kind (e.g. a cosine head has no fc.bias) is not an error.
            (report.ignored if key.startswith("fc.") else report.unexpected).append(key)
            continue
        if tensor.shape == target.shape:
            to_load[key] = tensor
            report.loaded.append(key)
        elif key == "conv1.weight" and _adaptable(tensor, target):
            n = target.shape[1]
            to_load[key] = tensor.repeat(1, n, 1, 1, 1) / n
            report.loaded.append(key)
            report.adapted.append(f"conv1.weight adapted 1→{n} channels (repeat, ×1/{n})")
        elif key in head:
            report.ignored.append(key)  # a head for another number of classes: the model keeps its new one
        else:
            report.mismatched.append((key, list(tensor.shape), list(target.shape)))
    present = set(to_load) | {m[0] for m in report.mismatched}
    report.missing = [k for k in model_state if k not in present]
    # Report keys in the model's order (network order), the order the tables show.
    order = {k: i for i, k in enumerate(model_state)}
    report.loaded.sort(key=order.__getitem__)
    return to_load


def _adaptable(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    return (
        tensor.dim() == 5
        and tensor.shape[1] == 1
        and tensor.shape[0] == target.shape[0]
        and (tensor.shape[2:] == target.shape[2:])
    )


def _check_plan(report: LoadReport, detected: DetectedArch | None) -> None:
    """Refuse loads that would leave the model (mostly) random: another depth, or too little matched."""
    if report.ok:
        return
    arch = report.model_arch
    if detected and detected.name and arch and detected.name != arch:
        raise IncompleteLoadError(
            f"{report.path} is a {detected.label} {_kind_of_file(report)} but the model is "
            f"{display_name(arch)} ({len(report.loaded)}/{len(report.model_keys)} keys would load)",
            hint=depth_hint(detected.name),
        )
    if report.backbone_fraction < _MIN_BACKBONE_FRACTION:
        raise IncompleteLoadError(
            f"{report.path} matches almost nothing in the model: {report.summary_line()}",
            hint=incomplete_hint(report),
        )


def _kind_of_file(report: LoadReport) -> str:
    # medcli's training checkpoints keep the weights under "model" (they can seed another training).
    return "medcli checkpoint" if report.container == "model" else "MedicalNet file"


def incomplete_hint(report: LoadReport) -> str:
    if report.detected_arch and report.model_arch and report.detected_arch != report.model_arch:
        arch = report.detected_arch
        return f"this is a {display_name(arch)} {_kind_of_file(report)}; {depth_hint(arch)}"
    mismatched = [m[0] for m in report.mismatched]
    if "conv1.weight" in mismatched and report.detected_in_channels:
        n = report.detected_in_channels
        return f"this file's conv1 takes {n} input channel{'s' if n > 1 else ''}; use --in-channels {n}"
    if report.mismatched:
        key, file_shape, model_shape = report.mismatched[0]
        return (
            f"{key} is {file_shape} in the file but {model_shape} in the model; check --depth, --in-channels"
        )
    return "check that the file is MedicalNet weights for this --depth (see `medcli weights verify -v`)"


def _check_finite(to_load: Mapping[str, torch.Tensor], path: Path) -> None:
    # A float64 sum is finite exactly when every float32 element is (it cannot overflow), and it takes one
    # pass without the boolean temporary that isfinite(t).all() allocates.
    bad = [
        k
        for k, t in to_load.items()
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float64)))
    ]
    if bad:
        raise WeightsError(
            f"{path} has NaN/Inf values in {len(bad)} tensors ({', '.join(bad[:3])})",
            hint="the file is corrupt: " + FETCH_HINT,
        )


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a weights file without a model: size, SHA-256, format, container, entries, architecture."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}", hint="run `medcli weights fetch`")
    fmt = sniff_format(path)
    if fmt == "zip":
        _check_zip_members(path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        sha_future = pool.submit(file_sha256, path)
        obj = _torch_load(path, fmt)
        sha = sha_future.result()
    raw, container = _find_state_dict(obj, path)
    state, prefix = _strip_prefix(raw)
    detected = detect_architecture(state)
    release, warning = identify_release(sha, path.stat().st_size)
    return {
        "path": str(path),
        "size": path.stat().st_size,
        "sha256": sha,
        "format": fmt,
        "container": container,
        "prefix_stripped": prefix,
        "entries": len(state),
        "detected_arch": detected.name if detected else None,
        "in_channels": detected.in_channels if detected else None,
        "release": release,
        "warnings": [warning] if warning else [],
    }
