"""Resumable, verified downloads: mirrors in order, retries with backoff, atomic install.

``fetch(urls, dest, sha256=..., size=...)`` streams into ``<dest>.part`` in 1 MiB chunks (constant
memory; two more threads write and hash while the first reads the socket), and moves the file into
place with ``os.replace`` only once its size and SHA-256 match.  So ``dest`` is either absent, the old
file, or the complete verified new one.

- Resume: an existing ``.part`` is hashed first, then the rest is asked for with ``Range: bytes=N-``.
  A server that answers 200 (ignoring Range) is read from byte 0 instead; a ``.part`` longer than the
  expected size, or a mismatched ``Content-Range``, is discarded.  Ctrl-C keeps the ``.part``.
- Failures: connection errors, timeouts, dropped connections, 408/429/5xx are retried on the same mirror
  with exponential backoff (``backoff`` seconds, doubling); anything else (404, a web page instead of the
  weights, wrong size, wrong checksum) moves on to the next mirror.  When every mirror failed,
  ``DownloadError`` names each URL and what happened there.
- A ``file://`` URL or a plain local path is copied through the same verification (a file a user
  downloaded in a browser).  Any other scheme than http(s) is a ``UsageError`` before any work.
- What is not the weights is named from its first bytes: a web page, a Git LFS pointer.
- ``accept(part)``, when given, runs on the verified ``.part`` before it is moved into place (the caller's
  load check): if it raises, ``dest`` is left as it was and the ``.part`` is removed.
- Proxies, ``REQUESTS_CA_BUNDLE`` and ``.netrc`` work as requests reads them from the environment.
- One fetch per destination at a time: ``<dest>.lock`` (an advisory ``flock``) keeps a second
  ``medcli weights fetch`` from writing into the same ``.part``; it fails at once, saying so.

Library code: it never prints.  Progress goes to ``progress(done_bytes, total_bytes_or_None)`` and
human-readable notices (retrying, resuming, next mirror) to ``notify(message)``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from medcli import __version__
from medcli.errors import DownloadError, UsageError
from medcli.weights.verify import CHUNK, check_file, sha256_file

ProgressFn = Callable[[int, "int | None"], None]
NotifyFn = Callable[[str], None]

DEFAULT_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds; read = longest silence tolerated mid-file
MAX_BACKOFF = 60.0
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
USER_AGENT = f"medcli/{__version__} python-requests/{requests.__version__}"
WEB_PAGE = "the server returned a web page, not the weights — the link may need a browser login"
LOCAL_WEB_PAGE = "the file is a web page (HTML), not the weights: the browser saved a page, not the download"
LFS_POINTER = "a Git LFS pointer file, not the weights: its repository's large files were never pulled"
PROXY_FAILED = "could not go through the proxy"


@dataclass
class FetchResult:
    """What ``fetch`` did.  ``action``: ``present`` (already verified, nothing fetched), ``downloaded``,
    or ``replaced`` (a corrupt local file was replaced by a verified download)."""

    path: Path
    action: str
    size: int
    sha256: str
    url: str | None = None
    resumed_from: int = 0
    bytes_transferred: int = 0
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def exclusive(dest: Path):
    """Hold ``<dest>.lock`` for one fetch into ``dest``; a second one gets a DownloadError at once."""
    from medcli.locking import exclusive as hold

    def busy(holder: str) -> DownloadError:
        return DownloadError(
            f"another `medcli weights fetch` is downloading {dest.name} "
            f"({holder + ' ' if holder else ''}holds {dest.name}.lock)",
            hint="wait for it to finish, then run the command again",
        )

    return hold(dest.with_name(dest.name + ".lock"), busy)


class _Retry(Exception):
    """A transient failure: try this mirror again after a pause (at least ``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _NextMirror(Exception):
    """This mirror cannot serve the file: move on."""


class _Restart(Exception):
    """The ``.part`` was discarded: ask again from byte 0 at once (not counted as a failure)."""


@dataclass
class _Job:
    dest: Path
    sha256: str
    size: int | None
    timeout: tuple[float, float]
    progress: ProgressFn | None
    session: requests.Session
    received: int = 0  # bytes transferred over the wire in this fetch (all attempts)
    resumed_from: int = 0


def fetch(
    urls: Sequence[str],
    dest: Path | str,
    *,
    sha256: str,
    size: int | None = None,
    force: bool = False,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = 3,
    backoff: float = 1.0,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    session: requests.Session | None = None,
    accept: Callable[[Path], object] | None = None,
) -> FetchResult:
    """Download the file with SHA-256 ``sha256`` (and ``size`` bytes, if known) from the first of ``urls``
    that serves it, into ``dest``.  A verified ``dest`` is kept as is unless ``force``."""
    _check_urls(urls)
    dest = Path(dest)
    sha256 = sha256.lower()
    notices: list[str] = []

    def say(msg: str) -> None:
        notices.append(msg)
        if notify:
            notify(msg)

    existing = check_file(dest, sha256=sha256, size=size)
    if existing.verified and not force:
        return FetchResult(dest, "present", existing.size or 0, sha256)
    if existing.state == "corrupt":
        say(f"{dest} is corrupt ({existing.reason}); it will be replaced once a verified copy is downloaded")
    if not urls:
        raise DownloadError(f"no URL to download {dest.name} from", hint="pass --url URL --sha256 HEX")

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(dest, e) from e
    # One fetch per destination: a second would write into the same .part.
    with exclusive(dest):
        part = part_path(dest)
        if size is not None and part.exists() and part.stat().st_size > size:
            say(f"discarding {part.name}: it is larger than the expected {size:,} bytes")
            part.unlink()
        _check_disk_space(dest, size, part)

        if isinstance(timeout, (int, float)):
            timeout = (float(timeout), float(timeout))
        own_session = session is None
        session = session or _new_session()
        job = _Job(dest, sha256, size, timeout, progress, session)
        failures: list[str] = []
        start = time.monotonic()
        try:
            for url in urls:
                say(f"{'copying' if _local_source(url) else 'downloading'} {url} → {dest}")
                try:
                    why = _try_mirror(job, url, retries=retries, backoff=backoff, say=say)
                except DownloadError as e:  # this disk, not the mirror (e.g. full): no other mirror helps
                    raise DownloadError(e.message + _kept(part), hint=e.hint) from e
                if why is None:
                    if accept is not None:
                        try:
                            accept(part)
                        except Exception:
                            # Verified bytes the caller cannot use: dest keeps what it had, and no complete
                            # .part is left for a later fetch (or --no-check) to install unchecked.
                            part.unlink(missing_ok=True)
                            raise
                    os.replace(part, dest)
                    return FetchResult(
                        dest,
                        "replaced" if existing.state == "corrupt" else "downloaded",
                        dest.stat().st_size,
                        sha256,
                        url=url,
                        resumed_from=job.resumed_from,
                        bytes_transferred=job.received,
                        seconds=time.monotonic() - start,
                        notices=notices,
                    )
                failures.append((url, why))
                if url != urls[-1]:
                    say(f"{_host(url)} failed ({why}); trying the next mirror")
        finally:
            if own_session:
                session.close()

        said = "; ".join(f"{url}: {why}" for url, why in failures)
        verb = "copy" if all(_local_source(url) for url in urls) else "download"
        raise DownloadError(f"could not {verb} {dest.name}: {said}{_kept(part)}", hint=_hint(failures))


def _kept(part: Path) -> str:
    """Remove an empty ``.part``; for one with bytes in it, say it is kept for resuming."""
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    return " (the partial download is kept: run the same command again to resume)" if part.exists() else ""


def _check_urls(urls: Sequence[str]) -> None:
    """A URL no retry can fix (``ftp://``, a typo such as ``htps://``, ``http://`` without a host) is a
    usage error at once, not retries with backoff ending in requests' exception name."""
    for url in urls:
        parsed = urlparse(url)
        if _local_source(url) is None and (parsed.scheme not in ("http", "https") or not parsed.netloc):
            raise UsageError(
                f"cannot download from {url}: medcli fetches http:// and https:// URLs and local files",
                hint="give an https://host/path URL, a file:// URL or a local file's path",
            )


def _try_mirror(job: _Job, url: str, *, retries: int, backoff: float, say: NotifyFn) -> str | None:
    """Fetch from one URL, retrying transient errors; ``None`` on success, else why this mirror failed."""
    attempt = restarts = 0
    while True:
        try:
            _download_once(job, url, say)
            return None
        except _Restart as e:
            restarts += 1
            if restarts > 2:
                return str(e)
            say(f"{e}; starting {job.dest.name} again from the beginning")
        except _NextMirror as e:
            return str(e)
        except _Retry as e:
            if attempt >= retries:
                return f"{e} (gave up after {attempt + 1} attempts)" if attempt else str(e)
            delay = min(max(backoff * 2**attempt, e.retry_after or 0.0), MAX_BACKOFF)
            attempt += 1
            say(f"{_host(url)}: {e}; retry {attempt}/{retries} in {delay:.1f}s")
            time.sleep(delay)


def _download_once(job: _Job, url: str, say: NotifyFn) -> None:
    """One attempt: complete ``.part`` from where it ends, then check its size and SHA-256.
    Raises ``_Retry``, ``_NextMirror`` or ``_Restart`` when the ``.part`` is not the verified file."""
    part = part_path(job.dest)
    local = _local_source(url)
    digest, size = _copy_local(job, local, part) if local is not None else _http_once(job, url, part, say)
    if digest == job.sha256 and (job.size is None or size == job.size):
        return
    what = _sniff(_head(part), local=local is not None)
    part.unlink(missing_ok=True)
    if job.resumed_from:  # the kept prefix may come from another version of the file: one clean retry
        job.resumed_from = 0
        raise _Restart("checksum mismatch after resuming")
    if what:
        raise _NextMirror(what)
    expected = f"{job.size:,} bytes, " if job.size is not None else ""
    raise _NextMirror(
        f"checksum mismatch: got {size:,} bytes, sha256 {digest[:12]}…; expected {expected}"
        f"sha256 {job.sha256[:12]}… (a different or damaged file)"
    )


def _http_once(job: _Job, url: str, part: Path, say: NotifyFn) -> tuple[str, int]:
    """GET the rest of the file into ``part``; returns (sha256 hex of the whole part, its size)."""
    offset = part.stat().st_size if part.exists() else 0
    # Hash the bytes we already have first, so a resumed download is still checked end to end.
    hasher = sha256_file(part) if offset else hashlib.sha256()
    if offset and hasher.hexdigest() == job.sha256:
        return job.sha256, offset  # a complete .part left by an interrupted install

    headers = {"Accept-Encoding": "identity"}  # byte offsets must be the file's, not a gzip stream's
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        r = job.session.get(url, headers=headers, stream=True, timeout=job.timeout)
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as e:
        raise _NextMirror(f"invalid URL ({_short(e)})") from e  # the same on every attempt
    except requests.RequestException as e:
        raise _Retry(_describe(e, job.timeout, url)) from e

    with r:
        if r.status_code == 416 and offset:
            part.unlink()
            raise _Restart(f"the server refused to resume at byte {offset:,}")
        if r.status_code in TRANSIENT_STATUS:
            raise _Retry(f"HTTP {r.status_code} {r.reason}", _retry_after(r))
        if r.status_code not in (200, 206):
            raise _NextMirror(f"HTTP {r.status_code} {r.reason}")
        if r.headers.get("Content-Type", "").lower().startswith("text/html"):
            raise _NextMirror(WEB_PAGE)

        length = _int_header(r, "Content-Length")
        if r.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
            # A server that ignores Accept-Encoding: identity; requests decodes the body, so the length
            # counts compressed bytes, not the file's.  Size and SHA-256 are still checked at the end.
            length = None
        if r.status_code == 206:
            start, total = _content_range(r)
            if start != offset:
                part.unlink()
                raise _Restart(f"the server resumed at byte {start}, not {offset:,}")
            say(f"resuming {job.dest.name} at {offset / 2**20:.1f} MiB")
            job.resumed_from = offset
        else:
            if offset:
                say(f"{_host(url)} does not support resuming; downloading {job.dest.name} from the start")
            offset, hasher, total = 0, hashlib.sha256(), length
            job.resumed_from = 0
        if total is not None and job.size is not None and total != job.size:
            # Often not another release but a page or an LFS pointer in its place: the first bytes say.
            what = _sniff(_first_bytes(r))
            raise _NextMirror(
                what or f"the server offers {total:,} bytes, expected {job.size:,} (a different file)"
            )
        total = total if total is not None else job.size

        done = offset
        if job.progress:
            job.progress(done, total)
        try:
            with open(part, "ab" if offset else "wb") as f, _Tee(f.write, hasher.update) as sink:
                for chunk in r.iter_content(CHUNK):
                    if done == 0 and (what := _sniff(chunk)):
                        raise _NextMirror(what)
                    sink.write(chunk)
                    done += len(chunk)
                    job.received += len(chunk)
                    if job.progress:
                        job.progress(done, total)
        except requests.RequestException as e:  # (a subclass of OSError: caught first)
            raise _Retry(f"{_describe(e, job.timeout, url)} after {done / 2**20:.1f} MiB") from e
        except OSError as e:
            raise _cannot_write(part, e) from e
    # Where the body should end: Content-Length, else the expected size (a body that ends when the server
    # closes the connection has no length of its own).  Short is a cut transfer: retry, resuming.
    end = offset + length if length is not None else total
    if end is not None and done < end:
        raise _Retry(f"connection closed after {done:,} of {end:,} bytes")
    return hasher.hexdigest(), done


def _copy_local(job: _Job, src: Path, part: Path) -> tuple[str, int]:
    """Copy a local file into ``part`` through the same hashing (a file downloaded in a browser)."""
    if src.is_dir():
        raise _NextMirror("a folder, not a weights file")
    if not src.is_file():
        raise _NextMirror("no such file")
    total = src.stat().st_size
    hasher = hashlib.sha256()
    done = 0
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout, _Tee(fout.write, hasher.update) as sink:
            while chunk := fin.read(CHUNK):
                sink.write(chunk)
                done += len(chunk)
                if job.progress:
                    job.progress(done, total)
    except OSError as e:
        part.unlink(missing_ok=True)  # a copy never resumes: what it wrote is of no use
        raise DownloadError(
            f"cannot copy {src} to {part}: {e.strerror or e}", hint="check both paths and the free space"
        ) from e
    return hasher.hexdigest(), done


class _Tee:
    """Hand every chunk to each consumer (here: the file's ``write`` and the hash's ``update``), each on its
    own thread, so writing, hashing and reading the socket overlap (all three release the GIL).  Bounded
    queues keep memory at a few chunks.  Leaving the ``with`` block (normally, on an error, or on Ctrl-C)
    first drains the queues: the ``.part`` holds every byte received, ready to resume.

    No fsync before the final ``os.replace``: a file cut short by a power loss fails the SHA-256 check on
    the next ``fetch`` and is replaced, and an fsync costs as much as the whole hash."""

    def __init__(self, *consumers: Callable[[bytes], object]):
        self._queues: list[queue.Queue[bytes | None]] = [queue.Queue(maxsize=4) for _ in consumers]
        self._threads = [
            threading.Thread(target=self._run, args=(q, fn), name="medcli-fetch", daemon=True)
            for q, fn in zip(self._queues, consumers, strict=True)
        ]
        self._error: BaseException | None = None

    def __enter__(self) -> _Tee:
        for t in self._threads:
            t.start()
        return self

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        for q in self._queues:
            q.put(chunk)

    def _run(self, q: queue.Queue[bytes | None], consume: Callable[[bytes], object]) -> None:
        while (chunk := q.get()) is not None:
            if self._error is None:
                try:
                    consume(chunk)
                except BaseException as e:  # e.g. disk full: re-raised in the reading thread
                    self._error = e

    def __exit__(self, *exc) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        if self._error is not None and exc[0] is None:
            raise self._error


# --- helpers ------------------------------------------------------------------------------------------


def _new_session() -> requests.Session:
    s = requests.Session()  # trust_env stays on: HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, .netrc
    s.headers["User-Agent"] = USER_AGENT
    return s


def _local_source(url: str) -> Path | None:
    """A ``file://`` URL or a plain path (no scheme, or a Windows drive letter) names a local file."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(url).expanduser()
    return None


def _describe(e: Exception, timeout: tuple[float, float], url: str) -> str:
    """A short description of a requests failure.  requests wraps urllib3's errors (a read timeout mid-body
    arrives as a ConnectionError, a DNS failure inside MaxRetryError), so look through the chain of causes."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        reason = getattr(cur, "reason", None)  # urllib3's MaxRetryError keeps its cause here
        wrapped = cur.args[0] if cur.args and isinstance(cur.args[0], BaseException) else None
        cur = next(
            (c for c in (cur.__cause__, reason, wrapped, cur.__context__) if isinstance(c, BaseException)),
            None,
        )
    names = {type(c).__name__ for c in chain}
    refused = any(isinstance(c, ConnectionRefusedError) for c in chain)
    if isinstance(e, requests.exceptions.ProxyError):  # not the host's fault: name the proxy
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url)) or "proxy"
        return f"{PROXY_FAILED} {proxy} ({'connection refused' if refused else _short(chain[-1])})"
    if "ConnectTimeoutError" in names or isinstance(e, requests.ConnectTimeout):
        return f"connection timed out after {timeout[0]:g}s"
    if "ReadTimeoutError" in names or isinstance(e, requests.ReadTimeout):
        return f"read timeout: no data for {timeout[1]:g}s"
    if isinstance(e, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in names:
        return "connection dropped mid-file"
    if "NameResolutionError" in names:
        return "host name not resolved (offline, or a proxy is needed: set HTTPS_PROXY)"
    if refused:
        return "connection refused"
    if isinstance(e, requests.exceptions.SSLError):
        return f"TLS error ({_short(chain[-1])}); behind a proxy, set REQUESTS_CA_BUNDLE to its certificate"
    if isinstance(e, requests.ConnectionError):
        return f"connection failed ({_short(chain[-1])})"
    return f"{type(e).__name__}: {_short(e)}"


def _short(e: Exception, limit: int = 160) -> str:
    s = str(e)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _hint(failures: list[tuple[str, str]]) -> str:
    whys = [why for _, why in failures]
    if any(LFS_POINTER in w for w in whys):
        return "run `git lfs pull` in that repository, or fetch from the manifest's mirrors (drop --url)"
    if any(WEB_PAGE in w for w in whys):
        return (
            "download the file in a browser, then install it with "
            "`medcli weights fetch --url /path/to/file` (it is checksum-verified)"
        )
    if any(LOCAL_WEB_PAGE in w for w in whys):
        return "download it again, saving the linked file itself, not the page, and pass that with --url"
    if any("checksum" in w or "different file" in w for w in whys):
        return "the mirror serves a different file; try another with --url URL, or report the mirror"
    if all(_local_source(url) for url, _ in failures):
        return "check the path given with --url"
    if any(PROXY_FAILED in w for w in whys):
        return "check the proxy address in HTTPS_PROXY / HTTP_PROXY, or unset it; NO_PROXY hosts go direct"
    if all(w.startswith("HTTP 4") for w in whys):
        return "the server has no such file: check the URL, or download the file yourself and pass its path"
    return (
        "check your connection (behind a proxy set HTTPS_PROXY), try a longer --timeout, "
        "or download the file yourself and pass --url /path/to/file"
    )


def _host(url: str) -> str:
    return urlparse(url).netloc or url


def _int_header(r: requests.Response, name: str) -> int | None:
    try:
        return int(r.headers[name])
    except (KeyError, ValueError):
        return None


def _content_range(r: requests.Response) -> tuple[int | None, int | None]:
    """Parse ``Content-Range: bytes START-END/TOTAL`` (TOTAL may be ``*``)."""
    value = r.headers.get("Content-Range", "")
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-")[0])
        return start, (None if total == "*" else int(total))
    except ValueError:
        return None, None


def _retry_after(r: requests.Response) -> float | None:
    try:
        return float(r.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _first_bytes(r: requests.Response) -> bytes:
    try:
        return next(r.iter_content(512), b"")
    except requests.RequestException:
        return b""


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except OSError:
        return b""


def _sniff(head: bytes, local: bool = False) -> str | None:
    """What a file that is not the weights is, from its first bytes: a web page, a Git LFS pointer, or None.
    (The weights start with a pickle or zip header, never with text.)"""
    head = head.lstrip()
    if head[:1] == b"<":
        return LOCAL_WEB_PAGE if local else WEB_PAGE
    if head.startswith(b"version https://git-lfs"):
        return LFS_POINTER
    return None


def _cannot_write(path: Path, e: OSError) -> DownloadError:
    """Disk full, read-only or permission denied: no mirror can fix that, so stop at once."""
    return DownloadError(
        f"cannot write {path}: {e.strerror or e}",
        hint="free some disk space, or choose a writable place with --dest",
    )


def _check_disk_space(dest: Path, size: int | None, part: Path) -> None:
    if size is None:
        return
    needed = size - (part.stat().st_size if part.exists() else 0)
    free = shutil.disk_usage(dest.parent).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space for {dest.name}: {needed / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free in {dest.parent}",
            hint="free some space or choose another place with --dest",
        )
