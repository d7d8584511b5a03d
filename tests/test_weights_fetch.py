"""`medcli weights fetch/list` and the downloader under them, against a real HTTP server on 127.0.0.1.

Nothing leaves the machine: the packaged manifest's URLs are never contacted; tests pass local URLs
(``--url``) or point ``MEDCLI_WEIGHTS_MANIFEST`` at a manifest of generated files.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
from helpers_weights import FakeMirror, manifest_entry, write_manifest

from medcli.errors import DownloadError, UnknownNameError, UsageError
from medcli.paths import DEFAULT_WEIGHTS
from medcli.weights.download import fetch, part_path
from medcli.weights.manifest import (
    fetch_command,
    install_path,
    load_manifest,
    local_status,
    weights_for_depth,
)

MiB = 2**20


def _blob(n: int = 3 * MiB + 123, seed: int = 0) -> bytes:
    """Incompressible bytes that do not start with '<' (that would look like a web page)."""
    data = bytearray(hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]
    for i in range(0, n, 4096):  # vary every block so a shifted resume cannot hash the same
        data[i : i + 8] = i.to_bytes(8, "little")
    data[0] = 0x80
    return bytes(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def mirror():
    with FakeMirror() as m:
        yield m


FAST = {"backoff": 0.01, "timeout": (2.0, 2.0)}


# ------------------------------------------------------------------------------------------ download core
def test_fetch_streams_verifies_and_installs(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    seen = []
    dest = tmp_path / "sub" / "w.pth"
    result = fetch(
        [url], dest, sha256=_sha(data), size=len(data), progress=lambda d, t: seen.append((d, t)), **FAST
    )
    assert result.action == "downloaded" and result.url == url
    assert dest.read_bytes() == data
    assert not part_path(dest).exists()
    assert [r["range"] for r in mirror.requests] == [None]
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert all(b >= a for (a, _), (b, _) in zip(seen, seen[1:], strict=False))  # monotonic progress


def test_dropped_connection_leaves_part_and_second_fetch_resumes_with_range(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data, "drop:1500000", "ok")
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        fetch([url], dest, sha256=_sha(data), size=len(data), retries=0, **FAST)
    assert url in str(err.value) and "resume" in str(err.value)
    assert not dest.exists()
    kept = part_path(dest).stat().st_size
    assert 0 < kept <= 1500000
    assert part_path(dest).read_bytes() == data[:kept]

    result = fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert result.action == "downloaded" and result.resumed_from == kept
    last = mirror.requests[-1]
    assert last["range"] == f"bytes={kept}-" and last["status"] == 206 and last["sent"] == len(data) - kept
    assert result.bytes_transferred == len(data) - kept
    assert dest.read_bytes() == data


def test_retry_within_one_fetch_resumes(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data, "drop:2000000", "ok")
    dest = tmp_path / "w.pth"
    notes: list[str] = []
    result = fetch([url], dest, sha256=_sha(data), size=len(data), retries=2, notify=notes.append, **FAST)
    assert dest.read_bytes() == data
    assert [r["status"] for r in mirror.requests] == [200, 206]
    assert mirror.requests[1]["range"] == f"bytes={result.resumed_from}-" and result.resumed_from > 0
    assert any("connection dropped" in n and "retry 1/2" in n for n in notes), notes


def test_server_ignoring_range_restarts_from_zero(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data, "drop:1500000", "ignore-range")
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError):
        fetch([url], dest, sha256=_sha(data), size=len(data), retries=0, **FAST)
    kept = part_path(dest).stat().st_size
    notes: list[str] = []
    result = fetch([url], dest, sha256=_sha(data), size=len(data), notify=notes.append, **FAST)
    assert mirror.requests[-1]["range"] == f"bytes={kept}-" and mirror.requests[-1]["status"] == 200
    assert result.resumed_from == 0 and result.bytes_transferred == len(data)
    assert dest.read_bytes() == data  # not the old prefix + the whole file
    assert any("does not support resuming" in n for n in notes)


def test_part_larger_than_expected_is_discarded(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    part_path(dest).write_bytes(data + b"extra")
    fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert mirror.requests[0]["range"] is None
    assert dest.read_bytes() == data


def test_bad_part_prefix_is_detected_and_downloaded_again(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    part_path(dest).write_bytes(b"\x80" + b"x" * 999_999)  # another file's first MB
    result = fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert [r["range"] for r in mirror.requests] == ["bytes=1000000-", None]
    assert dest.read_bytes() == data and result.resumed_from == 0


def test_complete_part_is_installed_without_a_request(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    part_path(dest).write_bytes(data)
    fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert mirror.requests == [] and dest.read_bytes() == data


def test_checksum_mismatch_installs_nothing(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", _blob(seed=1))  # same size, other bytes
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    msg = str(err.value)
    assert err.value.exit_code == 6
    assert "checksum mismatch" in msg and url in msg and _sha(data)[:12] in msg
    assert not dest.exists() and not part_path(dest).exists()


def test_wrong_size_is_refused_before_download(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data[:5000])
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError, match="offers 5,000 bytes, expected"):
        fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert not dest.exists()


@pytest.mark.parametrize("behaviour", ["html", "html-body"])
def test_web_page_instead_of_weights_is_reported(mirror, tmp_path, behaviour):
    data = _blob()
    url = mirror.add("/w.pth", data, behaviour)
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError) as err:
        fetch([url], dest, sha256=_sha(data), size=None, **FAST)
    assert "web page, not the weights" in str(err.value) and "browser" in str(err.value)
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert len(mirror.requests) == 1  # not retried: another attempt gets the same page


@pytest.mark.parametrize("status", [404, 500])
def test_next_mirror_after_failure(mirror, tmp_path, status):
    data = _blob()
    bad = mirror.add("/bad.pth", data, f"status:{status}")
    good = mirror.add("/good.pth", data)
    dest = tmp_path / "w.pth"
    notes: list[str] = []
    result = fetch(
        [bad, good], dest, sha256=_sha(data), size=len(data), retries=1, notify=notes.append, **FAST
    )
    assert result.url == good and dest.read_bytes() == data
    tries_on_bad = [r for r in mirror.requests if r["path"] == "/bad.pth"]
    assert len(tries_on_bad) == (2 if status == 500 else 1)  # 5xx is retried, 404 is not
    assert any("trying the next mirror" in n for n in notes)


def test_all_mirrors_failing_names_each_url(mirror, tmp_path):
    a = mirror.add("/a.pth", b"", "status:404")
    b = mirror.add("/b.pth", b"", "status:503")
    with pytest.raises(DownloadError) as err:
        fetch([a, b], tmp_path / "w.pth", sha256="0" * 64, retries=1, **FAST)
    msg = str(err.value)
    assert f"{a}: HTTP 404" in msg and f"{b}: HTTP 503" in msg and "gave up after 2 attempts" in msg


def test_stalled_server_hits_read_timeout(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data, "stall:100000")
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch([url], tmp_path / "w.pth", sha256=_sha(data), size=len(data), retries=0, timeout=(2, 0.3))
    assert time.monotonic() - t0 < 5
    assert "read timeout: no data for 0.3s" in str(err.value) and url in str(err.value)


def test_refused_connection_is_retried_then_reported(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    notes: list[str] = []
    with pytest.raises(DownloadError, match="connection refused") as err:
        fetch([url], tmp_path / "w.pth", sha256="0" * 64, retries=2, notify=notes.append, **FAST)
    assert "gave up after 3 attempts" in str(err.value)
    assert sum("retry" in n for n in notes) == 2


def test_present_verified_file_makes_no_request(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    dest.write_bytes(data)
    before = dest.stat().st_mtime_ns
    result = fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert result.action == "present" and mirror.requests == [] and dest.stat().st_mtime_ns == before
    forced = fetch([url], dest, sha256=_sha(data), size=len(data), force=True, **FAST)
    assert forced.action == "downloaded" and len(mirror.requests) == 1


def test_corrupt_present_file_is_replaced(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    dest.write_bytes(data[:-1] + b"\0")
    result = fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert result.action == "replaced" and dest.read_bytes() == data


def test_ctrl_c_keeps_the_part_for_resuming(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"

    def interrupt(done, total):
        if done >= MiB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch([url], dest, sha256=_sha(data), size=len(data), progress=interrupt, **FAST)
    kept = part_path(dest).stat().st_size
    assert kept >= MiB and not dest.exists()
    fetch([url], dest, sha256=_sha(data), size=len(data), **FAST)
    assert mirror.requests[-1]["range"] == f"bytes={kept}-" and dest.read_bytes() == data


def test_local_file_source(tmp_path):
    data = _blob()
    src = tmp_path / "downloaded in a browser.pth"
    src.write_bytes(data)
    for i, url in enumerate([str(src), src.as_uri()]):
        dest = tmp_path / f"w{i}.pth"
        assert fetch([url], dest, sha256=_sha(data), size=len(data)).action == "downloaded"
        assert dest.read_bytes() == data


def test_unwritable_destination_is_a_download_error(mirror, tmp_path):
    data = _blob(1000)
    url = mirror.add("/w.pth", data)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DownloadError, match="cannot write"):
        fetch([url], blocker / "w.pth", sha256=_sha(data), **FAST)


def test_proxy_from_environment_is_used(mirror, tmp_path, monkeypatch):
    """HTTP_PROXY works as requests reads it: the local server plays the proxy for an unresolvable host."""
    data = _blob(100_000)
    target = "http://weights.example.invalid/w.pth"
    mirror.add(target, data)  # a proxy receives the absolute URL as the request path
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, mirror.url(""))
    fetch([target], tmp_path / "w.pth", sha256=_sha(data), size=len(data), **FAST)
    assert [r["path"] for r in mirror.requests] == [target]
    assert (tmp_path / "w.pth").read_bytes() == data


def test_connection_closed_early_without_content_length_is_resumed(mirror, tmp_path):
    """A body that ends when the server closes the connection has no length: fewer bytes than the
    manifest's size is a cut transfer (retried, resuming), not "a different file"."""
    data = _blob()
    url = mirror.add("/w.pth", data, "cut:1500000", "ok")
    dest = tmp_path / "w.pth"
    notes: list[str] = []
    result = fetch([url], dest, sha256=_sha(data), size=len(data), retries=1, notify=notes.append, **FAST)
    assert dest.read_bytes() == data and result.resumed_from == 1500000
    assert [(r["range"], r["status"]) for r in mirror.requests] == [(None, 200), ("bytes=1500000-", 206)]
    assert any(f"connection closed after 1,500,000 of {len(data):,} bytes" in n for n in notes), notes


