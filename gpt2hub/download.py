"""HTTP downloads into the cache: resume with Range, retries, validation on arrival, size and sha256 or crc32c.

What can go wrong, and what happens:
- name resolution fails or the connection is refused: the mirror is down; `MirrorDown` at once, no retry.
- 404, 403 and other 4xx: `DownloadError` at once, naming the URL.
- 5xx, 408, 429, a reset or a closed connection mid-body, no byte for GPT2HUB_READ_TIMEOUT seconds (default 60), or
  a server that trickles (fewer than GPT2HUB_MIN_RATE bytes a second, default 1024, over GPT2HUB_RATE_WINDOW seconds,
  default 30; GPT2HUB_MIN_RATE=0 turns that check off): retried with a Range request from the bytes already written,
  a few times with short backoff, then `DownloadError`. A trickle is noticed within about twice the window, a
  silence within the read timeout.
- a 206 reply whose Content-Range does not start where the Range request asked: the partial file is discarded (a
  warning says so) and the download starts over from the first byte, rather than failing the same way on every run.
- the complete file has the wrong size, or its `accept` (the cache's gate: arrival.Gate) refuses it: deleted,
  `IntegrityError` (the caller tries the next mirror). Network errors are never reported as disk errors, nor the
  reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import queue
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import Any, Protocol

import google_crc32c
from tqdm.auto import tqdm

from .errors import CacheError, DownloadError, IntegrityError, quoted
from .files import CACHE_MODE, disk_errors, fsync_dir, regular_file, stat_entry, unlink_entry
from .settings import min_rate, read_timeout
from .settings import progress_disabled as progress_disabled  # re-exported: where the bars are drawn

log = logging.getLogger("gpt2hub")
CHUNK = 1 << 20
USER_AGENT = "gpt2hub (+https://pypi.org/project/gpt2hub)"
Acceptor = Callable[[Path, str], Any]  # (the complete file, its digest) -> what to return; IntegrityError refuses it


class MirrorDown(DownloadError):
    """The server cannot be reached at all (name resolution failed, connection refused): try the next one."""


class _Fatal(Exception):
    """A response that retrying will not fix (404, 403, ...)."""


class _Transient(Exception):
    """A failure that a retry may fix (5xx, a reset, a stall)."""


class Tap(Protocol):
    """Something that reads a file's bytes in order as they arrive: a digest, or `streaming.StreamedWeights`."""

    # whether its work per byte rivals the network's (sha256, converting): then it runs on a thread of its own
    heavy: bool

    def catch_up(self, part: Path, offset: int) -> None:
        """Make what it has seen the first `offset` bytes of `part` (a download resumes or starts over)."""

    def update(self, chunk: bytes) -> None:
        """The next bytes."""


def replay(part: Path, offset: int, update: Callable[[bytes], None]) -> None:
    """Hand the first `offset` bytes of `part` to `update`, in chunks: how a tap catches up with a partial file."""
    done = 0
    with open(part, "rb") as f:
        while done < offset and (chunk := f.read(min(CHUNK, offset - done))):
            update(chunk)
            done += len(chunk)


class _Taps:
    """Feeds every chunk to each tap: a heavy one on a thread of its own, so that hashing and converting overlap the
    network and the disk (hashlib, google_crc32c and torch release the GIL on large buffers), a light one (crc32c)
    in the downloading thread, where handing each chunk over would cost more than the work (measured: see
    benchmarks/results/cpu-xeon-amx-2core/cold_load.md).

    At most 16 chunks (16 MiB) wait for a threaded tap; `drain` waits until every tap has seen every chunk and
    re-raises what a tap raised. Use as a context manager: the threads end on leaving it.
    """

    def __init__(self, taps: list[Tap]) -> None:
        self.taps = taps
        self.inline = [t for t in taps if not t.heavy]
        threaded = [t for t in taps if t.heavy]
        self.queues: list[queue.Queue[bytes | None]] = [queue.Queue(maxsize=16) for _ in threaded]
        self.errors: list[BaseException | None] = [None] * len(threaded)
        self.threads = [threading.Thread(target=self._run, args=(i, tap), name=f"gpt2hub-tap-{i}", daemon=True)
                        for i, tap in enumerate(threaded)]

    def __enter__(self) -> _Taps:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()

    def _run(self, i: int, tap: Tap) -> None:
        q = self.queues[i]
        while (chunk := q.get()) is not None:
            try:
                if self.errors[i] is None:
                    tap.update(chunk)
            except BaseException as e:  # handed to the downloading thread by drain
                self.errors[i] = e
            finally:
                q.task_done()

    def update(self, chunk: bytes) -> None:
        for q in self.queues:
            q.put(chunk)
        for tap in self.inline:
            tap.update(chunk)

    def drain(self) -> None:
        for q in self.queues:
            q.join()
        for e in self.errors:
            if e is not None:
                raise e

    def catch_up(self, part: Path, offset: int) -> None:
        self.drain()
        for tap in self.taps:
            tap.catch_up(part, offset)


