"""`medcli train` from the command line: the seed's flags, bad inputs, the run directory, --json."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path

import pytest
import torch

pytest_plugins = ("helpers_train",)  # tiny_cohort, shared_cache, train_env

SEED_COMMAND = (
    "train --fold 0 --pretrained-path pretrained/medicalnet_resnet50_3d.pth --lr 2e-4 --batch_size 6 "
    "--epochs 60 --optimizer adam --loss LDAM --scheduler cosine --dropout 0.4 --grad_clip 0.5 "
    "--gradient_accumulation_steps 2 --ema_decay 0.999 --multi_gpu --gpu --amp"
).split()


def _parse(args: list[str]) -> dict:
    """Parse `medcli train ARGS` exactly as the CLI does, without running it."""
    from typer.main import get_command

    from medcli.cli.app import app

    train = get_command(app).commands["train"]
    return train.make_context("train", list(args)).params


def test_seed_command_line_parses_with_both_spellings():
    underscore = _parse(SEED_COMMAND[1:])
    hyphen = _parse([a.replace("_", "-") if a.startswith("--") else a for a in SEED_COMMAND[1:]])
    assert underscore == hyphen
    assert underscore["batch_size"] == 6 and underscore["gradient_accumulation_steps"] == 2
    assert underscore["ema_decay"] == 0.999 and underscore["grad_clip"] == 0.5
    assert underscore["multi_gpu"] and underscore["gpu"] and underscore["amp"] is True
    assert underscore["loss"] == "LDAM"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_seed_command_without_cuda_is_a_device_error(cli, train_env):
    result = cli(*SEED_COMMAND, "--data", train_env["data"], *train_env["tiny"])
    assert result.exit_code == 9, result.output
    assert "--gpu needs a CUDA GPU" in result.stderr
    assert not train_env["out"].exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--loss", "ldamm"], 2, "did you mean 'ldam'"),
        (["--optimizer", "adan"], 2, "unknown optimizer 'adan'"),
        (["--scheduler", "cosin"], 2, "did you mean 'cosine'"),
        (["--lr", "-1"], 2, "--lr must be a positive"),
        (["--batch-size", "0"], 2, "--batch-size must be a positive"),
        (["--epochs", "0"], 2, "--epochs must be a positive"),
        (["--fold", "2"], 2, "--fold 2 is outside 0..1"),
        (["--fold", "first"], 2, "not a fold number"),
        (["--depth", "51"], 2, "not a MedicalNet ResNet depth"),
        (["--resume"], 8, "nothing to resume"),
        (["--device", "cpu", "--amp", "--amp-dtype", "fp16"], 9, "fp16 needs a CUDA GPU"),
    ],
)
def test_bad_inputs_fail_before_any_work(cli, train_env, args, code, message):
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not list(train_env["out"].glob("*/fold*/*.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_exits_9(cli, train_env):
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], "--device", "cuda")
    assert result.exit_code == 9 and "needs a CUDA GPU" in result.stderr


def test_empty_data_root_is_a_data_error(cli, train_env, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("train", "--data", tmp_path / "empty", *train_env["tiny"])
    assert result.exit_code == 3, result.output
    assert "empty" in result.stderr


def test_first_run_without_data_says_how_to_get_some(cli, train_env, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDCLI_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here
    result = cli("train", *train_env["tiny"])
    assert result.exit_code == 3, result.output
    err = " ".join(result.stderr.split())
    assert "--data was not given and its default (data: $MEDCLI_DATA or ./data) does not exist" in err
    assert "`medcli data synth data/ --small`" in err


def test_class_absent_from_training_fold(cli, train_env, tmp_path):
    from medcli.data.synth import synth_cohort

    synth_cohort(tmp_path / "hgg_only", n_subjects=4, shape=(32, 32, 24), seed=1, lgg_fraction=0.0)
    result = cli("train", "--data", tmp_path / "hgg_only", *train_env["tiny"])
    assert result.exit_code == 3, result.output
    assert "no LGG subjects" in result.stderr


def test_a_scan_that_fails_preprocessing_stops_training_and_names_the_command_that_lists_all(
    cli, train_env, tmp_path
):
    """A NaN passes the header-only index, so training stops at preprocessing, naming the subject, and points
    to `data prepare` with this run's settings, which lists every such subject."""
    import shutil

    import nibabel as nib
    import numpy as np

    data = tmp_path / "nan_cohort"
    shutil.copytree(train_env["data"], data)
    scan = next(data.glob("*/*_t1ce.nii.gz"))
    img = nib.load(scan)
    voxels = np.asarray(img.dataobj).astype(np.float32)
    voxels[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(voxels, img.affine), scan)
    subject = scan.parent.name

    result = cli("train", "--data", data, "--out", train_env["out"], *train_env["tiny"])
    assert result.exit_code == 3, result.output
    assert subject in result.stderr and "NaN" in result.stderr
    command = f"medcli data prepare {data} --modalities t1ce --input-size 16,16,16"
    assert command in " ".join(result.stderr.split())
    assert not (train_env["out"] / "resnettiny-t1ce-ldam" / "fold0" / "last.pt").exists()

    listed = cli(*command.split()[1:])
    assert listed.exit_code != 0 and subject in listed.stdout + listed.stderr

    # Doing as told (removing the subject) trains: the split made before the stop was used by no fold.
    shutil.rmtree(scan.parent)
    again = cli("train", "--data", data, "--out", train_env["out"], *train_env["tiny"], "--max-steps", "1")
    assert again.exit_code == 0, again.output
    said = " ".join(again.stderr.split())
    assert "was made again: no fold has trained on it (the cohort changed since" in said
    # Once a fold has trained on it, a changed cohort is an error again.
    shutil.rmtree(sorted(p for p in data.iterdir() if p.is_dir())[0])
    changed = cli("train", "--data", data, "--out", train_env["out"], *train_env["tiny"], "--fold", "1")
    assert changed.exit_code == 3 and "the cohort changed since" in changed.stderr


