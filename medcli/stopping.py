"""A stop that every torchrun rank acts on at the same batch boundary.

Under torchrun, Ctrl-C (or a scheduler's SIGTERM, which medcli's launcher passes on as SIGINT) reaches every
rank at almost the same moment.  Raised at once, it lands wherever each rank happens to be: one rank may
already be unwinding while another waits in a gradient all-reduce for it, which then fails with gloo's
"connection closed" (or NCCL's hang) instead of saying which epoch last.pt holds.  So inside ``deferred()``
(the trainer's epochs, under DDP) SIGINT is only recorded, and ``distributed.stop_agreed`` (one small
all-reduce per batch) makes every rank raise KeyboardInterrupt at the same batch.  Outside that region, or a
second SIGINT, raises at once, as Python's own handler does.

Torch-free: ``medcli.cli.app.main`` installs the handler in each rank before anything is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_state = {"deferred": False, "requested": False}


def on_sigint(signum, frame) -> None:
    """The SIGINT handler of a torchrun rank."""
    if _state["deferred"] and not _state["requested"]:
        _state["requested"] = True  # acted on at the next batch, by every rank together
        return
    raise KeyboardInterrupt


def requested() -> bool:
    return _state["requested"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT inside is recorded for ``distributed.stop_agreed`` rather than raised where it lands."""
    _state["deferred"] = True
    try:
        yield
    finally:
        _state["deferred"] = False
