"""A verified on-disk cache of preprocessed arrays (nnU-Net style: preprocess once, memory-map every epoch).

Layout under the cache root (``medcli.paths.cache_dir()`` by default)::

    <root>/<cfg.key()>/config.json                   the PreprocessConfig these arrays were made with
    <root>/<cfg.key()>/<subject>-<sources>.npy       float32 [C, D, H, W], read with np.load(mmap_mode="r")
    <root>/<cfg.key()>/<subject>-<sources>.json      geometry + the source files' identity

``<sources>`` hashes each source file's resolved path, size and mtime_ns, and the directory is the config's
key, so an edited config or a modified scan is never served stale: it simply maps to another entry.

Writers put each file in place with ``os.replace`` from a temp file in the same directory (an atomic
rename on POSIX), JSON first and array last; readers only trust an entry whose array exists, loads, has the
expected shape/dtype and whose JSON names the same sources.  So concurrent DDP ranks or DataLoader workers
that miss at once all preprocess and all write identical bytes, and nobody ever reads a half-written file.
Nothing is held in RAM: arrays are memory-mapped (the OS page cache does the caching).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcli.atomic import atomic_write
from medcli.data.preprocess import Geometry, PreprocessConfig, preprocess
from medcli.errors import DataError, MedcliError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _source_identity(paths: Mapping[str, str | Path], cfg: PreprocessConfig) -> list[list[Any]]:
    """``[modality, resolved path, size, mtime_ns]`` for each modality the config uses."""
    paths = {str(k).lower(): v for k, v in paths.items() if v is not None}
    identity = []
    for m in cfg.modalities:
        if m not in paths:
            return []  # preprocess() raises the proper "missing modality" error
        p = Path(paths[m]).resolve()
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DataError(
                f"{p}: file not found", hint="check the path, or re-index the data folder"
            ) from None
        identity.append([m, str(p), st.st_size, st.st_mtime_ns])
    return identity


@dataclass(frozen=True)
class CacheEntry:
    array_path: Path
    meta_path: Path
    sources: list[list[Any]] = field(hash=False)


class PreprocessCache:
    """Preprocessed arrays on disk, keyed by the source files and the config.  Picklable (holds a path)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from medcli.paths import cache_dir

            root = cache_dir()
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"PreprocessCache({str(self.root)!r})"

    def config_dir(self, cfg: PreprocessConfig) -> Path:
        return self.root / cfg.key()

    def entry(self, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig) -> CacheEntry:
        sources = _source_identity(paths, cfg)
        digest = hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:16]
        stem = f"{_UNSAFE.sub('_', subject_id)}-{digest}"
        folder = self.config_dir(cfg)
        return CacheEntry(folder / f"{stem}.npy", folder / f"{stem}.json", sources)

    def lookup(
        self, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig
    ) -> np.ndarray | None:
        """The cached array (read-only memmap), or None when absent, stale or unreadable."""
        entry = self.entry(subject_id, paths, cfg)
        return self._read(entry, cfg)

    def _read(self, entry: CacheEntry, cfg: PreprocessConfig) -> np.ndarray | None:
        if not entry.sources:
            return None
        try:
            array = np.load(entry.array_path, mmap_mode="r")
            meta = json.loads(entry.meta_path.read_text())
        except (OSError, ValueError, EOFError):  # absent, or damaged by something outside medcli
            return None
        expected = (cfg.in_channels, *cfg.input_size)
        if array.shape != expected or array.dtype != np.float32 or meta.get("sources") != entry.sources:
            return None
        return array

    def get_or_create(
        self, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig
    ) -> np.ndarray:
        """The subject's preprocessed array, preprocessing and storing it on a miss."""
        entry = self.entry(subject_id, paths, cfg)
        array = self._read(entry, cfg)
        if array is None:
            self._create(entry, subject_id, paths, cfg)
            array = self._read(entry, cfg)
            if array is None:  # pragma: no cover - only if the disk lies to us
                raise DataError(
                    f"cache entry {entry.array_path} could not be read back after writing",
                    hint="check free space and permissions of the cache directory (--cache / MEDCLI_CACHE)",
                )
        return array

    def ensure(self, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig) -> bool:
        """Make sure the entry exists; True when it had to be preprocessed now (False: already cached)."""
        entry = self.entry(subject_id, paths, cfg)
        if self._read(entry, cfg) is not None:
            return False
        self._create(entry, subject_id, paths, cfg)
        return True

    def warnings(self, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig) -> list[str]:
        """What preprocessing said about the subject's files (no orientation, not skull-stripped); [] when
        the entry is absent or older than these notes."""
        try:
            meta = json.loads(self.entry(subject_id, paths, cfg).meta_path.read_text())
        except (OSError, ValueError):
            return []
        return [str(w) for w in meta.get("warnings", [])]

    def geometry(self, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig) -> Geometry:
        """The subject's geometry (for mapping model-space outputs back onto the scan)."""
        self.get_or_create(subject_id, paths, cfg)
        meta = json.loads(self.entry(subject_id, paths, cfg).meta_path.read_text())
        return Geometry.from_dict(meta["geometry"])

    def _create(
        self, entry: CacheEntry, subject_id: str, paths: Mapping[str, str | Path], cfg: PreprocessConfig
    ) -> None:
        result = preprocess(paths, cfg, subject_id=subject_id)
        folder = entry.array_path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            config_file = folder / "config.json"
            if not config_file.exists():
                blob = json.dumps(cfg.to_dict(), indent=2).encode()
                atomic_write(config_file, lambda f: f.write(blob))
            meta = {
                "subject_id": subject_id,
                "sources": entry.sources,
                "shape": list(result.array.shape),
                "dtype": "float32",
                "geometry": result.geometry.to_dict(),
                "warnings": list(result.warnings),  # e.g. not skull-stripped: for `prepare` and `train`
            }
            blob = json.dumps(meta, indent=1).encode()
            # JSON first, array last: a visible array always has its JSON beside it.
            atomic_write(entry.meta_path, lambda f: f.write(blob))
            atomic_write(entry.array_path, lambda f: np.save(f, result.array))
        except OSError as e:
            raise DataError(
                f"cannot write the preprocessing cache at {folder} ({e.strerror or e})",
                hint="choose a writable directory with --cache or MEDCLI_CACHE",
            ) from e