def test_an_unwritable_cache_is_a_usage_error_before_any_work(cli, train_env, tmp_path, monkeypatch):
    """MEDCLI_CACHE naming a file: every subject was preprocessed, then blamed ('could not be preprocessed'),
    and the run's splits.json was left behind."""
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEDCLI_CACHE", str(blocker))
    result = cli("train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"])
    assert result.exit_code == 2, result.output
    assert f"MEDCLI_CACHE {blocker}: is a file, not a folder" in result.stderr
    assert not train_env["out"].exists()
    prepared = cli("data", "prepare", train_env["data"], "--cache", blocker, "--input-size", "16")
    assert prepared.exit_code == 2 and f"--cache {blocker}: is a file, not a folder" in prepared.stderr


def test_subjects_left_out_of_training_are_named(cli, train_env, tmp_path):
    """A subject discover sets aside (a truncated scan) is not trained on, and the log says so; one that
    does not look skull-stripped is trained on, with a warning."""
    import shutil

    data = tmp_path / "cut_cohort"
    shutil.copytree(train_env["data"], data)
    scan = sorted(data.glob("*/*_t1ce.nii.gz"))[-1]
    scan.write_bytes(scan.read_bytes()[:2000])
    import nibabel as nib
    import numpy as np

    noisy = sorted(data.glob("*/*_t1ce.nii.gz"))[0]  # and one whose air was not removed: kept, with a warning
    img = nib.load(noisy)
    voxels = np.asarray(img.dataobj).astype(np.float32)
    voxels[voxels == 0] = 3.0
    nib.save(nib.Nifti1Image(voxels, img.affine), noisy)
    result = cli("train", "--data", data, "--out", train_env["out"], *train_env["tiny"], "--max-steps", "1")
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    assert f"1 of 10 subjects left out of training (first: {scan.parent.name}: t1ce: truncated" in err
    assert f"`medcli data index {data}` lists each" in err
    assert f"1 subject(s) with scans unlike BraTS (first: {noisy.parent.name}: 100% of the voxels" in err
    assert f"`medcli data prepare {data} --modalities t1ce --input-size 16,16,16` lists them" in err


def test_config_file_unknown_key_and_override(cli, train_env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('loss = "ce"\nlearning_rate = 0.1\n')
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], "--config", bad)
    assert result.exit_code == 2 and "learning_rate" in result.stderr

    good = tmp_path / "good.toml"
    good.write_text('loss = "nonexistent"\nlr = -5.0\n')
    # The file's values are used unless a flag overrides them: --lr fixes one, the loss stays bad.
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], "--config", good, "--lr", "1e-3")
    assert result.exit_code == 2 and "unknown loss 'nonexistent'" in result.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ("epochs = 2.5", "epochs = 2.5 is not an integer"),
        ('lr = "fast"', "lr = 'fast' is not a number"),
        ("batch_size = true", "batch_size = True is not an integer"),
        ("ema_decay = [0.9]", "ema_decay = [0.9] is not a number"),
        ('deterministic = "yes"', "deterministic = 'yes' is not true or false"),
        ("modalities = [1, 2]", "modalities = [1, 2] is not a list or comma-separated text"),
        ("patience = 1.5", "patience = 1.5 is not an integer"),
    ],
)
def test_config_file_values_of_the_wrong_type_name_the_key(cli, train_env, tmp_path, line, message):
    """A TOML value of the wrong type is a usage error naming the key (it was a TypeError traceback from
    deep in training, or from validation comparing a float with a string)."""
    config = tmp_path / "typed.toml"
    config.write_text(f'loss = "ce"\n{line}\n')
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], "--config", config)
    assert result.exit_code == 2, result.output
    assert f"{config}: {message}" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output and not train_env["out"].exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe", "is not valid TOML"),  # not UTF-8: was a UnicodeDecodeError traceback
        (b"batch-size = 2\nbatch_size = 4\n", "sets batch_size twice (as batch_size too)"),
        (b"min_lr_ratio = -5\n", "min_lr_ratio must be in [0, 1]"),  # trained with a negative lr, exit 0
        (b'loss = "ldam"\nloss_options = {s = 5}\n', "--loss-opt s=... sets what --ldam-s sets for ldam"),
        (b'loss_options = "gamma=2"\n', "see `medcli train --help` for --loss-opt"),
    ],
)
def test_config_file_mistakes_are_one_usage_line(cli, train_env, tmp_path, content, message):
    config = tmp_path / "c.toml"
    config.write_bytes(content)
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], "--config", config)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not train_env["out"].exists()


def test_config_file_may_hold_other_commands_tables_and_not_be_a_folder(cli, train_env, tmp_path):
    config = tmp_path / "medcli.toml"
    config.write_text('[train]\nloss = "nonexistent"\n\n[eval]\nn_boot = 100\n')
    result = cli("train", "--data", train_env["data"], *train_env["tiny"], "--config", config)
    assert result.exit_code == 2 and "unknown loss 'nonexistent'" in result.stderr, result.output
    folder = cli("train", "--data", train_env["data"], *train_env["tiny"], "--config", tmp_path)
    assert folder.exit_code == 2 and f"--config {tmp_path} is a folder" in folder.stderr, folder.output


