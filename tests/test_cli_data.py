"""`medcli data synth` and `medcli data index` through the real CLI (stdout/stderr apart, exit codes)."""

from __future__ import annotations

import json

import pytest
from helpers_data import write_subject

SHAPE = "24,24,16"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small 2020-layout cohort made through the CLI itself."""
    from typer.testing import CliRunner

    from medcli.cli.app import app

    out = tmp_path_factory.mktemp("cli") / "data"
    result = CliRunner().invoke(app, ["data", "synth", str(out), "-n", "10", "--shape", SHAPE, "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_synth_json_summary_and_files(cohort):
    out, summary = cohort
    assert summary["n_subjects"] == 10 and summary["layout"] == "2020"
    assert summary["grades"]["HGG"] + summary["grades"]["LGG"] == 10 and summary["grades"]["LGG"] >= 2
    assert summary["shape"] == [24, 24, 16]
    assert len(list(out.glob("BraTS20_Training_*/BraTS20_Training_*_t1ce.nii.gz"))) == 10
    assert (out / "name_mapping.csv").is_file()


def test_synth_table_output_and_next_step_hint(cli, tmp_path):
    result = cli(
        "data", "synth", tmp_path / "c", "-n", "3", "--shape", SHAPE, "--layout", "csv", "--seed", "4"
    )
    assert result.exit_code == 0, result.output
    assert "Synthetic cohort" in result.stdout and "csv" in result.stdout
    assert "next: medcli data index" in result.stderr
    assert (tmp_path / "c" / "manifest.csv").is_file()


def test_synth_refuses_a_non_empty_folder(cli, cohort):
    out, _ = cohort
    result = cli("data", "synth", out, "-n", "2", "--shape", SHAPE)
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not an empty folder" in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "24,24"], "--shape"),
        (["--layout", "2017"], "unknown layout"),
        (["--lgg-fraction", "2"], "lgg-fraction"),
        (["--small", "--shape", "32,32,32"], "--small (64,64,48) and --shape 32,32,32 both set the size"),
    ],
)
def test_synth_bad_options(cli, tmp_path, args, message):
    result = cli("data", "synth", tmp_path / "x", "-n", "2", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x").exists()


def test_index_tables(cli, cohort):
    out, summary = cohort
    result = cli("data", "index", out, "--list")
    assert result.exit_code == 0, result.output
    for text in ("brats2020", "usable subjects", "t1ce", "BraTS20_Training_010", "Modalities"):
        assert text in result.stdout
    assert "Problems" not in result.stdout


def test_index_json_is_only_json(cli, cohort):
    out, summary = cohort
    result = cli("data", "index", out, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["layout"] == "brats2020" and data["n_subjects"] == 10
    assert data["grades"]["HGG"] == summary["grades"]["HGG"]
    assert data["problems"] == [] and len(data["subjects"]) == 10


def test_index_reports_problems_and_still_exits_zero(cli, tmp_path):
    root = tmp_path / "flat"
    write_subject(root, "good_case")
    write_subject(root, "bad_case", ("t1", "t1ce", "t2"))  # no flair
    result = cli("data", "index", root)
    assert result.exit_code == 0, result.output
    assert "missing flair" in result.stdout and "bad_case" in result.stdout
    data = json.loads(cli("data", "index", root, "--json").stdout)
    assert data["excluded"] == ["bad_case"] and data["problems"][0]["what"] == "missing flair"
    # Asking for t1ce only makes both usable.
    assert json.loads(cli("data", "index", root, "--modalities", "t1ce", "--json").stdout)["n_subjects"] == 2


def test_index_with_nothing_usable_is_a_data_error(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("data", "index", tmp_path / "empty")
    assert result.exit_code == 3
    assert "no BraTS subjects or CSV manifest found" in result.stderr

    root = tmp_path / "flat"
    write_subject(root, "only_case", ("t1ce",))
    result = cli("data", "index", root)
    assert result.exit_code == 3
    assert "missing t1" in result.stdout  # the problem table is printed before the error
    assert "no usable subject" in result.stderr


def test_index_of_brats2021_notes_missing_grades(cli, tmp_path):
    write_subject(tmp_path / "b21", "BraTS2021_00000")
    result = cli("data", "index", tmp_path / "b21")
    assert result.exit_code == 0
    assert "brats2021" in result.stdout and "prediction only" in result.stdout
    assert "no LGG/HGG grade" in result.stderr