# --- filling the cache ahead of training (`medcli data prepare`) ---------------------------------------


@dataclass
class PrepareReport:
    """What ``prepare`` did: subjects preprocessed now, found already cached, and failures with reasons."""

    cached: list[str] = field(default_factory=list)
    already_cached: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (subject, warning) of usable subjects

    def to_dict(self) -> dict[str, Any]:
        return {
            "cached": len(self.cached),
            "already_cached": len(self.already_cached),
            "failed": [{"subject_id": s, "reason": r} for s, r in self.failed],
            "warnings": [{"subject_id": s, "warning": w} for s, w in self.warnings],
        }


def _prepare_one(cache: PreprocessCache, subject_id: str, paths: dict, cfg: PreprocessConfig) -> bool:
    return cache.ensure(subject_id, paths, cfg)


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent alone answers it (cancels what is left, says one
    # line); a worker stopped while it imports printed a traceback.  It started with SIGINT blocked (see
    # _prepare_in_processes) and now ignores it for good.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # One intra-op thread per worker process: N workers on N cores, not N×N threads.
    import torch

    torch.set_num_threads(1)


def prepare_cohort(
    subjects: Iterable[Any],
    cfg: PreprocessConfig,
    cache: PreprocessCache,
    *,
    workers: int = 1,
    on_progress: Callable[[str, str], None] | None = None,
) -> PrepareReport:
    """Fill ``cache`` for ``subjects`` (objects with ``subject_id`` and ``paths``), ``workers`` processes.

    A subject that fails (broken file, missing modality) is recorded with its reason and the rest go on.
    ``on_progress(subject_id, status)`` is called once per subject, status in cached/already/failed.
    """
    report = PrepareReport()
    jobs = [(s.subject_id, {k: str(v) for k, v in s.paths.items()}) for s in subjects]
    paths_of = dict(jobs)

    def record(sid: str, outcome: bool | BaseException) -> None:
        if isinstance(outcome, MedcliError):
            report.failed.append((sid, str(outcome)))
            status = "failed"
        elif isinstance(outcome, BaseException):
            report.failed.append((sid, f"{type(outcome).__name__}: {outcome}"))
            status = "failed"
        else:
            (report.cached if outcome else report.already_cached).append(sid)
            report.warnings.extend((sid, w) for w in cache.warnings(sid, paths_of[sid], cfg))
            status = "cached" if outcome else "already"
        if on_progress is not None:
            on_progress(sid, status)

    # Entries already cached are found here (a stat, an .npy header and a JSON file each): starting worker
    # processes for them cost ~2 s at every `medcli train` on a warm cache.
    todo = []
    for sid, paths in jobs:
        try:
            if cache.lookup(sid, paths, cfg) is not None:
                record(sid, False)
                continue
        except MedcliError as e:  # e.g. a file gone since indexing
            record(sid, e)
            continue
        todo.append((sid, paths))

    if workers <= 1 or len(todo) <= 1:
        for sid, paths in todo:
            try:
                record(sid, _prepare_one(cache, sid, paths, cfg))
            except Exception as e:  # one bad subject must not stop the others
                record(sid, e)
    else:
        _prepare_in_processes(todo, cfg, cache, workers, record)
    report.cached.sort()
    report.already_cached.sort()
    report.failed.sort()
    report.warnings.sort()
    return report


def _prepare_in_processes(
    todo: list[tuple[str, dict]],
    cfg: PreprocessConfig,
    cache: PreprocessCache,
    workers: int,
    record: Callable[[str, bool | BaseException], None],
) -> None:
    # spawn, not fork: the parent may hold torch/OpenMP threads, which do not survive a fork reliably.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, mp_context=context)
    try:
        # Workers start on submit, inheriting the signal mask: SIGINT stays blocked in them until their
        # initializer ignores it (in the parent it is only held back for these milliseconds).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            futures = {pool.submit(_prepare_one, cache, sid, paths, cfg): sid for sid, paths in todo}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for future in as_completed(futures):
            exc = future.exception()
            record(futures[future], exc if exc is not None else future.result())
    except BaseException:  # Ctrl-C, SIGTERM: stop now, not after the queued subjects (writes are atomic)
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise
    pool.shutdown()


# --- looking after the cache (`medcli data cache`) -------------------------------------------------------
# Entries are never overwritten, only superseded (an edited scan or config maps to a new entry), so without
# pruning the cache only grows.  An entry is stale when it can never be served again: a source file is gone
# or changed (its identity is part of the entry's name), or its folder's config no longer hashes to the
# folder's name (written by another medcli version).  Half-finished writes (an array without its JSON, a
# temp file) count only once they are older than ``min_age_s``: a writer may be busy with them right now.

ORPHAN_MIN_AGE_S = 3600.0

# Only what medcli writes is ever judged (and so ever deleted): a settings folder is named by a 16-hex-digit
# hash, an entry by ``<subject>-<16 hex digits>.json|.npy``, a temp file by ``atomic_path`` as
# ``.<entry file>.<random>.tmp``.  `--cache` pointed at a folder holding other things leaves them alone.
_FOLDER_NAME = re.compile(r"[0-9a-f]{16}")
_ENTRY_NAME = re.compile(r".+-[0-9a-f]{16}\.(json|npy)")
_TEMP_NAME = re.compile(r"\..+\.(json|npy)\.[^.]+\.tmp")


@dataclass
class CacheFolder:
    """One config's folder: its settings, live entries and what pruning would remove."""

    key: str
    path: Path
    config: dict[str, Any] | None
    entries: int = 0
    bytes: int = 0
    stale: list[Path] = field(default_factory=list)
    stale_bytes: int = 0
    stale_reason: str | None = None  # set when the whole folder is stale

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "path": str(self.path),
            "config": self.config,
            "entries": self.entries,
            "bytes": self.bytes,
            "stale_files": len(self.stale),
            "stale_bytes": self.stale_bytes,
            "stale_reason": self.stale_reason,
        }


