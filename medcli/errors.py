"""The error hierarchy.

Library code raises a ``MedcliError`` subclass whose message says what went wrong *and what to do*.
``medcli.cli`` prints it as one line on stderr and exits with the class's ``exit_code``; a traceback is
shown only with ``-v`` or ``MEDCLI_DEBUG=1``.  Exit codes are part of the CLI contract (README lists them).
"""

from __future__ import annotations


class MedcliError(Exception):
    """Base class: an error the user can act on."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MedcliError):
    """A bad option value or an unknown name (loss, optimizer, model, ...)."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A name not found in a registry; the message carries "did you mean" suggestions."""


class DataError(MedcliError):
    """Unusable input data: a corrupt/truncated NIfTI, NaNs, wrong shape, missing modality, empty cohort."""

    exit_code = 3


class WeightsError(MedcliError):
    """A weights file that cannot be used: HTML page, truncated, unsafe pickle, wrong architecture."""

    exit_code = 4


class IncompleteLoadError(WeightsError):
    """The file loaded, but not the whole backbone (``weights verify`` exits with this code)."""

    exit_code = 5


class DownloadError(MedcliError):
    """Fetching weights failed (network, checksum, HTML page, all mirrors exhausted)."""

    exit_code = 6


class PluginError(MedcliError):
    """A plugin failed to import, built an invalid object, or clashes with another."""

    exit_code = 7


class CheckpointError(MedcliError):
    """A training checkpoint that cannot be read, resumed from, or does not match the request."""

    exit_code = 8


class DeviceError(MedcliError):
    """The requested device (``--gpu``, ``--amp`` mode, ``--multi-gpu``) is not available here."""

    exit_code = 9


class PartialFailure(MedcliError):
    """A batch job finished, but some items failed (e.g. some scans in ``predict``)."""

    exit_code = 10


class Diverged(MedcliError):
    """Training diverged: the loss or the model's outputs became NaN or infinite (nothing of it is saved)."""

    exit_code = 11


class Interrupted(MedcliError):
    """Ctrl-C (SIGINT), with what the interrupted command left behind and how to go on."""

    exit_code = 130
    how = "interrupted"


class Terminated(Interrupted):
    """SIGTERM (a batch scheduler's time limit or preemption, ``kill``), said like Ctrl-C."""

    exit_code = 143
    how = "terminated (SIGTERM)"


class TerminateSignal(KeyboardInterrupt):
    """Raised by medcli's SIGTERM handler: a KeyboardInterrupt, so a termination unwinds as Ctrl-C does
    (temp files removed, locks released, train.log told how the session ended), not a silent death."""


def interruption(e: KeyboardInterrupt) -> type[Interrupted]:
    """The error class (words and exit code) for a KeyboardInterrupt: Ctrl-C's, or medcli's SIGTERM's."""
    return Terminated if isinstance(e, TerminateSignal) else Interrupted


PEER_GONE = "stopped: another process of this run failed (its error line says why)"


def peer_rank_gone(e: BaseException) -> bool:
    """A collective that failed because another torchrun rank exited (a rank-local error such as a NaN
    loss): gloo reports the closed connection, NCCL an aborted communicator.  Said as ``PEER_GONE``."""
    import os

    text = str(e)
    markers = ("Connection closed by peer", "Connection reset by peer", "remote worker", "NCCL communicator")
    return "LOCAL_RANK" in os.environ and any(m in text for m in markers)


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "other error",
    2: "usage error: bad option value or unknown name",
    3: "data error: unusable image, cohort or manifest",
    4: "weights error: file unusable as MedicalNet weights",
    5: "incomplete load: the backbone did not load completely",
    6: "download error",
    7: "plugin error",
    8: "checkpoint error",
    9: "device error: requested GPU/AMP/multi-GPU setup not available",
    10: "partial failure: some items of a batch failed",
    11: "training diverged: the loss or the outputs became NaN/Inf",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM)",
}
