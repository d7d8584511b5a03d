"""``train(cfg)``: one fold of k-fold cross-validation, the seed's recipe done properly.

Reading order: ``train`` (the whole flow) → ``_prepare_data`` → ``_build_model`` → ``_fit`` (epoch loop)
→ ``train_one_epoch`` (gradient accumulation, AMP, clipping, EMA) → ``predict_loader`` (validation).

The engine never prints: everything the user sees goes through ``callback(event)`` (medcli.engine.events).
Only rank 0 of a distributed run reports and writes; every rank computes the same decisions (best epoch,
early stopping) from the gathered validation predictions, so they never disagree.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medcli import pywarnings, stopping
from medcli.engine import checkpoint as ckpt_io
from medcli.engine import distributed as dist
from medcli.engine import speed
from medcli.engine.config import TrainConfig
from medcli.engine.cpu_kernels import describe, rewrite_for_cpu
from medcli.engine.devices import select_device
from medcli.engine.ema import create_ema, ema_checkpoint, restore_ema
from medcli.engine.events import (
    BatchEnded,
    Callback,
    EpochEnded,
    EpochStarted,
    FoldFinished,
    FoldStarted,
    Info,
    Warning,
    ignore,
)
from medcli.engine.optim import create_optimizer, create_schedule, set_backbone_frozen, train_mode
from medcli.engine.runs import FoldDir, RunLog
from medcli.engine.speed import CPU_CHANNELS_LAST_MIN_SIZE
from medcli.errors import (
    PEER_GONE,
    CheckpointError,
    DataError,
    DeviceError,
    Diverged,
    MedcliError,
    UsageError,
    WeightsError,
    interruption,
    peer_rank_gone,
)

CLASS_NAMES = ("LGG", "HGG")


# ------------------------------------------------------------------------------------------------ devices
@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32), GradScaler, memory format."""

    amp_dtype: torch.dtype | None
    use_scaler: bool
    channels_last: bool

    @property
    def name(self) -> str:
        base = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return base + (" + channels_last_3d" if self.channels_last else "")


def resolve_device(cfg: TrainConfig, *, make_current: bool = True) -> torch.device:
    """--device/--gpu → a torch.device; asking for CUDA where there is none is a DeviceError (exit 9).

    ``make_current=False`` only checks (the ``--multi_gpu`` launcher, which trains nowhere itself)."""
    want = cfg.device.strip().lower()
    if cfg.gpu and want == "cpu":
        raise UsageError("--gpu and --device cpu contradict each other", hint="drop one of them")
    spec, asked = ("cuda", "--gpu") if cfg.gpu and want == "auto" else (cfg.device, None)
    if not (dist.under_torchrun() and cfg.multi_gpu):
        return select_device(spec, asked=asked, make_current=make_current)
    # Under torchrun each process trains on the GPU of its LOCAL_RANK (dist.init makes it current); the
    # check must not make GPU 0 current, or every rank would hold a CUDA context there.
    if select_device(spec, asked=asked, make_current=False).type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank())


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """``--amp`` (None = auto) and ``--amp-dtype`` → Precision, from what was measured fastest.

    CUDA: AMP on by default.  ``auto`` picks fp16 + GradScaler + channels_last_3d: on an H100 a ResNet-50
    step at 128³ ran 161 samples/s that way, vs 122 (bf16), 114 (bf16 + channels_last) and 86 (fp32/TF32)
    (medcli.engine.speed).  bf16 needs no scaler and is kept contiguous (channels_last made it slower).
    CPU: ``auto`` is bf16 + channels_last_3d on inputs of 64³ and up where the CPU computes bf16 natively
    (AVX512-BF16 / AMX), with the predictor's bf16 rewrites (``medcli.engine.cpu_kernels``: fp32 stem, dilated
    convs as phase-batched undilated ones or tap by tap). A ResNet-50 step on 2 Sapphire Rapids (AMX) cores,
    bf16 + channels_last vs plain fp32: 2.35× at 128³ (16 cores: 2.10×), 1.22× at 64³, 0.89× at 32³ (medcli
    bench, one run each; fp32 + channels_last: 1.11×, 0.97×, 0.73×); on 2 Zen 5 cores (AVX512-BF16, no AMX)
    2.10× at 128³, 1.75× at 64³, 1.04× at 32³ (the fp32 default there: 1.10×). Plain bf16 autocast without the
    rewrites had been 0.94–1.07× at 128³: oneDNN has no fast bf16 kernel for dilated 3-D convs. Elsewhere
    ``auto`` is fp32: bf16 is emulated there, many times slower, and ``--amp`` opts in with a warning.
    channels_last_3d pays off in fp32 on large volumes only: 1.2× at 96³ and 1.2–2.0× at 128³ on a 2-core AVX2
    EPYC, slower at 16³–32³. (Those ratios predate medcli's CPU kernels: tap-wise dilated convs, then Winograd
    3³ convs in fp32; the AMX thresholds were not re-measured with them, and neither was fp32 with Winograd
    against bf16 there.)
    """
    if device.type == "cuda":
        amp = True if cfg.amp is None else cfg.amp
        if not amp:
            return Precision(None, False, bool(cfg.channels_last))
        dtype_name = "fp16" if cfg.amp_dtype == "auto" else cfg.amp_dtype
        if dtype_name == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(
                f"--amp-dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support",
                hint="use --amp-dtype fp16 (or auto)",
            )
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
        cl = (dtype is torch.float16) if cfg.channels_last is None else cfg.channels_last
        return Precision(dtype, dtype is torch.float16, cl)
    # CPU
    fast_bf16 = speed.cpu_has_fast_bf16()
    large = min(cfg.input_size) >= CPU_CHANNELS_LAST_MIN_SIZE
    amp = (fast_bf16 and large) if cfg.amp is None else cfg.amp
    if amp and cfg.amp_dtype == "fp16":
        raise DeviceError(
            "--amp-dtype fp16 needs a CUDA GPU", hint="on the CPU use --amp-dtype bf16 (or auto)"
        )
    cl = ((amp and fast_bf16) or large) if cfg.channels_last is None else cfg.channels_last
    return Precision(torch.bfloat16 if amp else None, False, cl)


def place_model(model: nn.Module, device: torch.device, precision: Precision) -> str | None:
    """Move ``model`` to ``device`` in ``precision``'s memory format; on a CPU, with medcli's CPU kernels
    (:func:`medcli.engine.cpu_kernels.rewrite_for_cpu`: same function and state-dict keys).  Returns what
    was rewritten (None where nothing was), for the log.  ``medcli bench`` times its train step this way."""
    rewrites = None
    if device.type == "cpu":
        rewrites = describe(rewrite_for_cpu(model, bf16=precision.amp_dtype is torch.bfloat16))
    fmt = torch.channels_last_3d if precision.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    return rewrites


