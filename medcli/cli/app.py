"""The root ``medcli`` command: global options, command groups, and the error boundary.

Each command module exposes ``register(root)`` and is imported here; none of them imports torch at
module level.  ``MedcliGroup.invoke`` is the single place where a ``MedcliError`` becomes one red line on
stderr and an exit code (the same path for the console script and for ``CliRunner`` tests).
"""

from __future__ import annotations

import inspect
import os
import signal
import sys

import typer
from typer.core import TyperCommand, TyperGroup

from medcli import __version__, pywarnings, switches
from medcli.allocator import keep_freed_memory
from medcli.cli import console
from medcli.errors import (
    EXIT_CODES,
    PEER_GONE,
    Interrupted,
    MedcliError,
    TerminateSignal,
    interruption,
    peer_rank_gone,
)


class MedcliGroup(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            with pywarnings.reported_by(console.warn):  # Python's warnings as medcli's WARNING lines
                return super().invoke(ctx)
        except MedcliError as e:
            if isinstance(e, Interrupted) and console.rank() != "0":
                raise typer.Exit(e.exit_code) from None  # every rank was interrupted: rank 0 says it
            _fail(str(e), e.exit_code)
        except BrokenPipeError:  # `medcli ... | head`: the reader left; nothing to report
            raise typer.Exit(1) from None
        except (OSError, RuntimeError, MemoryError) as e:  # known failures of the system, not bugs
            message = known_failure(e, ctx.invoked_subcommand)
            if message is None:
                raise
            _fail(message, 1)
        except KeyboardInterrupt as e:  # training says more itself (errors.Interrupted: what last.pt holds)
            kind = interruption(e)
            if console.rank() != "0":  # torchrun passed the signal to every rank: rank 0 says it
                raise typer.Exit(kind.exit_code) from None
            resumes = " (a partial download resumes)" if ctx.invoked_subcommand == "weights" else ""
            console.print_error(
                f"{kind.how}; files are written atomically, so nothing half-written is in place: run the "
                f"same command again{resumes}"
            )
            raise typer.Exit(kind.exit_code) from None


def _fail(message: str, code: int) -> None:
    """The one red line on stderr (the traceback too under -v) and the exit code."""
    if console.verbose():
        console.err.print_exception(show_locals=False)
    console.print_error(message)
    raise typer.Exit(code) from None


def known_failure(e: BaseException, command: str | None) -> str | None:
    """The one-line message for an error of the system rather than of medcli (another torchrun rank gone, a
    path that cannot be read or written, memory exhausted), or None: anything else is a bug and keeps its
    traceback."""
    if peer_rank_gone(e):  # under torchrun: another rank failed first and printed why
        return PEER_GONE
    if isinstance(e, OSError):  # a path that cannot be read or written, a full disk
        where = f": {e.filename}" if e.filename else ""
        return (
            f"{e.strerror or e}{where} (check the path, its permissions and the free disk space; "
            "-v shows where it happened)"
        )
    memory = out_of_memory(e) or worker_died(e)
    return f"{memory} ({_MEMORY_HINTS.get(command, _MEMORY_HINT)})" if memory else None


_MEMORY_HINT = "close other programs, or use a machine with more memory"
_MEMORY_HINTS = {
    "train": "lower --batch-size (raising --gradient-accumulation-steps keeps the effective batch), "
    "--num-workers or --input-size; on a GPU --amp also halves the activations",
    "predict": "leave out --tta, or use fewer models at once (--model RUN/fold0); the input size is the "
    "model's own",
    "eval": "leave out --tta, or score one fold's model at a time; the input size is the model's own",
    "bench": "pass a smaller --input-size or --batch-size",
}


def worker_died(e: BaseException) -> str | None:
    """A DataLoader worker process killed from outside (almost always the kernel's out-of-memory killer:
    each worker holds its own batches), in one line; None for any other error."""
    import re

    m = re.search(
        r"DataLoader worker \(pids?\(?s?\)? ?([\d, ]+)\) (is killed by signal: (\w+)|exited unexpectedly)",
        str(e),
    )
    if not m:
        return None
    how = f"killed by signal {m.group(3)}" if m.group(3) else "ended unexpectedly"
    return f"a data-loading worker (pid {m.group(1)}) was {how}: most likely the machine ran out of memory"


def out_of_memory(e: BaseException) -> str | None:
    """What ran out, in one line, when ``e`` is an allocation failure (CPU or GPU); None otherwise.  torch's
    CPU allocator raises a RuntimeError with its C++ assertion text; CUDA's is torch.OutOfMemoryError."""
    import re

    text = str(e)
    if isinstance(e, MemoryError):
        return "out of memory"
    cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if cpu:
        return f"out of memory: could not allocate {int(cpu.group(1)) / 2**20:.0f} MiB more on the CPU"
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..."
        first = text.splitlines()[0] if text else ""
        detail = first.replace("CUDA out of memory.", "").split(". GPU")[0].strip(" .")
        return "out of memory on the GPU" + (f": {detail[0].lower()}{detail[1:]}" if detail else "")
    return None


class MedcliCommand(TyperCommand):
    """A command whose long options also take underscores: ``--batch_size`` is ``--batch-size``.

    The seed's command line (``--batch_size 6 --grad_clip 0.5 --gradient_accumulation_steps 2 ...``) runs
    unchanged.  The underscore spellings are not declared as aliases: declared, every such option was listed
    twice, and the names column grew until ``train --help`` cut option names even at 140 columns."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        known = {opt for p in self.params for opt in (*p.opts, *p.secondary_opts)}
        return super().parse_args(ctx, dashed_options(args, known))

    def format_help(self, ctx, formatter) -> None:
        # Typer's rich help sets long names, their --no- forms, types and help side by side; in a terminal
        # too narrow for all of them rich cuts option names ("--gradient-accumu…" in an 80-column `train
        # --help`).  There the plain layout is used, which gives a long name a line of its own.
        if self.rich_markup_mode is None or _help_width() >= rich_help_width(self):
            return super().format_help(ctx, formatter)
        mode, self.rich_markup_mode = self.rich_markup_mode, None
        try:
            return super().format_help(ctx, formatter)
        finally:
            self.rich_markup_mode = mode


def rich_help_width(command) -> int:
    """Columns that typer's rich help needs to show every option name of ``command`` whole: the widest
    names of each column, ~9 for the type, ~30 for the help text, 14 for the panel's borders and padding."""

    def widest(names) -> int:
        return max((len(n) for n in names), default=0)

    params = command.params
    longs = widest(",".join(o for o in p.opts if o.startswith("--")) for p in params)
    shorts = widest(",".join(o for o in p.opts if not o.startswith("--")) for p in params)
    negatives = widest(",".join(p.secondary_opts) for p in params)
    return longs + shorts + negatives + 9 + 30 + 14


def _help_width() -> int:
    from rich.console import Console
    from typer import rich_utils

    return Console(width=rich_utils.MAX_WIDTH).width


def dashed_options(args: list[str], known: set[str]) -> list[str]:
    """``args`` with each unknown ``--a_b`` (or ``--a_b=v``) whose ``--a-b`` is known spelled that way;
    values and everything after ``--`` unchanged."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        dashed = name.replace("_", "-")
        if name.startswith("--") and name not in known and dashed in known:
            out[i] = dashed + eq + value
    return out


_exit_codes = " · ".join(f"{code} {what.split(':')[0]}" for code, what in EXIT_CODES.items())

app = typer.Typer(
    cls=MedcliGroup,
    name="medcli",
    help=(
        "Grade glioma MRI (LGG vs HGG) with MedicalNet-pretrained 3D ResNets.\n\n"
        "Fetch and verify weights, index data, train with patient-level stratified k-fold CV, evaluate "
        "with confidence intervals, and predict on new scans."
    ),
    epilog=f"Exit codes: {_exit_codes}.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show full key lists and tracebacks (also MEDCLI_DEBUG=1)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    console.set_verbose(verbose)
    switches.fp32_kernels_choice()  # a typo in MEDCLI_FP32_KERNELS fails here, before a command writes


def reflow(text: str) -> str:
    """A docstring's paragraphs each on one line.  Typer's rich help keeps a paragraph's source line breaks,
    so a docstring wrapped at 110 columns came out ragged in an 80-column terminal; the terminal wraps."""
    return "\n\n".join(" ".join(p.split("\n")) for p in inspect.cleandoc(text).split("\n\n"))


def _finish_commands(typer_app: typer.Typer) -> None:
    """Every command: help reflowed (see ``reflow``), underscores accepted (``MedcliCommand``)."""
    for info in typer_app.registered_commands:
        text = info.help or (info.callback.__doc__ if info.callback else None)
        if text:
            info.help = reflow(text)
        info.cls = MedcliCommand
    for group in typer_app.registered_groups:
        _finish_commands(group.typer_instance)


def _register_commands() -> None:
    # One module per command group; order here is the order in `medcli --help`.
    from medcli.cli import bench, data, evaluate, plugins, predict, train, weights

    for module in (weights, data, train, evaluate, predict, plugins, bench):
        module.register(app)
    _finish_commands(app)


_register_commands()


def main() -> None:
    keep_freed_memory()  # before any tensor: see medcli.allocator
    if "LOCAL_RANK" not in os.environ:  # under torchrun, the launcher's SIGTERM stops a rank as it is
        signal.signal(signal.SIGTERM, _raise_terminate)
    else:  # torchrun's SIGINT (Ctrl-C, or a scheduler's SIGTERM passed on): every rank stops at one batch
        from medcli import stopping

        signal.signal(signal.SIGINT, stopping.on_sigint)
    app(prog_name="medcli")


def _raise_terminate(signum, frame) -> None:
    """SIGTERM (SLURM's time limit or preemption, `kill`) unwinds like Ctrl-C: a training says which epoch
    last.pt holds, in its train.log too, and releases its fold's lock."""
    raise TerminateSignal()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
