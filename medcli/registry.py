"""Name → factory registries with "did you mean" errors.

Names are matched case-insensitively with ``_`` and ``-`` treated alike, so ``--loss LDAM``,
``--loss ldam`` and ``--loss Weighted_CE`` all resolve.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from medcli.errors import UnknownNameError


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Closest candidates to ``name`` (normalized comparison), best first."""
    cands = list(candidates)
    by_norm = {normalize(c): c for c in cands}
    hits = difflib.get_close_matches(normalize(name), list(by_norm), n=n, cutoff=0.5)
    return [by_norm[h] for h in hits]


def unknown_name_error(kind: str, name: str, candidates: Iterable[str]) -> UnknownNameError:
    cands = sorted(candidates, key=str.lower)
    close = suggest(name, cands)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None
    choices = f"choose one of: {', '.join(cands)}" if cands else f"no {kind} is available"
    return UnknownNameError(f"unknown {kind} {name!r}; {choices}", hint=hint)


class Registry:
    """A small name → factory table.  ``kind`` names the thing in error messages ("loss", "optimizer")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._display: dict[str, str] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None):
        """Register ``factory`` under ``name``; usable as a decorator."""

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            key = normalize(name)
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[key] = f
            self._display[key] = name
            return f

        return add(factory) if factory is not None else add

    def __contains__(self, name: str) -> bool:
        return normalize(name) in self._items

    def names(self) -> list[str]:
        return sorted(self._display.values(), key=str.lower)

    def get(self, name: str) -> Callable[..., Any]:
        if not isinstance(name, str):
            raise unknown_name_error(self.kind, repr(name), self.names())
        try:
            return self._items[normalize(name)]
        except KeyError:
            raise unknown_name_error(self.kind, name, self.names()) from None
