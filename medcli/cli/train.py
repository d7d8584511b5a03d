"""`medcli train`: one fold (or all folds) of stratified k-fold CV, with the seed's flags.

The seed's command line runs unchanged (``--batch_size``, ``--grad_clip``, ``--gradient_accumulation_steps``,
``--ema_decay``, ``--multi_gpu`` beside their hyphenated spellings).  Settings come from, lowest to highest
priority: TrainConfig's defaults, a ``--config FILE.toml``, then flags given on the command line.

This module only parses and renders: the recipe lives in ``medcli.engine.trainer`` (imported inside the
command so ``medcli --help`` never loads torch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import typer

from medcli.cli import console
from medcli.engine.config import TrainConfig
from medcli.errors import DataError, DeviceError, UsageError, interruption
from medcli.paths import cache_dir, default_data_root, default_runs_root, require_writable_dir

_D = TrainConfig.__dataclass_fields__  # defaults shown in --help come from the one place they live


def _default(name: str) -> Any:
    return _D[name].default


# CLI parameter name → TrainConfig field (the same name unless listed).
_NOT_CONFIG = {"fold", "config", "resume", "force", "json_out", "no_pretrained", "ctx"}


def train_command(
    ctx: typer.Context,
    fold: str = typer.Option("0", "--fold", help="Fold to train, 0..K-1, or 'all' for every fold in turn."),
    folds: int = typer.Option(_default("folds"), "--folds", help="Number of CV folds K."),
    data: Path = typer.Option(
        None, "--data", help="Data root (BraTS folder or CSV manifest). (default: $MEDCLI_DATA or ./data)"
    ),
    out: Path = typer.Option(None, "--out", help="Where runs go. (default: $MEDCLI_RUNS or ./runs)"),
    name: str | None = typer.Option(
        None, "--name", help="Run name. (default: from model, modalities and loss, e.g. resnet50-t1ce-ldam)"
    ),
    pretrained_path: str = typer.Option(
        "auto",
        "--pretrained-path",
        help="MedicalNet weights file, or 'auto': the local copy of the release for --depth (`medcli "
        "weights list` shows where). A missing file means random init with a warning.",
    ),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Train from random initialization."),
    require_pretrained: bool = typer.Option(
        False,
        "--require-pretrained",
        help="Fail (exit 4) instead of warning when the weights file is missing.",
    ),
    depth: str = typer.Option(
        str(_default("depth")), "--depth", help="ResNet depth: 10/18/34/50/101/152/200 or tiny."
    ),
    modalities: str = typer.Option(
        "t1ce", "--modalities", help="Comma-separated input sequences, e.g. t1ce,flair."
    ),
    input_size: str = typer.Option("128", "--input-size", help="Model input edge (128) or D,H,W."),
    lr: float = typer.Option(_default("lr"), "--lr", help="Backbone learning rate."),
    batch_size: int = typer.Option(_default("batch_size"), "--batch-size", help="Micro-batch size."),
    epochs: int = typer.Option(_default("epochs"), "--epochs"),
    optimizer: str = typer.Option(_default("optimizer"), "--optimizer", help="adam, adamw or sgd."),
    loss: str = typer.Option(
        _default("loss"),
        "--loss",
        help="ce, weighted-ce, focal, ldam, ldam-drw or a plugin (case-insensitive).",
    ),
    scheduler: str = typer.Option(
        _default("scheduler"), "--scheduler", help="cosine (with warm-up), step, plateau or none."
    ),
    dropout: float = typer.Option(_default("dropout"), "--dropout"),
    zero_init_last: bool = typer.Option(
        _default("zero_init_last"),
        "--zero-init-last/--no-zero-init-last",
        help="Random init: residual branches start at zero (helps deep nets train from scratch).",
    ),
    grad_clip: float = typer.Option(_default("grad_clip"), "--grad-clip", help="Max gradient norm (0: off)."),
    gradient_accumulation_steps: int = typer.Option(
        _default("gradient_accumulation_steps"),
        "--gradient-accumulation-steps",
        help="Micro-batches per optimiser step.",
    ),
    ema_decay: float = typer.Option(
        _default("ema_decay"),
        "--ema-decay",
        help="EMA of weights (0: off); validated and saved.",
    ),
    select: str = typer.Option(
        _default("select"), "--select", help="Weights that pick best.pt: auto (EMA when on), ema or raw."
    ),
    weight_decay: float = typer.Option(
        _default("weight_decay"), "--weight-decay", help="Not applied to norms and biases."
    ),
    head_lr_mult: float = typer.Option(
        _default("head_lr_mult"), "--head-lr-mult", help="The new head's lr = lr × this."
    ),
    freeze_backbone_epochs: int = typer.Option(
        _default("freeze_backbone_epochs"), "--freeze-backbone-epochs", help="Train only the head at first."
    ),
    warmup_epochs: float = typer.Option(
        _default("warmup_epochs"), "--warmup-epochs", help="Linear lr warm-up (epochs, may be fractional)."
    ),
    ldam_s: float = typer.Option(_default("ldam_s"), "--ldam-s", help="LDAM logit scale s."),
    ldam_max_m: float = typer.Option(_default("ldam_max_m"), "--ldam-max-m", help="LDAM largest margin."),
    drw_start: float | None = typer.Option(
        None,
        "--drw-start",
        help="ldam-drw: epoch (>=1) or fraction of training (<1) where re-weighting starts.",
    ),
    loss_options: list[str] = typer.Option(
        [],
        "--loss-opt",
        help="A loss option KEY=VALUE, repeatable (e.g. --loss-opt gamma=2 for focal, epsilon=2 for poly1).",
    ),
    gpu: bool = typer.Option(False, "--gpu", help="Require a CUDA GPU (exit 9 if there is none)."),
    multi_gpu: bool = typer.Option(
        False,
        "--multi-gpu",
        help="DistributedDataParallel over all visible GPUs via torchrun (1 GPU: warns, runs on it).",
    ),
    nproc: int | None = typer.Option(
        None, "--nproc", help="Processes for --multi-gpu (default: visible GPUs; with --device cpu: 2)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    amp: bool | None = typer.Option(
        None,
        "--amp/--no-amp",
        help="Mixed precision. (default: auto: on for CUDA, and from 64³ on CPUs with native bf16)",
    ),
    amp_dtype: str = typer.Option("auto", "--amp-dtype", help="auto, fp16 or bf16."),
    channels_last: bool | None = typer.Option(
        None, "--channels-last/--no-channels-last", help="channels_last_3d memory format. (default: auto)"
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (slow first epoch)."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="DataLoader workers. (default: auto)"),
    seed: int = typer.Option(_default("seed"), "--seed"),
    deterministic: bool = typer.Option(
        False,
        "--deterministic",
        help="Deterministic algorithms (slower): the same seed gives bit-identical runs, on CUDA too.",
    ),
    patience: int | None = typer.Option(None, "--patience", help="Early stopping: epochs without AUC gain."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after N optimiser steps (smoke runs)."
    ),
    config: Path | None = typer.Option(None, "--config", help="TOML file of settings; flags override it."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the fold from its last.pt (a complete fold is left as it is)."
    ),
    force: bool = typer.Option(False, "--force", help="Start over in an existing fold folder."),
    json_out: bool = typer.Option(False, "--json", help="Print only the final summary as JSON on stdout."),
) -> None:
    """Fine-tune a MedicalNet-pretrained 3D ResNet on one fold (or all folds) of stratified k-fold CV.

    Writes runs/<name>/fold<k>/: config.json, metrics.csv/.jsonl, val_predictions.csv, last.pt,
    best.pt (by validation AUC), curves.png, train.log (every session, timestamped).  A diverging training
    (NaN/Inf loss or outputs) stops before that epoch is saved and exits 11.
    """
    if resume and force:  # force would win and delete the checkpoints that --resume asked to continue
        raise UsageError(
            "--resume and --force contradict each other: --resume continues the fold from its last.pt, "
            "--force deletes it and starts over",
            hint="keep --resume to continue the training, or --force alone to start it over",
        )
    given = {k: v for k, v in ctx.params.items() if k not in _NOT_CONFIG}
    explicit = {k for k in given if _from_command_line(ctx, k)}
    settings: dict[str, Any] = load_config_file(config) if config else {}
    settings.update({k: v for k, v in given.items() if k in explicit or k not in settings})
    if no_pretrained:
        settings["pretrained_path"] = None
    if not settings.get("data") and not default_data_root().exists():  # the first run, most likely
        raise DataError(
            f"no data to train on: --data was not given and its default ({default_data_root()}: "
            "$MEDCLI_DATA or ./data) does not exist",
            hint="pass --data with a BraTS folder or a CSV manifest, or try medcli on a synthetic cohort: "
            "`medcli data synth data/ --small`",
        )
    # Absolute in config.json and the checkpoints: `medcli eval --recompute` finds the data from anywhere.
    settings["data"] = os.path.abspath(os.path.expanduser(settings.get("data") or default_data_root()))
    settings["out"] = str(settings.get("out") or default_runs_root())
    require_writable_dir(settings["out"], "--out")  # now, not after the data are prepared
    require_writable_dir(cache_dir(), "MEDCLI_CACHE")  # the preprocessed arrays go there
    settings = {k: v for k, v in settings.items() if v is not None or k == "pretrained_path"}
    from medcli.losses import parse_loss_options  # torch-free; KEY=VALUE strings (CLI) or a TOML table

    settings["loss_options"] = parse_loss_options(settings.get("loss_options"))

    toml_fold = settings.pop("fold", None)
    fold_spec = str(toml_fold if toml_fold is not None and not _from_command_line(ctx, "fold") else fold)
    folds_to_run, first = _parse_fold(fold_spec, int(settings.get("folds", _default("folds"))))
    cfg = TrainConfig.from_dict({**settings, "fold": first}).validate()

    if cfg.multi_gpu and not _under_torchrun():
        code = _launch_distributed(cfg, fold_spec, resume=resume, force=force, json_out=json_out)
        if code is not None:
            raise typer.Exit(code)
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "multi_gpu": False})  # one device: train right here

    from medcli.engine import trainer

    results = []
    shown: set[str] = set()
    for k in folds_to_run:
        cfg_k = TrainConfig.from_dict({**cfg.to_dict(), "fold": k})
        renderer = Renderer(quiet=_rank() != 0, shown=shown)
        # `--fold all --resume` continues the folds that have a last.pt and starts the others.
        resume_k = resume and (len(folds_to_run) == 1 or _has_checkpoint(cfg_k))
        try:
            result = trainer.train(cfg_k, callback=renderer, resume=resume_k, force=force)
        finally:
            renderer.close()
        results.append(result.to_dict())
    if _under_torchrun():
        from medcli.engine import distributed

        distributed.shutdown()
    if _rank() != 0:
        return
    summary = {"run": cfg.run_name(), "run_dir": str(Path(cfg.out) / cfg.run_name()), "folds": results}
    if json_out:
        console.print_json(summary)
    else:
        _print_summary(summary)


def register(root: typer.Typer) -> None:
    """Add ``medcli train``."""
    root.command("train", no_args_is_help=False)(train_command)


# ------------------------------------------------------------------------------------------------ helpers
def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def load_config_file(path: Path) -> dict[str, Any]:
    """A --config TOML: keys are option names; an unknown key is a UsageError (with did-you-mean)."""
    from medcli.engine.config import check_setting_types, load_toml

    data = load_toml(path)
    valid = set(TrainConfig.__dataclass_fields__) | {"fold", "no_pretrained"}
    valid -= {"in_channels", "num_classes", "head"}
    unknown = sorted(set(data) - valid)
    if unknown:
        from medcli.registry import suggest

        close = [s for k in unknown for s in suggest(k, valid, n=1)]
        raise UsageError(
            f"{path}: unknown setting(s) {', '.join(unknown)}",
            hint=f"did you mean {', '.join(close)}?" if close else "keys are `medcli train` option names",
        )
    check_setting_types(path, data)
    if data.pop("no_pretrained", False):
        data["pretrained_path"] = None
    return data


def _has_checkpoint(cfg: TrainConfig) -> bool:
    return (Path(cfg.out) / cfg.run_name() / f"fold{cfg.fold}" / "last.pt").is_file()


def _parse_fold(spec: str, k: int) -> tuple[list[int], int]:
    text = spec.strip().lower()
    if text == "all":
        return list(range(k)), 0
    if text.lstrip("-").isdigit():
        return [int(text)], int(text)
    raise UsageError(f"--fold {spec!r} is not a fold number or 'all'", hint=f"use 0..{k - 1} or all")


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank() -> int:
    return int(os.environ.get("RANK", 0)) if _under_torchrun() else 0


def _launch_distributed(
    cfg: TrainConfig, fold_spec: str, *, resume: bool, force: bool, json_out: bool
) -> int | None:
    """Re-run this training under torchrun: one process per GPU (or --nproc CPU processes with gloo), and
    return its exit code.

    With fewer than 2 GPUs there is nothing to distribute: warn and return None (train in this process).
    """
    import torch

    from medcli.cli.launch import relaunch_command
    from medcli.engine import distributed
    from medcli.engine.trainer import resolve_device

    # --gpu without CUDA → DeviceError here, before anything starts; no GPU becomes current in this process.
    device = resolve_device(cfg, make_current=False)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        n = cfg.nproc or visible
        if n > visible:
            raise DeviceError(
                f"--nproc {n} but only {visible} GPU(s) visible", hint=f"use --nproc {visible} or less"
            )
    else:
        n = cfg.nproc or int(os.environ.get(distributed.NPROC_ENV, "2"))
        if cfg.device == "auto":
            raise DeviceError(
                "--multi-gpu: no CUDA GPU is visible",
                hint="drop --multi-gpu, or add --device cpu to run the same DDP path on CPU processes (gloo)",
            )
    if n < 2:
        console.warn(f"--multi-gpu: only {n} device(s); training in one process on {device}")
        return None

    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "head", "fold", "in_channels")}
    settings.pop("num_classes", None)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="medcli-train-", delete=False) as fh:
        fh.write(_to_toml(settings))
        config_path = fh.name
    args = ["train", "--config", config_path, "--fold", fold_spec]
    args += ["--resume"] * resume + ["--force"] * force + ["--json"] * json_out
    # TOML has no null: a None setting is left out and the ranks take the option's default, which is None
    # for all but --pretrained-path ('auto').  Said as the flag, or the ranks would load the release.
    args += ["--no-pretrained"] * ("pretrained_path" in settings and settings["pretrained_path"] is None)
    cmd = relaunch_command(args, n)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    console.info(f"Launching {n} processes with torchrun ({'NCCL' if device.type == 'cuda' else 'gloo'})")
    # torchrun in a process group of its own (its ranks have sessions of their own): a terminal's Ctrl-C
    # reaches this launcher alone, which passes it on once, and torchrun passes it to the ranks.  In one
    # group torchrun got it twice, the terminal's and this launcher's, the second while it stopped the ranks.
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    try:
        return proc.wait()
    except KeyboardInterrupt as e:
        # Pass it on, so torchrun stops its ranks rather than leaving them running orphaned.  A SIGTERM (a
        # scheduler's time limit) goes on as SIGINT: a rank keeps SIGTERM's default death (see app.main),
        # while on SIGINT it unwinds, so rank 0 says which epoch last.pt holds, in train.log too.
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise e from None
        kind = interruption(e)
        if code != 128 + signal.SIGINT:  # the ranks did not unwind on it: SIGTERMed too (SLURM signals every
            # process of a job), they died without a word, so this launcher says it
            raise kind(
                f"{kind.how}; last.pt holds the last epoch the training finished",
                hint="add --resume to the same command to continue from there",
            ) from None
        return kind.exit_code  # rank 0 said where its training stopped
    finally:
        os.unlink(config_path)


def _to_toml(d: dict[str, Any]) -> str:
    """Flat TOML for the settings TrainConfig holds (str, int, float, bool, lists, and the loss-options
    table as an inline table)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def _print_summary(summary: dict[str, Any]) -> None:
    table = console.table(f"run {summary['run']} in {summary['run_dir']}")
    for col in ("fold", "epochs", "best epoch", "best val AUC", "selected", "last val AUC", "folder"):
        table.add_column(col, justify="right" if col not in ("selected", "folder") else "left")
    for r in summary["folds"]:
        last = r.get("last") or {}

        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        table.add_row(
            str(r["fold"]),
            str(r["epochs_run"]),
            "n/a" if r["best_epoch"] is None else str(r["best_epoch"] + 1),
            fmt(r["best_metric"]),
            r["selection"],
            fmt(last.get("val_auc_ema") if r["selection"] == "ema" else last.get("val_auc")),
            Path(r["run_dir"]).name,  # the run's folder is in the title: a full path per row gets cut
        )
    console.out.print(table)
    run_dir = summary["run_dir"]
    console.info(f"Next: `medcli eval {run_dir}`, then `medcli predict SCAN --model {run_dir}`")


