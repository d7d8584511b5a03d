"""A real HTTP server on 127.0.0.1 for download tests: Range support and scripted misbehaviour.

Each path has a *plan*: a list of behaviours used one per request (the last one repeats), e.g.
``mirror.add("/w.pth", data, "drop:1500000", "ok")``: the first request dies after 1.5 MB, later ones
succeed.  Behaviours:

    ok              200, or 206 for a satisfiable ``Range: bytes=N-``
    ignore-range    always 200 with the whole file
    status:CODE     that HTTP status, empty body
    html            200, Content-Type text/html, a login page
    html-body       200, Content-Type application/octet-stream, but the body is a web page
    drop:N          send the headers for the full response, N body bytes, then close the connection
    stall:N         send N body bytes, then go silent (until the server stops)
    cut:N           no Content-Length (the body ends when the connection closes): N body bytes, then close
    gzip            200, the whole file gzip-compressed with its compressed Content-Length (a server that
                    ignores ``Accept-Encoding: identity``)

Every request is recorded in ``mirror.requests`` as ``{"path", "range", "status", "sent"}``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients here hang up on purpose (an aborted or stalled download, a kept-alive connection closed):
        # the reset that follows is expected, not a failure to print into the test log.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeMirror:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list[str]] = {}
        self.requests: list[dict] = []
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def add(self, path: str, data: bytes, *plan: str) -> str:
        self.files[path] = data
        self.plans[path] = list(plan or ["ok"])
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def next_behaviour(self, path: str) -> str:
        plan = self.plans.get(path, ["status:404"])
        return plan.pop(0) if len(plan) > 1 else plan[0]

    def __enter__(self) -> FakeMirror:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # releases stalled handlers
        self._server.shutdown()
        self._server.server_close()


def _handler(mirror: FakeMirror):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            behaviour = mirror.next_behaviour(self.path)
            record = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
            mirror.requests.append(record)
            kind, _, arg = behaviour.partition(":")
            data = mirror.files.get(self.path, b"")

            if kind == "status":
                return self._reply(record, int(arg), b"")
            if kind in ("html", "html-body"):
                ctype = "text/html; charset=utf-8" if kind == "html" else "application/octet-stream"
                return self._reply(record, 200, HTML, ctype)
            if kind == "gzip":
                return self._reply(record, 200, gzip.compress(data), extra={"Content-Encoding": "gzip"})

            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and kind != "ignore-range":
                start = int(match.group(1))
                if start >= len(data):
                    return self._reply(record, 416, b"", extra={"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            status = 206 if start else 200
            extra = {"Accept-Ranges": "bytes"}
            if start:
                extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            limit = int(arg) if kind in ("drop", "stall", "cut") else None
            if kind == "cut":
                extra["Connection"] = "close"
            self._reply(record, status, body, extra=extra, limit=limit, length=kind != "cut")
            if kind in ("drop", "cut"):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif kind == "stall":
                mirror._stop.wait(30)
                self.close_connection = True

        def _reply(
            self, record, status, body, ctype="application/octet-stream", extra=None, limit=None, length=True
        ):
            record["status"] = status
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if length:
                self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            payload = body if limit is None else body[:limit]
            try:
                self.wfile.write(payload)
                self.wfile.flush()
                record["sent"] = len(payload)
            except OSError:  # the client went away (e.g. it detected a web page and hung up)
                pass

    return Handler


# ------------------------------------------------------------------------------------ a site's manifest
def write_manifest(path: Path, entries: list[dict], default: str) -> Path:
    """A ``MEDCLI_WEIGHTS_MANIFEST`` file listing ``entries`` (see :func:`manifest_entry`)."""
    path.write_text(
        json.dumps({"format": "medcli-weights-manifest/1", "default": default, "weights": entries})
    )
    return path


def manifest_entry(name: str, file: str, data: bytes | Path, urls: list[str], depth: int = 10) -> dict:
    """A release of ``data`` (bytes, or a file's; its size and SHA-256) for :func:`write_manifest`."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            size, sha = data.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest()
    else:
        size, sha = len(data), hashlib.sha256(data).hexdigest()
    return {
        "name": name,
        "depth": depth,
        "datasets": 8,
        "file": file,
        "size": size,
        "sha256": sha,
        "urls": urls,
    }