class _Hash(Protocol):
    """What _Digest needs of hashlib's sha256 and google_crc32c's Checksum (whose hexdigest returns bytes)."""

    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str | bytes: ...


_HASHES: dict[str, Callable[[], _Hash]] = {"sha256": hashlib.sha256, "crc32c": google_crc32c.Checksum}


class _Digest:
    """A running sha256 or crc32c of a partial file; re-reads the file only when resuming one it has not seen."""

    def __init__(self, kind: str) -> None:
        self.new, self.heavy = _HASHES[kind], kind == "sha256"  # sha256: 1.3 GB/s, crc32c: 6 GB/s on one core
        self.h, self.length = self.new(), 0

    def catch_up(self, part: Path, offset: int) -> None:
        if self.length != offset:
            self.h, self.length = self.new(), 0
            if offset == 0:  # starting over (the partial file may be gone)
                return
            replay(part, offset, self.update)

    def update(self, chunk: bytes) -> None:
        self.h.update(chunk)
        self.length += len(chunk)

    def hexdigest(self) -> str:
        digest = self.h.hexdigest()
        return digest.decode() if isinstance(digest, bytes) else digest


class _Bar:
    """One file's share of a progress bar shared by every file of a model download (bytes of all files)."""

    def __init__(self, bar: tqdm | None) -> None:
        self.bar, self.counted, self.expected = bar, 0, False

    def start(self, offset: int, total: int) -> None:
        """A response begins at `offset` of a file of `total` bytes (-1 unknown)."""
        if self.bar is None:
            return
        if not self.expected and total >= 0:
            self.bar.total = (self.bar.total or 0) + total
            self.expected = True
        self.advance(offset - self.counted)  # negative when a server ignored the Range and we start over

    def advance(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)
            self.counted += n


