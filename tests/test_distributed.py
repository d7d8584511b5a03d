"""--multi_gpu's DDP path with two real CPU processes (gloo) under torchrun."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_medcli

from medcli.engine.distributed import relaunch_command

pytest_plugins = ("helpers_train",)  # tiny_cohort, shared_cache, train_env


def test_relaunch_command_is_torchrun_of_medcli():
    cmd = relaunch_command(["train", "--fold", "0"], 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
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
    assert len((fold_dir / "train.log").read_text().splitlines()) == 2  # rank 0 alone writes

    splits = json.loads((fold_dir.parent / "splits.json").read_text())
    with open(fold_dir / "val_predictions.csv") as fh:
        predicted = [r["subject_id"] for r in csv.DictReader(fh)]
    # Every validation subject exactly once: the DistributedSampler's padded duplicate was dropped.
    assert sorted(predicted) == sorted(splits["folds"][0]["val"])