def test_gzip_encoded_response_is_checked_by_its_decoded_size(mirror, tmp_path):
    """A server that compresses despite Accept-Encoding: identity: its Content-Length counts gzip bytes."""
    data = _blob()
    url = mirror.add("/w.pth", data, "gzip")
    dest = tmp_path / "w.pth"
    assert fetch([url], dest, sha256=_sha(data), size=len(data), **FAST).action == "downloaded"
    assert dest.read_bytes() == data


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 184885051\n"


@pytest.mark.parametrize("size_known", [True, False])
def test_git_lfs_pointer_is_named(mirror, tmp_path, size_known):
    data = _blob()
    served = mirror.add("/w.pth", LFS)
    local = tmp_path / "pointer.pth"
    local.write_bytes(LFS)
    for url in (served, str(local)):
        dest = tmp_path / "w.pth"
        with pytest.raises(DownloadError) as err:
            fetch([url], dest, sha256=_sha(data), size=len(data) if size_known else None, **FAST)
        assert "Git LFS pointer" in str(err.value) and "git lfs pull" in str(err.value), err.value
        assert not dest.exists() and not part_path(dest).exists()


def test_web_page_of_another_length_sent_as_binary_is_named(mirror, tmp_path):
    data = _blob()
    url = mirror.add("/w.pth", data, "html-body")  # application/octet-stream, an HTML body
    with pytest.raises(DownloadError, match="web page, not the weights"):
        fetch([url], tmp_path / "w.pth", sha256=_sha(data), size=len(data), **FAST)


