"""The CLI surface: help for every command, no torch at help time, errors as one line + exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from medcli.errors import EXIT_CODES, DataError, MedcliError


def _all_command_paths():
    from typer.main import get_command

    from medcli.cli.app import app

    def walk(cmd, prefix):
        yield prefix
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*prefix, name])

    return list(walk(get_command(app), []))


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "medcli")
def test_every_command_has_help(cli, path):
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize("args", [["--help"], ["weights", "--help"]])
def test_help_does_not_import_torch(args):
    code = (
        "import sys\n"
        "from medcli.cli.app import main\n"
        f"sys.argv = ['medcli', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_version(cli):
    from medcli import __version__

    result = cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_exit_codes_are_distinct_and_documented():
    import medcli.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, MedcliError)]
    for c in classes:
        assert c.exit_code in EXIT_CODES, c
    assert DataError("x").exit_code == 3


def test_medcli_error_becomes_one_line_and_exit_code(monkeypatch):
    """A MedcliError raised inside any command is rendered by the root group, not as a traceback."""
    import typer
    from typer.testing import CliRunner

    from medcli.cli.app import MedcliGroup

    app = typer.Typer(cls=MedcliGroup)

    @app.command()
    def boom():
        raise DataError("scan.nii.gz has NaN voxels", hint="fix the file or drop the subject")

    @app.command()
    def other():
        pass

    result = CliRunner().invoke(app, ["boom"])
    assert result.exit_code == 3
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "NaN voxels" in lines[0] and "fix the file" in lines[0]


def test_user_text_is_printed_as_given_not_as_emoji(cli, tmp_path):
    """Rich turned `:x:` into ❌: `--device cuda:x` was reported as `cuda❌`; a scan named `a:x:b` too."""
    r = cli("bench", "--device", "cuda:x")
    assert r.exit_code == 2 and "--device cuda:x: not a device" in r.stderr and "❌" not in r.stderr
    from medcli.cli import console

    for printer in (console.out, console.err):
        with printer.capture() as captured:
            printer.print("case:x:1 :smile:")
        assert captured.get().strip() == "case:x:1 :smile:"


def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source(cli):
    # `weights verify`'s docstring wraps its second paragraph at 110 columns in the source; on a wide
    # terminal that paragraph must come out as one line, not broken where the source broke it.
    result = cli("weights", "verify", "--help", env={"COLUMNS": "300"})
    assert result.exit_code == 0
    lines = [line.strip() for line in result.output.splitlines()]
    assert any(line.startswith("Exit 0 when") and line.endswith("full key lists.") for line in lines), (
        result.output
    )


def test_reflow_joins_lines_within_paragraphs_only():
    from medcli.cli.app import reflow

    doc = """First line
        goes on.

        Second paragraph
        also."""
    assert reflow(doc) == "First line goes on.\n\nSecond paragraph also."


_FAULTS = """
import resource, sys
from medcli.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "on" else False)
import torch

def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(n)  # written: every page touched
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# 256 MB at a time, as a training loop allocates: glibc's heap settles after a few rounds (PyTorch's
# 64-byte aligned blocks leave small remainders), then kept memory is reused; returned memory always
# faults in anew.
for _ in range(12):
    faults(64 << 20)
