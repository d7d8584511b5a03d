"""Inference: fold ensembles, flip test-time augmentation, on the fast path.

Every flipped copy of a scan is built at once (``[F*N, C, D, H, W]``) and sent through each ensemble member
in chunks of ``max_batch`` volumes; each fold model is loaded once.  Probabilities (softmax, then P(HGG))
are averaged over members and flips, as in nnU-Net.  5 folds x 8 flips cost 1.01x the time of 40 single
forward passes on CPU (chunks of 2) and 0.75x on an H100 (chunks of 8).

The fast path (``fuse=True``, the default) changes how, never what, the model computes:

* BatchNorm folded into the preceding conv (one less pass over every activation);
* channels-last-3d memory format on CPU (and with bf16 on CUDA);
* on CPU (:mod:`medcli.engine.cpu_kernels`), in fp32 every stride-1 3³ conv by Winograd F(4³, 3³) (the
  dilated ones over their phase sub-grids) and the large 1³ convs as GEMMs;
* ``precision="bf16"`` on a CPU with native bf16: the backbone in bf16 on fused oneDNN ops, conv+ReLU and
  conv+add+ReLU, with a space-to-depth stem and layer4's dilated convs tap by tap
  (:mod:`medcli.engine.cpu_bf16`); elsewhere ``torch.autocast(bfloat16)``.
* ``precision="auto"``: bf16 on CPUs that compute it natively (AMX / AVX512-BF16), else fp32 (emulated
  bf16 is slower than fp32; on CUDA a batch-1 forward is launch-bound and fp32/TF32 was fastest).

Measured on 16 Sapphire Rapids cores (AMX), ResNet-50 at 128^3, batch 1: plain fp32 eager 0.68 s, fast
fp32 0.42 s, fast bf16 0.20 s (3.4x; P(HGG) within 0.001 of fp32); a whole one-scan predict 0.68 s ->
0.36 s (1.9x).  Timing hooks for ``medcli bench``: :meth:`Predictor.probabilities` (model part),
:meth:`Predictor.predict` (files in, predictions out) and :func:`synthetic_predictor` (no files needed);
plain fp32 eager is ``Predictor(..., precision="fp32", fuse=False, channels_last=False)``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medcli.data import label_to_grade
from medcli.engine import cpu_bf16
from medcli.engine.cpu_kernels import rewrite_for_cpu
from medcli.engine.devices import select_device
from medcli.engine.runs import fold_number, missing_folds
from medcli.engine.winograd import keep_transformed_weights, transformed_weight_bytes
from medcli.errors import CheckpointError, DataError, MedcliError, UsageError

CLASS_NAMES = ("LGG", "HGG")
PRECISIONS = ("auto", "fp32", "bf16")
# Transformed Winograd weights kept between forward passes (CPU, fp32) while all members' fit in this.
KEPT_TRANSFORMS_BYTES = 2 << 30

# Every subset of the three spatial axes of an [N, C, D, H, W] batch: identity, 3 single, 3 double, 1 triple.
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r)
)


def flipped_copies(x: torch.Tensor, flips: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``x [N, C, D, H, W]`` once per flip (the dims it flips), flip-major: ``[F*N, C, D, H, W]``."""
    return torch.cat([x.flip(dims) if dims else x for dims in flips])


# ----------------------------------------------------------------------------------------------------------
# Hardware choices
# ----------------------------------------------------------------------------------------------------------


