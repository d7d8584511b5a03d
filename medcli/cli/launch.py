"""torchrun for ``medcli train --multi_gpu``: PyTorch's own launcher, reporting a failed rank as medcli does.

``python -m medcli.cli.launch`` takes torchrun's arguments and runs torchrun's ``run``.  Plain torchrun
answers a worker that failed with its own log line, a ``ChildFailedError`` traceback and exit code 1, after
the rank has already printed medcli's one-line error: the user saw three reports and lost the exit code
(11 for a diverged training, 9 for a device error, ...).  Here the failed rank's line stands alone and the
launcher exits with that rank's code; a rank killed by a signal (the kernel's OOM killer, say) gets a line
of its own, since it printed nothing, and exits 128 + the signal number, as a shell would.  A SIGINT or
SIGTERM sent to torchrun itself (medcli passes Ctrl-C and a scheduler's SIGTERM on) is passed to the ranks
by torchrun and ends in 128 + its number, without torchrun's traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from medcli.cli import console


def relaunch_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The command that re-runs this ``medcli`` invocation with ``nproc`` processes under torchrun."""
    return [
        sys.executable,
        "-m",
        "medcli.cli.launch",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "medcli",
        *argv,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    # Its failure report repeats what the failed rank printed, with a traceback of the launcher itself; its
    # warnings ("Received 2 death signal, shutting down workers") say again what the user just did.  Each
    # of its modules sets its logger's own level at import, so the parent logger's level is not enough.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as e:  # SIGINT/SIGTERM from medcli's launcher: torchrun passed it to the ranks
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1
        number = -failure.exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGTERM:  # a rank alone `kill`ed; the OOM killer sends SIGKILL
            console.print_error(f"rank {rank} was terminated by SIGTERM (run the same command with --resume)")
        else:
            console.print_error(
                f"rank {rank} was killed by {name} (out of memory, if the kernel's OOM killer sent it: "
                "lower --batch-size or --nproc)"
            )
        return 128 + number
    return 0


if __name__ == "__main__":
    sys.exit(main())