def test_config_file_takes_every_spelling_a_setting_has(cli, train_env, tmp_path):
    """Lists or text for modalities and input size, a table for loss options, "all" for fold."""
    config = tmp_path / "spelled.toml"
    config.write_text(
        'fold = "all"\nmodalities = ["t1ce"]\ninput_size = [16, 16, 16]\nloss = "focal"\n'
        "loss_options = {gamma = 2}\nwarmup_epochs = 0\nepochs = 1\nmax_steps = 1\n"
    )
    result = cli("train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
                 "--config", config, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [f["fold"] for f in json.loads(result.stdout)["folds"]] == [0, 1]


@pytest.mark.slow
def test_seed_recipe_runs_and_writes_the_run_directory(cli, train_env):
    """The seed's command on the CPU (minus --gpu/--multi_gpu/--amp) on the tiny model, 3 steps."""
    seed_cpu = [a for a in SEED_COMMAND if a not in ("--gpu", "--multi_gpu", "--amp")]
    result = cli(
        *seed_cpu,
        "--device",
        "cpu",
        "--data",
        train_env["data"],
        "--out",
        train_env["out"],
        *train_env["tiny"],
        "--max-steps",
        "3",
    )
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "Creating ResNet-tiny-3D model..." in err
    assert "Loading MedicalNet pretrained weights from: pretrained/medicalnet_resnet50_3d.pth" in err
    assert "random initialization" in err  # the file is absent here: warning, not failure
    assert "Model created: 0.23M total params, 0.23M trainable" in err
    # medcli's CPU kernels, in fp32 too (which ones depends on the CPU: fp32_kernels_here)
    from medcli.engine.cpu_kernels import describe, rewrite_for_cpu
    from medcli.models import create_model

    assert f"CPU fp32: {describe(rewrite_for_cpu(create_model('tiny'), bf16=False))}" in " ".join(err.split())
    run_dir = train_env["out"] / "resnettiny-t1ce-ldam"
    assert f"runresnettiny-t1ce-ldamin{run_dir}" in "".join(result.stdout.split())  # the summary's title
    assert f"Next: `medcli eval {run_dir}`" in " ".join(err.split())

    fold = train_env["out"] / "resnettiny-t1ce-ldam" / "fold0"
    for name in (
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "val_predictions.csv",
        "last.pt",
        "curves.png",
    ):
        assert (fold / name).is_file(), name
    assert (fold.parent / "splits.json").is_file()
    config = json.loads((fold / "config.json").read_text())
    assert config["lr"] == 2e-4 and config["batch_size"] == 2 and config["gradient_accumulation_steps"] == 2
    assert config["model"]["head"] == "cosine"  # LDAM pairs with a cosine classifier
    rows = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["global_step"] == 3
    with open(fold / "val_predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert list(preds[0]) == ["subject_id", "patient_id", "label", "p_hgg", "p_hgg_ema"]
    assert len(preds) == 5 and all(0.0 <= float(p["p_hgg_ema"]) <= 1.0 for p in preds)

    from medcli.engine.checkpoint import load_for_inference

    model, pre, meta = load_for_inference(fold / "last.pt")
    assert meta["weights"] == "ema" and meta["global_step"] == 3 and meta["fold"] == 0
    assert tuple(pre.input_size) == (16, 16, 16) and model.head_type == "cosine"

    # Same folder, other settings: refused before any work, with what to do.
    again = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"], "--lr", "1e-3",
        "--pretrained-path", "pretrained/medicalnet_resnet50_3d.pth",
    )  # fmt: skip
    assert again.exit_code == 2 and "different settings (lr)" in again.stderr and "--name" in again.stderr
    # Same settings without --resume: refused too (nothing is silently overwritten).
    same = cli(
        *seed_cpu,
        "--data",
        train_env["data"],
        "--out",
        train_env["out"],
        *train_env["tiny"],
        "--max-steps",
        "3",
    )
    assert same.exit_code == 2 and "--resume" in same.stderr
    # --resume --force: refused, not "force wins" (which deletes the checkpoint --resume asked to continue).
    before = (fold / "last.pt").read_bytes()
    both = cli(*seed_cpu, "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
               "--resume", "--force")  # fmt: skip
    assert both.exit_code == 2 and "--resume and --force contradict" in both.stderr
    assert (fold / "last.pt").read_bytes() == before
    # A damaged config.json is one line naming it and what to do, not a JSONDecodeError traceback.
    (fold / "config.json").write_text('{"lr": 2e-4, ')
    damaged = cli(*seed_cpu, "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
                  "--resume")  # fmt: skip
    assert damaged.exit_code == 2 and "Traceback" not in damaged.output
    assert f"{fold / 'config.json'} cannot be read" in " ".join(damaged.stderr.split())
    assert "--force" in damaged.stderr and (fold / "last.pt").read_bytes() == before


def test_starting_a_fold_over_removes_the_old_runs_files(tmp_path):
    """--force (a fresh start) leaves none of the old training's outputs to be mistaken for the new one's,
    curves.png included (it used to show the old curves until the first epoch ended)."""
    from medcli.engine.runs import FoldDir

    fd = FoldDir(tmp_path / "run", 0)
    fd.path.mkdir(parents=True)
    old = [
        "metrics.csv",
        "metrics.jsonl",
        "val_predictions.csv",
        "train.log",
        "best.pt",
        "last.pt",
        "curves.png",
    ]
    for name in old:
        (fd.path / name).write_text("old")
    fd.start({"lr": 1.0}, fresh=False)  # a resume keeps them
    assert all((fd.path / name).exists() for name in old)
    fd.start({"lr": 1.0}, fresh=True)
    assert not [name for name in old if (fd.path / name).exists()]
    assert json.loads(fd.config.read_text()) == {"lr": 1.0}


@pytest.mark.slow
def test_json_summary_only_json_on_stdout_for_all_folds(cli, train_env):
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--fold", "all", "--loss", "ce", "--epochs", "1", "--ema-decay", "0", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["run"] == "resnettiny-t1ce-ce"
    assert [f["fold"] for f in summary["folds"]] == [0, 1]  # --fold all: every fold, one shared split
    for fold in summary["folds"]:
        assert fold["epochs_run"] == 1 and fold["selection"] == "raw"
        assert os.path.isfile(fold["files"]["last.pt"])
    assert result.stderr.count("epoch 1/1") == 2
    # A line each fold repeats word for word shows once on the terminal; each fold's log keeps its own.
    assert result.stderr.count("Model created:") == 1
    for fold in summary["folds"]:
        assert "Model created:" in (Path(fold["files"]["last.pt"]).parent / "train.log").read_text()


def test_renderer_draws_progress_and_epoch_lines(monkeypatch, capsys):
    """The live bars (terminal) and the plain per-epoch line, driven by real event objects."""
    from medcli.cli import console
    from medcli.cli.train import Renderer
    from medcli.engine import events as ev

    monkeypatch.setattr(console, "progress_enabled", lambda: True)
    r = Renderer()
    r(ev.FoldStarted(0, "runs/x/fold0", 8, 2, 2, 0, 4, "cpu", "fp32"))
    assert r.progress is not None
    r(ev.EpochStarted(0, 2, 4))
    for b in range(1, 5):
        r(ev.BatchEnded(0, b, 4, 0.5, 1e-3, 3.0))
    assert r.progress.tasks[1].completed == 4
    r(ev.EpochEnded({"epoch": 0}, True, "epoch 1/2 · train_loss 0.5000"))
    assert r.progress.tasks[0].completed == 1
    r(ev.Warning("a [bracketed] warning"))
    r(ev.FoldFinished({}))
    assert r.progress is None
    err = capsys.readouterr().err
    assert "INFO: epoch 1/2 · train_loss 0.5000" in err and "a [bracketed] warning" in err
    one = ev.FoldStarted(0, "runs/x/fold0", 2, 2, 2, 0, 1, "cpu", "fp32").describe()
    assert (
        ", 1 batch/epoch on cpu" in one
        and ", 4 batches/epoch on"
        in ev.FoldStarted(0, "runs/x/fold0", 8, 2, 2, 0, 4, "cpu", "fp32").describe()
    )


@pytest.mark.slow
def test_pretrained_weights_load_with_the_seeds_log_lines(cli, train_env, tmp_path):
    """A MedicalNet-layout file (released format, module. prefix): the backbone loads, only fc is new."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    weights = write_medicalnet_checkpoint(tmp_path / "resnet_10.pth", depth=10)
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--depth", "10", "--pretrained-path", weights, "--require-pretrained", "--loss", "ce",
        "--max-steps", "1", "--epochs", "1", "--ema-decay", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert f"Loading MedicalNet pretrained weights from: {weights}" in err
    assert "Using checkpoint as state_dict (legacy pickle, 'module.' prefix stripped)" in err
    assert "keys loaded · missing 2 (fc.weight, fc.bias) · unexpected 0 · shape mismatches 0" in err
    assert "MedicalNet pretrained weights loaded successfully!" in err
    assert "Model created: 14.36M total params, 14.36M trainable" in err

    ckpt = torch.load(train_env["out"] / "resnet10-t1ce-ce" / "fold0" / "last.pt", weights_only=True)
    import hashlib

    assert ckpt["provenance"]["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.slow
def test_default_weights_follow_the_depth(cli, train_env, tmp_path):
    """No --pretrained-path: the release for --depth, where `medcli weights fetch resnet10` puts it."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    home_file = tmp_path / "home" / "weights" / "resnet_10_23dataset.pth"
    args = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"], "--depth",
            "10", "--loss", "ce", "--max-steps", "1", "--epochs", "1", "--ema-decay", "0"]  # fmt: skip
    absent = cli(*args, "--require-pretrained")
    assert absent.exit_code == 4
    assert str(home_file) in absent.stderr and "medcli weights fetch resnet10" in absent.stderr

    write_medicalnet_checkpoint(home_file, depth=10)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert f"Loading MedicalNet pretrained weights from: {home_file}" in result.stderr
    assert "MedicalNet pretrained weights loaded successfully!" in result.stderr
    config = json.loads((train_env["out"] / "resnet10-t1ce-ce" / "fold0" / "config.json").read_text())
    assert config["pretrained_path"] == str(home_file)  # the run records the file it started from

    tiny = cli("train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
               "--name", "tiny", "--max-steps", "1", "--epochs", "1")  # fmt: skip
    assert tiny.exit_code == 0, tiny.output
    assert "MedicalNet released no ResNet-tiny-3D weights: training from random initialization" in tiny.stderr


