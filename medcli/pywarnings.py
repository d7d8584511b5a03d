"""Python warnings in medcli's voice: one place that turns ``warnings.warn`` calls (PyTorch's, a library's,
a plugin's) into medcli's own warning lines.

Python prints a warning in two lines with the source line of the call; medcli shows it as one ``WARNING:``
line, once per command, saying where it came from.  The CLI wraps every command in ``reported_by``
(console lines); training wraps itself inside that with its own reporter, so its warnings also become
events and reach train.log.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def reported_by(report: Callable[[str], None]) -> Iterator[None]:
    """Within this block each distinct Python warning is passed once to ``report`` as
    ``"Category: message (file.py:line)"``; the filters and ``showwarning`` are restored afterwards."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"{category.__name__}: {message}"
        if text not in seen:  # e.g. each DataLoader iterator repeats its worker warning
            seen.add(text)
            report(f"{text} ({Path(filename).name}:{lineno})")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
