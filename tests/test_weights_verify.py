"""`medcli weights verify`: the real CLI on generated weights files; exit codes 0 / 4 / 5, tables, JSON."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers_models import medicalnet_file
from helpers_weights import manifest_entry, write_manifest

from medcli.models.synthetic import medicalnet_state_dict

SUMMARY_50 = (
    "318/320 keys loaded · missing 2 (fc.weight, fc.bias) · unexpected 0 · shape mismatches 0 · 46.16M params"
)


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    return medicalnet_file(tmp_path_factory, 50)


@pytest.fixture
def tiny_file(tmp_path_factory):
    return medicalnet_file(tmp_path_factory, "tiny")


def _one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_verify_resnet50_released_layout(cli, r50_file):
    result = cli("weights", "verify", r50_file)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert SUMMARY_50 in out
    for fact in (
        f"{r50_file.stat().st_size:,} bytes",
        "legacy pickle",
        "container state_dict",
        "prefix 'module.' stripped",
        "unknown release",
    ):
        assert fact in out, fact
    assert "ResNet-50 (from its keys)" in out
    assert "fc.weight, fc.bias" in out  # the missing-keys table
    # the per-layer table: layer3 of ResNet-50 has 114 entries, all loaded
    assert re.search(r"layer3\W+114\W+0\W+0\W+0\W+0", out)


def _site_releases(monkeypatch, tmp_path, *releases: tuple[str, int, object]) -> None:
    """A manifest whose releases (name, depth, file) are these generated files; the first is the default."""
    entries = [manifest_entry(name, f"{name}.pth", path, [], depth=depth) for name, depth, path in releases]
    manifest = write_manifest(tmp_path / "manifest.json", entries, default=releases[0][0])
    monkeypatch.setenv("MEDCLI_WEIGHTS_MANIFEST", str(manifest))


def test_verify_default_path_is_the_seeds(cli, r50_file, tmp_path, monkeypatch):
    _site_releases(monkeypatch, tmp_path, ("r50", 50, r50_file))
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "medicalnet_resnet50_3d.pth").symlink_to(r50_file)
    monkeypatch.chdir(tmp_path)
    result = cli("weights", "verify")
    assert result.exit_code == 0, result.output
    assert SUMMARY_50 in result.stdout


def test_verify_default_path_follows_depth(cli, tmp_path, tmp_path_factory, monkeypatch):
    """Without PATH, `--depth 10` checks the ResNet-10 release where `weights fetch resnet10` puts it."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDCLI_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    missing = cli("weights", "verify", "--depth", "10")
    assert missing.exit_code == 4
    line = _one_error_line(missing)
    assert (
        str(home / "weights" / "resnet_10_23dataset.pth") in line and "medcli weights fetch resnet10" in line
    )

    r10 = medicalnet_file(tmp_path_factory, 10)  # made the release, so its copy verifies
    _site_releases(monkeypatch, tmp_path, ("r50", 50, r10), ("resnet10", 10, r10))
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "resnet10.pth").symlink_to(r10)
    result = cli("weights", "verify", "--depth", "10")
    assert result.exit_code == 0, result.output
    assert "missing 2 (fc.weight, fc.bias)" in result.stdout

    none = cli("weights", "verify", "--depth", "tiny")  # no release of that depth: name a file
    assert none.exit_code == 2 and "no weights for depth tiny" in _one_error_line(none)


@pytest.mark.parametrize("damage", ["appended", "same size"])
def test_verify_of_the_release_copy_that_is_not_the_release_exits_4(
    cli, tmp_path, tmp_path_factory, monkeypatch, damage
):
    """Without PATH, verify checks the copy `list` reports and `train --pretrained-path auto` loads: one that
    is not the release (bytes appended, or changed at the same size) is corrupt, even if torch reads it."""
    r10 = medicalnet_file(tmp_path_factory, 10)
    monkeypatch.setenv("MEDCLI_HOME", str(tmp_path / "home"))
    _site_releases(monkeypatch, tmp_path, ("r50", 50, r10), ("resnet10", 10, r10))
    copy = tmp_path / "home" / "weights" / "resnet10.pth"
    copy.parent.mkdir(parents=True)
    data = bytearray(r10.read_bytes())
    if damage == "appended":
        data += b"\0" * 5000
    else:
        data[-8] ^= 1  # the low byte of a value near the end: still loads
    copy.write_bytes(data)
    named = cli("weights", "verify", copy, "--depth", "10")  # a file you name may be your own: it loads
    assert named.exit_code == 0, named.output
    if damage == "same size":  # ... with a clear word that it is not the release
        assert "but a different SHA-256: a modified or corrupt copy" in named.stderr

    result = cli("weights", "verify", "--depth", "10")
    assert result.exit_code == 4, result.output
    line = _one_error_line(result)
    assert f"{copy} is a corrupt copy of resnet10" in line and "medcli weights fetch resnet10" in line
    assert ("size" if damage == "appended" else "sha256") in line and result.stdout == ""
    listed = json.loads(cli("weights", "list", "--json").stdout)
    assert [r["local"]["state"] for r in listed if r["name"] == "resnet10"] == ["corrupt"]  # they agree
    shutil.copy(r10, copy)
    assert cli("weights", "verify", "--depth", "10").exit_code == 0