def autocast(device: torch.device, precision: Precision):
    return torch.autocast(
        device.type, dtype=precision.amp_dtype or torch.float32, enabled=precision.amp_dtype is not None
    )


# -------------------------------------------------------------------------------------------- the result
@dataclass
class FoldResult:
    fold: int
    run_dir: str
    epochs_run: int
    best_epoch: int | None
    best_metric: float | None
    selection: str
    stopped_early: bool
    global_step: int
    last: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- train
def train(
    cfg: TrainConfig, *, callback: Callback = ignore, resume: bool = False, force: bool = False
) -> FoldResult:
    """Train fold ``cfg.fold`` into ``cfg.out/<run name>/fold<k>/`` and return the outcome.

    Errors the user can fix (bad names/values, missing data, a class absent from the training fold, a
    run folder holding another config, no CUDA for --gpu) are raised before any model is built.
    """
    cfg.validate()
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    if cfg.multi_gpu and dist.under_torchrun():
        dist.init(device.type)
    log = RunLog(callback) if dist.is_main() else None  # rank 0 alone writes train.log
    emit: Callback = log or ignore
    _set_determinism(cfg, device)
    fetch = resolve_pretrained(cfg)  # before the run folder compares configs: it stores the resolved path

    fold_dir = FoldDir(Path(cfg.out) / cfg.run_name(), cfg.fold)
    with contextlib.ExitStack() as held:
        if dist.is_main():  # one training per fold folder at a time (ranks of one run are one training)
            held.enter_context(fold_dir.exclusive())
        fold_dir.check_reusable(cfg.to_dict(), resume=resume, force=force)
        if resume and not fold_dir.last.exists():
            raise CheckpointError(
                f"nothing to resume: {fold_dir.last} does not exist",
                hint="drop --resume to start this fold, or check --name/--out",
            )

        if cfg.require_pretrained and not (cfg.pretrained_path and Path(cfg.pretrained_path).is_file()):
            raise WeightsError(
                f"--require-pretrained: weights file {cfg.pretrained_path} not found",
                hint=f"run `{fetch}`, or pass the file with --pretrained-path",
            )

        # PyTorch's or a plugin's warnings (under --deterministic, a CUDA op without a deterministic kernel
        # only warns) become Warning events: medcli's voice, and kept in train.log.
        with pywarnings.reported_by(lambda text: emit(Warning(text))):
            data = _prepare_data(cfg, fold_dir, precision, emit)
            loss_fn = build_loss(cfg, data.class_counts)
            cfg.head = "cosine" if getattr(loss_fn, "needs_cosine_head", False) else "linear"
            if hasattr(loss_fn, "describe"):
                emit(Info(f"Loss: {loss_fn.describe()}"))

            model, start = _build_model(cfg, emit, fetch)
            pretrained_sha = start.sha256 if start is not None else None
            _warn_start_saw_validation(cfg, start, data, emit)
            _warn_other_start(fold_dir, pretrained_sha, emit)
            _warn_other_settings(fold_dir, cfg, emit)
            if log is not None:
                fold_dir.start(cfg.to_dict(), fresh=not resume)
                log.open(fold_dir.log, resume=resume)
            dist.barrier()
            try:
                result = _fit(
                    cfg, device, precision, model, loss_fn, data, fold_dir, pretrained_sha, emit, resume
                )
            except BaseException as e:
                # The log says how the session ended, then the error goes on to the CLI.  No barrier
                # here: an error may be this rank's alone (its loss went NaN), with the other ranks waiting
                # in a gradient all-reduce; a barrier would wait for them forever.  Exiting lets torchrun
                # stop the others and report this rank's exit code.
                error = _compile_failure(e) if cfg.compile else None
                if log is not None:
                    shown = error or e
                    if isinstance(shown, MedcliError):
                        log.write(f"error: {shown}")
                    elif peer_rank_gone(shown):  # not gloo's "Connection closed by peer [...] GLHF!"
                        log.write(f"error: {PEER_GONE}")
                    else:
                        log.write(f"error: {type(shown).__name__}: {shown}")
                if error is not None:
                    raise error from e
                raise
            dist.barrier()  # every rank finished the fold: the next one starts together
            return result


