"""--multi-gpu's DDP path with two real CPU processes (gloo) under torchrun."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_medcli, training_with_a_checkpoint

from medcli.cli.launch import relaunch_command
from medcli.errors import PEER_GONE

pytest_plugins = ("helpers_train",)  # tiny_cohort, shared_cache, train_env


def test_relaunch_command_is_torchrun_of_medcli():
    cmd = relaunch_command(["train", "--fold", "0"], 4)
    assert cmd[1:6] == ["-m", "medcli.cli.launch", "--standalone", "--nproc_per_node=4", "-m"]
    assert cmd[6:] == ["medcli", "train", "--fold", "0"]


@pytest.mark.slow
def test_ddp_two_gloo_processes(train_env):
    out = train_env["out"]
    result = run_medcli(
        "train", "--data", train_env["data"], "--out", out, *train_env["tiny"],
        "--loss", "ce", "--epochs", "2", "--multi_gpu", "--device", "cpu", "--nproc", "2", "--json",
        env=train_env["env"], timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Launching 2 processes with torchrun (gloo)" in result.stderr
    assert "cpu × 2 processes" in result.stderr
    summary = json.loads(result.stdout)  # rank 0 alone prints: exactly one JSON document
    fold_dir = out / "resnettiny-t1ce-ce" / "fold0"
    assert summary["folds"][0]["run_dir"] == str(fold_dir)

    # Each rank sees half the 5 training subjects (3 with the sampler's padding): 2 micro-batches of 2,
    # one optimiser step per epoch, where a single process would take 2 per epoch.
    rows = [json.loads(x) for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["global_step"] == 2
    log = (fold_dir / "train.log").read_text().splitlines()  # rank 0 alone writes: one of each line
    assert sum(line.endswith(" started") for line in log) == 1
    assert sum(" epoch 2/2 · " in line for line in log) == 1

    splits = json.loads((fold_dir.parent / "splits.json").read_text())
    with open(fold_dir / "val_predictions.csv") as fh:
        predicted = [r["subject_id"] for r in csv.DictReader(fh)]
    # Every validation subject exactly once: the DistributedSampler's padded duplicate was dropped.
    assert sorted(predicted) == sorted(splits["folds"][0]["val"])


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_dropout_and_resume_exactly(train_env):
    """Two gloo processes with dropout: each rank has its own random stream, every rank's state is saved,
    and a run stopped after 2 epochs and resumed to 3 ends with the weights of an uninterrupted 3-epoch run
    (restoring rank 0's stream on both ranks, as before, would not)."""
    out = train_env["out"]
    common = [
        "train", "--data", train_env["data"], "--out", out, *train_env["tiny"], "--loss", "ce",
        "--scheduler", "none", "--dropout", "0.5", "--deterministic", "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    base = [*common, "--multi_gpu", "--nproc", "2"]
    for args in (["--epochs", "3", "--name", "full"], ["--epochs", "2", "--name", "cut"]):
        result = run_medcli(*base, *args, env=train_env["env"], timeout=400)
        assert result.returncode == 0, result.stderr
    resumed = run_medcli(
        *base, "--epochs", "3", "--name", "cut", "--resume", env=train_env["env"], timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr and "random streams" not in resumed.stderr

    a = torch.load(out / "full" / "fold0" / "last.pt", weights_only=True)
    b = torch.load(out / "cut" / "fold0" / "last.pt", weights_only=True)
    assert len(a["rng_ranks"]) == 2
    assert not torch.equal(a["rng_ranks"][0]["torch"], a["rng_ranks"][1]["torch"])  # per-rank streams
    assert torch.equal(a["rng"]["torch"], a["rng_ranks"][0]["torch"])
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    # Resumed by one process: it goes on, and says the random streams are not the uninterrupted run's.
    more = run_medcli(*common, "--epochs", "4", "--name", "full", "--resume", env=train_env["env"])
    assert more.returncode == 0, more.stderr
    assert "resuming with 1 process(es) a checkpoint that was saved by 2 processes" in more.stderr
    assert torch.load(out / "full" / "fold0" / "last.pt", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ("raise SystemExit(11)", 11),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143),
    ],
)
def test_launcher_keeps_a_failed_ranks_exit_code(script, code, capfd):
    """torchrun itself answers any failed worker with a traceback and exit code 1; medcli's launcher runs
    the same torchrun and exits with the rank's own code (a signal as 128 + its number, with a line)."""
    from medcli.cli.launch import main

    assert main(["--standalone", "--nproc_per_node=1", "--no-python", sys.executable, "-c", script]) == code
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ChildFailedError" not in err
    if code == 137:
        assert "Error: rank 0 was killed by SIGKILL (out of memory, if the kernel's OOM killer" in err
    if code == 143:  # `kill` of one rank: no out-of-memory guess
        assert "Error: rank 0 was terminated by SIGTERM (run the same command with --resume)" in err


@pytest.mark.slow
def test_ddp_divergence_exits_11_with_medcli_lines_only(train_env):
    """Both gloo ranks see the NaN validation outputs (gathered) and stop; the user gets rank 0's line once
    (rank 1 raised the same error and holds its line back until torchrun stops it) and exit 11, not
    torchrun's failure report.  Which rank printed first was a race: CI once saw rank 1's line alone."""
    result = run_medcli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--loss", "ce", "--lr", "1e6", "--epochs", "3", "--multi_gpu", "--device", "cpu", "--nproc", "2",
        env=train_env["env"], timeout=400,
    )  # fmt: skip
    assert result.returncode == 11, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: training diverged"), errors
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@pytest.mark.slow
def test_ddp_error_of_every_rank_is_said_once(train_env, tmp_path):
    """A mistake every rank finds alike (a --data path that does not exist) is one line, rank 0's, with
    its exit code: it was said once per rank, in whichever order the ranks got there."""
    result = run_medcli(
        "train", "--data", tmp_path / "no-such-cohort", "--out", train_env["out"], *train_env["tiny"],
        "--multi_gpu", "--device", "cpu", "--nproc", "2", env=train_env["env"], timeout=240,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    missing = tmp_path / "no-such-cohort"
    assert errors == [f"Error: {missing} does not exist (check the path: a BraTS folder or a CSV manifest)"]
    assert not train_env["out"].exists()


# A loss whose value turns NaN on rank 1 alone, from its 4th call (the training's own calls; the smoke test
# that checks a plugin loss before training calls a copy): a rank-local divergence.
RANK_LOCAL_NAN = """
import os

import torch.nn.functional as F


class Loss:
    def __init__(self, *, num_classes, class_counts):
        self.calls = 0

    def __call__(self, logits, target):
        self.calls += 1
        loss = F.cross_entropy(logits.float(), target)
        return loss * float("nan") if os.environ.get("RANK") == "1" and self.calls > 3 else loss
"""


@pytest.mark.slow
def test_a_divergence_on_one_rank_alone_stops_the_run_instead_of_hanging(train_env, tmp_path, monkeypatch):
    """Rank 1's loss turns NaN while rank 0's stays finite, in the middle of a gradient-accumulation group:
    rank 1 stops with exit 11, rank 0 (left waiting in the all-reduce) stops too, with one line saying the
    other rank failed.  Rank 1 used to wait in a barrier after its error while rank 0 waited in the
    all-reduce, until gloo's 30-minute timeout."""
    from helpers_plugins import fake_site_on_path

    sites = fake_site_on_path(tmp_path, monkeypatch)
    site = next(sites)
    site.add("medcli-ranknan", {"ranknan": "Loss"}, RANK_LOCAL_NAN)
    result = run_medcli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--loss", "ranknan", "--epochs", "3", "--multi_gpu", "--device", "cpu", "--nproc", "2",
        env={**train_env["env"], **site.env()}, timeout=240,
    )  # fmt: skip
    assert result.returncode == 11, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors[0].startswith("Error: rank 1: training diverged: the loss became nan"), result.stderr
    assert errors[1:] in (
        [],
        ["Error: stopped: another process of this run failed (its error line says why)"],
    )
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    # Rank 0 writes train.log: left in the all-reduce, it says so (unless torchrun stopped it first), not
    # in gloo's words ("Connection closed by peer [127.0.0.1]:50846 ... GLHF!").
    end = (train_env["out"] / "resnettiny-t1ce-ranknan" / "fold0" / "train.log").read_text().splitlines()[-1]
    assert " epoch 1/3 · " in end or end.endswith(" error: " + PEER_GONE), end
    next(sites, None)  # the fake site's clean-up