def native_bf16(device: torch.device) -> bool:
    """True where bf16 convolutions run natively (GPU with bf16, or a CPU with AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from medcli.engine.speed import cpu_has_fast_bf16  # the trainer's test, so both agree

        return cpu_has_fast_bf16()
    return False


def fuse_conv_bn(model: nn.Module, memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """Fold every eval-mode BatchNorm3d into the Conv3d before it (in place), as inference runtimes do.

    ResNet-3D pairs are named ``convN``/``bnN`` (stem and blocks) and ``downsample = Sequential(conv, bn)``.
    Folding removes one full read+write of every activation per BN: a large share of CPU time at 128^3.
    The function computed is unchanged (up to float rounding); the state-dict keys are not, so fuse only
    models loaded for inference.  The folded weights are written in ``memory_format`` (one pass over
    the checkpoint's weights, not a fold and then a channels-last copy: 0.07 s vs 0.10 s for a ResNet-50).
    """

    def fold(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> None:
        # torch.nn.utils.fusion.fuse_conv_bn_weights's arithmetic, written into a tensor of the wanted
        # memory format; in place (fuse_conv_bn_eval would deep-copy every conv first: 185 MB).
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = torch.empty_like(conv.weight, memory_format=memory_format)
        torch.mul(conv.weight, scale.to(conv.weight.dtype).view(-1, 1, 1, 1, 1), out=weight)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        bias = ((bias - bn.running_mean) * scale + bn.bias).to(weight.dtype)
        grad = conv.weight.requires_grad
        conv.weight, conv.bias = nn.Parameter(weight, grad), nn.Parameter(bias, grad)

    model.eval()
    with torch.no_grad():
        for module in list(model.modules()):
            for i in range(1, 10):
                conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
                if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d):
                    fold(conv, bn)
                    setattr(module, f"bn{i}", nn.Identity())
            if isinstance(module, nn.Sequential) and len(module) == 2:
                conv, bn = module[0], module[1]
                if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d):
                    fold(conv, bn)
                    module[1] = nn.Identity()
    return model


def resolve_precision(precision: str, device: torch.device, input_size: Sequence[int] | None = None) -> str:
    """``auto`` → ``bf16`` on CPUs with native bf16 for inputs of 64³ and up, else ``fp32``; explicit bf16
    without native support is slow.  The size rule is the trainer's (``CPU_CHANNELS_LAST_MIN_SIZE``: below
    it bf16 was slower than fp32 on AMX), so a model's validation during training and its eval --recompute
    or predict run in the same precision: the same probabilities below 64³, equal within bf16's rounding
    from there (training's autocast and predict's fused bf16 ops round differently).

    On CUDA ``auto`` is fp32 (TF32 convolutions): a one-scan ResNet-50 forward at 128³ on an H200 ran 235
    scans/s in plain fp32, 219 with BN folded + channels_last and 149 in bf16 + channels_last (medcli
    bench): at batch 1 the GPU waits on kernel launches, not arithmetic."""
    from medcli.engine.speed import CPU_CHANNELS_LAST_MIN_SIZE  # the trainer's rule, so both agree

    p = precision.strip().lower()
    if p not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}", hint=f"choose one of: {', '.join(PRECISIONS)}")
    if p == "auto":
        large = input_size is None or min(input_size) >= CPU_CHANNELS_LAST_MIN_SIZE
        return "bf16" if device.type == "cpu" and large and native_bf16(device) else "fp32"
    return p


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ScanInput:
    """One scan to predict: an id and a path per modality (plus the label, when the input carries one)."""

    scan_id: str
    paths: dict[str, Path]
    label: int | None = None
    patient_id: str | None = None

    @classmethod
    def of_subject(cls, subject: Any) -> ScanInput:
        """A subject that ``medcli.data.discover`` found (its id, files, grade and patient)."""
        paths = {m: Path(p) for m, p in subject.paths.items()}
        return cls(subject.subject_id, paths, subject.label, subject.patient_id)


@dataclass
class ScanPrediction:
    scan_id: str
    grade: str
    p_hgg: float
    p_sd: float  # over all members x flips
    p_min: float
    p_max: float
    p_members: list[float]  # per ensemble member, averaged over flips
    n_members: int
    n_flips: int
    label: int | None = None  # the grade the input carries (graded folder or manifest), 1 = HGG
    saliency_nifti: str | None = None
    saliency_png: str | None = None
    warnings: list[str] = field(default_factory=list)  # about the input files (e.g. no orientation)

    def to_dict(self) -> dict[str, Any]:
        """For --json and --csv: the input's grade by name as ``true_grade`` ("LGG"/"HGG", as the table and
        eval's predictions.csv show it), since a bare 0/1 beside the predicted ``grade`` leaves the reader to
        guess which class is 1.  ``grade`` is the model's call, here and in eval's predictions.csv alike."""
        truth = None if self.label is None else label_to_grade(self.label)
        return {
            ("true_grade" if k == "label" else k): (truth if k == "label" else v)
            for k, v in asdict(self).items()
        }


@dataclass
class ScanFailure:
    scan_id: str
    error: str
    exit_code: int


@dataclass
class PredictResult:
    predictions: list[ScanPrediction]
    failures: list[ScanFailure]
    precision: str
    device: str
    tta: bool
    n_members: int
    threshold: float
    members: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictions": [p.to_dict() for p in self.predictions],
            "failures": [asdict(f) for f in self.failures],
            "precision": self.precision,
            "device": self.device,
            "tta": self.tta,
            "n_members": self.n_members,
            "threshold": self.threshold,
            "members": self.members,
        }


# ----------------------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------------------


class Predictor:
    """An ensemble of models sharing one preprocessing config, ready to predict.

    ``models``: eval-mode modules (each loaded once); ``preprocess_cfg``: the checkpoint's
    ``PreprocessConfig`` (applied with the same function training used).  ``max_batch`` caps the number of
    volumes (flipped copies included) in one forward pass, bounding memory for large inputs.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        preprocess_cfg: Any,
        *,
        tta: bool = False,
        precision: str = "auto",
        device: str | torch.device = "cpu",
        channels_last: bool | None = None,
        threshold: float = 0.5,
        max_batch: int | None = None,
        prefetch: int | None = None,
        member_names: Sequence[str] | None = None,
        member_weights: Sequence[str | None] | None = None,
        logit_scales: Sequence[float] | None = None,
        fuse: bool = True,
    ):
        if not models:
            raise CheckpointError(
                "no models to predict with", hint="pass --model with a checkpoint or run directory"
            )
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.precision = resolve_precision(
            precision, self.device, getattr(preprocess_cfg, "input_size", None)
        )
        # channels_last_3d: oneDNN prefers it (fp32 ResNet-50 at 128^3 on 16 Sapphire Rapids cores: 0.36 s
        # vs 0.42 s contiguous; bf16 needs it); on CUDA at batch 1 it was slower (see resolve_precision).
        # fp32, fuse=False, contiguous = plain eager.
        if channels_last is None:
            channels_last = self.device.type == "cpu" or self.precision != "fp32"
        self.channels_last = channels_last
        self.tta = tta
        self.flips = FLIPS if tta else FLIPS[:1]
        self.threshold = float(threshold)
        # Volumes per forward pass.  GPU: 8 (5 folds x 8 flips took 0.75x the time of 40 single passes on an
        # H100).  CPU: 2 (batch 8 was 1.25x there on 16 Sapphire Rapids cores, out of cache; 2 was 1.01x).
        if max_batch is None:
            max_batch = 8 if self.device.type == "cuda" else 2
        self.max_batch = max(1, int(max_batch))
        # Scans preprocessed ahead, each in its own thread (decompression, percentiles and resizing release
        # the GIL: 2 threads preprocessed 1.45x as many full-size subjects per second as 1 on 2 cores).  On a
        # GPU the forward pass takes milliseconds and preprocessing is the bottleneck, so use half the cores
        # (up to 4); on a CPU the forward pass takes seconds on every core and one scan ahead hides it.
        if prefetch is None:
            prefetch = min(4, max(1, (os.cpu_count() or 1) // 2)) if self.device.type == "cuda" else 1
        self.prefetch = max(1, int(prefetch))
        self.preprocess_cfg = preprocess_cfg
        self.member_names = list(member_names or [f"model{i}" for i in range(len(models))])
        # "ema" or "raw" per member as its checkpoint resolved --weights (None: not loaded from a checkpoint).
        self.member_weights = list(member_weights or [None] * len(models))
        # Cosine-head (LDAM) logits are cosines; training applied softmax(s * cos), so predict does too.
        self.logit_scales = [float(s) for s in (logit_scales or [1.0] * len(models))]
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        self.models = []
        for m in models:
            m.eval().requires_grad_(False)
            if fuse:  # the fast path: BN folded; on CPU the CPU kernels too
                fuse_conv_bn(m, memory_format=fmt)
                if self.device.type == "cpu":
                    rewrite_for_cpu(m, bf16=self.precision == "bf16", inference=True)
            self.models.append(m.to(device=self.device, memory_format=fmt))
        check_members(self.models, self.member_names)
        # On CPU in fp32 the 3³ convs run by Winograd, whose weights are transformed on every call unless
        # kept: a ResNet-50 keeps 1.07 GB, and its forward pass takes 3-9% less time from the second call
        # on (2 AVX2 cores; ~20% before the transform went depth first); a 5-fold ensemble of them would
        # keep 5.4 GB, so members keep theirs only while all fit.
        self.keeps_transforms = sum(map(transformed_weight_bytes, self.models)) <= KEPT_TRANSFORMS_BYTES
        self._keep_transforms(self.keeps_transforms)

    def _keep_transforms(self, keep: bool) -> None:
        for m in self.models:
            keep_transformed_weights(m, keep)

    @property
    def in_channels(self) -> int:
        return int(self.models[0].in_channels)

    def _autocast(self, model: nn.Module):
        # A backbone on medcli's fused bf16 ops is bf16 already (oneDNN refuses those ops under autocast).
        if self.precision == "bf16" and not cpu_bf16.is_rewritten(model):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x.contiguous()

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """P(HGG) for every member and flip: ``[M, F, N]`` for a batch ``x`` of shape ``[N, C, D, H, W]``.

        All flipped copies go through each member together (one forward pass per member per ``max_batch``).
        """
        if x.ndim != 5:
            raise ValueError(f"expected a [N, C, D, H, W] batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise DataError(
                f"input has {x.shape[1]} channels but the model expects {self.in_channels}",
                hint="pass the modalities the model was trained on",
            )
        n = x.shape[0]
        batch = flipped_copies(x, self.flips)
        out = np.empty((len(self.models), len(self.flips) * n), dtype=np.float64)
        for m, (model, scale) in enumerate(zip(self.models, self.logit_scales, strict=True)):
            for start in range(0, batch.shape[0], self.max_batch):
                chunk = self._prepare(batch[start : start + self.max_batch])
                with self._autocast(model):
                    logits = model(chunk)
                probs = torch.softmax(logits.float() * scale, dim=1)[:, 1]
                out[m, start : start + chunk.shape[0]] = probs.cpu().numpy()
        return out.reshape(len(self.models), len(self.flips), n)

    def summarize(self, probs: np.ndarray, index: int, scan: ScanInput) -> ScanPrediction:
        """Turn ``probabilities(...)[:, :, index]`` into one scan's prediction (mean, spread, grade)."""
        p = probs[:, :, index]
        mean = float(p.mean())
        return ScanPrediction(
            scan_id=scan.scan_id,
            grade=CLASS_NAMES[int(mean >= self.threshold)],
            p_hgg=mean,
            p_sd=float(p.std()),
            p_min=float(p.min()),
            p_max=float(p.max()),
            p_members=[float(v) for v in p.mean(axis=1)],
            n_members=p.shape[0],
            n_flips=p.shape[1],
            label=scan.label,
        )

    def preprocess(self, scan: ScanInput):
        """The training-time preprocessing of one scan → ``Preprocessed`` (array [C,D,H,W] + geometry).

        ``preprocess`` itself reports missing modalities, unreadable/4D/2D/NaN/all-zero images and
        modalities on different grids as ``DataError``s naming the file.
        """
        from medcli.data.preprocess import preprocess

        return preprocess(scan.paths, self.preprocess_cfg, subject_id=scan.scan_id)

    def empty_result(self) -> PredictResult:
        return PredictResult(
            predictions=[],
            failures=[],
            precision=self.precision,
            device=str(self.device),
            tta=self.tta,
            n_members=len(self.models),
            threshold=self.threshold,
            members=self.member_names,
        )

    def predict(
        self,
        scans: Iterable[ScanInput],
        *,
        saliency_dir: Path | None = None,
        on_scan: Callable[[ScanInput, ScanPrediction | ScanFailure], None] | None = None,
        into: PredictResult | None = None,
    ) -> PredictResult:
        """Predict every scan; a scan that fails is recorded (with its error) and the rest go on.  Each
        outcome is added to ``into`` (a fresh result if None) as it comes: a caller interrupted midway
        (Ctrl-C) still holds every scan done."""
        result = into if into is not None else self.empty_result()
        scans = list(scans)
        # Kept transforms pay off from a member's second forward pass on; for one pass, keeping 1 GB of
        # fresh memory costs more in page faults (~0.3 s) than transforming each weight as it is used.
        passes = len(scans) * math.ceil(len(self.flips) / self.max_batch)
        self._keep_transforms(self.keeps_transforms and passes > 1)
        for scan, pending in _prefetched(scans, self.preprocess, ahead=self.prefetch):
            try:
                pre = pending.result()  # re-raises the scan's own DataError
                x = torch.from_numpy(np.ascontiguousarray(pre.array, dtype=np.float32))[None]
                pred = self.summarize(self.probabilities(x), 0, scan)
                pred.warnings = list(pre.warnings)
                if saliency_dir is not None:
                    from medcli.engine.saliency import write_saliency

                    nii, png = write_saliency(
                        self, x, pre, scan, Path(saliency_dir), target=int(pred.grade == "HGG")
                    )
                    pred.saliency_nifti, pred.saliency_png = str(nii), str(png)
                result.predictions.append(pred)
                outcome: ScanPrediction | ScanFailure = pred
            except MedcliError as e:
                outcome = ScanFailure(scan.scan_id, str(e), e.exit_code)
                result.failures.append(outcome)
            if on_scan is not None:
                on_scan(scan, outcome)
        return result


def _prefetched(items: list, fn: Callable, ahead: int = 1) -> Iterable[tuple[Any, Any]]:
    """Yield ``(item, future of fn(item))`` in order, with ``fn`` already running on the next ``ahead``
    items in as many threads.

    Preprocessing (gzip decoding, percentiles, resampling) overlaps the previous scans' forward passes;
    ``ahead`` bounds the extra memory to that many preprocessed volumes.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="medcli-preprocess") as pool:
        pending = deque((item, pool.submit(fn, item)) for item in items[:ahead])
        for item in items[ahead:]:
            done = pending.popleft()
            pending.append((item, pool.submit(fn, item)))  # submitted before the caller waits on `done`
            yield done
        yield from pending


def check_members(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Ensemble members must agree on input channels and classes (they are averaged)."""
    first = models[0]
    for model, name in zip(models[1:], names[1:], strict=True):
        for attr in ("in_channels", "num_classes"):
            if getattr(model, attr) != getattr(first, attr):
                raise CheckpointError(
                    f"{name}: {attr}={getattr(model, attr)} but {names[0]} has {getattr(first, attr)}",
                    hint="ensemble only folds of one run (same modalities and classes)",
                )


# ----------------------------------------------------------------------------------------------------------
# Finding the model(s)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """Which checkpoint files make up the ensemble, and why (for messages and JSON)."""

    checkpoints: list[Path]
    kind: str  # "checkpoint" | "fold" | "run"
    root: Path
    untrained: list[int] = field(default_factory=list)  # a run's folds (by its splits.json) without one

    def describe(self) -> str:
        """``"2 of 3 folds of runs/x (fold 2: no checkpoint yet)"``, ``"runs/x/fold0"``, ... for messages."""
        if self.kind != "run":
            return str(self.checkpoints[0] if self.kind == "checkpoint" else self.root)
        n = len(self.checkpoints)
        if not self.untrained:
            return f"{n} fold{'s' if n != 1 else ''} of {self.root}"
        missing = ("fold " if len(self.untrained) == 1 else "folds ") + ", ".join(map(str, self.untrained))
        return f"{n} of {n + len(self.untrained)} folds of {self.root} ({missing}: no checkpoint yet)"


def newest_run(runs_root: Path, checkpoint_name: str = "best.pt", *, what: str) -> Path:
    """The run under ``runs_root`` whose fold checkpoint was written last: what predict and eval use when
    no model is named (``what``: how to name one, for the error)."""
    runs = [d for d in runs_root.glob("*") if d.is_dir() and any(d.glob(f"fold*/{checkpoint_name}"))]
    if not runs:
        raise CheckpointError(
            f"no trained run found under {runs_root}/", hint=f"train one with `medcli train`, or pass {what}"
        )
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in d.glob(f"fold*/{checkpoint_name}")))