class Renderer:
    """Turns trainer events into INFO lines, Rich progress (terminal) or one line per epoch (logs).

    ``shown``: INFO and WARNING texts already on the terminal.  Shared across the folds of ``--fold all``
    so a line that each fold repeats word for word (the model built, subjects left out) shows once; each
    fold's train.log still has them all.
    """

    def __init__(self, quiet: bool = False, shown: set[str] | None = None):
        self.quiet = quiet
        self.shown = set() if shown is None else shown
        self.progress = None
        self.epoch_task = None
        self.batch_task = None

    def __call__(self, event) -> None:
        from medcli.engine import events as ev

        if self.quiet:
            return
        if isinstance(event, (ev.Info, ev.Warning)):
            if event.message in self.shown:
                return
            self.shown.add(event.message)
            (console.info if isinstance(event, ev.Info) else console.warn)(event.message)
        elif isinstance(event, ev.FoldStarted):
            console.info(event.describe())
            if console.progress_enabled():
                self._start_progress(event)
        elif isinstance(event, ev.EpochStarted) and self.progress is not None:
            self.progress.reset(
                self.batch_task, total=event.num_batches, description=f"epoch {event.epoch + 1}"
            )
        elif isinstance(event, ev.BatchEnded) and self.progress is not None:
            self.progress.update(
                self.batch_task,
                completed=event.batch,
                loss=f"{event.loss:.4f}",
                lr=f"{event.lr:.2e}",
                sps=f"{event.samples_per_s:.2f}",
            )
        elif isinstance(event, ev.EpochEnded):
            console.info(event.line)
            if self.progress is not None:
                self.progress.advance(self.epoch_task)
        elif isinstance(event, ev.FoldFinished):
            self.close()

    def _start_progress(self, event) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} · lr {task.fields[lr]} · {task.fields[sps]} samples/s"),
            TimeRemainingColumn(),
            console=console.err,
            transient=True,
        )
        self.progress.start()
        self.epoch_task = self.progress.add_task(
            f"fold {event.fold}",
            total=event.epochs,
            completed=event.start_epoch,
            loss="-",
            lr="-",
            sps="-",
        )
        self.batch_task = self.progress.add_task(
            "epoch", total=event.batches_per_epoch, loss="-", lr="-", sps="-"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
