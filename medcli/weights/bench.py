"""Download benchmark: ``fetch`` vs ``curl`` on the same loopback URL, and ``fetch``'s memory growth.

A weights-sized file (184,885,051 bytes by default, the ResNet-50 release's size) of random bytes is
served from 127.0.0.1 with ``sendfile`` (so the server is not the bottleneck), then downloaded

- by ``medcli.weights.download.fetch`` in a child process (so its peak RSS is its own): streaming,
  SHA-256 and size verification, atomic install, exactly as ``medcli weights fetch`` does;
- by ``curl -o`` (skipped when curl is not installed): the reference for raw transfer speed.

Runs alternate and the best of ``repeats`` is kept for each (the machine may be shared).  Targets:
peak RSS growth < 64 MiB, throughput >= 80 % of curl's.  ``medcli bench`` renders the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RELEASE_SIZE = 184_885_051  # resnet_50_23dataset.pth
RSS_TARGET_MIB = 64
RATIO_TARGET = 0.8


class _SendfileHandler(SimpleHTTPRequestHandler):
    """Static files with zero-copy ``sendfile``; quiet."""

    def copyfile(self, source, outputfile):
        self.wfile.flush()
        self.connection.sendfile(source)

    def log_message(self, *args):
        pass


def _write_random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = 8 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _proc_status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (Linux, KiB) in bytes, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    """Peak resident memory of this process so far.  Linux: VmHWM, not ru_maxrss, which a new process
    inherits from its parent at exec() and would charge the parent's peak to this one."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _current_rss_bytes() -> int:
    """Resident memory now (Linux); elsewhere the peak so far, which can only under-state growth."""
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else _maxrss_bytes()


def _child(url: str, dest: str, sha256: str, size: int, out: str) -> None:
    """Runs in the child process: one ``fetch``, with its time and peak RSS growth written to ``out``."""
    from medcli.weights.download import fetch

    before = _current_rss_bytes()  # after imports: the interpreter, requests, medcli
    t0 = time.perf_counter()
    fetch([url], dest, sha256=sha256, size=size, retries=0)
    seconds = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"seconds": seconds, "rss_growth": _maxrss_bytes() - before}))


def _run_fetch(url: str, dest: Path, sha256: str, size: int, out: Path) -> dict:
    dest.unlink(missing_ok=True)
    code = "import sys; from medcli.weights.bench import _child; _child(*sys.argv[1:4], int(sys.argv[4]), sys.argv[5])"  # noqa: E501
    subprocess.run(
        [sys.executable, "-c", code, url, str(dest), sha256, str(size), str(out)], check=True, timeout=600
    )
    return json.loads(out.read_text())


def _run_curl(curl: str, url: str, dest: Path) -> float:
    dest.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([curl, "-sS", "--fail", "-o", str(dest), url], check=True, timeout=600)
    return time.perf_counter() - t0


def run_fetch_benchmark(size: int = RELEASE_SIZE, *, repeats: int = 3, workdir: Path | None = None) -> dict:
    """Serve ``size`` random bytes on loopback; time ``fetch`` and ``curl``; return the figures as a dict.

    Keys: ``size_bytes``, ``fetch`` {seconds, mib_per_s, rss_growth_mib}, ``curl`` {seconds, mib_per_s}
    or None, ``ratio_vs_curl`` (None without curl), ``targets`` {rss_ok, throughput_ok}.
    """
    with tempfile.TemporaryDirectory(prefix="medcli-bench-", dir=workdir) as tmp:
        tmp_path = Path(tmp)
        serve_dir = tmp_path / "serve"
        serve_dir.mkdir()
        sha256 = _write_random_file(serve_dir / "weights.pth", size)
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_SendfileHandler, directory=str(serve_dir)))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/weights.pth"
        curl = shutil.which("curl")
        fetch_runs: list[dict] = []
        curl_runs: list[float] = []
        try:
            for _ in range(repeats):
                fetch_runs.append(
                    _run_fetch(url, tmp_path / "fetched.pth", sha256, size, tmp_path / "child.json")
                )
                if curl:
                    curl_runs.append(_run_curl(curl, url, tmp_path / "curl.pth"))
        finally:
            server.shutdown()
            server.server_close()

    best = min(fetch_runs, key=lambda r: r["seconds"])
    mib = size / 2**20
    rss_growth_mib = max(r["rss_growth"] for r in fetch_runs) / 2**20
    result = {
        "size_bytes": size,
        "repeats": repeats,
        "fetch": {
            "seconds": round(best["seconds"], 3),
            "mib_per_s": round(mib / best["seconds"], 1),
            "rss_growth_mib": round(rss_growth_mib, 1),
        },
        "curl": None,
        "ratio_vs_curl": None,
        "targets": {"rss_growth_mib_max": RSS_TARGET_MIB, "ratio_min": RATIO_TARGET},
    }
    result["targets"]["rss_ok"] = rss_growth_mib < RSS_TARGET_MIB
    if curl_runs:
        curl_s = min(curl_runs)
        result["curl"] = {"seconds": round(curl_s, 3), "mib_per_s": round(mib / curl_s, 1)}
        result["ratio_vs_curl"] = round(curl_s / best["seconds"], 3)
        result["targets"]["throughput_ok"] = result["ratio_vs_curl"] >= RATIO_TARGET
    return result
