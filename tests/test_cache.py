"""The preprocessing cache: hits, invalidation, atomic writes, concurrent writers, and prepare_cohort."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_nifti import make_subject, phantom, save_nifti

from medcli.data.cache import PreprocessCache, prepare_cohort
from medcli.data.preprocess import PreprocessConfig, preprocess
from medcli.errors import DataError

CFG = PreprocessConfig(modalities=("t1ce", "flair"), input_size=(16, 16, 16), crop_margin=2)


@dataclass
class Subj:
    subject_id: str
    paths: dict


@pytest.fixture
def subject(tmp_path):
    return "S1", make_subject(tmp_path / "data" / "S1", ("t1ce", "flair"))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_miss_then_hit_returns_the_same_memmapped_array(tmp_path, subject):
    sid, paths = subject
    cache = PreprocessCache(tmp_path / "cache")
    first = cache.get_or_create(sid, paths, CFG)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    np.testing.assert_array_equal(first, preprocess(paths, CFG).array)
    entry = cache.entry(sid, paths, CFG)
    written = entry.array_path.stat().st_mtime_ns
    assert cache.ensure(sid, paths, CFG) is False  # a hit: nothing recomputed
    second = cache.get_or_create(sid, paths, CFG)
    assert second.tobytes() == first.tobytes()
    assert entry.array_path.stat().st_mtime_ns == written
    assert cache.geometry(sid, paths, CFG) == preprocess(paths, CFG).geometry
    assert not [n for n in _files(cache.root) if n.endswith(".tmp")]


def test_config_change_is_a_different_entry(tmp_path, subject):
    sid, paths = subject
    cache = PreprocessCache(tmp_path / "cache")
    assert cache.ensure(sid, paths, CFG) is True
    other = PreprocessConfig(modalities=("t1ce", "flair"), input_size=(16, 16, 16), crop_margin=3)
    assert cache.lookup(sid, paths, other) is None
    assert cache.ensure(sid, paths, other) is True
    np.testing.assert_array_equal(cache.get_or_create(sid, paths, other), preprocess(paths, other).array)
    assert cache.config_dir(other) != cache.config_dir(CFG)


def test_modified_source_file_is_never_served_stale(tmp_path, subject):
    sid, paths = subject
    cache = PreprocessCache(tmp_path / "cache")
    old = np.array(cache.get_or_create(sid, paths, CFG))
    # Rewrite t1ce with other content; the file's identity (size/mtime) changes.
    save_nifti(paths["t1ce"], phantom(seed=42, blob_at=(8, 8, 8)))
    assert cache.lookup(sid, paths, CFG) is None
    new = cache.get_or_create(sid, paths, CFG)
    assert not np.array_equal(new, old)
    np.testing.assert_array_equal(new, preprocess(paths, CFG).array)


def test_touched_source_with_same_size_is_a_miss(tmp_path, subject):
    sid, paths = subject
    cache = PreprocessCache(tmp_path / "cache")
    cache.ensure(sid, paths, CFG)
    st = paths["flair"].stat()
    os.utime(paths["flair"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.lookup(sid, paths, CFG) is None


def test_damaged_entry_and_leftover_temp_file_are_not_read(tmp_path, subject):
    sid, paths = subject
    cache = PreprocessCache(tmp_path / "cache")
    good = np.array(cache.get_or_create(sid, paths, CFG))
    entry = cache.entry(sid, paths, CFG)
    # A crash mid-write leaves only a temp file; damage elsewhere truncates the final file.
    (entry.array_path.parent / f".{entry.array_path.name}.abc.tmp").write_bytes(b"\x93NUMPY partial")
    entry.array_path.write_bytes(entry.array_path.read_bytes()[:300])
    assert cache.lookup(sid, paths, CFG) is None
    np.testing.assert_array_equal(cache.get_or_create(sid, paths, CFG), good)


def test_missing_source_and_unwritable_cache_are_data_errors(tmp_path, subject):
    sid, paths = subject
    with pytest.raises(DataError, match="missing modality flair"):
        PreprocessCache(tmp_path / "c").get_or_create(sid, {"t1ce": paths["t1ce"]}, CFG)
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        PreprocessCache(tmp_path / "c").get_or_create(sid, {**paths, "flair": tmp_path / "nope.nii.gz"}, CFG)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(DataError, match="cannot write the preprocessing cache"):
        PreprocessCache(blocker / "cache").get_or_create(sid, paths, CFG)


def test_cache_pickles_as_its_root(tmp_path):
    cache = PreprocessCache(tmp_path / "c")
    assert pickle.loads(pickle.dumps(cache)).root == cache.root


def test_default_root_follows_medcli_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDCLI_CACHE", str(tmp_path / "elsewhere"))
    assert PreprocessCache().root == tmp_path / "elsewhere"


def _writer(root: str, paths: dict, ready, go) -> None:
    """A separate process that rewrites the same entry again and again (as racing DDP ranks would)."""
    import torch

    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    cache = PreprocessCache(root)
    entry = cache.entry("S1", paths, CFG)
    ready.release()
    go.wait(30)
    for _ in range(25):
        cache._create(entry, "S1", paths, CFG)  # a full rewrite: preprocess, JSON, array


def test_concurrent_writers_never_expose_a_partial_file(tmp_path, subject):
    sid, paths = subject
    root = tmp_path / "cache"
    cache = PreprocessCache(root)
    expected = np.array(cache.get_or_create(sid, paths, CFG))
    ctx = mp.get_context("fork")  # instant start; the children use a single torch thread
    ready, go = ctx.Semaphore(0), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(str(root), paths, ready, go)) for _ in range(2)]
    for w in writers:
        w.start()
    try:
        for _ in writers:
            assert ready.acquire(timeout=60)
        go.set()
        reads = 0
        while any(w.is_alive() for w in writers) or reads == 0:
            got = cache.lookup(sid, paths, CFG)
            assert got is not None, "a reader saw a missing or partial entry"
            assert np.array_equal(got, expected)
            reads += 1
        for w in writers:
            w.join(timeout=60)
            assert w.exitcode == 0
    finally:
        for w in writers:
            if w.is_alive():
                w.kill()
    assert reads > 5
    assert not [n for n in _files(root) if n.endswith(".tmp")]
    assert len([n for n in _files(root) if n.endswith(".npy")]) == 1


def test_prepare_cohort_counts_and_reasons(tmp_path):
    data = tmp_path / "data"
    subjects = [Subj(f"S{i}", make_subject(data / f"S{i}", ("t1ce", "flair"), seed=i)) for i in range(3)]
    broken = make_subject(data / "S3", ("t1ce", "flair"), seed=3)
    broken["flair"].write_bytes(b"garbage")
    subjects.append(Subj("S3", broken))
    subjects.append(Subj("S4", {"t1ce": subjects[0].paths["t1ce"]}))
    cache = PreprocessCache(tmp_path / "cache")
    cache.ensure("S0", subjects[0].paths, CFG)
    seen = []
    report = prepare_cohort(subjects, CFG, cache, on_progress=lambda s, st: seen.append((s, st)))
    assert report.cached == ["S1", "S2"] and report.already_cached == ["S0"]
    reasons = dict(report.failed)
    assert "S3_flair.nii.gz" in reasons["S3"] and "missing modality flair" in reasons["S4"]
    assert sorted(seen) == [
        ("S0", "already"),
        ("S1", "cached"),
        ("S2", "cached"),
        ("S3", "failed"),
        ("S4", "failed"),
    ]
    assert report.to_dict()["cached"] == 2


def test_prepare_cohort_in_worker_processes_and_none_started_when_warm(tmp_path):
    """Worker processes fill the cache as the serial path does (failures included); a warm cache is
    recognised in the parent, with no process started (the CPU time of reaped children stays put)."""
    data = tmp_path / "data"
    subjects = [Subj(f"S{i}", make_subject(data / f"S{i}", ("t1ce", "flair"), seed=i)) for i in range(3)]
    broken = make_subject(data / "S3", ("t1ce", "flair"), seed=3)
    broken["flair"].write_bytes(b"garbage")
    subjects.append(Subj("S3", broken))
    serial_cache, parallel_cache = PreprocessCache(tmp_path / "a"), PreprocessCache(tmp_path / "b")
    serial = prepare_cohort(subjects, CFG, serial_cache, workers=1)

    children = os.times().children_user
    parallel = prepare_cohort(subjects, CFG, parallel_cache, workers=2)
    assert os.times().children_user > children, "no worker process did any work"
    assert parallel.cached == serial.cached == ["S0", "S1", "S2"]
    assert [sid for sid, _ in parallel.failed] == ["S3"] and "S3_flair.nii.gz" in parallel.failed[0][1]
    for s in subjects[:3]:
        np.testing.assert_array_equal(
            parallel_cache.lookup(s.subject_id, s.paths, CFG), serial_cache.lookup(s.subject_id, s.paths, CFG)
        )

    children = os.times().children_user
    warm = prepare_cohort(subjects, CFG, parallel_cache, workers=2)
    assert os.times().children_user == children, "worker processes started for a warm cache"
    assert warm.already_cached == ["S0", "S1", "S2"] and warm.cached == []
    assert [sid for sid, _ in warm.failed] == ["S3"]


def test_prepare_cohort_reports_warnings_now_and_from_the_cache(tmp_path):
    """A scan with noise in the air (not skull-stripped) is cached with a warning, which is reported when
    it is preprocessed and again when it is found already cached."""
    data = tmp_path / "data"
    clean = make_subject(data / "A", ("t1ce", "flair"), seed=1)
    noisy = make_subject(data / "B", ("t1ce", "flair"), seed=2)
    head = phantom(seed=5)
    head[head == 0] = 7.0  # a constant non-zero background: the air was not removed
    save_nifti(noisy["t1ce"], head)
    subjects = [Subj("A", clean), Subj("B", noisy)]
    cache = PreprocessCache(tmp_path / "cache")
    for _ in range(2):  # preprocessed now, then read back from the entries
        report = prepare_cohort(subjects, CFG, cache)
        assert [s for s, _ in report.warnings] == ["B"]
        assert "does not look skull-stripped" in report.warnings[0][1]
        assert report.to_dict()["warnings"][0]["subject_id"] == "B"
    assert report.already_cached == ["A", "B"]


# --- `medcli data prepare` ------------------------------------------------------------------------------


@pytest.fixture
def cohort(tmp_path):
    from medcli.data.synth import synth_cohort

    synth_cohort(tmp_path / "brats", n_subjects=4, shape=(32, 32, 24), seed=0)
    return tmp_path / "brats"


def _prepare(cohort: Path, cache: Path, modalities: str) -> list:
    """`medcli data prepare` of ``cohort`` into ``cache`` at 16³."""
    return ["data", "prepare", cohort, "--cache", cache, "--input-size", "16", "--modalities", modalities]


def test_prepare_fills_the_cache_then_finds_it(cli, cohort, tmp_path):
    args = _prepare(cohort, tmp_path / "c", "t1ce,flair")
    first = cli(*args, "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)  # stdout holds the JSON and nothing else
    assert summary["cached"] == 4 and summary["already_cached"] == 0 and summary["failed"] == []
    assert summary["config"]["modalities"] == ["t1ce", "flair"]
    assert summary["warnings"] == []  # synthetic BraTS-like scans: skull-stripped, oriented
    again = json.loads(cli(*args, "--json").stdout)
    assert again["cached"] == 0 and again["already_cached"] == 4
    # What training will ask for is served from what prepare wrote.
    from medcli.data.discover import discover

    cfg = PreprocessConfig(modalities=("t1ce", "flair"), input_size=16)
    store = PreprocessCache(tmp_path / "c")
    for s in discover(cohort).subjects:
        assert store.lookup(s.subject_id, s.paths, cfg) is not None
    table = cli(*args)
    assert table.exit_code == 0 and "already cached" in table.stdout


def test_prepare_lists_subjects_cached_with_a_warning(cli, cohort, tmp_path):
    flair = sorted(cohort.glob("*/*_flair.nii.gz"))[0]
    img = nib.load(flair)
    voxels = np.asarray(img.dataobj).astype(np.float32)
    voxels[voxels == 0] = 2.0  # air not removed
    nib.save(nib.Nifti1Image(voxels, img.affine), flair)
    args = _prepare(cohort, tmp_path / "c", "flair")
    summary = json.loads(cli(*args, "--json").stdout)
    assert [w["subject_id"] for w in summary["warnings"]] == [flair.parent.name]
    table = cli(*args)
    assert table.exit_code == 0 and "Cached, with a warning" in table.stdout
    assert "skull-stripped" in table.stdout and flair.parent.name in table.stdout


def test_prepare_reports_a_broken_subject_and_exits_10(cli, cohort, tmp_path):
    bad = next(cohort.glob("*_002/*_t1ce.nii.gz"))
    img = nib.load(str(bad))
    data = img.get_fdata().astype(np.float32)
    data[data > 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    result = cli("data", "prepare", cohort, "--cache", tmp_path / "c", "--input-size", "16", "--json")
    assert result.exit_code == 10
    summary = json.loads(result.stdout)
    assert summary["cached"] == 3
    [failure] = summary["failed"]
    assert failure["subject_id"].endswith("_002") and "NaN" in failure["reason"]
    assert "1 of 4 subjects failed" in result.stderr


def test_prepare_rejects_a_bad_input_size(cli, cohort, tmp_path):
    result = cli("data", "prepare", cohort, "--cache", tmp_path / "c", "--input-size", "12,12")
    assert result.exit_code == 2 and "--input-size '12,12' is invalid" in result.stderr


@pytest.mark.slow
def test_prepare_with_worker_processes(cli, cohort, tmp_path):
    result = cli(
        "data", "prepare", cohort, "--cache", tmp_path / "c", "--input-size", "16", "-j", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cached"] == 4


# ------------------------------------------------------------------------------- inspecting and pruning
def _two_subject_cache(tmp_path):
    cache = PreprocessCache(tmp_path / "cache")
    subjects = {
        s: make_subject(tmp_path / "data" / s, ("t1ce", "flair"), seed=i) for i, s in enumerate(("A", "B"))
    }
    for sid, paths in subjects.items():
        cache.ensure(sid, paths, CFG)
    return cache, subjects


def test_inspect_counts_live_entries_and_prune_removes_only_stale_ones(tmp_path):
    from medcli.data.cache import inspect_cache, prune_cache

    cache, subjects = _two_subject_cache(tmp_path)
    [folder] = inspect_cache(cache.root)
    assert (folder.key, folder.entries, folder.stale) == (CFG.key(), 2, [])
    assert folder.config == CFG.to_dict() and folder.bytes > 2 * 4 * 2 * 16**3

    # Subject A's FLAIR is re-exported: its old entry can never be served again.
    save_nifti(subjects["A"]["flair"], phantom(seed=7))
    stale_entry = [p for p in cache.config_dir(CFG).iterdir() if p.name.startswith("A-")]
    assert len(stale_entry) == 2 and cache.entry("A", subjects["A"], CFG).array_path not in stale_entry
    temp_new = cache.config_dir(CFG) / ".B-x.npy.abc.tmp"  # a writer busy right now
    temp_old = cache.config_dir(CFG) / ".B-y.npy.def.tmp"  # left by a killed writer
    temp_new.write_bytes(b"x")
    temp_old.write_bytes(b"y")
    os.utime(temp_old, (1, 1))
    [folder] = inspect_cache(cache.root)
    assert folder.entries == 1 and sorted(folder.stale) == sorted([*stale_entry, temp_old])

    files, freed = prune_cache(cache.root)
    assert files == 3 and freed == folder.stale_bytes
    assert temp_new.exists() and not temp_old.exists()
    assert cache.lookup("B", subjects["B"], CFG) is not None  # the live entry is still served
    assert cache.ensure("A", subjects["A"], CFG) is True  # A is simply preprocessed again
    assert inspect_cache(cache.root)[0].entries == 2


def test_a_folder_from_another_medcli_version_is_stale_as_a_whole(tmp_path):
    from medcli.data.cache import inspect_cache, prune_cache

    cache, _ = _two_subject_cache(tmp_path)
    folder = cache.config_dir(CFG)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "future_setting": 1}))
    [info] = inspect_cache(cache.root)
    assert info.stale_reason and "another medcli version" in info.stale_reason
    assert len(info.stale) == 5  # config + 2 x (json, npy)
    prune_cache(cache.root)
    assert not folder.exists() and inspect_cache(cache.root) == []


def test_cli_data_cache_reports_and_prunes(cli, tmp_path):
    cache, subjects = _two_subject_cache(tmp_path)
    subjects["B"]["t1ce"].unlink()  # B's scan is gone
    result = cli("data", "cache", "--cache", cache.root, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    [folder] = report["folders"]
    assert folder["entries"] == 1 and folder["stale_files"] == 2 and report["stale_bytes"] > 0
    assert "pruned" not in report and len(list(cache.config_dir(CFG).glob("B-*"))) == 2  # nothing deleted

    table = cli("data", "cache", "--cache", cache.root)
    assert table.exit_code == 0 and "t1ce,flair" in table.stdout and "--prune" in table.stderr
    pruned = cli("data", "cache", "--cache", cache.root, "--prune", "--json")
    assert json.loads(pruned.stdout)["pruned"]["files"] == 2
    assert not list(cache.config_dir(CFG).glob("B-*")) and list(cache.config_dir(CFG).glob("A-*"))
    empty = cli("data", "cache", "--cache", tmp_path / "nowhere")
    assert empty.exit_code == 0 and "no preprocessed arrays" in empty.stderr


def test_prune_judges_only_what_medcli_wrote(tmp_path, cli):
    """`--cache` pointed at a folder that also holds other things (a project folder, say): files and folders
    medcli never names are neither listed nor deleted, and JSON that is not an object is not a traceback."""
    from medcli.data.cache import inspect_cache, prune_cache

    cache, _ = _two_subject_cache(tmp_path)
    results = cache.root / "results"
    results.mkdir()
    (results / "config.json").write_text('{"lr": 0.1}')
    (results / "weights.bin").write_bytes(b"important")
    notes = cache.root / "notes"
    notes.mkdir()
    (notes / "summary.json").write_text('{"a": 1}')
    (notes / "list.json").write_text("[1, 2]")
    (notes / ".env").write_text("secret")
    os.utime(notes / ".env", (1, 1))
    ours = cache.config_dir(CFG)
    (ours / "README.txt").write_text("a note someone left")  # not an entry name: not ours to judge
    (ours / "x-0123456789abcdef.json").write_text("[1, 2]")  # an entry's name, but damaged (not an object)
    os.utime(ours / "x-0123456789abcdef.json", (1, 1))

    [folder] = inspect_cache(cache.root)
    assert folder.entries == 2 and folder.stale == [ours / "x-0123456789abcdef.json"]
    listed = cli("data", "cache", "--cache", cache.root, "--json")
    assert listed.exit_code == 0, listed.stderr
    prune_cache(cache.root)
    kept = [results / "config.json", results / "weights.bin", notes / "summary.json", notes / "list.json"]
    assert all(p.exists() for p in [*kept, notes / ".env", ours / "README.txt"])
    assert inspect_cache(cache.root)[0].entries == 2


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_ctrl_c_while_workers_start_is_one_line_and_leaves_no_process(cohort, tmp_path):
    """Ctrl-C reaches every process of the group: workers still importing torch in their initializer
    printed "Exception in initializer" with a traceback; now the parent alone answers, with one line."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "medcli", *map(str, _prepare(cohort, tmp_path / "c", "t1ce")), "-j", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        start_new_session=True,
    )
    deadline = time.time() + 120
    while len(_children(proc.pid)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _children(proc.pid)
    time.sleep(0.3)  # inside the workers' initializer (torch's import takes seconds)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the foreground process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception in initializer" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert "run the same command again" in err and "download" not in err  # nothing was downloading
    time.sleep(1)
    assert not [w for w in workers if _alive(w)]


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by a container's init) is not running
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
