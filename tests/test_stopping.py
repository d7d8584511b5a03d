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


def test_a_single_process_agrees_to_nothing():
    """No process group: stop_agreed is a no-op (a single process's SIGINT raises where it lands)."""
    import torch

    from medcli.engine import distributed

    stopping._state["requested"] = True
    try:
        distributed.stop_agreed(torch.device("cpu"))
    finally:
        stopping._state["requested"] = False