def test_verify_json_is_only_json(cli, r50_file):
    result = cli("weights", "verify", r50_file, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["ok"] is True and data["summary"] == SUMMARY_50
    assert data["counts"] == {
        "model_entries": 320,
        "file_entries": 318,
        "loaded": 318,
        "missing": 2,
        "unexpected": 0,
        "mismatched": 0,
        "ignored": 0,
    }
    assert data["missing"] == ["fc.weight", "fc.bias"] and data["params_total"] == 46_159_170
    assert data["model"] == {"depth": 50, "in_channels": 1, "num_classes": 2, "head": "linear"}
    assert len(data["sha256"]) == 64 and data["format"] == "legacy pickle"


def test_verify_tiny_with_four_channels_and_verbose_key_lists(cli, tiny_file, monkeypatch):
    from medcli.cli import console

    monkeypatch.setitem(console._state, "verbose", False)  # -v is sticky within one process
    quiet = cli("weights", "verify", tiny_file, "--depth", "tiny", "--in-channels", "4")
    assert quiet.exit_code == 0, quiet.output
    assert "conv1.weight adapted 1→4 channels (repeat, ×1/4)" in quiet.stdout
    assert "loaded keys" not in quiet.stdout
    result = cli("-v", "weights", "verify", tiny_file, "--depth", "tiny")
    assert result.exit_code == 0, result.output
    assert "loaded keys" in result.stdout and "layer4.0.conv2.weight" in result.stdout  # full lists with -v


def test_verify_missing_file_exits_4(cli, tmp_path):
    result = cli("weights", "verify", tmp_path / "absent.pth")
    assert result.exit_code == 4
    line = _one_error_line(result)
    assert "not found" in line and "absent.pth" in line and "medcli weights fetch" in line
    assert "check the path" in line  # a path you gave: first check it, not only "fetch"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"<html><body>Google Drive - Virus scan warning</body></html>", "web page"), (b"", "empty")],
)
def test_verify_unusable_file_exits_4(cli, tmp_path, content, needle):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    result = cli("weights", "verify", path, "--depth", "tiny")
    assert result.exit_code == 4
    line = _one_error_line(result)
    assert needle in line and "w.pth" in line and "medcli weights fetch" in line


def test_verify_truncated_file_exits_4(cli, tiny_file, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(tiny_file.read_bytes()[:-100])
    result = cli("weights", "verify", path, "--depth", "tiny")
    assert result.exit_code == 4
    assert "truncated or corrupt" in _one_error_line(result)


def test_verify_wrong_depth_exits_5_and_names_the_depth(cli, tmp_path_factory):
    r10 = medicalnet_file(tmp_path_factory, 10)
    result = cli("weights", "verify", r10, "--depth", "tiny")
    assert result.exit_code == 5
    line = _one_error_line(result)
    assert "ResNet-10 MedicalNet file" in line and "use --depth 10" in line


def test_verify_of_a_training_checkpoint_names_it_as_such(cli, tmp_path):
    """A medcli best.pt can seed another training, so verify reads it, and names it for what it is."""
    from helpers_predict import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "fold0" / "best.pt")
    result = cli("weights", "verify", ckpt)  # default --depth 50
    assert result.exit_code == 5
    line = _one_error_line(result)
    assert "is a tiny medcli checkpoint but the model is ResNet-50" in line and "use --depth tiny" in line
    assert cli("weights", "verify", ckpt, "--depth", "tiny").exit_code == 0


def test_verify_partial_backbone_exits_5_with_the_summary(cli, tmp_path):
    state = medicalnet_state_dict("tiny")
    del state["module.layer4.0.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    result = cli("weights", "verify", path, "--depth", "tiny")
    assert result.exit_code == 5
    assert "missing 3 (layer4.0.conv2.weight, fc.weight, fc.bias)" in result.stdout  # the report is printed
    assert "missing 3" in _one_error_line(result)


def test_verify_bad_depth_is_a_usage_error(cli, tiny_file):
    result = cli("weights", "verify", tiny_file, "--depth", "42")
    assert result.exit_code == 2
    assert "unknown model 'resnet42'" in _one_error_line(result)


def test_render_load_report_is_reusable(tiny_file, capsys):
    """`train` and `weights fetch` print the same summary through the same renderer."""
    from medcli.cli.weights import render_load_report
    from medcli.models import create_model, load_pretrained

    report = load_pretrained(create_model("tiny"), tiny_file)
    render_load_report(report, to_stderr=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert report.summary_line() in captured.err


@pytest.mark.slow
def test_verify_in_a_real_process(r50_file, medcli_proc):
    """Console-script path: real exit code, the report on stdout, nothing on stderr."""
    done = medcli_proc("weights", "verify", r50_file)
    assert done.returncode == 0, done.stderr
    assert SUMMARY_50 in done.stdout and done.stderr == ""


def test_verify_with_a_cosine_head_and_more_classes(cli, tiny_file):
    result = cli("weights", "verify", tiny_file, "--depth", "tiny", "--head", "cosine", "--num-classes", "3")
    assert result.exit_code == 0, result.output
    assert "missing 1 (fc.weight)" in result.stdout  # the cosine head has no bias


def test_verify_wrong_in_channels_exits_5_and_names_the_option(cli, tmp_path):
    from medcli.models.synthetic import write_medicalnet_checkpoint

    path = write_medicalnet_checkpoint(tmp_path / "w4.pth", "tiny", in_channels=4)
    result = cli("weights", "verify", path, "--depth", "tiny")
    assert result.exit_code == 5
    assert "use --in-channels 4" in _one_error_line(result)
    assert cli("weights", "verify", path, "--depth", "tiny", "--in-channels", "4").exit_code == 0