def _unreachable(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(reason, OSError) and reason.errno in (111, -2, -3, -5))


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            raise  # the caller decides: the whole file may already be here
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code}") from None
        raise _Fatal(f"HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        if _unreachable(e):
            raise MirrorDown(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
        if isinstance(e, ValueError):  # urllib's "unknown url type"
            raise _Fatal(f"{url} is not an http(s) URL: check GPT2HUB_OPENAI_URL") from None
        raise _Transient(str(getattr(e, "reason", e))) from None


class _Pace:
    """A body's bytes counted over windows of `window` seconds: fewer than `rate` a second in one is a stall, as is
    a server sending one byte every few seconds, which no read timeout notices."""

    def __init__(self, rate: float, window: float) -> None:
        self.rate, self.window = rate, window
        self.start, self.got = monotonic(), 0

    def add(self, n: int) -> None:
        self.got += n
        elapsed = monotonic() - self.start
        if self.rate <= 0 or self.window <= 0 or elapsed < self.window:
            return
        if self.got < self.rate * elapsed:
            raise _Transient(f"only {self.got} bytes in {elapsed:.1f} s, below GPT2HUB_MIN_RATE={self.rate:g} bytes/s "
                             f"over GPT2HUB_RATE_WINDOW={self.window:g} s")
        self.start, self.got = monotonic(), 0


def _span(resp: http.client.HTTPResponse, url: str, offset: int, part: Path) -> tuple[int, int]:
    """(first byte, total size or -1) of a response to a request for bytes from `offset`.

    A 206 that starts elsewhere (or says nowhere) leaves the partial file unusable: it is discarded, so that the next
    attempt starts over instead of failing the same way on every run.
    """
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")
        match = re.match(r"bytes (\d+)-\d+/(\d+)", content_range)
        if not match or int(match.group(1)) != offset:
            log.warning("%s answered a request for bytes %d- with Content-Range %s; discarding the %d bytes downloaded "
                        "and starting over", url, offset, quoted(content_range), offset)
            part.unlink(missing_ok=True)
            raise _Transient(f"Content-Range {quoted(content_range)} for bytes {offset}-; starting over")
        return offset, int(match.group(2))
    length = resp.headers.get("Content-Length")  # 200: the server ignored the Range header, start again
    return 0, int(length) if length is not None and length.isdigit() else -1


def _attempt(url: str, part: Path, timeout: float, bar: _Bar, taps: _Taps, limit: int,
             where: tuple[Path, tuple[int, int] | None]) -> int:
    """Fetch what `part` still lacks; returns the file's size. Reading errors are network errors, writing ones disk's.
    `where`: the file's destination and its folder's identity (see _same_folder), checked before `part` is opened."""
    offset = part.stat().st_size if part.exists() else 0
    pace = min_rate()
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:  # 416: asked past the end, so what we hold may be the whole file
        match = re.search(r"/(\d+)", e.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return offset
        part.unlink()
        raise _Transient(f"range {offset}- not satisfiable; starting over") from None
    with resp:
        offset, total = _span(resp, url, offset, part)
        bar.start(offset, total)
        taps.catch_up(part, offset)
        _same_folder(*where)  # (a retry opens the partial file again by its path)
        with disk_errors(part):
            f = open(part, "r+b" if offset else "wb")
        with f:
            if offset:
                with disk_errors(part):
                    f.seek(offset)
                    f.truncate()
            got = _body(resp, f, part, _Pace(*pace), taps, bar, limit)
    if total >= 0 and got != total:
        raise _Transient(f"connection closed at byte {got} of {total}")
    return got


def _body(resp: http.client.HTTPResponse, f: Any, part: Path, pace: _Pace, taps: _Taps, bar: _Bar, limit: int) -> int:
    """Copy the response body to `f` (open at its end) and the taps; returns the file's size, flushed and synced."""
    while chunk := _read(resp):
        if f.tell() + len(chunk) > limit:  # an endless or oversized body: never fill the disk
            raise IntegrityError(f"is larger than {limit} bytes, more than the file can be")
        with disk_errors(part):
            f.write(chunk)
        taps.update(chunk)
        bar.advance(len(chunk))
        pace.add(len(chunk))
    with disk_errors(part):
        f.flush()
        os.fsync(f.fileno())
    return f.tell()


def _read(resp: http.client.HTTPResponse) -> bytes:
    """The bytes that have arrived (one socket read, at most CHUNK), so a stall loses none already received."""
    try:
        return resp.read1(CHUNK)
    except TimeoutError:
        raise _Transient("no byte within the read timeout (GPT2HUB_READ_TIMEOUT)") from None
    except (OSError, http.client.HTTPException) as e:  # reset, incomplete read: the network's
        raise _Transient(f"{type(e).__name__}: {e}") from None


def _folder_id(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of `folder` if it is a real folder (not a link to one), else None."""
    st = stat_entry(folder)
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISDIR(st.st_mode) else None


def _same_folder(dest: Path, folder_id: tuple[int, int] | None) -> None:
    """Refuse to touch `dest`'s partial file by its path once its folder is not the one the download began in (another
    process replaced it with a link, or moved it): a path through a link could write outside the cache."""
    if folder_id is None or _folder_id(dest.parent) != folder_id:
        raise CacheError(f"{dest.parent} changed while {dest.name} was downloading into it (moved, or replaced by a "
                         f"link); nothing was written through it: run the command again")


def claim_partial(dest: Path) -> Path:
    """This process's partial file for `dest`, taking over the largest one an earlier process left (by an atomic
    rename, so two processes never write the same partial file). Anything but a regular file under this process's
    name (a link planted there) is removed, never written through."""
    mine = dest.with_name(f"{dest.name}.{os.getpid()}.incomplete")
    if regular_file(mine) is not None:
        return mine
    if os.path.lexists(mine):
        unlink_entry(mine)
    pattern = re.compile(re.escape(dest.name) + r"\.(\d+\.)?incomplete$")
    with contextlib.suppress(OSError):
        leftovers = [p for p in dest.parent.iterdir() if pattern.fullmatch(p.name) and regular_file(p)]
        for p in sorted(leftovers, key=lambda p: p.stat().st_size, reverse=True):
            with contextlib.suppress(OSError):
                os.rename(p, mine)
                return mine
    return mine


def download(url: str, dest: Path, accept: Acceptor | None = None, *, digest_kind: str = "crc32c",
             expected_size: int | None = None, retries: int = 3, timeout: float | None = None, backoff: float = 0.25,
             bar: tqdm | None = None, max_size: int = 64 << 20, tap: Tap | None = None, mode: int = CACHE_MODE) -> Any:
    """Download `url` to `dest` atomically; returns what `accept` returns (default: the file's size and digest).

    Bytes go to a partial file unique to this process (an earlier process's is claimed and resumed with a Range
    request), hashed as they arrive (`digest_kind`: "sha256" or "crc32c"). `accept(part, digest)` judges the complete
    file before it takes its final name (read-only, `mode`): it raises IntegrityError to refuse it, and the file is
    then deleted and the error names it, the URL and what was wrong. A body longer than `expected_size` (or
    `max_size` when the size is not known) is cut off as an IntegrityError. `bar`, if given, is a progress bar
    shared by every file of the download. `tap`, if given, sees every byte of the file in order (see `Tap`); the
    download does not wait for its verdict.
    """
    timeout = read_timeout() if timeout is None else timeout
    with disk_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
    folder = _folder_id(dest.parent)  # every later write by path checks that the folder is still this one
    _same_folder(dest, folder)
    part = claim_partial(dest)
    running = _Digest(digest_kind)
    limit = expected_size if expected_size is not None else max_size
    if tap is not None:
        tap.catch_up(part, 0)  # a tap that saw an earlier download (another mirror, another partial) starts afresh
    with _Taps([running] if tap is None else [running, tap]) as taps:
        try:
            size = _fetch(url, part, timeout, _Bar(bar), taps, retries, backoff, limit, (dest, folder))
        except IntegrityError as e:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{dest.name} from {url} {e}") from None
        taps.catch_up(part, size)  # waits for the taps; reads the file only if it was whole already (416)
    return _finish(url, part, (dest, folder), size, running, expected_size, accept or _record(digest_kind), mode)


def _record(kind: str) -> Acceptor:
    return lambda part, digest: {"size": part.stat().st_size, kind: digest}


def _fetch(url: str, part: Path, timeout: float, bar: _Bar, taps: _Taps, retries: int, backoff: float,
           limit: int, where: tuple[Path, tuple[int, int] | None]) -> int:
    for attempt in range(retries + 1):
        try:
            return _attempt(url, part, timeout, bar, taps, limit, where)
        except _Fatal as e:
            raise DownloadError(str(e)) from None
        except _Transient as e:
            if attempt == retries:
                kept = f"; {part.name} keeps {part.stat().st_size} bytes, run again to resume" if part.exists() else ""
                raise DownloadError(f"{url}: {e} (after {retries + 1} attempts){kept}") from None
            wait = backoff * 2 ** attempt
            log.warning("download of %s interrupted (%s); resuming in %.2f s", url, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _finish(url: str, part: Path, where: tuple[Path, tuple[int, int] | None], size: int, digest: _Digest,
            expected_size: int | None, accept: Acceptor, mode: int) -> Any:
    dest = where[0]
    try:
        if expected_size is not None and size != expected_size:
            raise IntegrityError(f"is {size} bytes, expected {expected_size}")
        accepted = accept(part, digest.hexdigest())
    except IntegrityError as e:
        part.unlink(missing_ok=True)
        raise IntegrityError(f"{dest.name} from {url} {e}") from None
    _same_folder(*where)
    with disk_errors(dest):
        os.chmod(part, mode)
        os.replace(part, dest)
    fsync_dir(dest.parent)
    return accepted