def find_checkpoints(model: Path | None, runs_root: Path, checkpoint_name: str = "best.pt") -> ModelSource:
    """Resolve ``--model``: a checkpoint file, a fold directory (its best.pt), a run directory (every
    ``fold*/best.pt``), or, when None, the newest run under ``runs_root``."""
    if model is None:
        model = newest_run(runs_root, checkpoint_name, what="--model runs/<name> (or a .pt checkpoint)")
    model = Path(model)
    if model.is_file():
        return ModelSource([model], "checkpoint", model.parent)
    if not model.exists():
        raise CheckpointError(
            f"{model}: not found", hint="pass a .pt checkpoint, a fold directory or a run directory"
        )
    if (model / checkpoint_name).is_file():
        return ModelSource([model / checkpoint_name], "fold", model)
    folds = sorted(model.glob(f"fold*/{checkpoint_name}"), key=lambda p: fold_number(p.parent.name))
    if folds:
        return ModelSource(folds, "run", model, missing_folds(model, [p.parent for p in folds]))
    raise CheckpointError(
        f"{model}: no {checkpoint_name} in it or in fold*/ below it",
        hint="finish training a fold first, or pass a .pt checkpoint",
    )


def load_predictor(
    source: ModelSource,
    *,
    weights: str = "auto",
    **options: Any,
) -> Predictor:
    """Load every checkpoint once and build a :class:`Predictor`; members must share preprocessing."""
    from medcli.engine.checkpoint import load_for_inference

    models, names, scales, used, cfg0 = [], [], [], [], None
    for path in source.checkpoints:
        model, cfg, meta = load_for_inference(path, weights=weights)
        scales.append(meta.get("logit_scale", 1.0))
        used.append(meta.get("weights", weights))
        name = f"fold{meta['fold']}" if meta.get("fold") is not None and source.kind == "run" else str(path)
        if cfg0 is None:
            cfg0 = cfg
        elif cfg.to_dict() != cfg0.to_dict():
            raise CheckpointError(
                f"{path}: preprocessing differs from {source.checkpoints[0]}",
                hint="ensemble only folds trained with the same preprocessing (one run directory)",
            )
        models.append(model)
        names.append(name)
    if len(cfg0.modalities) != models[0].in_channels:
        raise CheckpointError(
            f"{source.checkpoints[0]}: model has {models[0].in_channels} input channels but preprocessing "
            f"lists {len(cfg0.modalities)} modalities",
            hint="the checkpoint is inconsistent; retrain or pass another checkpoint",
        )
    return Predictor(models, cfg0, member_names=names, member_weights=used, logit_scales=scales, **options)