def _written_by_medcli(name: str) -> bool:
    return name == "config.json" or bool(_ENTRY_NAME.fullmatch(name) or _TEMP_NAME.fullmatch(name))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile (a writer's rename, another prune)
        return default


def _sources_current(sources: list[list[Any]]) -> bool:
    for _modality, path, size, mtime_ns in sources:
        try:
            st = Path(path).stat()
        except OSError:
            return False
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return False
    return bool(sources)


def _folder_stale_reason(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return None, None  # a first writer has not put it there yet; judge the entries alone
    except (OSError, ValueError):
        return None, "its config.json is unreadable"
    try:
        key = PreprocessConfig.from_dict(config).key()
    except (MedcliError, TypeError, ValueError, AttributeError):  # AttributeError: not a JSON object
        return config, "its config.json is from another medcli version"
    if key != folder.name:
        return config, "its config.json is from another medcli version (the settings hash differs)"
    return config, None


def inspect_cache(root: str | Path, *, min_age_s: float = ORPHAN_MIN_AGE_S) -> list[CacheFolder]:
    """Every config folder under ``root``, with its live entries and its stale files (nothing is changed)."""
    import time

    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    now = time.time()
    folders = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _FOLDER_NAME.fullmatch(p.name)):
        config, reason = _folder_stale_reason(folder)
        info = CacheFolder(folder.name, folder, config, stale_reason=reason)
        files = sorted(p for p in folder.iterdir() if p.is_file() and _written_by_medcli(p.name))
        if reason is not None:
            info.stale = files
            info.stale_bytes = sum(_size(p) for p in files)
            folders.append(info)
            continue
        for p in files:  # an atomic writer's temp files, left by a killed process
            if _TEMP_NAME.fullmatch(p.name) and now - _mtime(p, now) > min_age_s:
                info.stale.append(p)
        stems = sorted({p.stem for p in files if _ENTRY_NAME.fullmatch(p.name)})
        for stem in stems:
            pair = [q for q in (folder / f"{stem}.json", folder / f"{stem}.npy") if q.exists()]
            try:
                sources = json.loads((folder / f"{stem}.json").read_text()).get("sources") or []
                current = _sources_current(sources)
            except (OSError, ValueError, AttributeError, TypeError):  # AttributeError/TypeError: not ours
                current = None  # no (readable) JSON yet: maybe a writer is between its two files
            if current and len(pair) == 2:
                info.entries += 1
                info.bytes += sum(_size(q) for q in pair)
            elif current is False:
                info.stale += pair  # a source file changed or is gone: never served again
            elif all(now - _mtime(q, now) > min_age_s for q in pair):
                info.stale += pair  # half an entry, long abandoned
        info.stale_bytes = sum(_size(p) for p in info.stale)
        folders.append(info)
    return folders


def prune_cache(root: str | Path, *, min_age_s: float = ORPHAN_MIN_AGE_S) -> tuple[int, int]:
    """Delete what ``inspect_cache`` calls stale (and folders left empty); returns (files, bytes) freed."""
    files = freed = 0
    for info in inspect_cache(root, min_age_s=min_age_s):
        for p in info.stale:
            size = _size(p)
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            files += 1
            freed += size
        remaining = [p for p in info.path.iterdir() if p.name != "config.json"]  # anything, ours or not
        if not remaining:
            (info.path / "config.json").unlink(missing_ok=True)
            try:
                info.path.rmdir()
            except OSError:
                pass  # a writer just added something
    return files, freed