def test_folds_started_from_other_weights_are_flagged(cli, train_env, tmp_path):
    """Fold 0 from random init, fold 1 from a weights file: fold 1's log says the folds differ."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    weights = write_medicalnet_checkpoint(tmp_path / "tiny.pth", depth="tiny")
    base = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--name", "mixed", "--max-steps", "1", "--epochs", "1"]  # fmt: skip
    first = cli(*base, "--fold", "0", "--pretrained-path", weights)
    assert first.exit_code == 0, first.output
    again = cli(*base, "--fold", "1", "--pretrained-path", weights)
    assert again.exit_code == 0 and "not comparable" not in again.stderr  # same start: nothing to say

    changed = tmp_path / "other.pth"
    changed.write_bytes(weights.read_bytes())
    with open(changed, "ab") as fh:
        fh.write(b"\0")  # other bytes, so another SHA-256 (torch ignores trailing bytes of a legacy file)
    result = cli(*base, "--fold", "1", "--pretrained-path", changed, "--force")
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    assert "fold0 started from weights with SHA-256" in err and "the run's folds are not comparable" in err


def test_require_pretrained_missing_file_exits_4(cli, train_env):
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--pretrained-path", "nope.pth", "--require-pretrained",
    )  # fmt: skip
    assert result.exit_code == 4 and "nope.pth" in result.stderr


def test_amp_on_the_cpu_trains_in_bf16_and_warns_where_bf16_is_emulated(cli, train_env):
    from medcli.engine.speed import cpu_has_fast_bf16

    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--device", "cpu", "--amp", "--loss", "ce", "--max-steps", "1", "--epochs", "1", "--ema-decay", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "on cpu (bf16" in result.stderr
    # "CPU bf16: ..." or, where bf16 is native (channels_last then), "CPU bf16 + channels_last_3d: ..."
    assert ": fp32 stem, dilation-4 convs tap by tap, dilation-2 convs phase-batched" in result.stderr
    assert ("oneDNN emulates it" in result.stderr) is not cpu_has_fast_bf16()
    # The rewrite keeps the keys: the checkpoint is a plain model's, and eval loads it.
    fold = train_env["out"] / "resnettiny-t1ce-ce" / "fold0"
    plain = torch.load(fold / "last.pt", weights_only=True)["model"]
    from medcli.models import create_model

    assert list(plain) == list(create_model("tiny").state_dict())
    assert cli("eval", str(fold), "--json").exit_code == 0


def test_a_bad_medcli_fp32_kernels_fails_before_anything_is_written(cli, train_env, monkeypatch):
    monkeypatch.setenv("MEDCLI_FP32_KERNELS", "fast")
    result = cli("train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"])
    assert result.exit_code == 2
    assert "MEDCLI_FP32_KERNELS=fast is not one of all, onednn" in " ".join(result.stderr.split())
    assert not train_env["out"].exists()


@pytest.mark.slow
def test_compile_trains_like_eager_and_saves_plain_keys(cli, train_env):
    """--compile (torch.compile, inductor on CPU) is a real path: same loss as eager, clean checkpoint keys,
    and the checkpoint evaluates."""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = cli(
            "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--name", name, "--loss", "ce", "--epochs", "1", "--max-steps", "2", "--ema-decay", "0",
            "--dropout", "0", "--json", *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        # Python warnings raised in training are medcli's WARNING lines (and train.log's).
        assert "lru_cache" not in result.stderr, "Dynamo warned about a cached helper"
        fold = train_env["out"] / name / "fold0"
        losses[name] = json.loads((fold / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    ckpt = torch.load(fold / "last.pt", weights_only=True)
    assert not [k for k in ckpt["model"] if k.startswith("_orig_mod.")]
    result = cli("eval", str(fold), "--json")
    assert result.exit_code == 0, result.output


def _log(path: Path) -> list[tuple[datetime, str]]:
    """train.log as (time, text) pairs; every line must carry an ISO time with its UTC offset."""
    pairs = []
    for line in path.read_text().splitlines():
        stamp, text = line.split(" ", 1)
        when = datetime.fromisoformat(stamp)
        assert when.tzinfo is not None, line
        pairs.append((when, text))
    return pairs


def test_train_log_keeps_every_session_of_a_fold_with_times(cli, train_env, tmp_path):
    """What the terminal said (data, loss, model and weights, each epoch, the end) is in train.log with the
    time; a resumed session appends under its own header, --force starts the file over."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    weights = write_medicalnet_checkpoint(tmp_path / "tiny.pth", depth="tiny")
    base = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--name", "logged", "--loss", "ce", "--pretrained-path", weights]  # fmt: skip
    log_path = train_env["out"] / "logged" / "fold0" / "train.log"
    first = cli(*base, "--epochs", "2")
    assert first.exit_code == 0, first.output
    log = _log(log_path)
    texts = [t for _, t in log]
    assert texts[0].startswith("medcli ") and texts[0].endswith(" started")
    assert [w for w, _ in log] == sorted(w for w, _ in log)
    # Every INFO line the terminal showed is there, in the same order (the pretrained load report too).
    said = [line.removeprefix("INFO: ") for line in first.stderr.splitlines() if line.startswith("INFO: ")]
    logged = [t for t in said if t in texts]
    assert any("keys loaded" in t for t in logged) and any(t.startswith("epoch 2/2 ·") for t in logged)
    assert [t for t in texts if t in said] == logged and len(logged) >= len(said) - 1  # all but "Next: ..."
    assert texts[-1].startswith("Fold 0 finished after 2 epochs: best epoch ")

    resumed = cli(*base, "--epochs", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    again = [t for _, t in _log(log_path)]
    assert again[: len(texts)] == texts  # the first session is kept as it was
    assert again[len(texts)].endswith(" resumed") and any(t.startswith("epoch 3/3 ·") for t in again)
    assert any(t.startswith("Resuming from ") for t in again[len(texts) :])

    fresh = cli(*base, "--epochs", "1", "--force")
    assert fresh.exit_code == 0, fresh.output
    texts = [t for _, t in _log(log_path)]
    assert sum(t.endswith((" started", " resumed")) for t in texts) == 1 and texts[0].endswith(" started")
    assert not any(t.startswith("epoch 2/") for t in texts)

    # A log that cannot be written (here a folder in its place) is a warning; the training goes on.
    log_path.unlink()
    log_path.mkdir()
    unlogged = cli(*base, "--epochs", "2", "--resume")
    assert unlogged.exit_code == 0, unlogged.output
    assert f"WARNING: could not write {log_path}" in " ".join(unlogged.stderr.split())
    assert "epoch 2/2 ·" in unlogged.stderr and log_path.is_dir()


def test_a_warm_up_as_long_as_the_training_is_warned_about(cli, train_env):
    """--warmup-epochs 1 (the default) with --epochs 1: the schedule clamps the warm-up to the last step, so
    the lr rises all along and never decays; a WARNING says so and what to change.  A shorter warm-up, or a
    schedule without one, trains without it."""
    base = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"]]
    base += ["--loss", "ce", "--max-steps", "1"]
    r = cli(*base, "--name", "w1", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "WARNING: --warmup-epochs 1 spans the whole training (1 epoch)" in " ".join(r.stderr.split())
    assert "--warmup-epochs 0.1" in r.stderr
    for name, extra in (("w2", ["--warmup-epochs", "0.5"]), ("w3", ["--scheduler", "plateau"])):
        r = cli(*base, "--name", name, "--epochs", "1", *extra)
        assert r.exit_code == 0 and "spans the whole training" not in r.stderr, r.output


def test_a_diverging_training_stops_with_exit_11_and_saves_nothing_of_it(cli, train_env):
    """An absurd learning rate: NaN/Inf outputs stop the run before the epoch is saved; the log says why."""
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--name", "diverged", "--loss", "ce", "--lr", "1e6", "--epochs", "3",
    )  # fmt: skip
    assert result.exit_code == 11, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "lower --lr" in errors[0]
    fold = train_env["out"] / "diverged" / "fold0"
    assert not (fold / "last.pt").exists() and not (fold / "best.pt").exists()
    assert _log(fold / "train.log")[-1][1] == "error: " + errors[0].removeprefix("Error: ")


def test_a_nan_loss_stops_the_epoch_at_that_step():
    """Without fp16's GradScaler (which skips such steps) a non-finite loss ends training at once."""
    from torch.utils.data import DataLoader, TensorDataset

    from medcli.engine.trainer import Precision, TrainState, train_one_epoch
    from medcli.errors import Diverged
    from medcli.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny")
    x = torch.randn(4, 1, 16, 16, 16)
    x[3, 0, 8, 8, 8] = float("nan")  # the second batch's loss is NaN
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1, 0, 1])), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state, fp32 = TrainState(), Precision(amp_dtype=None, use_scaler=False, channels_last=False)
    with pytest.raises(Diverged, match=r"the loss became nan at step 2 \(lr 1.00e-02\)"):
        train_one_epoch(
            model, loader, torch.nn.CrossEntropyLoss(), optimizer, torch.amp.GradScaler("cpu", enabled=False),
            device=torch.device("cpu"), precision=fp32, state=state,
        )  # fmt: skip
    assert state.global_step == 1  # the first step ran; the NaN one stopped before updating any weight
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_python_warnings_in_training_become_medcli_warnings_in_the_log(cli, train_env):
    """A library's warning (here PyTorch's DataLoader, given more workers than this machine's cores) is a
    WARNING line once per session, and train.log keeps it: Python alone would print it to stderr only."""
    workers = (
        len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) + 1
    )
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--name", "warned", "--loss", "ce", "--epochs", "2", "--num-workers", str(workers),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = [line for line in result.stderr.splitlines() if "worker processes in total" in line]
    assert len(shown) == 1 and shown[0].startswith("WARNING: UserWarning: This DataLoader will create")
    logged = [
        t for _, t in _log(train_env["out"] / "warned" / "fold0" / "train.log") if "worker processes" in t
    ]
    assert len(logged) == 1 and logged[0].startswith("warning: UserWarning: This DataLoader will create")


