"""Entry-point plugins: discovery without importing, isolated loading, status records.

A plugin is an installed distribution that declares an entry point in one of medcli's groups, e.g.::

    [project.entry-points."medcli.losses"]
    poly1 = "medcli_polyloss:Poly1CrossEntropy"

The entry-point name is what users type (``--loss poly1``).  Discovery reads only installed metadata, so a
plugin whose code is broken cannot break ``medcli --help`` or any command that does not use it; its code is
imported by ``load`` (when used) or ``check`` (``medcli plugins list --check``), each inside its own
try/except.  Built-in names win: a plugin claiming one is "shadowed" and never loaded.  Two distributions
claiming one name are a "conflict", and using that name is an error naming both.  ``MEDCLI_DISABLE_PLUGINS=1``
turns discovery off.  What a loaded object must satisfy is up to the group's owner (``medcli.losses``
validates loss factories); this module only knows how to find, import and report.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from typing import Any

from medcli.errors import PluginError
from medcli.registry import normalize

ENV_DISABLE = "MEDCLI_DISABLE_PLUGINS"
GROUP_KINDS = {"medcli.losses": "loss"}  # entry-point group → what its names are called in messages

# Statuses.  "unchecked": found in metadata, not imported.  "builtin": a name medcli itself provides.
BUILTIN, UNCHECKED, OK = "builtin", "unchecked", "ok"
ERROR, INVALID, SHADOWED, CONFLICT = "error", "invalid", "shadowed", "conflict"
BROKEN = frozenset({ERROR, INVALID, SHADOWED, CONFLICT})


class InvalidPlugin(Exception):
    """Raised by a group's validator: the plugin imported, but what it provides breaks the contract."""


@dataclass(frozen=True)
class PluginRecord:
    """One name in one group, where it comes from, and what we know about it."""

    group: str
    name: str
    distribution: str
    version: str
    value: str  # "module:attribute" as declared; for built-ins the Python path of the factory
    status: str
    error: str | None = None  # first line of what went wrong, for listing
    summary: str = ""  # one line: the distribution's Summary (plugins) or the docstring (built-ins)
    also_provided_by: tuple[str, ...] = ()  # other "dist version"s claiming this name (status conflict)
    entry_point: metadata.EntryPoint | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return normalize(self.name)

    @property
    def source(self) -> str:
        """``dist version``, the way error messages name a plugin."""
        return f"{self.distribution} {self.version}".strip()

    @property
    def broken(self) -> bool:
        return self.status in BROKEN

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("entry_point")
        return d


def plugins_disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (tracebacks belong to ``-v``, not to listings)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def reinstall_hint(record: PluginRecord) -> str:
    return f"run `medcli plugins list --check`; reinstall or uninstall {record.distribution}"


def discover(group: str, *, builtin_names: Iterable[str] = ()) -> list[PluginRecord]:
    """Every entry point in ``group``, sorted by name, with statuses unchecked / shadowed / conflict.

    Nothing is imported: only the installed metadata (``*.dist-info/entry_points.txt``) is read.
    """
    if plugins_disabled():
        return []
    try:
        eps = list(metadata.entry_points(group=group))
    except Exception as e:  # a corrupt dist-info somewhere on sys.path must not take the CLI down
        return [PluginRecord(group, "?", "?", "", "", ERROR, f"reading installed metadata: {first_line(e)}")]

    builtins = {normalize(b) for b in builtin_names}
    by_key: dict[str, list[metadata.EntryPoint]] = defaultdict(list)
    for ep in eps:
        by_key[normalize(ep.name)].append(ep)

    records = []
    for key, group_eps in sorted(by_key.items()):
        dists = {_dist_name(ep) for ep in group_eps}
        for ep in group_eps:
            status, error, others = UNCHECKED, None, ()
            if key in builtins:
                status, error = SHADOWED, f"{ep.name!r} is a built-in medcli name; the built-in is used"
            elif len(dists) > 1:
                others = tuple(sorted(_source(e) for e in group_eps if _dist_name(e) != _dist_name(ep)))
                status, error = CONFLICT, f"{ep.name!r} is also provided by {', '.join(others)}"
            records.append(
                PluginRecord(
                    group=group,
                    name=ep.name,
                    distribution=_dist_name(ep),
                    version=_dist_version(ep),
                    value=ep.value,
                    status=status,
                    error=error,
                    summary=_dist_summary(ep),
                    also_provided_by=others,
                    entry_point=ep,
                )
            )
    return records


def load(record: PluginRecord) -> Any:
    """Import the object behind ``record``; any failure is a ``PluginError`` naming the distribution."""
    if record.status == SHADOWED:
        raise PluginError(
            f"plugin {record.name!r} from {record.source} is shadowed by the built-in of that name"
        )
    if record.status == CONFLICT:
        raise conflict_error(record)
    try:
        return _import(record)
    except (Exception, SystemExit) as e:
        raise PluginError(
            f"plugin {record.name!r} from {record.source} {_import_failure(record, e)}",
            hint=reinstall_hint(record),
        ) from e


def _import(record: PluginRecord) -> Any:
    if record.entry_point is None:
        raise LookupError(f"{record.name!r} is not an installed plugin")
    with quiet_stdout():
        return record.entry_point.load()


@contextlib.contextmanager
def quiet_stdout():
    """Send anything plugin code prints to stderr: stdout carries only results (and ``--json``)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _import_failure(record: PluginRecord, exc: BaseException) -> str:
    return f"failed to import ({record.value}): {first_line(exc)}"


def conflict_error(record: PluginRecord) -> PluginError:
    """The error for using a name that several distributions provide: it names all of them."""
    sources = sorted({record.source, *record.also_provided_by})
    kind = GROUP_KINDS.get(record.group, record.group)
    return PluginError(
        f"{kind} {record.name!r} is provided by several plugins: {', '.join(sources)}",
        hint="uninstall all but one of them (pip uninstall <distribution>)",
    )


def check(record: PluginRecord, validate: Callable[[Any], None]) -> PluginRecord:
    """Import ``record`` and run ``validate`` on the loaded object; return the record with its new status.

    ``validate`` raises ``InvalidPlugin`` for a contract violation; any other exception counts as "error".
    Shadowed and conflicting records are returned unchanged: they are never imported.
    """
    if record.status in (SHADOWED, CONFLICT, BUILTIN):
        return record
    try:
        obj = _import(record)
    except (Exception, SystemExit) as e:  # SystemExit: a plugin calling sys.exit() at import time
        return replace(record, status=ERROR, error=_import_failure(record, e))
    try:
        with quiet_stdout():
            validate(obj)
    except InvalidPlugin as e:
        text = str(e).strip()
        return replace(record, status=INVALID, error=text.splitlines()[0] if text else None)
    except (Exception, SystemExit) as e:
        return replace(record, status=ERROR, error=first_line(e))
    return replace(record, status=OK, error=None)


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.name if dist is not None else None) or "unknown"


def _dist_version(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.version if dist is not None else None) or ""


def _source(ep: metadata.EntryPoint) -> str:
    return f"{_dist_name(ep)} {_dist_version(ep)}".strip()


def _dist_summary(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    try:
        return (dist.metadata.get("Summary") or "").strip() if dist is not None else ""
    except Exception:
        return ""