def _process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (Linux /proc), torchrun's ranks included: those run in sessions
    of their own, so the launcher's session does not hold them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # zombies are already gone
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    ("how", "code"),
    [("terminal Ctrl-C", 130), ("SIGTERM to the launcher", 143), ("SIGTERM to every process", 143)],
)
def test_a_stopped_multi_gpu_training_says_once_what_last_pt_holds(train_env, how, code):
    """Ctrl-C at the terminal (SIGINT to the launcher's process group) or a SIGTERM to the launcher alone
    (`kill PID`): torchrun stops its ranks, none is left training orphaned, and the user reads one line,
    rank 0's, saying which epoch last.pt holds; train.log says it too.  Ctrl-C reached torchrun and every
    rank twice over (the terminal's and torchrun's), which printed torchrun's traceback and warning and
    each rank's line; a SIGTERM killed the ranks silently (train.log just stopped).  A scheduler that
    signals every process of the job (SLURM's time limit) kills the ranks as they are: the launcher says
    it, once, with --resume."""
    import os
    import signal

    # Ctrl-C reaches a command run in a terminal's foreground; a batch script's `medcli train ... &` runs with
    # SIGINT ignored, and is stopped by SIGTERM (its ranks still get SIGINT: torchrun handles it, so they
    # start with SIGINT's default, not ignored).
    ctrl_c = how == "terminal Ctrl-C"
    sigint = signal.SIG_DFL if ctrl_c else signal.SIG_IGN
    proc, fold = training_with_a_checkpoint(
        train_env, "ddpstop", "--loss", "ce", "--multi_gpu", "--device", "cpu", "--nproc", "2",
        start_new_session=True,  # the launcher leads its process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )  # fmt: skip
    tree = _process_tree(proc.pid)  # the launcher, torchrun, the ranks
    assert len(tree) >= 4, tree
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the foreground process group
    elif how == "SIGTERM to the launcher":
        proc.terminate()
    else:
        for pid in tree:
            os.kill(pid, signal.SIGTERM)
    # The ranks share the launcher's stderr: orphaned, they held it open (training on) until their
    # rendezvous store timed out, over a minute later.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert "Traceback" not in err and "death signal" not in err
    if how == "SIGTERM to every process":
        assert errors == [
            "Error: terminated (SIGTERM); last.pt holds the last epoch the training finished (add --resume "
            "to the same command to continue from there)"
        ], err
    else:
        assert len(errors) == 1 and f"{fold / 'last.pt'} holds epoch " in errors[0], err
        assert (fold / "train.log").read_text().splitlines()[-1].endswith(errors[0].removeprefix("Error: "))
    deadline = time.time() + 10
    while (left := _alive(tree)) and time.time() < deadline:
        time.sleep(0.2)
    assert left == []


@pytest.mark.slow
def test_no_pretrained_reaches_the_ranks(train_env):
    """--no-pretrained was dropped on the way to the ranks (TOML has no null), so with the release's file
    present a from-scratch ablation silently started from pretrained weights."""
    from medcli.models import create_model
    from medcli.weights.manifest import load_manifest

    release = Path(train_env["env"]["MEDCLI_HOME"]) / "weights" / load_manifest().for_depth(10).file
    release.parent.mkdir(parents=True)
    backbone = {k: v for k, v in create_model(10).state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": backbone}, release)
    tiny = [a if a != "tiny" else "10" for a in train_env["tiny"]]
    result = run_medcli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *tiny, "--no-pretrained",
        "--loss", "ce", "--epochs", "1", "--max-steps", "1", "--multi_gpu", "--device", "cpu", "--nproc", "2",
        env=train_env["env"], timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (train_env["out"] / "resnet10-t1ce-ce" / "fold0" / "train.log").read_text()
    assert "--no-pretrained: training from random initialization" in log
    assert "Loading MedicalNet" not in log and "Loading MedicalNet" not in result.stderr