def test_resuming_a_complete_fold_trains_nothing_and_changes_nothing(cli, train_env):
    """A fold that stopped early (or ran all its epochs) is complete: --resume, as `--fold all --resume` gives
    every fold before the one it continues, says so and leaves last.pt, the metrics and config.json alone.
    Before, an early-stopped fold trained one more epoch on each resume."""
    base = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--name", "stopped", "--loss", "ce", "--patience", "1"]  # fmt: skip
    first = cli(*base, "--epochs", "6")
    assert first.exit_code == 0, first.output
    # 6 epochs of strictly rising AUC on 5 validation scans would be needed to run them all.
    assert "Early stopping: no validation AUC gain for 1 epoch" in first.stderr, first.stderr
    fold = train_env["out"] / "stopped" / "fold0"
    files = (
        "last.pt",
        "best.pt",
        "metrics.jsonl",
        "metrics.csv",
        "config.json",
        "val_predictions.csv",
        "curves.png",
    )
    before = {name: (fold / name).read_bytes() for name in files}
    done = len((fold / "metrics.jsonl").read_text().splitlines())
    assert done < 6

    again = cli(*base, "--epochs", "6", "--resume", "--json")
    assert again.exit_code == 0, again.output
    said = " ".join(again.stderr.split())
    assert f"Fold 0 is complete: it stopped early after epoch {done}" in said, said
    assert "--patience 1; a larger one continues it" in said
    assert not any(line.startswith("INFO: epoch ") for line in again.stderr.splitlines())
    assert {name: (fold / name).read_bytes() for name in files} == before
    summary = json.loads(again.stdout)
    assert summary["folds"][0]["epochs_run"] == done and summary["folds"][0]["stopped_early"] is True

    # Fewer --epochs than were trained: nothing to do either, and config.json still says what was trained.
    fewer = cli(*base, "--epochs", str(done - 1) if done > 1 else "1", "--resume")
    assert fewer.exit_code == 0, fewer.output
    assert "Fold 0 is complete: " in fewer.stderr and f"--epochs above {done} continues it" in " ".join(
        fewer.stderr.split()
    )
    assert {name: (fold / name).read_bytes() for name in files} == before

    # A larger --patience continues the fold.
    more = cli(*base[:-1], "9", "--epochs", "6", "--resume")
    assert more.exit_code == 0, more.output
    assert f"epoch {done + 1}/6 ·" in more.stderr


