"""The known MedicalNet releases (``manifest.json`` beside this module) and where their files live locally.

The manifest ships inside the package (package data), so ``medcli weights fetch`` works from a
non-editable install as well as from a checkout.  Each entry has a short name users type
(``resnet50_23dataset``), optional aliases (``resnet50``), the depth and dataset variant, the released
file name, its size (``None`` where not confirmed) and SHA-256, and its mirrors in the order to try them.

Local files: the default entry installs to the seed's path ``pretrained/medicalnet_resnet50_3d.pth``
(``medcli.paths.DEFAULT_WEIGHTS``); every entry also has a home under ``$MEDCLI_HOME/weights/<file>``
(where ``fetch --all`` puts them).  :func:`weights_for_depth` is what ``train`` and ``weights verify`` use
when no file is named: the local copy of the release for the model's depth.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from medcli.errors import WeightsError
from medcli.paths import DEFAULT_WEIGHTS, medcli_home
from medcli.registry import normalize, unknown_name_error
from medcli.weights.verify import FileCheck, check_file, is_sha256

MANIFEST_FORMAT = "medcli-weights-manifest/1"
MANIFEST_ENV = "MEDCLI_WEIGHTS_MANIFEST"  # a site's own manifest: internal mirrors, extra releases


@dataclass(frozen=True)
class WeightsEntry:
    """One released weights file."""

    name: str
    depth: int
    datasets: int
    file: str
    size: int | None
    sha256: str
    urls: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    note: str | None = None
    is_default: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "default": self.is_default,
            "depth": self.depth,
            "datasets": self.datasets,
            "file": self.file,
            "size": self.size,
            "sha256": self.sha256,
            "urls": list(self.urls),
            "note": self.note,
        }


def weights_dir() -> Path:
    """Where ``fetch NAME`` and ``fetch --all`` put files: ``$MEDCLI_HOME/weights``."""
    return medcli_home() / "weights"


def install_path(entry: WeightsEntry) -> Path:
    """Where ``fetch`` puts ``entry`` without ``--dest``: the seed's path for the default, else the cache."""
    return DEFAULT_WEIGHTS if entry.is_default else weights_dir() / entry.file


def local_candidates(entry: WeightsEntry) -> list[Path]:
    """Every place a copy of ``entry`` is looked for, preferred first (duplicates removed)."""
    paths = [install_path(entry), weights_dir() / entry.file]
    return list(dict.fromkeys(paths))


def local_status(entry: WeightsEntry) -> FileCheck:
    """The best local copy of ``entry``: the first verified one, else the first corrupt one, else absent
    (reported at the install path)."""
    checks = [check_file(p, sha256=entry.sha256, size=entry.size) for p in local_candidates(entry)]
    for state in ("verified", "corrupt"):
        for c in checks:
            if c.state == state:
                return c
    return checks[0]


def weights_for_depth(depth: int | str) -> tuple[Path | None, WeightsEntry | None]:
    """Where the release for ``depth`` is (its first local copy, else its install path, where ``medcli weights
    fetch NAME`` would put it), and the release; ``(None, None)`` for a depth MedicalNet never released."""
    entry = load_manifest().for_depth(depth)
    if entry is None:
        return None, None
    return next((p for p in local_candidates(entry) if p.is_file()), install_path(entry)), entry


def fetch_command(entry: WeightsEntry | None) -> str:
    """The command that downloads ``entry`` to where :func:`weights_for_depth` looks."""
    if entry is None or entry.is_default:
        return "medcli weights fetch"
    return f"medcli weights fetch {entry.aliases[0] if entry.aliases else entry.name}"


@dataclass(frozen=True)
class Manifest:
    entries: tuple[WeightsEntry, ...]
    default_name: str

    @property
    def default(self) -> WeightsEntry:
        return self.get(self.default_name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def for_depth(self, depth: int | str) -> WeightsEntry | None:
        """The release a ResNet of ``depth`` starts from by default: the default release where it has that
        depth, else the one named or aliased ``resnet<depth>`` (the 23-dataset file where there is one), else
        the one of that depth trained on the most datasets; None for a depth never released (``tiny``)."""
        key = normalize(f"resnet{depth}")
        same = [e for e in self.entries if str(e.depth) == str(depth)]
        if not same:
            return None
        return min(
            same,
            key=lambda e: (
                not e.is_default,
                key not in {normalize(n) for n in (e.name, *e.aliases)},
                -e.datasets,
            ),
        )

    def get(self, name: str) -> WeightsEntry:
        """Look up by name, alias or released file name (``resnet_50_23dataset.pth``); case-insensitive."""
        key = normalize(name)
        for e in self.entries:
            if key in {normalize(n) for n in (e.name, *e.aliases, e.file)}:
                return e
        raise unknown_name_error(
            "weights", name, [*self.names(), *(a for e in self.entries for a in e.aliases)]
        )


def _entry(raw: dict, default_name: str) -> WeightsEntry:
    # A site's manifest is written by hand: a wrong type must fail here, naming the file, not later (a
    # string of URLs was tried one character at a time).
    name, urls, size = raw.get("name"), raw.get("urls"), raw.get("size")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"{name}: 'urls' must be a list of strings")
    if not is_sha256(raw.get("sha256")):
        raise ValueError(f"{name}: 'sha256' must be 64 hex digits")
    if size is not None and (type(size) is not int or size < 0):
        raise ValueError(f"{name}: 'size' must be a number of bytes, or null")
    return WeightsEntry(
        name=raw["name"],
        depth=int(raw["depth"]),
        datasets=int(raw["datasets"]),
        file=raw["file"],
        size=None if raw.get("size") is None else int(raw["size"]),
        sha256=raw["sha256"].lower(),
        urls=tuple(raw["urls"]),
        aliases=tuple(raw.get("aliases", ())),
        note=raw.get("note"),
        is_default=raw["name"] == default_name,
    )


def load_manifest(path: Path | None = None) -> Manifest:
    """Read ``path``, else ``$MEDCLI_WEIGHTS_MANIFEST``, else the packaged manifest."""
    if path is None and os.environ.get(MANIFEST_ENV):
        path = Path(os.environ[MANIFEST_ENV]).expanduser()
    source = Path(path) if path is not None else resources.files("medcli.weights").joinpath("manifest.json")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        manifest = Manifest(tuple(_entry(e, raw["default"]) for e in raw["weights"]), raw["default"])
        manifest.default  # noqa: B018 - the default must name an entry
    except Exception as e:  # a broken manifest is a packaging bug, but say which file
        raise WeightsError(
            f"the weights manifest {source} is not valid: {e}",
            hint=f"fix or unset ${MANIFEST_ENV}" if path else "reinstall medcli (the manifest ships with it)",
        ) from e
    return manifest