# ----------------------------------------------------------------------------------------------------------
# Finding the scans
# ----------------------------------------------------------------------------------------------------------

_NII = (".nii.gz", ".nii")
SALIENCY_NAME = re.compile(r"_gradcam\.nii(\.gz)?$", re.IGNORECASE)  # medcli.engine.saliency's maps


def _strip_nii(name: str) -> str:
    for suffix in _NII:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _scan_id(path: Path, modality: str) -> str:
    """``BraTS20_Training_001_t1ce.nii.gz`` (or ``..._t1c``) → ``BraTS20_Training_001``; other names lose
    only the suffix."""
    from medcli.data import canonical_modality
    from medcli.data.discover import MODALITY_FILE

    named = MODALITY_FILE.search(path.name)
    if named and canonical_modality(named.group(1)) == modality:
        return path.name[: named.start()]
    return _strip_nii(path.name)


def _check_named_modality(path: Path, modality: str) -> None:
    """A single file whose name says it is another sequence (``X_flair.nii.gz``) or a segmentation
    (``X_seg.nii.gz``) is refused: the model would grade it as its own modality without a word."""
    from medcli.data import canonical_modality
    from medcli.data.discover import MODALITY_FILE, ODD_SEG_FILE

    named = MODALITY_FILE.search(path.name)
    if ODD_SEG_FILE.search(path.name) or (named and named.group(1).lower() == "seg"):
        raise DataError(
            f"{path}: named as a segmentation (label map), not a {modality} image",
            hint=f"pass the subject's {modality} scan (<id>_{modality}.nii.gz)",
        )
    if named and (other := canonical_modality(named.group(1))) != modality:
        raise DataError(
            f"{path}: named as a {other} scan, but the model reads {modality}",
            hint=f"pass the subject's {modality} scan, or rename the file if its name is wrong",
        )


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NII)


