"""Rendering shared by all commands: consoles, error lines, JSON output, progress.

stdout carries results only (tables, or JSON under ``--json``); messages, warnings and progress go to
stderr.  Rich turns colour off by itself under ``NO_COLOR`` or when the stream is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

# Width is only a fallback for non-terminals (CI logs); Rich measures real terminals itself.  No emoji codes:
# user text (`--device cuda:x`, a scan named `a:x:b`) must not turn into pictures (`cuda❌`).
# No markup either: text is printed as it is (a subject id `case[/x]` crashed a table; `T1 [post]` lost its
# bracket); medcli's own styles are explicit (``styled``, or ``markup=True`` on a line it wrote itself).
out = Console(soft_wrap=False, emoji=False, markup=False)
err = Console(stderr=True, emoji=False, markup=False)

_state = {"verbose": False}


def set_verbose(flag: bool) -> None:
    """Set by the root callback on every invocation: ``-v`` or ``MEDCLI_DEBUG=1``."""
    _state["verbose"] = flag or os.environ.get("MEDCLI_DEBUG", "") not in ("", "0")


def verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    """An INFO line on stderr (the seed's log voice), never wrapped: an epoch line stays one line in CI
    logs (and above live bars)."""
    err.print(f"INFO: {message}", highlight=False, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]WARNING:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


def rank() -> str:
    """This process's torchrun rank, "0" outside torchrun."""
    return os.environ.get("RANK", "0") if "LOCAL_RANK" in os.environ else "0"


# How long a rank other than 0 holds back its error line (see print_error).
RANK_0_FIRST_S = 5.0


def print_error(message: str) -> None:
    """The one red line an error gets.  Under torchrun most errors are every rank's alike (missing data, a
    diverged model: the validation outputs are gathered), and the first rank to exit makes torchrun stop
    the others: so a rank other than 0 first gives rank 0 time to print and exit, and is then stopped
    without repeating the line.  An error of its own (its loss alone went NaN) is printed after that wait,
    naming the rank."""
    if rank() != "0":
        try:
            time.sleep(RANK_0_FIRST_S)
        except KeyboardInterrupt:  # Ctrl-C meanwhile: the run is being stopped, and rank 0 says so
            return
    where = "" if rank() == "0" else f"rank {rank()}: "
    err.print(f"[bold red]Error:[/] {where}{escape(message)}", highlight=False, markup=True, soft_wrap=True)


def styled(text: str, style: str):
    """A table cell in a style, its text as it is (the consoles take no markup)."""
    from rich.text import Text

    return Text(text, style=style)


def print_json(data: Any) -> None:
    """JSON, and nothing else, on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    """Progress bars only on an interactive stderr: CI logs stay readable."""
    return err.is_terminal


def table(title: str, **options: Any):
    """A Rich table titled on the left, at least as wide as its title: Rich wraps a title to its table's
    width, so a narrow table (one scan, a short key) would otherwise break its title over two lines."""
    from rich.table import Table

    return Table(title=title, title_justify="left", min_width=len(title), **options)
