"""--resume after SIGKILL ends with exactly the weights of an uninterrupted run (CPU, deterministic); Ctrl-C
says which epoch last.pt holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_medcli, training_with_a_checkpoint

pytest_plugins = ("helpers_train",)  # tiny_cohort, shared_cache, train_env


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(train_env):
    env = {**os.environ, **train_env["env"]}
    args = ["train", "--data", str(train_env["data"]), "--out", str(train_env["out"]), *train_env["tiny"]]
    args += ["--epochs", "4", "--deterministic", "--seed", "3", "--dropout", "0.3"]

    full = run_medcli(*args, "--name", "full", env=train_env["env"], timeout=300)
    assert full.returncode == 0, full.stderr

    cut_dir = train_env["out"] / "cut" / "fold0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcli", *args, "--name", "cut"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (cut_dir / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(cut_dir / "last.pt", weights_only=True)["epoch"]
    assert killed_at < 3

    resumed = run_medcli(*args, "--name", "cut", "--resume", env=train_env["env"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {cut_dir / 'last.pt'}" in resumed.stderr

    a = torch.load(train_env["out"] / "full" / "fold0" / "last.pt", weights_only=True)
    b = torch.load(cut_dir / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["best_metric"] == b["best_metric"]

    def rows(run):
        lines = (train_env["out"] / run / "fold0" / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if k not in ("seconds", "samples_per_s")} for x in lines
        ]

    assert rows("full") == rows("cut")  # one row per epoch, none lost or doubled by the kill


@pytest.mark.slow
def test_ctrl_c_says_which_epoch_last_pt_holds_and_how_to_resume(train_env):
    """Ctrl-C mid-training: exit 130, one line naming the epoch last.pt holds and --resume; it resumes."""
    # A shell's background job (`make test &`) ignores SIGINT, and a child inherits that: Python then
    # installs no KeyboardInterrupt handler.  Ctrl-C in a terminal reaches a process that handles it.
    proc, fold = training_with_a_checkpoint(
        train_env, "ctrlc", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    held = torch.load(fold / "last.pt", weights_only=True)["epoch"]
    assert f"{fold / 'last.pt'} holds epoch {held + 1} (add --resume to the same command" in errors[0]

    resumed = _resume(train_env, "ctrlc")
    assert f"Resuming from {fold / 'last.pt'}: epoch {held + 1} done" in resumed.stderr


@pytest.mark.slow
def test_sigterm_ends_a_training_like_ctrl_c_and_says_so_in_its_log(train_env):
    """A batch scheduler's time limit or preemption sends SIGTERM: exit 143, one line naming the epoch
    last.pt holds, the same in train.log, and the fold's lock released (the next command can resume)."""
    proc, fold = training_with_a_checkpoint(train_env, "sigterm")
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "terminated (SIGTERM) in epoch" in errors[0], err
    held = torch.load(fold / "last.pt", weights_only=True)["epoch"]
    assert f"{fold / 'last.pt'} holds epoch {held + 1}" in errors[0]
    log_end = (fold / "train.log").read_text().splitlines()[-1]
    assert "error: terminated (SIGTERM)" in log_end and f"holds epoch {held + 1}" in log_end
    assert not (fold.parent / ".fold0.lock").exists()

    _resume(train_env, "sigterm")


def _resume(train_env: dict, name: str):
    """The same command as training_with_a_checkpoint's, with --resume, for one more step."""
    args = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"]]
    args += ["--epochs", "400", "--name", name, "--resume", "--max-steps", "1"]
    resumed = run_medcli(*args, env=train_env["env"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return resumed