def collect_scans(
    inputs: Sequence[Path], modalities: Sequence[str], notes: list[str] | None = None
) -> tuple[list[ScanInput], list[ScanFailure]]:
    """Turn ``predict``'s INPUT arguments into scans.

    A ``.nii``/``.nii.gz`` file is one scan of the model's single modality; a folder or CSV manifest goes
    through :func:`medcli.data.discover.discover` (subject folders, directories of subjects, BraTS
    layouts, manifests), and a folder holding only freely named NIfTI files is read file by file.  Inputs
    that cannot be read are returned as failures so the rest still run; files a folder holds but that are
    not predicted are said in ``notes`` (when given).
    """
    notes = [] if notes is None else notes
    scans: list[ScanInput] = []
    failures: list[ScanFailure] = []
    for raw in inputs:
        path = Path(raw)
        try:
            if not path.exists():
                raise DataError(f"{path}: no such file or directory", hint="check the path")
            if path.is_file() and is_nifti(path):
                scans.append(_single_file_scan(path, modalities))
                continue
            if path.is_file() and path.suffix.lower() not in (".csv", ".tsv"):
                from medcli.data.discover import DICOM_HINT, looks_like_dicom

                if looks_like_dicom(path):
                    raise DataError(f"{path}: a DICOM file, not NIfTI", hint=DICOM_HINT)
                raise DataError(
                    f"{path}: not a NIfTI image, folder or CSV manifest",
                    hint="pass .nii/.nii.gz scans, subject folders, a folder of subjects, or a .csv manifest",
                )
            found, bad = _discover_scans(path, modalities, notes)
            scans.extend(found)
            failures.extend(bad)
        except DataError as e:
            failures.append(ScanFailure(str(path), str(e), e.exit_code))
    return _unique(scans), failures