@pytest.mark.parametrize("url", ["ftp://host/w.pth", "htps://host/w.pth", "http://", "http:///w.pth"])
def test_url_that_no_retry_can_fix_is_a_usage_error_at_once(tmp_path, url):
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="medcli fetches http:// and https:// URLs and local files"):
        fetch([url], tmp_path / "w.pth", sha256="0" * 64, retries=3, backoff=1.0)
    assert time.monotonic() - t0 < 1 and list(tmp_path.iterdir()) == []


def test_dead_proxy_is_named(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    with pytest.raises(DownloadError) as err:
        fetch(["http://weights.example.invalid/w.pth"], tmp_path / "w.pth", sha256="0" * 64, retries=0)
    assert f"could not go through the proxy {proxy} (connection refused)" in err.value.message
    assert "HTTPS_PROXY" in err.value.hint and "unset it" in err.value.hint


def test_local_source_errors_speak_of_files(tmp_path):
    """A path given with --url is a file on this machine: no talk of connections, proxies or browsers."""
    data = _blob(1000)
    page = tmp_path / "saved_page.html"
    page.write_bytes(b"<!DOCTYPE html><html>Download</html>")
    (tmp_path / "folder").mkdir()
    cases = [
        (tmp_path / "nope.pth", "no such file"),
        (tmp_path / "folder", "a folder, not a weights file"),
        (page, "the file is a web page (HTML), not the weights: the browser saved a page, not the download"),
    ]
    for src, why in cases:
        with pytest.raises(DownloadError) as err:
            fetch([str(src)], tmp_path / "w.pth", sha256=_sha(data))
        assert err.value.message == f"could not copy w.pth: {src}: {why}", err.value.message
        assert "connection" not in err.value.hint and "proxy" not in err.value.hint
        assert "install it with `medcli weights fetch --url" not in err.value.hint  # what the user just did
        assert not (tmp_path / "w.pth").exists() and not part_path(tmp_path / "w.pth").exists()


def test_missing_file_on_a_server_gets_no_network_hint(mirror, tmp_path):
    url = mirror.add("/w.pth", b"", "status:404")
    with pytest.raises(DownloadError) as err:
        fetch([url], tmp_path / "w.pth", sha256="0" * 64, **FAST)
    assert "check the URL" in err.value.hint and "proxy" not in err.value.hint


_FULL_DISK = """
import resource, signal, sys
from medcli.errors import DownloadError
from medcli.weights.download import fetch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
try:
    fetch([sys.argv[1]], sys.argv[2], sha256=sys.argv[3], size=int(sys.argv[4]), retries=0)
except DownloadError as e:
    print(e)
"""


def test_disk_full_keeps_a_partial_download_and_says_so_but_no_empty_part(mirror, tmp_path):
    """A real write failure (a file size limit stands in for a full disk): a download's .part is kept, and
    said so (it resumes once there is space); a failed local copy, which never resumes, leaves none."""
    import subprocess
    import sys

    data = _blob()
    src = tmp_path / "src.pth"
    src.write_bytes(data)
    for url, dest, kept in ((mirror.add("/w.pth", data), "w.pth", True), (str(src), "c.pth", False)):
        args = [url, tmp_path / dest, _sha(data), len(data)]
        out = subprocess.run(
            [sys.executable, "-c", _FULL_DISK, *map(str, args)], capture_output=True, text=True
        )
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert "File too large" in out.stdout and ("partial download is kept" in out.stdout) == kept, (
            out.stdout
        )
        assert part_path(tmp_path / dest).exists() == kept and not (tmp_path / dest).exists()
        if kept:
            assert part_path(tmp_path / dest).read_bytes() == data[:1_000_000]


# ----------------------------------------------------------------------------------------------- manifest
def test_packaged_manifest_lists_every_release():
    m = load_manifest()
    by_file = {e.file: e for e in m.entries}
    assert len(by_file) == 11 and len(set(m.names())) == 11
    default = m.default
    assert (default.name, default.depth, default.datasets) == ("resnet50_23dataset", 50, 23)
    assert default.file == "resnet_50_23dataset.pth" and default.size == 184_885_051
    assert default.sha256.startswith("ff48a622")
    assert any("zenodo.org/records/15234379" in u for u in default.urls)
    assert by_file["resnet_152.pth"].size is None and by_file["resnet_10_23dataset.pth"].size is None
    for e in m.entries:
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        hf = f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{e.depth}/resolve/main/{e.file}"
        assert e.urls[0] == hf


def test_manifest_lookup_by_name_alias_or_file():
    m = load_manifest()
    assert m.get("resnet50") is m.default
    assert m.get("ResNet50_23Dataset") is m.default
    assert m.get("resnet_50_23dataset.pth") is m.default
    assert m.get("resnet18").datasets == 23 and m.get("resnet101").datasets == 8
    assert m.get("resnet_18.pth").name == "resnet18_8dataset"
    with pytest.raises(UnknownNameError, match="did you mean"):
        m.get("resnet5")


def test_install_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLI_HOME", str(tmp_path))
    m = load_manifest()
    assert install_path(m.default) == DEFAULT_WEIGHTS == Path("pretrained/medicalnet_resnet50_3d.pth")
    assert install_path(m.get("resnet18")) == tmp_path / "weights" / "resnet_18_23dataset.pth"


def test_release_for_each_depth_and_where_train_looks(tmp_path, monkeypatch):
    """`train`/`verify` without a file: the depth's release at its first local copy, else its install path."""
    monkeypatch.setenv("MEDCLI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    m = load_manifest()
    assert m.for_depth(50) is m.default and m.for_depth("50") is m.default
    assert m.for_depth(10).name == "resnet10_23dataset"  # the 23-dataset file over the 8-dataset one
    assert m.for_depth(101).name == "resnet101_8dataset"  # the only release of that depth
    assert m.for_depth("tiny") is None and weights_for_depth("tiny") == (None, None)

    assert weights_for_depth(50) == (DEFAULT_WEIGHTS, m.default)
    home_copy = tmp_path / "home" / "weights" / "resnet_50_23dataset.pth"  # where `fetch --all` puts it
    home_copy.parent.mkdir(parents=True)
    home_copy.write_bytes(b"x")
    assert weights_for_depth(50)[0] == home_copy  # the copy that exists wins over the absent seed path
    assert weights_for_depth(18)[0] == tmp_path / "home" / "weights" / "resnet_18_23dataset.pth"
    assert fetch_command(m.default) == "medcli weights fetch"
    assert fetch_command(m.for_depth(18)) == "medcli weights fetch resnet18"


def test_manifest_is_package_data():
    """A non-editable install must carry manifest.json (setuptools only packages .py files by default)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"].get("package-data", {})
    assert "manifest.json" in package_data.get("medcli.weights", []), package_data


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def site(tmp_path, monkeypatch, mirror):
    """A cwd, a MEDCLI_HOME and a manifest of two generated releases served by ``mirror``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDCLI_HOME", str(tmp_path / "home"))
    a, b = _blob(seed=1), _blob(2 * MiB, seed=2)
    entries = [
        manifest_entry("alpha", "alpha.pth", a, [mirror.add("/alpha.pth", a)]),
        manifest_entry("beta", "beta.pth", b, [mirror.add("/beta.pth", b)]),
    ]
    manifest = write_manifest(tmp_path / "manifest.json", entries, default="alpha")
    monkeypatch.setenv("MEDCLI_WEIGHTS_MANIFEST", str(manifest))
    return {"alpha": a, "beta": b, "home": tmp_path / "home" / "weights"}


def test_cli_list_json_reports_local_state(cli, site):
    (site["home"]).mkdir(parents=True)
    (site["home"] / "beta.pth").write_bytes(site["beta"][:-1])  # corrupt (size)
    result = cli("weights", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["alpha"]["local"]["state"] == "absent" and rows["alpha"]["default"] is True
    assert rows["alpha"]["local"]["path"] == str(DEFAULT_WEIGHTS)
    assert rows["beta"]["local"]["state"] == "corrupt" and "size" in rows["beta"]["local"]["reason"]

    DEFAULT_WEIGHTS.parent.mkdir()
    DEFAULT_WEIGHTS.write_bytes(site["alpha"])
    rows = {r["name"]: r for r in json.loads(cli("weights", "list", "--json").stdout)}
    assert rows["alpha"]["local"]["state"] == "verified"


def test_cli_list_table(cli, site):
    result = cli("weights", "list")
    assert result.exit_code == 0
    assert "alpha *" in result.stdout and "beta" in result.stdout and "absent" in result.stdout
    # Files under $MEDCLI_HOME/weights by name, the folder once in the title; the seed's path in full.
    assert str(site["home"]) in "".join(result.stdout.split()) and "beta.pth" in result.stdout
    assert str(site["home"] / "beta.pth") not in "".join(result.stdout.split())


def test_cli_list_shows_every_name_and_alias_whole_at_80_columns(cli, tmp_path):
    """Names and aliases are typed and copied: each whole on one line at 80 columns, never cut or folded."""
    from medcli.weights.manifest import load_manifest

    result = cli("weights", "list", env={"COLUMNS": "80", "MEDCLI_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    rows = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows and max(map(len, result.stdout.splitlines())) <= 80
    # Each name and alias whole on one line of the first column (folded mid-name, it could not be copied).
    lines = [cells[1].strip() for cells in rows]
    names = [n for e in load_manifest().entries for n in (e.name, *e.aliases)]
    assert names and all(any(n in line for line in lines) for n in names), lines


def test_cli_fetch_all_into_medcli_home(cli, site, mirror):
    result = cli("weights", "fetch", "--all", "--no-check", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["action"] for r in rows] == ["downloaded", "downloaded"]
    assert (site["home"] / "alpha.pth").read_bytes() == site["alpha"]
    assert (site["home"] / "beta.pth").read_bytes() == site["beta"]
    again = cli("weights", "fetch", "--all", "--no-check", "--json")
    assert [r["action"] for r in json.loads(again.stdout)] == ["present", "present"]
    assert len(mirror.requests) == 2
    # The default release is also wanted at the seed's path: copied from the verified local copy.
    assert cli("weights", "fetch", "--no-check").exit_code == 0
    assert DEFAULT_WEIGHTS.read_bytes() == site["alpha"] and len(mirror.requests) == 2


def test_cli_fetch_all_partial_failure(cli, site, mirror):
    mirror.plans["/beta.pth"] = ["status:404"]
    result = cli("weights", "fetch", "--all", "--no-check", "--retries", "0")
    assert result.exit_code == 10
    assert (site["home"] / "alpha.pth").exists() and not (site["home"] / "beta.pth").exists()
    assert "beta" in result.stderr and "HTTP 404" in result.stderr


def test_cli_fetch_default_goes_to_seed_path(cli, site):
    result = cli("weights", "fetch", "--no-check")
    assert result.exit_code == 0, result.stderr
    assert DEFAULT_WEIGHTS.read_bytes() == site["alpha"]
    assert "alpha" in result.stdout and "downloaded" in result.stdout


def test_cli_fetch_own_url_and_sha(cli, mirror, tmp_path):
    data = _blob()
    url = mirror.add("/mine.pth", data)
    dest = tmp_path / "mine.pth"
    ok = cli("weights", "fetch", "--url", url, "--sha256", _sha(data).upper(), "--dest", dest, "--no-check")
    assert ok.exit_code == 0, ok.stderr
    assert dest.read_bytes() == data


def test_cli_checksum_mismatch_exit_6_and_nothing_installed(cli, mirror, tmp_path):
    url = mirror.add("/mine.pth", _blob(seed=5))
    dest = tmp_path / "mine.pth"
    result = cli("weights", "fetch", "--url", url, "--sha256", _sha(_blob()), "--dest", dest, "--no-check")
    assert result.exit_code == 6
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "checksum mismatch" in lines[0]
    assert not dest.exists() and not part_path(dest).exists() and result.stdout == ""


def test_cli_html_page_exit_6(cli, mirror, tmp_path):
    url = mirror.add("/page", b"", "html")
    result = cli("weights", "fetch", "--url", url, "--sha256", "a" * 64, "--dest", tmp_path / "w.pth")
    assert result.exit_code == 6 and "web page, not the weights" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sha256", "a" * 64], "--sha256 checks the file given with --url"),
        (["--url", "http://127.0.0.1:9/x", "--sha256", "xyz"], "not a SHA-256"),
        (["--all", "resnet18"], "--all fetches every release"),
        (["resnet5"], "did you mean"),
    ],
)
def test_cli_usage_errors(cli, tmp_path, args, message):
    result = cli("weights", "fetch", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_cli_own_sha256_without_dest_never_touches_the_release(cli, site, mirror, tmp_path):
    """--sha256 (a file that is not the release) without --dest: a usage error before any download, and
    the verified release at its install path stays the release."""
    assert cli("weights", "fetch", "--no-check").exit_code == 0
    other = _blob(seed=9)
    url = mirror.add("/mine.pth", other)
    requests_before = len(mirror.requests)
    result = cli("weights", "fetch", "--url", url, "--sha256", _sha(other), "--no-check")
    assert result.exit_code == 2, result.stderr
    assert "needs --dest" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert len(mirror.requests) == requests_before
    assert DEFAULT_WEIGHTS.read_bytes() == site["alpha"] and local_status(load_manifest().default).verified
    # The release's own checksum names the release: that may go to its install path.
    same = cli("weights", "fetch", "--url", mirror.url("/alpha.pth"), "--sha256", _sha(site["alpha"]))
    assert same.exit_code == 0, same.stderr


@pytest.mark.parametrize("blocker", ["folder at the file", "file at the folder"])
def test_cli_unusable_install_path_is_a_usage_error_before_downloading(cli, site, mirror, blocker):
    if blocker == "folder at the file":
        DEFAULT_WEIGHTS.mkdir(parents=True)
        problem = f"the install path {DEFAULT_WEIGHTS} is a folder"
    else:
        DEFAULT_WEIGHTS.parent.write_text("x")
        problem = f"{DEFAULT_WEIGHTS.parent} is a file, not a folder"
    result = cli("weights", "fetch")
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert problem in line and "--dest" in line
    assert mirror.requests == [] and not part_path(DEFAULT_WEIGHTS).exists()


def test_cli_fetch_all_checks_every_install_path_first(cli, site, mirror):
    site["home"].parent.mkdir(parents=True)
    site["home"].write_text("x")  # $MEDCLI_HOME/weights is a file
    result = cli("weights", "fetch", "--all", "--no-check")
    assert (
        result.exit_code == 2
        and "is a file, not a folder" in result.stderr
        and "MEDCLI_HOME" in result.stderr
    )
    assert mirror.requests == []


def test_cli_dest_with_a_trailing_slash_is_a_folder(cli, site, tmp_path):
    result = cli("weights", "fetch", "beta", "--dest", "new/sub/", "--no-check")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "new" / "sub" / "beta.pth").read_bytes() == site["beta"]


def test_cli_local_copy_reports_no_transfer_rate(cli, site, tmp_path):
    src = tmp_path / "downloaded.pth"
    src.write_bytes(site["beta"])
    result = cli("weights", "fetch", "beta", "--url", src, "--no-check")
    assert result.exit_code == 0, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if " verified in " in x]
    assert "MiB/s" not in line  # nothing crossed a network: "0.0 MiB/s" would be a false figure


def test_cli_bad_url_scheme_exit_2(cli, tmp_path):
    result = cli(
        "weights", "fetch", "--url", "htps://example.org/w.pth", "--sha256", "a" * 64, "--dest", "w.pth"
    )
    assert result.exit_code == 2 and "htps://example.org/w.pth" in result.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("urls", "http://example.org/w.pth", "'urls' must be a list of strings"),
        ("sha256", "abc", "'sha256' must be 64 hex digits"),
        ("size", "12", "'size' must be a number of bytes"),
    ],
)
def test_cli_malformed_site_manifest_is_one_line_naming_it(cli, tmp_path, monkeypatch, field, value, message):
    entry = {**manifest_entry("alpha", "alpha.pth", b"x", ["http://example.org/a"]), field: value}
    manifest = write_manifest(tmp_path / "m.json", [entry], default="alpha")
    monkeypatch.setenv("MEDCLI_WEIGHTS_MANIFEST", str(manifest))
    result = cli("weights", "list")
    assert result.exit_code == 4
    (line,) = result.stderr.strip().splitlines()
    assert str(manifest) in line and message in line and "MEDCLI_WEIGHTS_MANIFEST" in line