def test_resuming_with_more_epochs_respreads_the_schedule_and_says_so(cli, train_env):
    """--epochs 4 on a fold trained with 2: the cosine schedule now spans 4 epochs from the current step (the
    lr rises again) and a warning says so, with the lr the next step uses."""
    from medcli.engine.optim import warmup_cosine

    base = ["train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--name", "longer", "--loss", "ce", "--lr", "1e-3"]  # fmt: skip
    first = cli(*base, "--epochs", "2")
    assert first.exit_code == 0, first.output
    rows = [json.loads(x) for x in (train_env["out"] / "longer/fold0/metrics.jsonl").read_text().splitlines()]
    steps = rows[-1]["global_step"]
    per_epoch = steps // 2
    resumed = cli(*base, "--epochs", "4", "--resume")
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.stderr.split())
    expected = 1e-3 * warmup_cosine(4 * per_epoch, per_epoch, 0.01)(steps)
    assert (
        f"WARNING: --epochs 4 where this fold started with 2: the cosine schedule now spans 4 epochs, so the "
        f"lr goes on at {expected:.2e} (was {rows[-1]['lr']:.2e})"
    ) in said, said
    assert expected > 10 * rows[-1]["lr"]  # the lr really rose again: the schedule was re-spread
    after = [
        json.loads(x) for x in (train_env["out"] / "longer/fold0/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in after] == [0, 1, 2, 3]
    assert after[2]["lr"] == pytest.approx(
        1e-3 * warmup_cosine(4 * per_epoch, per_epoch, 0.01)(steps + per_epoch)
    )


def test_a_run_on_a_relative_data_path_is_evaluated_from_anywhere(cli, train_env, tmp_path, monkeypatch):
    """config.json and the checkpoints hold the data's absolute path: `eval --recompute` from another working
    directory finds it (a relative "data" was looked up under the new cwd).  Data that moved since is a
    one-line error naming --data, which then points eval at the new place."""
    relative = os.path.relpath(train_env["data"], tmp_path)
    trained = cli("train", "--data", relative, "--out", "runs", *train_env["tiny"], "--name", "rel",
                  "--loss", "ce", "--epochs", "1")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    fold = tmp_path / "runs" / "rel" / "fold0"
    assert json.loads((fold / "config.json").read_text())["data"] == str(train_env["data"])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ("eval", fold, "--recompute", "--n-boot", "0", "--no-plots", "--json")
    scored = cli(*args)
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["folds"][0]["source"] == "recomputed"

    checkpoint = torch.load(fold / "best.pt", weights_only=True)  # as if the cohort had moved since
    checkpoint["config"]["data"] = str(tmp_path / "moved-away")
    (fold / "best.pt").unlink()
    torch.save(checkpoint, fold / "best.pt")
    moved = cli(*args)
    assert moved.exit_code == 3, moved.output
    assert f"is not at {tmp_path / 'moved-away'} any more" in " ".join(moved.stderr.split())
    assert "pass --data" in moved.stderr
    assert cli(*args, "--data", train_env["data"]).exit_code == 0


@pytest.mark.slow
def test_a_fold_in_training_is_not_trained_twice_at_once(train_env, tmp_path):
    """Two trainings of one fold (a SLURM array repeating a fold, a command started twice) would interleave
    checkpoints and metrics, or wipe them under --force: the second real process is refused at once,
    while another fold of the same run trains beside it."""
    from conftest import run_medcli

    from medcli.engine.runs import FoldDir

    out = train_env["out"]
    args = ("train", "--data", train_env["data"], "--out", out, *train_env["tiny"], "--max-steps", "1")
    run_root = out / "resnettiny-t1ce-ldam"
    with FoldDir(run_root, 0).exclusive():  # this process is "the first training" of fold 0
        for extra in ((), ("--force",)):
            second = run_medcli(*args, "--fold", "0", *extra, env=train_env["env"])
            assert second.returncode == 2, second.stderr
            assert f"fold 0 of {run_root} is being trained by another medcli process (pid {os.getpid()})" in (
                " ".join(second.stderr.split())
            )
            assert not (run_root / "fold0").exists()
        other_fold = run_medcli(*args, "--fold", "1", env=train_env["env"])
        assert other_fold.returncode == 0, other_fold.stderr
    done = run_medcli(*args, "--fold", "0", env=train_env["env"])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in run_root.iterdir()) == ["fold0", "fold1", "splits.json"]  # no lock left


def test_a_training_that_fails_early_leaves_no_empty_run_folder(cli, train_env):
    r = cli("train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--require-pretrained", "--pretrained-path", "nowhere.pth")  # fmt: skip
    assert r.exit_code == 4, r.stderr
    assert not train_env["out"].exists()  # neither the run's folder nor a new --out


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("a/b", "not a plain folder name"),
        ("../up", "not a plain"),
        (".hidden", "not a plain"),
        ("", "is empty"),
    ],
)
def test_a_run_name_that_is_not_a_folder_name_is_refused_before_anything(cli, train_env, name, error):
    r = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"], "--name", name
    )
    assert r.exit_code == 2 and error in r.stderr
    assert not train_env["out"].exists() and not (train_env["out"].parent / "up").exists()