def _single_file_scan(path: Path, modalities: Sequence[str]) -> ScanInput:
    """One NIfTI file as a scan of the model's only modality (refused for a multi-modality model, or when
    its name says it is another sequence)."""
    if len(modalities) != 1:
        raise DataError(
            f"{path}: a single image, but the model needs {len(modalities)} modalities "
            f"({', '.join(modalities)})",
            hint="pass the subject folder (<id>_<modality>.nii.gz files) or a CSV manifest",
        )
    _check_named_modality(path, modalities[0])
    return ScanInput(_scan_id(path, modalities[0]), {modalities[0]: path})


def _unique(scans: list[ScanInput]) -> list[ScanInput]:
    """The same files named twice (a scan and its folder, say) are predicted once; different scans that
    share an id (``a/scan.nii.gz``, ``b/scan.nii.gz``) get ids that tell them apart (``a_scan``, ``b_scan``),
    so no row is ambiguous and no saliency map overwrites another's."""
    seen: set[tuple] = set()
    kept: list[ScanInput] = []
    for scan in scans:
        files = tuple(sorted((m, str(p.resolve())) for m, p in scan.paths.items()))
        if files not in seen:
            seen.add(files)
            kept.append(scan)
    counts = Counter(s.scan_id for s in kept)
    taken = {i for i, n in counts.items() if n == 1}  # ids that stay as they are
    for scan in kept:
        if counts[scan.scan_id] > 1:
            folder = next(iter(scan.paths.values())).resolve().parent.name
            base = candidate = f"{folder}_{scan.scan_id}"
            n = 2
            while candidate in taken:
                candidate, n = f"{base}-{n}", n + 1
            scan.scan_id = candidate
            taken.add(candidate)
    return kept