@pytest.fixture(scope="module")
def resnet10_file(tmp_path_factory) -> Path:
    from medcli.models.synthetic import write_medicalnet_checkpoint

    return write_medicalnet_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet_10.pth", depth=10)


@pytest.mark.slow
def test_cli_fetch_checks_the_file_loads(cli, mirror, tmp_path, monkeypatch, resnet10_file):
    """The real thing end to end: a MedicalNet-layout ResNet-10 file, served, fetched, verified, loaded."""
    data = resnet10_file.read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDCLI_HOME", str(tmp_path / "home"))
    entry = manifest_entry("r10", "resnet_10.pth", data, [mirror.add("/resnet_10.pth", data)], depth=10)
    monkeypatch.setenv("MEDCLI_WEIGHTS_MANIFEST", str(write_manifest(tmp_path / "m.json", [entry], "r10")))
    result = cli("weights", "fetch", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["load"]["ok"] is True
    assert DEFAULT_WEIGHTS.read_bytes() == data
    assert local_status(load_manifest().default).verified


@pytest.mark.slow
def test_cli_fetch_reports_a_file_of_another_depth(cli, mirror, tmp_path, resnet10_file):
    """The load check runs before the file is moved into place: a failing one leaves --dest as it was."""
    data = resnet10_file.read_bytes()
    url = mirror.add("/resnet_10.pth", data)
    dest = tmp_path / "w.pth"
    result = cli("weights", "fetch", "resnet18", "--url", url, "--sha256", _sha(data), "--dest", dest)
    assert result.exit_code == 5
    assert "does not fit a ResNet-18" in result.stderr and "ResNet-10" in result.stderr
    assert f"{dest}: checksum verified" in result.stderr and ".part" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing installed, no .part for --no-check to install later
    dest.write_bytes(data)  # the file already there (say, fetched with --no-check): checked again
    again = cli("weights", "fetch", "resnet18", "--url", url, "--sha256", _sha(data), "--dest", dest)
    assert again.exit_code == 5 and "does not fit a ResNet-18" in again.stderr
    assert dest.read_bytes() == data  # the bytes are what the user asked for; only the check failed


def test_cli_fetch_that_fails_the_load_check_keeps_the_old_dest(cli, mirror, tmp_path, resnet10_file):
    """--dest held good weights: a new file that fails the load check (another depth: exit 5; not weights
    at all: exit 4) must not replace them, nor delete them."""
    old = resnet10_file.read_bytes()
    dest = tmp_path / "my.pth"
    page = tmp_path / "p.html"
    page.write_bytes(b"<html>x</html>\n")
    r18 = mirror.add("/r18.pth", old)  # a ResNet-10 file offered as a ResNet-18 one
    for name, url, data, code in (("resnet10", str(page), page.read_bytes(), 4), ("resnet18", r18, old, 5)):
        dest.write_bytes(old + b"old")  # a valid earlier file at --dest (other bytes than the new one)
        result = cli("weights", "fetch", name, "--url", url, "--sha256", _sha(data), "--dest", dest)
        assert result.exit_code == code, result.stderr
        assert "not installed" in result.stderr
        assert dest.read_bytes() == old + b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["my.pth", "p.html"]


def test_cli_fetch_of_a_file_of_yours_that_is_not_weights_installs_nothing(cli, mirror, tmp_path):
    """Your checksum vouches for the bytes only: bytes no ResNet can load are not installed at --dest, so a
    second fetch cannot find them "present, verified" and succeed."""
    data = b"\x97{\xaaLA}b_" + bytes(range(256)) * 40
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    for _ in range(2):
        result = cli("weights", "fetch", "resnet10", "--url", url, "--sha256", _sha(data), "--dest", dest)
        assert result.exit_code == 4, result.stderr
        assert "not a PyTorch weights file" in result.stderr and "not installed" in result.stderr
        assert f"{dest} is not" in result.stderr  # named as the file asked for, not its .part
        assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code_and_streams(medcli_proc, mirror, tmp_path):
    """A real process: the error is one line on stderr, stdout stays empty, the exit code is 6."""
    url = mirror.add("/w.pth", b"", "status:404")
    proc = medcli_proc("weights", "fetch", "--url", url, "--sha256", "b" * 64, "--dest", tmp_path / "w.pth")
    assert proc.returncode == 6 and proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "HTTP 404" in errors[0] and url in errors[0]


# ------------------------------------------------------------------------------------------ one at a time
def test_a_second_fetch_into_the_same_file_fails_at_once(mirror, tmp_path):
    from conftest import run_medcli

    from medcli.weights.download import exclusive

    data = _blob(MiB)
    url = mirror.add("/w.pth", data)
    dest = tmp_path / "w.pth"
    args = ("weights", "fetch", "--url", url, "--sha256", _sha(data), "--dest", dest, "--no-check")
    with exclusive(dest):  # this process is "the first fetch"
        with pytest.raises(DownloadError, match="another `medcli weights fetch` is downloading w.pth"):
            fetch([url], dest, sha256=_sha(data), **FAST)
        other = run_medcli(*args)  # a real second process
        assert other.returncode == 6, other.stderr
        assert "another `medcli weights fetch` is downloading w.pth" in other.stderr
        assert not dest.exists() and not part_path(dest).exists()
    assert not (tmp_path / "w.pth.lock").exists()  # released and removed
    done = run_medcli(*args)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]  # no .part or .lock left behind


def test_fetch_logs_progress_lines_when_stderr_is_not_a_terminal(cli, mirror, tmp_path, monkeypatch):
    """CI and batch jobs get no progress bar, but a long download still shows it is alive in the log."""
    import medcli.cli.weights_fetch as fetch_cli

    data = _blob(3 * MiB)
    url = mirror.add("/slow.pth", data)
    monkeypatch.setattr(fetch_cli, "LOG_EVERY_S", 0.0)  # every progress callback logs
    result = cli(
        "weights",
        "fetch",
        "--url",
        url,
        "--sha256",
        _sha(data),
        "--dest",
        tmp_path / "slow.pth",
        "--no-check",
    )
    assert result.exit_code == 0, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("INFO: slow.pth: ") and "MiB/s" in x]
    assert lines and "% (" in lines[0] and "of 3.0 MiB" in lines[0]
    monkeypatch.setattr(fetch_cli, "LOG_EVERY_S", 3600.0)  # the default pace: none in a short download
    again = cli(
        "weights", "fetch", "--url", url, "--sha256", _sha(data), "--dest", tmp_path / "b.pth", "--no-check"
    )
    assert again.exit_code == 0 and "% (" not in again.stderr