@pytest.mark.slow
def test_a_compile_failure_is_one_line_and_the_fold_starts_over_without_it(train_env):
    """--compile on a machine without a C++ compiler (a slim container): one line, exit 9, the same in
    train.log; the same command without --compile then trains the fold, no --force needed."""
    from conftest import run_medcli

    args = _one_step(train_env)
    failed = run_medcli(*args, "--compile", env={**train_env["env"], "CXX": "/nonexistent/g++"})
    assert failed.returncode == 9, failed.stderr
    assert "Traceback" not in failed.stderr
    (line,) = [ln for ln in failed.stderr.splitlines() if ln.startswith("Error:")]
    assert "--compile: torch.compile could not compile the model: InvalidCxxCompiler" in line
    log = (train_env["out"] / "resnettiny-t1ce-ldam" / "fold0" / "train.log").read_text().splitlines()
    assert "error: --compile: torch.compile could not compile the model" in log[-1]
    again = run_medcli(*args, env=train_env["env"])
    assert again.returncode == 0, again.stderr


def test_brats_2023_modality_names_train(cli, train_env):
    """--modalities t1c,t2f (BraTS 2023's names) are t1ce,flair: discovery found the files, but
    preprocessing looked for "t1c" and failed every subject."""
    r = cli("train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
            "--modalities", "t1c,t2f", "--max-steps", "1", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    (fold,) = json.loads(r.stdout)["folds"]
    assert Path(fold["run_dir"]).parent.name == "resnettiny-t1ce+flair-ldam"
    assert json.loads((Path(fold["run_dir"]) / "config.json").read_text())["modalities"] == ["t1ce", "flair"]


def test_an_input_size_that_leaves_one_voxel_is_refused_and_the_smallest_that_does_not_trains(cli, train_env):
    """At 8³ layer3/layer4 work on one voxel: a batch of one (--batch-size 1, or an epoch's last) made
    BatchNorm raise mid-epoch with a traceback.  Refused up front; 9³ (2³ there) trains at batch 1."""
    base = (
        "train",
        "--data",
        train_env["data"],
        "--out",
        train_env["out"],
        "--depth",
        "tiny",
        "--folds",
        "2",
    )
    r = cli(*base, "--input-size", "8", "--batch-size", "1", "--num-workers", "0")
    assert r.exit_code == 2 and "leaves the ResNet's last stages one voxel" in " ".join(r.stderr.split())
    assert not train_env["out"].exists()
    r = cli(*base, "--input-size", "9", "--batch-size", "1", "--num-workers", "0", "--max-steps", "2")
    assert r.exit_code == 0, r.stderr


def test_a_frozen_backbone_is_the_pretrained_function_itself(cli, train_env, tmp_path):
    """--freeze-backbone-epochs: the frozen epochs train the head alone.  BatchNorm layers stay in eval
    mode then, so their running statistics are the pretrained ones afterwards (in train mode every batch
    overwrote them, and the head learned on batch-normalised features it would never see again)."""
    from medcli.models.synthetic import write_medicalnet_checkpoint

    weights = write_medicalnet_checkpoint(tmp_path / "resnet_tiny.pth", depth="tiny")
    result = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"],
        "--pretrained-path", weights, "--require-pretrained", "--loss", "ce", "--ema-decay", "0",
        "--epochs", "1", "--freeze-backbone-epochs", "1", "--lr", "1e-2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    released = torch.load(weights, weights_only=True)["state_dict"]
    released = {k.removeprefix("module."): v for k, v in released.items()}
    trained = torch.load(train_env["out"] / "resnettiny-t1ce-ce" / "fold0" / "last.pt", weights_only=True)[
        "model"
    ]
    backbone = [k for k in trained if not k.startswith("fc.") and k in released]
    assert any(k.endswith("running_mean") for k in backbone)
    for key in backbone:
        assert torch.equal(trained[key], released[key]), key


def test_a_fold_trained_with_another_recipe_than_its_run_is_warned_about(cli, train_env):
    """eval pools a run's folds and predict ensembles them: a fold with another lr is another recipe (a
    warning); another --epochs or --max-steps is only how long it ran (none)."""
    base = _one_step(train_env)
    assert cli(*base, "--fold", "0").exit_code == 0
    r = cli(*base, "--fold", "1", "--epochs", "3")
    assert r.exit_code == 0, r.stderr
    assert "trained with other settings" not in r.stderr
    r = cli(*base, "--fold", "1", "--lr", "1e-3", "--force")
    assert r.exit_code == 0, r.stderr
    assert "fold0 of this run was trained with other settings (lr 0.0002 → 0.001)" in " ".join(
        r.stderr.split()
    )


def test_train_says_what_discovery_passed_over(cli, train_env, tmp_path):
    """A subject's scan lying beside the subject folders is in no subject: training says so (as
    `data index` does) instead of training on one subject fewer without a word."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(train_env["data"], data)
    first = sorted(d for d in data.iterdir() if d.is_dir())[0]
    shutil.copy(next(first.glob("*_t1ce.nii.gz")), data / "BraTS20_Training_999_t1ce.nii.gz")
    r = cli("train", "--data", data, "--out", train_env["out"], *train_env["tiny"], "--max-steps", "1")
    assert r.exit_code == 0, r.stderr
    assert "left out 1 file(s) lying beside the subject folders (BraTS20_Training_999_t1ce.nii.gz)" in (
        " ".join(r.stderr.split())
    )


def _one_step(train_env: dict) -> tuple:
    """`medcli train` of the tiny model on the tiny cohort, for one optimiser step."""
    return (
        "train",
        "--data",
        train_env["data"],
        "--out",
        train_env["out"],
        *train_env["tiny"],
        "--max-steps",
        "1",
    )


def test_multi_gpu_on_one_device_trains_here_as_a_plain_run_does(cli, train_env):
    """--multi-gpu with one device warns and trains in this process through the same loop as a plain run:
    `--fold all --resume` continues fold 0 and starts fold 1 (the one-device path had a loop of its own
    that resumed every fold, and refused fold 1: "nothing to resume")."""
    base = (*_one_step(train_env), "--multi-gpu", "--device", "cpu", "--nproc", "1")
    assert cli(*base, "--fold", "0").exit_code == 0
    r = cli(*base, "--fold", "all", "--resume", "--max-steps", "2", "--json")
    assert r.exit_code == 0, r.stderr
    assert "--multi-gpu: only 1 device(s); training in one process on cpu" in r.stderr
    folds = json.loads(r.stdout)["folds"]
    assert [Path(f["run_dir"]).name for f in folds] == ["fold0", "fold1"]
    assert [f["global_step"] for f in folds] == [2, 2]


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_a_usage_error_everywhere(cli, train_env, tmp_path, seed):
    """numpy's generator takes seeds in 0..2**32-1: --seed -1 ended train and eval in a ValueError
    traceback (torch's overflow for larger ones), data synth too."""
    r = cli(
        "train", "--data", train_env["data"], "--out", train_env["out"], *train_env["tiny"], "--seed", seed
    )
    assert r.exit_code == 2 and f"--seed must be in 0..4294967295, got {seed}" in r.stderr, r.output
    config = tmp_path / "seed.toml"
    config.write_text(f"seed = {seed}\n")
    r = cli("train", "--data", train_env["data"], "--out", train_env["out"], "--config", config)
    assert r.exit_code == 2 and "--seed must be in 0..4294967295" in r.stderr, r.output
    for command in (("eval", tmp_path), ("data", "synth", "-n", "2", tmp_path / "cohort")):
        r = cli(*command, "--seed", seed)
        assert r.exit_code == 2 and "Invalid value for '--seed'" in r.output, r.output
    assert not train_env["out"].exists() and not (tmp_path / "cohort").exists()


def test_starting_from_a_checkpoint_that_saw_this_folds_validation_patients_warns(cli, train_env):
    """--pretrained-path to a medcli checkpoint of the same cohort: fold 0's model trained on fold 1's
    validation patients, so fine-tuning it on fold 1 gives optimistic validation metrics; it loaded
    silently ("73/73 keys loaded").  The same fold of the same split saw none of them: no warning."""
    base = _one_step(train_env)
    assert cli(*base, "--fold", "0").exit_code == 0
    start = train_env["out"] / "resnettiny-t1ce-ldam" / "fold0" / "last.pt"
    r = cli(*base, "--fold", "1", "--name", "leaky", "--pretrained-path", start)
    assert r.exit_code == 0, r.stderr
    assert (
        f"WARNING: the starting weights {start} (fold 0 of a medcli run) were trained on 5 of this fold's 5 "
        "validation patients: this fold's validation metrics, and the best.pt chosen on them, will be "
        "optimistic" in " ".join(r.stderr.split())
    )
    assert "Starting weights loaded: a medcli checkpoint (fold 0 of its run)" in r.stderr
    assert "MedicalNet pretrained weights loaded" not in r.stderr
    r = cli(*base, "--fold", "0", "--name", "clean", "--pretrained-path", start)
    assert r.exit_code == 0, r.stderr
    assert "starting weights" not in r.stderr