def _discover_scans(
    path: Path, modalities: Sequence[str], notes: list[str]
) -> tuple[list[ScanInput], list[ScanFailure]]:
    """Subjects found by ``discover``; those it set aside (missing modality, corrupt header, grids that
    disagree) come back as failures carrying discover's own message."""
    from medcli.data.discover import MODALITY_FILE, ODD_SEG_FILE, NoSubjectsFound, discover

    # NIfTI files directly in the folder whose names say no sequence (patient1.nii.gz): discover looks
    # only for sequence-named files, so these are either the folder's scans or files it leaves out.
    top = _top_level_nifti(path)
    loose = [p for p in top if not MODALITY_FILE.search(p.name) and not ODD_SEG_FILE.search(p.name)]
    try:
        cohort = discover(path, modalities=tuple(modalities))
    except NoSubjectsFound:
        # A folder of freely named scans is what a one-modality model predicts file by file, as if each
        # were given on the command line.
        if loose and len(modalities) == 1:
            return _file_scans(loose, modalities)
        # discover's message describes training layouts (grades, name_mapping.csv); predict needs no labels.
        names = " + ".join(f"<id>_{m}.nii.gz" for m in modalities)
        what = f"{len(loose)} NIfTI files not named by sequence" if loose else "no scans found"
        raise DataError(
            f"{path}: {what}",
            hint=f"pass {names} files, folders of them (one per subject), or a CSV manifest",
        ) from None
    notes.extend(cohort.left_out)  # files and folders under it that are no subject's
    if len(modalities) == 1:
        _pair_masks_with_their_scans(cohort, modalities[0])
    # Freely named files the folder holds directly that no subject took (a mask, a registration output,
    # beside sequence-named files): said, not guessed at.  Sequence-named ones lying beside the subject
    # folders are discovery's to say (cohort.left_out).
    used = {
        f.resolve() for s in (*cohort.subjects, *cohort.excluded) for f in (*s.paths.values(), s.seg) if f
    }
    left = [p for p in loose if p.resolve() not in used]
    if left:
        shown = ", ".join(p.name for p in left[:3]) + (", ..." if len(left) > 3 else "")
        notes.append(
            f"{path}: left out {len(left)} NIfTI file(s) that are no subject's ({shown}); "
            "pass a file itself to predict it"
        )
    scans = [ScanInput.of_subject(s) for s in cohort.subjects]
    failures = []
    for s in cohort.excluded:
        errors = [p for p in cohort.problems if p.subject == s.subject_id and p.severity == "error"]
        text = "; ".join(f"{p.file or s.subject_id}: {p.what} ({p.hint})" for p in errors) or "unusable"
        failures.append(ScanFailure(s.subject_id, text, DataError.exit_code))
    return scans, failures