def _compile_failure(e: BaseException) -> DeviceError | None:
    """torch.compile fails at the model's first call (no C++ compiler on a CPU machine, an unsupported
    op): one line saying so and that --compile can go, rather than inductor's traceback."""
    from torch._dynamo.exc import BackendCompilerFailed

    if not isinstance(e, BackendCompilerFailed):
        return None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return DeviceError(
        f"--compile: torch.compile could not compile the model: {first}",
        hint="drop --compile (it changes speed, not results; the fold starts over without --force); on CPU "
        "it needs a working C++ compiler (g++ or clang++, or set CXX)",
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CUDA devices too


def _seed_this_rank(cfg: TrainConfig) -> None:
    """Under DDP, once the model is built (identically on every rank: same seed), each rank continues on its
    own random stream, so the replicas draw different dropout masks (as timm seeds seed + rank).  Rank r
    uses seed + 1_000_003·r.  Data order and augmentation have their own explicit seeds."""
    _seed_everything(cfg.seed + 1_000_003 * dist.rank())


def _set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    _seed_everything(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels


# -------------------------------------------------------------------------------------------------- data
@dataclass
class FoldData:
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: Any
    train_generator: torch.Generator
    train_dataset: Any
    val_subjects: list[Any]
    class_counts: tuple[int, int]
    split_hash: str
    preprocess: Any


def _prepare_data(cfg: TrainConfig, fold_dir: FoldDir, precision: Precision, emit: Callback) -> FoldData:
    from medcli.data.dataset import VolumeDataset
    from medcli.data.discover import discover
    from medcli.data.preprocess import PreprocessConfig

    pcfg = PreprocessConfig(modalities=tuple(cfg.modalities), input_size=tuple(cfg.input_size))
    cohort = discover(Path(cfg.data), modalities=cfg.modalities)
    subjects = cohort.require_labels()
    for note in [*cohort.left_out, *cohort.notes]:  # what discovery passed over or merged
        emit(Info(note))
    _warn_left_out(cohort, subjects, cfg.data, emit)
    splits = _load_or_make_splits(cfg, subjects, fold_dir, emit)
    train_ids, val_ids = splits.fold(cfg.fold)
    by_id = {s.subject_id: s for s in subjects}
    missing = [i for i in (*train_ids, *val_ids) if i not in by_id]
    if missing:
        raise DataError(
            f"{fold_dir.splits} names subjects not found under {cfg.data} (e.g. {missing[0]})",
            hint="point --data at the cohort the split was made for, or use --name for a new run",
        )
    train_subjects = [by_id[i] for i in train_ids]
    val_subjects = [by_id[i] for i in val_ids]
    counts = tuple(sum(s.label == c for s in train_subjects) for c in (0, 1))
    for c, n in enumerate(counts):
        if n == 0:
            raise DataError(
                f"fold {cfg.fold}'s training set has no {CLASS_NAMES[c]} subjects "
                f"({counts[0]} LGG, {counts[1]} HGG of {len(subjects)} labelled under {cfg.data})",
                hint="add subjects of that grade, or use fewer --folds",
            )
    if not val_subjects:
        raise DataError(f"fold {cfg.fold} has no validation subjects", hint="use fewer --folds")
    emit(
        Info(
            f"Fold {cfg.fold}/{cfg.folds}: {len(train_subjects)} train ({counts[0]} LGG, {counts[1]} HGG), "
            f"{len(val_subjects)} val · split {fold_dir.splits}"
        )
    )

    cache = None
    if cfg.cache:
        from medcli.data.cache import PreprocessCache
        from medcli.paths import cache_dir

        cache = PreprocessCache(cache_dir())
        _warm_cache(cache, [*train_subjects, *val_subjects], pcfg, emit, data_root=cfg.data)
    train_ds = VolumeDataset(train_subjects, pcfg, cache=cache, augment=True, seed=cfg.seed)
    val_ds = VolumeDataset(val_subjects, pcfg, cache=cache, augment=False, seed=cfg.seed)

    workers = _num_workers(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    common = {
        "num_workers": workers,
        "worker_init_fn": _seed_worker,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": False,  # workers must see set_epoch()'s new augmentation seed
    }
    if dist.world_size() > 1:
        from torch.utils.data.distributed import DistributedSampler

        train_sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed, drop_last=False)
        val_sampler = DistributedSampler(val_ds, shuffle=False)
        train_loader = DataLoader(
            train_ds, batch_size=cfg.batch_size, sampler=train_sampler, generator=generator, **common
        )
        val_loader = DataLoader(
            val_ds, batch_size=cfg.val_batch_size or cfg.batch_size, sampler=val_sampler, **common
        )
    else:
        train_sampler = None
        train_loader = DataLoader(
            train_ds, batch_size=cfg.batch_size, shuffle=True, generator=generator, **common
        )
        val_loader = DataLoader(
            val_ds, batch_size=cfg.val_batch_size or cfg.batch_size, shuffle=False, **common
        )
    return FoldData(
        train_loader,
        val_loader,
        train_sampler,
        generator,
        train_ds,
        val_subjects,
        (int(counts[0]), int(counts[1])),
        splits.cohort_hash,
        pcfg,
    )


def _warn_left_out(cohort: Any, subjects: Sequence[Any], data_root: str, emit: Callback) -> None:
    """Name the subjects found but not trained on (unreadable or incomplete scans, no grade), and why:
    training on fewer subjects than the user has must never be silent."""
    used = {s.subject_id for s in subjects}
    left = [s.subject_id for s in (*cohort.subjects, *cohort.excluded) if s.subject_id not in used]
    if not left:
        return
    problem = cohort.reason(left[0])
    why = problem.what if problem else "no LGG/HGG grade"
    emit(
        Warning(
            f"{len(left)} of {len(left) + len(subjects)} subjects left out of training (first: {left[0]}: "
            f"{why}); `medcli data index {data_root}` lists each with what to do"
        )
    )


def _warm_cache(cache, subjects: Sequence[Any], pcfg, emit: Callback, *, data_root: str) -> None:
    """Preprocess every subject once, in parallel, before the first epoch (rank 0; others wait).

    A scan that cannot be preprocessed stops training here, naming it, rather than mid-epoch.
    """
    from medcli.data.cache import prepare_cohort

    report = None
    if dist.is_main():
        started = time.perf_counter()
        workers = min(os.cpu_count() or 1, 4, len(subjects))
        report = prepare_cohort(subjects, pcfg, cache, workers=workers if len(subjects) > 8 else 1)
        emit(
            Info(
                f"Preprocessed cache {cache.config_dir(pcfg)}: {len(report.cached)} new, "
                f"{len(report.already_cached)} reused ({time.perf_counter() - started:.1f}s)"
            )
        )
    report = dist.broadcast_object(report)
    # `data index` reads headers only; `data prepare` preprocesses, so it lists what preprocessing found.
    prepare = (
        f"`medcli data prepare {data_root} --modalities {','.join(pcfg.modalities)} --input-size "
        f"{','.join(map(str, pcfg.input_size))}`"
    )
    if report.failed:
        sid, reason = report.failed[0]
        raise DataError(
            f"{len(report.failed)} subject(s) could not be preprocessed; first: {sid}: {reason}",
            hint=f"{prepare} lists every subject that fails; fix or remove them",
        )
    if report.warnings:
        sid, warning = report.warnings[0]
        n = len({s for s, _ in report.warnings})
        emit(
            Warning(f"{n} subject(s) with scans unlike BraTS (first: {sid}: {warning}); {prepare} lists them")
        )


def _num_workers(cfg: TrainConfig) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    cpus = os.cpu_count() or 1
    # On a 2-core machine the model needs both cores; a loader worker would only steal from it.
    return 0 if cpus <= 2 else min(4, cpus // 2)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random in a DataLoader worker from torch's per-worker seed (drawn from the generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _load_or_make_splits(cfg: TrainConfig, subjects: Sequence[Any], fold_dir: FoldDir, emit: Callback):
    """``runs/<name>/splits.json``: made once (rank 0), then reused by every fold and resume of the run.

    A cohort that changed since (subjects added/removed/relabelled) or another k/seed is an error, once a
    fold has trained on the split; a split no fold has used yet (the first training stopped at a bad scan,
    which the user then removed) is simply made again.
    """
    from medcli.data.splits import ensure_splits

    splits = None
    if dist.is_main():
        fold_dir.run_root.mkdir(parents=True, exist_ok=True)
        try:
            splits = ensure_splits(fold_dir.splits, subjects, k=cfg.folds, seed=cfg.seed)
        except MedcliError as e:
            if not fold_dir.splits.exists() or _split_in_use(fold_dir):
                raise
            emit(Info(f"{fold_dir.splits} was made again: no fold has trained on it ({e.message})"))
            fold_dir.splits.unlink()
            splits = ensure_splits(fold_dir.splits, subjects, k=cfg.folds, seed=cfg.seed)
    dist.barrier()
    return (
        splits if splits is not None else ensure_splits(fold_dir.splits, subjects, k=cfg.folds, seed=cfg.seed)
    )


def _split_in_use(fold_dir: FoldDir) -> bool:
    """Whether a fold of the run has a checkpoint made on its split, or another fold is training now."""
    from medcli.locking import holder

    root = fold_dir.run_root
    if any(root.glob("fold*/last.pt")) or any(root.glob("fold*/best.pt")):
        return True
    return any(holder(lock) for lock in root.glob(".fold*.lock") if lock != fold_dir.lock)


# ------------------------------------------------------------------------------------------ loss & model
def build_loss(cfg: TrainConfig, class_counts: tuple[int, int]) -> nn.Module:
    """get_loss with the options it accepts (LDAM's s/max_m, DRW's start) from the config."""
    from medcli.losses import get_loss

    options: dict[str, Any] = {"s": cfg.ldam_s, "max_m": cfg.ldam_max_m}
    if cfg.drw_start is not None:
        start = cfg.drw_start
        options["drw_start"] = int(start) if float(start).is_integer() and start >= 1 else float(start)
    # Explicit --loss-opt values win over the LDAM/DRW flags' defaults.
    options = {**_accepted(cfg.loss, options), **cfg.loss_options}
    return get_loss(cfg.loss, num_classes=2, class_counts=class_counts, **options)


def _accepted(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` a built-in loss takes (plugins get only what their own flags say)."""
    from medcli.losses import LOSSES

    if name not in LOSSES:
        return {}
    try:
        params = inspect.signature(LOSSES.get(name)).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def display_name(depth: int | str) -> str:
    return f"ResNet{depth}-3D" if isinstance(depth, int) else f"ResNet-{depth}-3D"


def _warn_other_start(fold_dir: FoldDir, sha: str | None, emit: Callback) -> None:
    """A run's folds are compared and ensembled, so they should start from the same weights; say so when
    another fold's checkpoint records other ones (e.g. the weights were fetched after fold 0 trained)."""

    def start(h: str | None) -> str:
        return "random initialization" if h is None else f"weights with SHA-256 {h[:12]}…"

    for other in sorted(fold_dir.path.parent.glob("fold*/last.pt")):
        if other.parent == fold_dir.path:
            continue
        try:  # memory-mapped: only the small provenance dict is read
            theirs = ckpt_io.read_checkpoint(other, mmap=True).get("provenance", {}).get("pretrained_sha256")
        except CheckpointError:
            continue  # unreadable: `eval`/`predict` will say so where it matters
        if theirs != sha:
            emit(
                Warning(
                    f"{other.parent.name} started from {start(theirs)}, this fold from {start(sha)}: the "
                    "run's folds are not comparable (use --force on the other folds, or --name for a new run)"
                )
            )
            return


def _warn_other_settings(fold_dir: FoldDir, cfg: TrainConfig, emit: Callback) -> None:
    """The folds of a run estimate one recipe (eval pools them, predict ensembles them): say so when
    another fold was trained with other settings (how it runs, e.g. --epochs or --num-workers, aside)."""
    import json

    for other in sorted(fold_dir.path.parent.glob("fold*/config.json")):
        if other.parent == fold_dir.path:
            continue
        try:
            theirs = TrainConfig.from_dict(json.loads(other.read_text()))
        except (OSError, ValueError, MedcliError):
            continue  # unreadable: `eval`/`predict` will say so where it matters
        diff = theirs.differences(cfg)
        if diff:
            was, now = theirs.to_dict(), cfg.to_dict()
            shown = ", ".join(f"{k} {was[k]} → {now[k]}" for k in diff[:3]) + (
                ", ..." if len(diff) > 3 else ""
            )
            emit(
                Warning(
                    f"{other.parent.name} of this run was trained with other settings ({shown}): the run's "
                    "folds no longer estimate one recipe (use --name for a separate run)"
                )
            )
            return


def resolve_pretrained(cfg: TrainConfig) -> str:
    """Replace ``pretrained_path="auto"`` by where the MedicalNet release for ``cfg.depth`` is (or would be
    fetched to; None for a depth never released, ``tiny``).  Returns the command that fetches that release,
    for the messages about a missing file."""
    from medcli.weights.manifest import fetch_command, weights_for_depth

    path, entry = weights_for_depth(cfg.depth)
    if cfg.pretrained_path == "auto":
        cfg.pretrained_path = None if path is None else str(path)
    return fetch_command(entry)


def _build_model(cfg: TrainConfig, emit: Callback, fetch: str) -> tuple[nn.Module, Any]:
    """create_model + load_pretrained, announced in the seed's words with true numbers (``fetch``: the
    command that downloads the release for this depth, for a missing file); the model and the load's
    report (None without starting weights)."""
    from medcli.models import create_model, load_pretrained
    from medcli.weights.manifest import load_manifest

    name = display_name(cfg.depth)
    emit(Info(f"Creating {name} model..."))
    emit(Info(f"Model architecture: {name} (MedicalNet-compatible)"))
    model = create_model(
        cfg.depth,
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        dropout=cfg.dropout,
        head=cfg.head,
        zero_init_last=cfg.zero_init_last,
    )
    report = None
    if cfg.pretrained_path:
        emit(Info(f"Loading MedicalNet pretrained weights from: {cfg.pretrained_path}"))
        report = load_pretrained(model, cfg.pretrained_path, require=cfg.require_pretrained, fetch=fetch)
        if report.exists:
            stripped = f", '{report.prefix_stripped}' prefix stripped" if report.prefix_stripped else ""
            emit(Info(f"Using checkpoint as {report.container} ({report.format}{stripped})"))
        emit(Info(report.summary_line()))
        for w in report.warnings:
            emit(Warning(w))
        if report.ok and report.medcli_fold is not None:  # not a MedicalNet release: do not call it one
            emit(Info(f"Starting weights loaded: a medcli checkpoint (fold {report.medcli_fold} of its run)"))
        elif report.ok:
            emit(Info("MedicalNet pretrained weights loaded successfully!"))
        elif report.exists:
            from medcli.errors import IncompleteLoadError

            message = (
                f"the backbone did not load completely from {cfg.pretrained_path} "
                f"({len(report.missing)} keys missing, {len(report.mismatched)} shape mismatches)"
            )
            if cfg.require_pretrained:
                raise IncompleteLoadError(message, hint="run `medcli weights verify` on the file")
            emit(Warning(message + "; the rest starts from random initialization"))
    elif load_manifest().for_depth(cfg.depth) is None:  # `tiny`: nothing to start from
        emit(Info(f"MedicalNet released no {name} weights: training from random initialization"))
    else:
        emit(Info("--no-pretrained: training from random initialization"))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit(Info(f"Model created: {total / 1e6:.2f}M total params, {trainable / 1e6:.2f}M trainable"))
    return model, report


def _warn_start_saw_validation(cfg: TrainConfig, start: Any, data: FoldData, emit: Callback) -> None:
    """Starting weights that are a medcli checkpoint trained on this fold's validation patients (another
    split of the same cohort, say) have seen them: the fold's validation metrics, and best.pt chosen on
    them, are then optimistic.  Said with the count where the checkpoint's split file lies beside it."""
    from medcli.data.splits import Splits
    from medcli.engine.runs import split_file_of

    if start is None or not start.exists or start.medcli_fold is None:
        return
    source = Path(cfg.pretrained_path)
    val_patients = {s.patient_id for s in data.val_subjects}
    split_file = split_file_of(source.resolve().parent)
    try:
        old = Splits.load(split_file) if split_file else None
        old_train, _ = old.fold(int(start.medcli_fold)) if old else ([], [])
    except (MedcliError, ValueError, TypeError):
        old = None
    if old is not None:
        seen = {old.patients.get(s, s) for s in old_train} & val_patients
        if not seen:
            return
        what = f"were trained on {len(seen)} of this fold's {len(val_patients)} validation patients"
    elif start.medcli_data and Path(start.medcli_data).resolve() == Path(cfg.data).resolve():
        what = "were trained on this cohort (no split file beside them says on which patients)"
    else:
        return
    emit(
        Warning(
            f"the starting weights {source} (fold {start.medcli_fold} of a medcli run) {what}: this fold's "
            "validation metrics, and the best.pt chosen on them, will be optimistic; start from MedicalNet's "
            "weights, or from a checkpoint that never saw these patients"
        )
    )


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainState:
    """What changes as training runs (and what a checkpoint restores)."""

    epoch: int = -1  # last completed
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    saved_epoch: int = -1  # the epoch last.pt holds (-1: none yet), for the message on Ctrl-C


def _fit(
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
    model: nn.Module,
    loss_fn: nn.Module,
    data: FoldData,
    fold_dir: FoldDir,
    pretrained_sha: str | None,
    emit: Callback,
    resume: bool,
) -> FoldResult:
    if device.type == "cpu" and precision.amp_dtype is torch.bfloat16 and not speed.cpu_has_fast_bf16():
        emit(
            Warning(
                "--amp on a CPU without native bf16: oneDNN emulates it, many times slower than fp32 "
                "(drop --amp)"
            )
        )
    rewrites = place_model(model, device, precision)
    if rewrites:
        emit(Info(f"CPU {precision.name}: {rewrites}"))
    loss_fn.to(device)
    ema = create_ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = create_optimizer(
        cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, head_lr_mult=cfg.head_lr_mult
    )
    steps_per_epoch = -(-len(data.train_loader) // cfg.gradient_accumulation_steps)
    schedule = create_schedule(
        cfg.scheduler,
        optimizer,
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=cfg.warmup_epochs,
        min_ratio=cfg.min_lr_ratio,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    if not resume and cfg.scheduler in ("cosine", "step") and cfg.warmup_epochs >= cfg.epochs:
        # The schedule clamps the warm-up to the last step: the lr would rise all along and never decay.
        emit(
            Warning(
                f"--warmup-epochs {cfg.warmup_epochs:g} spans the whole training ({_epochs(cfg.epochs)}): "
                f"the lr rises until the last step and the {cfg.scheduler} decay never comes; use a "
                f"shorter warm-up (e.g. --warmup-epochs {max(cfg.epochs / 10, 0.1):g}) or more --epochs"
            )
        )

    state = TrainState()
    complete = None
    if resume:
        saved = _restore(fold_dir, cfg, model, ema, optimizer, schedule, scaler, state, emit)
        state.saved_epoch = state.epoch
        emit(Info(f"Resuming from {fold_dir.last}: epoch {state.epoch + 1} done, step {state.global_step}"))
        complete = _completed(cfg, state)
        if complete is None and saved.epochs != cfg.epochs:
            _respread_schedule(saved, cfg, schedule, loss_fn, emit)
    elif dist.world_size() > 1:
        _seed_this_rank(cfg)
    if dist.is_main():
        state.rows = [r for r in fold_dir.read_metrics() if r["epoch"] <= state.epoch] if resume else []
    if complete is not None:  # `--fold all --resume` after a crash in a later fold lands here: change nothing
        if dist.is_main():
            fold_dir.write_config(saved.to_dict())  # start() wrote this session's settings; none applied
        reason, stopped_early = complete
        emit(Info(f"Fold {cfg.fold} is complete: {reason}; nothing to train"))
        return _fold_result(cfg, fold_dir, state, stopped_early=stopped_early, emit=emit, plot=False)

    net: nn.Module = model
    if dist.world_size() > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.freeze_backbone_epochs > 0,
        )
    if cfg.compile:
        net = torch.compile(net)

    emit(
        FoldStarted(
            fold=cfg.fold,
            run_dir=str(fold_dir.path),
            num_train=len(data.train_dataset),
            num_val=len(data.val_subjects),
            epochs=cfg.epochs,
            start_epoch=state.epoch + 1,
            batches_per_epoch=len(data.train_loader),
            device=str(device) + (f" × {dist.world_size()} processes" if dist.world_size() > 1 else ""),
            precision=precision.name,
        )
    )
    scale = cfg.ldam_s if cfg.head == "cosine" else 1.0
    stopped_early = False
    with _resume_hint_on_interrupt(fold_dir, cfg, state), stopping.deferred():
        for epoch in range(state.epoch + 1, cfg.epochs):
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                break
            started = time.perf_counter()
            if hasattr(loss_fn, "on_epoch_start"):
                loss_fn.on_epoch_start(epoch, cfg.epochs)
            set_backbone_frozen(model, epoch < cfg.freeze_backbone_epochs)
            if hasattr(data.train_dataset, "set_epoch"):
                data.train_dataset.set_epoch(epoch)
            if data.train_sampler is not None:
                data.train_sampler.set_epoch(epoch)
            data.train_generator.manual_seed(
                cfg.seed * 100003 + epoch
            )  # the shuffle depends on the epoch only

            emit(EpochStarted(epoch=epoch, epochs=cfg.epochs, num_batches=len(data.train_loader)))
            stats = train_one_epoch(
                net,
                data.train_loader,
                loss_fn,
                optimizer,
                scaler,
                device=device,
                precision=precision,
                accumulation=cfg.gradient_accumulation_steps,
                grad_clip=cfg.grad_clip,
                schedule=schedule,
                ema=ema,
                ema_source=model,
                state=state,
                max_steps=cfg.max_steps,
                on_batch=lambda b, n, loss, lr, sps, e=epoch: emit(BatchEnded(e, b, n, loss, lr, sps)),
            )
            val = evaluate_loader(model, data.val_loader, loss_fn, device, precision, scale)
            val_ema = (
                evaluate_loader(ema.module, data.val_loader, loss_fn, device, precision, scale)
                if ema
                else None
            )
            _check_finite_outputs(epoch, val, val_ema)
            chosen = val_ema if (cfg.selection == "ema" and val_ema is not None) else val
            if schedule.interval == "plateau" and chosen["auc"] is not None:
                schedule.scheduler.step(chosen["auc"])

            metric = chosen["auc"]
            is_best = metric is not None and (state.best_metric is None or metric > state.best_metric)
            if is_best:
                state.best_metric, state.best_epoch = metric, epoch
            state.epoch = epoch
            record = {
                "epoch": epoch,
                "train_loss": stats["loss"],
                "val_loss": val["loss"],
                "val_auc": val["auc"],
                "val_bal_acc": val["bal_acc"],
                "val_auc_ema": val_ema["auc"] if val_ema else None,
                "val_bal_acc_ema": val_ema["bal_acc"] if val_ema else None,
                "val_loss_ema": val_ema["loss"] if val_ema else None,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": stats["samples_per_s"],
                "seconds": round(time.perf_counter() - started, 3),
                "global_step": state.global_step,
            }
            line = _epoch_line(cfg, record, is_best)
            # Every rank's random state, for an exact resume under DDP (a collective: all ranks call it).
            rng_ranks = dist.gather_objects([ckpt_io.capture_rng()]) if dist.world_size() > 1 else None
            if dist.is_main():
                state.rows.append(record)
                # Metrics first, checkpoint second: a run killed in between resumes from the previous
                # checkpoint and drops the rows after it, so metrics never run ahead of last.pt for long.
                fold_dir.write_metrics(state.rows)
                if is_best or not (fold_dir.path / "val_predictions.csv").exists():
                    fold_dir.write_predictions(_prediction_rows(data.val_subjects, val, val_ema))
                blob = _checkpoint_dict(
                    cfg, model, ema, optimizer, schedule, scaler, state, data, pretrained_sha
                )
                if rng_ranks is not None:
                    blob["rng_ranks"] = rng_ranks
                ckpt_io.atomic_save(blob, fold_dir.last)
                state.saved_epoch = epoch
                if is_best:
                    _link_or_copy(fold_dir.last, fold_dir.best)
            # After the checkpoint: train.log never names an epoch that last.pt does not hold.
            emit(EpochEnded(record=record, is_best=is_best, line=line))

            if (
                cfg.patience is not None
                and state.best_epoch is not None
                and epoch - state.best_epoch >= cfg.patience
            ):
                stopped_early = True
                emit(Info(f"Early stopping: no validation AUC gain for {_epochs(cfg.patience)}"))
                break
    return _fold_result(cfg, fold_dir, state, stopped_early=stopped_early, emit=emit)


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _completed(cfg: TrainConfig, state: TrainState) -> tuple[str, bool] | None:
    """Why a resumed fold has nothing left to train under ``cfg`` and whether it stopped early, or None.
    Without this check a fold that had stopped early trained one more epoch on every --resume (rewriting its
    last.pt and metrics), as `--fold all --resume` does to the folds before the one it continues."""
    done = state.epoch + 1
    if done >= cfg.epochs:
        which = (
            f"all {_epochs(done)}"
            if done == cfg.epochs
            else f"{_epochs(done)}, more than --epochs {cfg.epochs},"
        )
        return f"{which} trained (--epochs above {done} continues it)", False
    if (
        cfg.patience is not None
        and state.best_epoch is not None
        and state.epoch - state.best_epoch >= cfg.patience
    ):
        return (
            f"it stopped early after epoch {done}, {_epochs(state.epoch - state.best_epoch)} without a "
            f"validation AUC gain (--patience {cfg.patience}; a larger one continues it)",
            True,
        )
    if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
        return f"it reached --max-steps {cfg.max_steps} (a larger one continues it)", False
    return None


def _respread_schedule(
    saved: TrainConfig, cfg: TrainConfig, schedule, loss_fn: nn.Module, emit: Callback
) -> None:
    """A resume with another --epochs: the schedule (and a fractional --drw-start) now spans the new length.
    The optimiser's lr is set to the new schedule's value at the current step at once (LambdaLR would only
    apply it at the next step), and the user is told: the fold is no longer any one uninterrupted training."""
    changes = []
    scheduler = schedule.scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        optimizer = scheduler.optimizer
        before = optimizer.param_groups[0]["lr"]
        step = scheduler.last_epoch
        for group, base, factor in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(step)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
        after = optimizer.param_groups[0]["lr"]
        changes.append(
            f"the {cfg.scheduler} schedule now spans {_epochs(cfg.epochs)}, so the lr goes on at {after:.2e} "
            f"(was {before:.2e})"
        )
    if hasattr(loss_fn, "drw_epoch"):
        old, new = loss_fn.drw_epoch(saved.epochs), loss_fn.drw_epoch(cfg.epochs)
        if old != new:
            changes.append(f"re-weighting starts at epoch {new + 1} (was {old + 1})")
    if changes:
        emit(
            Warning(
                f"--epochs {cfg.epochs} where this fold started with {saved.epochs}: {'; '.join(changes)}; "
                "the result is not that of one uninterrupted training of either length"
            )
        )


def _fold_result(
    cfg: TrainConfig,
    fold_dir: FoldDir,
    state: TrainState,
    *,
    stopped_early: bool,
    emit: Callback,
    plot: bool = True,
) -> FoldResult:
    """What the fold's folder holds now (drawing curves.png first unless ``plot`` is off: a complete fold
    that was only visited keeps its files as they were)."""
    files = {}
    if dist.is_main() and state.rows:
        if plot:
            try:
                fold_dir.plot_curves(state.rows)
            except Exception as e:  # a plot must never fail a finished training
                emit(Warning(f"could not draw curves.png: {e}"))
        if (fold_dir.path / "curves.png").exists():
            files["curves"] = str(fold_dir.path / "curves.png")
        for name in (
            "config.json",
            "metrics.csv",
            "metrics.jsonl",
            "val_predictions.csv",
            "last.pt",
            "best.pt",
            "train.log",
        ):
            if (fold_dir.path / name).exists():
                files[name] = str(fold_dir.path / name)
    result = FoldResult(
        fold=cfg.fold,
        run_dir=str(fold_dir.path),
        epochs_run=state.epoch + 1,
        best_epoch=state.best_epoch,
        best_metric=state.best_metric,
        selection=cfg.selection,
        stopped_early=stopped_early,
        global_step=state.global_step,
        last=state.rows[-1] if state.rows else {},
        files=files,
    )
    emit(FoldFinished(summary=result.to_dict()))
    return result


@contextlib.contextmanager
def _resume_hint_on_interrupt(fold_dir: FoldDir, cfg: TrainConfig, state: TrainState):
    """Ctrl-C (or SIGTERM) during the epochs: say which epoch ``last.pt`` holds and how to continue."""
    try:
        yield
    except KeyboardInterrupt as e:
        error = interruption(e)
        where = f"{error.how} in epoch {state.epoch + 2}/{cfg.epochs}"
        if state.saved_epoch < 0:
            raise error(f"{where}, before the first checkpoint", hint="run the same command again") from None
        raise error(
            f"{where}; {fold_dir.last} holds epoch {state.saved_epoch + 1}",
            hint="add --resume to the same command to continue from there",
        ) from None


def _epoch_line(cfg: TrainConfig, r: dict[str, Any], is_best: bool) -> str:
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    ema = f" · val_auc_ema {f(r['val_auc_ema'])}" if r.get("val_auc_ema") is not None else ""
    return (
        f"epoch {r['epoch'] + 1}/{cfg.epochs} · train_loss {f(r['train_loss'])} · "
        f"val_loss {f(r['val_loss'])} · "
        f"val_auc {f(r['val_auc'])}{ema} · val_bal_acc {f(r['val_bal_acc'], '.3f')} · lr {r['lr']:.2e} · "
        f"{r['samples_per_s']:.2f} samples/s · {r['seconds']:.1f}s{' · best' if is_best else ''}"
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    """best.pt = this epoch's last.pt.  A hard link costs nothing; last.pt is later *replaced* (a new
    inode), so the link keeps this epoch's bytes.  Published with os.replace, like every checkpoint."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------------- one training epoch
def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Sequence[nn.Parameter],
    grad_clip: float,
) -> float | None:
    """Unscale (AMP), clip the global grad norm, step, update the scaler.  Returns the pre-clip norm.

    Clipping must see true gradients, so it comes after ``scaler.unscale_``; ``scaler.step`` then skips the
    step if the fp16 gradients overflowed.
    """
    norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train_one_epoch(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: Precision,
    accumulation: int = 1,
    grad_clip: float = 0.0,
    schedule=None,
    ema=None,
    ema_source: nn.Module | None = None,
    state: TrainState | None = None,
    max_steps: int | None = None,
    on_batch=None,
) -> dict[str, float]:
    """One pass over ``loader`` with gradient accumulation; returns mean loss and samples/s.

    Micro-batches are grouped by ``accumulation``; each micro-batch loss is divided by the number of
    micro-batches *actually* in its group, so a short last group (len(loader) not a multiple) is
    flushed with correctly scaled gradients instead of being dropped or under-weighted.  DDP skips the
    all-reduce on non-final micro-batches (no_sync).  Schedules with interval "step" and the EMA advance
    once per optimiser step.
    """
    state = state if state is not None else TrainState()
    train_mode(model)  # model.train(), frozen BatchNorm layers (--freeze-backbone-epochs) left in eval mode
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fmt = torch.channels_last_3d if precision.channels_last else torch.contiguous_format
    num_batches = len(loader)
    total_loss, total_seen = 0.0, 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        dist.stop_agreed(device)  # Ctrl-C under DDP: every rank stops here, at the same batch
        x, y = batch[0], batch[1]
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = torch.as_tensor(y).to(device, non_blocking=True).long()
        group_start = (i // accumulation) * accumulation
        group_size = min(accumulation, num_batches - group_start)
        final_micro = i - group_start == group_size - 1
        with dist.no_sync(model, skip=not final_micro):
            with autocast(device, precision):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            scaler.scale(loss / group_size).backward()
        value = float(loss.detach())
        if not math.isfinite(value) and not scaler.is_enabled():  # fp16's GradScaler skips such steps
            lr = optimizer.param_groups[0]["lr"]
            raise _diverged(f"the loss became {value} at step {state.global_step + 1} (lr {lr:.2e})")
        total_loss += value * len(y)
        total_seen += len(y)
        if final_micro:
            scale = scaler.get_scale() if scaler.is_enabled() else None
            optimizer_step(optimizer, scaler, params, grad_clip)
            # fp16: GradScaler skips the step when gradients overflowed (the first few steps, while it
            # finds its scale) and lowers the scale.  A skipped step changed no weight, so the schedule and
            # the EMA do not advance either: they count real updates.
            stepped = scale is None or scaler.get_scale() >= scale
            if (
                stepped
                and schedule is not None
                and schedule.interval == "step"
                and schedule.scheduler is not None
            ):
                schedule.scheduler.step()
            state.global_step += 1
            if stepped and ema is not None:
                ema.update_parameters(ema_source if ema_source is not None else model)
        if on_batch is not None:
            elapsed = max(time.perf_counter() - start, 1e-9)
            on_batch(
                i + 1,
                num_batches,
                value,
                optimizer.param_groups[0]["lr"],
                total_seen * dist.world_size() / elapsed,
            )
        if final_micro and max_steps is not None and state.global_step >= max_steps:
            break
    elapsed = max(time.perf_counter() - start, 1e-9)
    mean_loss = dist.all_reduce_sum(total_loss, device) / max(1.0, dist.all_reduce_sum(total_seen, device))
    return {"loss": mean_loss, "samples_per_s": total_seen * dist.world_size() / elapsed, "seconds": elapsed}


# ------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def predict_loader(
    model: nn.Module, loader, device: torch.device, precision: Precision
) -> list[tuple[str, int, list[float]]]:
    """(subject_id, label, logits) for every item of ``loader``, gathered over ranks, duplicates dropped."""
    was_training = model.training
    model.eval()
    fmt = torch.channels_last_3d if precision.channels_last else torch.contiguous_format
    rows: list[tuple[str, int, list[float]]] = []
    for x, y, ids in loader:
        dist.stop_agreed(device)
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, precision):
            logits = model(x).float().cpu()
        for sid, label, z in zip(ids, torch.as_tensor(y).tolist(), logits.tolist(), strict=True):
            rows.append((str(sid), int(label), z))
    model.train(was_training)
    seen: set[str] = set()
    unique = []
    for row in dist.gather_objects(rows):  # DistributedSampler pads with repeats: keep the first of each
        if row[0] not in seen:
            seen.add(row[0])
            unique.append(row)
    return unique


def _check_finite_outputs(epoch: int, val: dict[str, Any], val_ema: dict[str, Any] | None) -> None:
    """Before anything of ``epoch`` is saved: NaN/Inf probabilities mean the model diverged (under fp16 the
    GradScaler skips steps with non-finite losses, so this is where such a run is caught)."""
    for which, v in (("", val), (" (EMA)", val_ema)):
        if v is not None and not v["finite"]:
            raise _diverged(
                f"the model's validation outputs{which} are NaN or infinite after epoch {epoch + 1}"
            )


def _diverged(what: str) -> Diverged:
    """The error for a training whose loss or outputs became NaN/Inf; it stops before saving the epoch, so
    last.pt and best.pt still hold finite weights.  Another --lr makes another run: start over."""
    return Diverged(
        f"training diverged: {what}; nothing of this epoch was saved",
        hint="lower --lr or add --grad-clip 1.0, and start over with --force (or --name for a new run)",
    )


def evaluate_loader(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision,
    logit_scale: float = 1.0,
) -> dict[str, Any]:
    """Validation loss, AUC and balanced accuracy (at p >= 0.5), plus per-subject P(HGG)."""
    from sklearn.metrics import balanced_accuracy_score

    from medcli.engine.metrics import roc_auc_or_none

    rows = predict_loader(model, loader, device, precision)
    ids = [r[0] for r in rows]
    labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
    logits = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    loss = float(loss_fn(logits.to(device), labels.to(device))) if len(rows) else None
    p = torch.softmax(logits * logit_scale, dim=1)[:, 1].numpy() if len(rows) else np.zeros(0)
    y = labels.numpy()
    finite = bool(np.isfinite(p).all())  # else a diverged model: no metrics (_check_finite_outputs)
    auc = roc_auc_or_none(y, p) if finite else None
    both = len(set(y.tolist())) == 2
    bal = float(balanced_accuracy_score(y, (p >= 0.5).astype(int))) if both and finite else None
    return {
        "loss": loss,
        "auc": auc,
        "bal_acc": bal,
        "p_hgg": dict(zip(ids, p.tolist(), strict=True)),
        "y": y,
        "finite": finite,
    }


def _prediction_rows(subjects, val: dict[str, Any], val_ema: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for s in subjects:
        rows.append(
            {
                "subject_id": s.subject_id,
                "patient_id": s.patient_id or s.subject_id,
                "label": s.label,
                "p_hgg": round(val["p_hgg"][s.subject_id], 6),
                "p_hgg_ema": round(val_ema["p_hgg"][s.subject_id], 6) if val_ema else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_dict(cfg, model, ema, optimizer, schedule, scaler, state: TrainState, data: FoldData, sha):
    from datetime import datetime, timezone

    from medcli import __version__

    return {
        "format": ckpt_io.FORMAT,
        "model": model.state_dict(),
        **ema_checkpoint(ema),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "rng": ckpt_io.capture_rng(),
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "config": cfg.to_dict(),
        "preprocess": data.preprocess.to_dict(),
        "class_names": list(CLASS_NAMES),
        "fold": cfg.fold,
        "split_hash": data.split_hash,
        "provenance": {
            "pretrained_sha256": sha,
            "medcli_version": __version__,
            "torch_version": str(torch.__version__),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _restore(
    fold_dir: FoldDir, cfg, model, ema, optimizer, schedule, scaler, state: TrainState, emit: Callback
) -> TrainConfig:
    """Load last.pt into the model, optimiser, schedule, scaler, EMA and ``state``; returns the settings it
    was trained with (they differ from ``cfg`` at most in RUN_CONTROL_FIELDS such as --epochs)."""
    ck = ckpt_io.read_checkpoint(fold_dir.last)
    saved = TrainConfig.from_dict(ck["config"])
    diff = saved.differences(cfg)
    if diff:
        raise CheckpointError(
            f"cannot resume {fold_dir.last}: it was trained with other settings ({', '.join(diff)})",
            hint="resume with the original settings, or use --name for a new run",
        )
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        schedule.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ema is not None:
            if ck.get("ema") is None:
                raise CheckpointError(f"{fold_dir.last} has no EMA weights but --ema-decay is set")
            restore_ema(ema, ck)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot resume from {fold_dir.last}: {str(e).splitlines()[0][:200]}",
            hint="the checkpoint does not match this model/optimizer; start over with --force",
        ) from None
    state.epoch = int(ck["epoch"])
    state.global_step = int(ck["global_step"])
    state.best_metric = ck.get("best_metric")
    state.best_epoch = ck.get("best_epoch")
    _restore_rng(ck, emit)
    return saved


def _restore_rng(ck: dict[str, Any], emit: Callback) -> None:
    """This rank's random state as it was saved; exact when resumed with the same number of processes."""
    ranks = ck.get("rng_ranks")
    if dist.world_size() == 1 and not ranks:
        ckpt_io.restore_rng(ck["rng"])
    elif ranks and len(ranks) == dist.world_size():
        ckpt_io.restore_rng(ranks[dist.rank()])
    else:
        saved = f"was saved by {len(ranks)} processes" if ranks else "holds one process's random state"
        emit(
            Warning(
                f"resuming with {dist.world_size()} process(es) a checkpoint that {saved}: training goes on, "
                "but not on the random streams (dropout, shards) an uninterrupted run would have drawn"
            )
        )
        ckpt_io.restore_rng(ck["rng"])
        if dist.world_size() > 1:
            _seed_everything(int(torch.randint(0, 2**31 - 1, ())) + 1_000_003 * dist.rank())
