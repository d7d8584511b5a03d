"""Training with loss options, a loss plugin, and a partly matching weights file — real tiny trainings."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

pytest_plugins = ["tests.helpers_train"]


def _read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_with_the_poly1_plugin_and_loss_options(cli, train_env):
    """The example plugin (installed by `make install`) is used for real optimiser steps via --loss."""
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--loss", "poly1", "--loss-opt", "epsilon=2", "--epochs", "1", "--ema-decay", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fold = train_env["out"] / "resnettiny-t1ce-poly1" / "fold0"
    config = json.loads((fold / "config.json").read_text())
    assert config["loss"] == "poly1" and config["loss_options"] == {"epsilon": 2}
    assert "Loss: " in result.stderr and "2" in result.stderr.split("Loss: ", 1)[1].splitlines()[0]
    rows = _read_metrics(fold)
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))
    ckpt = torch.load(fold / "last.pt", weights_only=True)
    assert ckpt["global_step"] >= 1


def test_unknown_loss_option_is_a_usage_error(cli, train_env):
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--loss", "focal", "--loss-opt", "gamme=2", "--epochs", "1",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "gamme" in result.stderr and "gamma" in result.stderr


@pytest.fixture
def partial_weights(tmp_path):
    """A ResNet-10 MedicalNet file with layer4 removed: most of the backbone matches, not all of it."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    path = write_medicalnet_checkpoint(tmp_path / "resnet_10.pth", depth=10)
    state = torch.load(path, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if ".layer4." not in k}
    torch.save(state, path)
    return path


def test_partial_pretrained_load_warns_or_fails_when_required(cli, train_env, partial_weights):
    base = [
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"], "--depth", "10",
        "--pretrained-path", partial_weights, "--loss", "ce", "--max-steps", "1", "--epochs", "1",
        "--ema-decay", "0",
    ]  # fmt: skip
    strict = cli(*base, "--require-pretrained")
    assert strict.exit_code == 5, strict.output
    assert "did not load completely" in strict.stderr
    lenient = cli(*base, "--force")
    assert lenient.exit_code == 0, lenient.output
    assert "did not load completely" in lenient.stderr
    assert "loaded successfully" not in lenient.stderr
