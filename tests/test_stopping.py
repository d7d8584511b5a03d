"""medcli.stopping: a torchrun rank's SIGINT, recorded inside the trainer's epochs and raised elsewhere."""

from __future__ import annotations

import signal

import pytest

from medcli import stopping


@pytest.fixture
def rank_handler(monkeypatch):
    """The handler a torchrun rank installs (medcli.cli.app.main), on a fresh state, restored after."""
    monkeypatch.setattr(stopping, "_state", {"deferred": False, "requested": False})
    previous = signal.signal(signal.SIGINT, stopping.on_sigint)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_outside_the_epochs_raises_where_it_lands(rank_handler):
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert not stopping.requested()


def test_sigint_inside_is_recorded_for_the_ranks_to_stop_together_and_a_second_one_raises(rank_handler):
    with stopping.deferred():
        signal.raise_signal(signal.SIGINT)  # recorded: no exception here, mid-batch
        assert stopping.requested()
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C again: at once
            signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # past the epochs, as Python's own handler
        signal.raise_signal(signal.SIGINT)


# Two real gloo ranks under torchrun: rank 1 alone gets SIGINT inside the epochs.
TWO_RANKS = """
import os, signal, torch
from medcli import stopping
from medcli.engine import distributed

signal.signal(signal.SIGINT, stopping.on_sigint)  # as medcli.cli.app.main installs it in a rank
distributed.init("cpu")
rank = distributed.rank()
with stopping.deferred():
    if rank == 1:
        os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised: rank 0 may be inside a collective
    for batch in range(3):
        try:
            distributed.stop_agreed(torch.device("cpu"))
        except KeyboardInterrupt:
            print(f"rank {rank} stopped at batch {batch}", flush=True)
            break
    else:
        print(f"rank {rank} ran on", flush=True)
distributed.shutdown()
"""


@pytest.mark.slow
def test_every_rank_stops_at_the_batch_where_any_rank_was_interrupted(tmp_path):
    """rank 0 never got the signal, yet stops at the same batch as rank 1: neither is left inside a
    collective the other has quit."""
    import os
    import re
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = sorted(
        re.findall(r"rank \d (?:stopped at batch \d|ran on)", result.stdout)
    )  # two writers interleave
    assert said == ["rank 0 stopped at batch 0", "rank 1 stopped at batch 0"], result.stdout