def _pair_masks_with_their_scans(cohort, modality: str) -> None:
    """``patient1.nii.gz`` beside ``patient1_seg.nii.gz`` (loose, or in a subject folder): the seg made a
    subject with no scan (set aside: "missing t1ce") and the scan was passed over.  For a one-modality model
    the file named as the mask less its ``_seg`` is the subject's scan."""
    import dataclasses

    from medcli.data.discover import MODALITY_FILE

    for subject in list(cohort.excluded):
        if subject.paths or subject.seg is None or not (named := MODALITY_FILE.search(subject.seg.name)):
            continue
        stem = subject.seg.name[: named.start()]
        scan = next(
            (f for f in (subject.seg.parent / f"{stem}{x}" for x in (".nii.gz", ".nii")) if f.is_file()), None
        )
        if scan is None:
            continue
        cohort.excluded.remove(subject)
        cohort.subjects.append(dataclasses.replace(subject, paths={modality: scan}))


def _top_level_nifti(path: Path) -> list[Path]:
    """NIfTI files directly in folder ``path``, less the Grad-CAM maps predict itself writes (a --saliency
    folder inside the scans' folder must not turn maps into scans on the next run)."""
    if not path.is_dir():
        return []
    return sorted(
        p
        for p in path.iterdir()
        if p.is_file() and is_nifti(p) and not p.name.startswith(".") and not SALIENCY_NAME.search(p.name)
    )


def _file_scans(files: list[Path], modalities: Sequence[str]) -> tuple[list[ScanInput], list[ScanFailure]]:
    scans, failures = [], []
    for f in files:
        try:
            scans.append(_single_file_scan(f, modalities))
        except DataError as e:
            failures.append(ScanFailure(str(f), str(e), e.exit_code))
    return scans, failures


# ----------------------------------------------------------------------------------------------------------
# Benchmark hooks (used by `medcli bench`)
# ----------------------------------------------------------------------------------------------------------


def synthetic_predictor(
    depth: int | str = 50,
    members: int = 5,
    input_size: int = 128,
    *,
    in_channels: int = 1,
    seed: int = 0,
    **options: Any,
) -> Predictor:
    """A :class:`Predictor` over ``members`` randomly initialised models (no checkpoint files needed), for
    timing the model part: ``p.probabilities(torch.randn(1, in_channels, *[input_size] * 3))``."""
    from medcli.data.preprocess import PreprocessConfig
    from medcli.models import create_model

    torch.manual_seed(seed)
    # Non-zero residual BN gammas, as in a trained model: every branch contributes to the output.
    models = [create_model(depth, in_channels=in_channels, zero_init_last=False) for _ in range(members)]
    modalities = ("t1ce", "flair", "t2", "t1")[:in_channels]
    cfg = PreprocessConfig(modalities=modalities, input_size=(input_size,) * 3)
    return Predictor(models, cfg, **options)
