"""Training checkpoints: the on-disk format, atomic writes, safe loads, and inference loading.

Format ``medcli-checkpoint/1`` (others depend on it; keep the keys exactly)::

    format, model, ema, ema_updates (the EMA's update count: steps the fp16 GradScaler skipped are not
    updates; older files lack it and global_step stands in), optimizer, scheduler, scaler, epoch
    (last completed, 0-based), global_step,
    rng {torch, numpy, python, cuda} (rank 0's), rng_ranks (under DDP: every rank's rng, by rank; else
    absent), best_metric, config (TrainConfig.to_dict(), incl. "model"),
    preprocess (PreprocessConfig.to_dict()), class_names, fold, split_hash,
    provenance {pretrained_sha256, medcli_version, torch_version, created}

Everything is tensors and plain containers so ``torch.load(weights_only=True)`` reads it: arbitrary
pickles are never executed.  Writes go to a temp file in the same directory, are fsynced, then
``os.replace``d over the target, so a crash or a full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcli.atomic import atomic_write, fsync_dir
from medcli.errors import CheckpointError

FORMAT = "medcli-checkpoint/1"
CLASS_NAMES = ["LGG", "HGG"]
_HEAVY_KEYS = ("model", "ema", "optimizer", "scheduler", "scaler", "rng", "rng_ranks")


# -- writing ---------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably; on failure the old file is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: torch.save(obj, fh))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e}",
            hint="check free disk space and permissions; the previous checkpoint was kept",
        ) from e
    fsync_dir(path.parent)


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors/lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        # One state per GPU the saving process could see; a machine with fewer GPUs restores those it has
        # (torch.cuda.set_rng_state_all would fail on the first missing one).
        for index, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


# -- reading ---------------------------------------------------------------------------------------------
def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load and check a medcli checkpoint; anything else is a CheckpointError saying what to do.

    ``mmap=True`` maps the file instead of reading it: tensors nobody touches (the optimizer state of a
    last.pt, the raw weights when the EMA ones are used) cost nothing.  Private mapping: writes to the
    tensors never reach the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist",
            hint="pass a best.pt/last.pt from a runs/<name>/fold<k>/ folder",
        )
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # zip (torch >= 1.6) or legacy pickle
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch file (it starts with {head!r})",
            hint="re-copy it, or use last.pt/best.pt from the run folder",
        )
    try:
        # mmap needs the zip format (torch >= 1.6 writes it); a legacy file is read as a whole.
        with warnings.catch_warnings():
            # A pickle not written by torch.save (protocol 4, say) makes torch warn before refusing or
            # reading it; the outcome is reported below, the warning would only be noise on stderr.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(
                path, map_location=map_location, weights_only=True, mmap=mmap and head == b"PK\x03\x04"
            )
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            f"{path} holds Python objects that are not plain tensors"
            + (f" ({found.group(1)})" if found else ""),
            hint="medcli never unpickles arbitrary code; use a checkpoint written by `medcli train`",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch file ({_first_line(e)})",
            hint="re-copy it, or use last.pt/best.pt from the run folder",
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        looks_like_weights = isinstance(obj, dict) and (
            "state_dict" in obj or any(str(k).startswith(("conv1", "module.")) for k in obj)
        )
        raise CheckpointError(
            f"{path} is not a medcli training checkpoint (no format {FORMAT!r})",
            hint=(
                "it looks like pretrained weights: pass it to `medcli train --pretrained-path`"
                if looks_like_weights
                else "use best.pt or last.pt written by `medcli train`"
            ),
        )
    missing = [k for k in ("model", "config", "preprocess", "epoch") if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}", hint="it is incomplete; use another checkpoint"
        )
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def checkpoint_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Everything but the tensors: what eval/predict show and check."""
    meta = {k: v for k, v in ckpt.items() if k not in _HEAVY_KEYS}
    meta["has_ema"] = ckpt.get("ema") is not None
    cfg = ckpt.get("config") or {}
    model = cfg.get("model") or {}
    # Cosine-head logits are cosines in [-1, 1]; probabilities are softmax(logit_scale * logits).
    meta["logit_scale"] = float(cfg.get("ldam_s", 1.0)) if model.get("head") == "cosine" else 1.0
    return meta


def selected_weights(config: dict[str, Any]) -> str:
    """The weights that picked best.pt, from a training config: "ema" or "raw" (``select``; ``auto`` is EMA
    when EMA was on).  A config that says nothing (not written by `medcli train`) gives "ema", which
    ``load_for_inference`` turns into raw where a checkpoint has no EMA weights."""
    select = config.get("select", "auto")
    if select in ("ema", "raw"):
        return select
    if "ema_decay" not in config:
        return "ema"
    return "ema" if float(config.get("ema_decay") or 0) > 0 else "raw"


def build_model(model_cfg: dict[str, Any], device: str | torch.device | None = None) -> torch.nn.Module:
    from medcli.models import create_model

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return create_model(
            depth=model_cfg["depth"],
            in_channels=int(model_cfg.get("in_channels", 1)),
            num_classes=int(model_cfg.get("num_classes", 2)),
            dropout=float(model_cfg.get("dropout", 0.0)),
            head=model_cfg.get("head", "linear"),
        )


def load_for_inference(
    path: str | Path, weights: str = "ema", *, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, PreprocessConfig, meta) from a training checkpoint.

    ``weights="ema"`` uses the EMA weights when the checkpoint has them and falls back to the raw ones
    otherwise (``meta["weights"]`` says which were used); ``"raw"`` always uses the trained weights;
    ``"auto"`` the ones that selected this best.pt in training (see ``selected_weights``).
    ``meta["logit_scale"]`` is the factor to apply before softmax (s for LDAM's cosine head, else 1).
    """
    from medcli.data.preprocess import PreprocessConfig

    if weights not in ("auto", "ema", "raw"):
        raise CheckpointError(f"weights={weights!r} is not 'auto', 'ema' or 'raw'")
    ckpt = read_checkpoint(path, map_location="cpu", mmap=True)
    if weights == "auto":
        weights = selected_weights(ckpt.get("config") or {})
    meta = checkpoint_meta(ckpt)
    state = ckpt["ema"] if weights == "ema" and ckpt.get("ema") is not None else ckpt["model"]
    meta["weights"] = "ema" if state is ckpt.get("ema") else "raw"
    meta["path"] = str(path)
    model_cfg = (ckpt["config"] or {}).get("model")
    if not model_cfg:
        raise CheckpointError(f"{path} has no model settings in its config", hint="retrain with medcli train")
    # Shapes only (meta device), then the checkpoint's tensors assigned in place: no random init of
    # weights that are overwritten anyway, and no copy.
    model = build_model(model_cfg, device="meta")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit a {model_cfg} model ({_first_line(e)})",
            hint="the checkpoint is from another medcli version or was edited",
        ) from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the state dict does not carry (strict=True checks persistent ones only)
        raise CheckpointError(f"{path}: the checkpoint does not set {', '.join(left[:3])}")
    preprocess = PreprocessConfig.from_dict(ckpt["preprocess"])
    return model.to(map_location).eval(), preprocess, meta