print(faults(64 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensor_memory_is_reused_not_faulted_in_again():
    env = {k: v for k, v in os.environ.items() if k != "MEDCLI_KEEP_FREED_MEMORY"}

    def run(mode: str, **extra: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0], int(out[1])

    applied, kept = run("on")
    _, returned = run("off")
    assert applied == "True"
    assert returned > 16_000  # 256 MB in 4 KB pages is 65,536 (fewer where huge pages serve some)
    assert kept < returned / 20
    assert run("on", MEDCLI_KEEP_FREED_MEMORY="0")[0] == "False"  # the opt-out


def _leaf_commands():
    from typer.main import get_command

    from medcli.cli.app import app

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if not subs:
            yield prefix, cmd
        for name, sub in (subs or {}).items():
            yield from walk(sub, [*prefix, name])

    return list(walk(get_command(app), []))


@pytest.mark.parametrize("columns", [80, 100, 120])
@pytest.mark.parametrize(
    "path,command", _leaf_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_help_shows_every_option_name_uncut(cli, path, command, columns):
    # Underscore spellings are accepted, not declared (MedcliCommand): declared, they doubled the width of
    # the names column and `train --help` cut names even at 140 columns.  Where typer's rich layout would
    # still cut names (train at 80 and 100 columns), the plain layout is used.
    result = cli(*path, "--help", env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and all(len(line) <= columns for line in result.output.splitlines())
    assert "\\[" not in result.output  # rich markup's escape, shown as is by the plain layout
    names = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    missing = [n for n in names if n not in result.output.replace("│", " ").split()]
    assert not missing, f"cut or missing in `medcli {' '.join(path)} --help`: {missing}\n{result.output}"


def test_long_options_take_underscores_as_dashes():
    from medcli.cli.app import dashed_options

    known = {"--batch-size", "--grad-clip", "--name"}
    args = [
        "--batch_size",
        "6",
        "--grad_clip=0.5",
        "--name",
        "--my_run",
        "--other_thing",
        "--",
        "--batch_size",
    ]
    assert dashed_options(args, known) == [
        "--batch-size",
        "6",
        "--grad-clip=0.5",
        "--name",
        "--my_run",
        "--other_thing",
        "--",
        "--batch_size",
    ]


def test_underscore_spellings_work_on_every_command_and_unknown_ones_still_fail(cli, tmp_path):
    out = tmp_path / "d"
    ok = cli(
        "data", "synth", str(out), "--subjects", "4", "--small", "--lgg_fraction", "0.5", "--label_noise", "0"
    )
    assert ok.exit_code == 0, ok.output
    assert len([p for p in out.rglob("*.nii.gz")]) > 0
    bad = cli("data", "synth", str(tmp_path / "e"), "--no_such_option", "1")
    assert bad.exit_code == 2
    assert "--no_such_option" in bad.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["predict", "scan.nii.gz", "--saliency", "{file}"], "--saliency"),
        (["predict", "scan.nii.gz", "--csv", "{file}/p.csv"], "--csv"),
        (["predict", "scan.nii.gz", "--csv", "{folder}"], "--csv"),
        (["eval", "run", "--out", "{file}"], "--out"),
        (["eval", "run", "--out", "{file}/sub"], "--out"),
        (["train", "--data", "{folder}", "--out", "{file}"], "--out"),
        (["data", "synth", "{file}/cohort", "--small"], "OUT"),
        (["weights", "fetch", "--dest", "{file}/w.pth"], "--dest"),
    ],
    ids=lambda v: " ".join(v[:3]) if isinstance(v, list) else None,
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(cli, tmp_path, args, option):
    """A file where an output folder should go (or a folder where a file should): one line naming the
    option, exit 2, before a model, scan or download is touched; these were OSError tracebacks, some after
    a whole batch had been predicted."""
    in_the_way = tmp_path / "in-the-way"
    in_the_way.write_text("not a folder")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    before = sorted(tmp_path.rglob("*"))
    result = cli(*[a.format(file=in_the_way, folder=folder) for a in args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {option} "), result.stderr
    assert "Traceback" not in result.output and sorted(tmp_path.rglob("*")) == before


class _WorkerKillsItself(torch.utils.data.Dataset):
    """What the kernel's out-of-memory killer does to a DataLoader worker: SIGKILL, no Python exception."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return i


def test_a_killed_data_loading_worker_is_one_line_with_what_to_lower():
    from medcli.cli.app import known_failure

    with pytest.raises(RuntimeError) as caught:
        list(torch.utils.data.DataLoader(_WorkerKillsItself(), num_workers=1))
    line = known_failure(caught.value, "train")
    assert line is not None and "data-loading worker (pid" in line and "ran out of memory" in line
    assert "--num-workers" in line and "\n" not in line
    assert known_failure(RuntimeError("DataLoader timed out after 5 seconds"), "train") is None
