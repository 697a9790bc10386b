"""HTTP downloads into the cache: resume with Range, retries with backoff, size and sha256 or crc32c checks, progress bars."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from tqdm.auto import tqdm

from .cache import disk_errors, env_flag, fsync_dir, kind_for
from .errors import DownloadError, IntegrityError

log = logging.getLogger("gpt2hub")
CHUNK = 1 << 20
USER_AGENT = "gpt2hub (+https://pypi.org/project/gpt2hub)"


def progress_disabled() -> bool:
    return env_flag("GPT2HUB_DISABLE_PROGRESS_BARS")


class _Fatal(Exception):
    """A response that retrying will not fix (404, 403, ...)."""


_HASHES = {"sha256": hashlib.sha256, "crc32c": google_crc32c.Checksum}


class _Digest:
    """A running sha256 or crc32c of a partial file; re-reads the file only when resuming one it has not seen."""

    def __init__(self, kind: str) -> None:
        self.new = _HASHES[kind]
        self.h, self.length = self.new(), 0

    def catch_up(self, part: Path, offset: int) -> None:
        if self.length != offset:
            self.h, self.length = self.new(), 0
            with open(part, "rb") as f:
                while self.length < offset and (chunk := f.read(min(CHUNK, offset - self.length))):
                    self.update(chunk)

    def update(self, chunk: bytes | np.ndarray) -> None:
        self.h.update(chunk)
        self.length += len(chunk)

    def hexdigest(self) -> str:
        digest = self.h.hexdigest()
        return digest.decode() if isinstance(digest, bytes) else digest


def _attempt(url: str, part: Path, timeout: float, bar: tqdm | None, digest: _Digest) -> int:
    """Fetch what `part` still lacks; returns the file's total size as the server states it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # asked past the end: what we hold may be the whole file
            match = re.search(r"/(\d+)", e.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                return offset
            part.unlink()
            raise ConnectionError(f"range {offset}- not satisfiable; starting over") from None
        if e.code in (408, 425, 429) or e.code >= 500:
            raise ConnectionError(f"HTTP {e.code} from {url}") from None
        raise _Fatal(f"HTTP {e.code} {e.reason} for {url}") from None
    with resp:
        if resp.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise _Fatal(f"{url} answered a Range request with Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(match.group(2))
        else:  # 200: the server ignored the Range header, so start again from byte 0
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else -1
        if bar is not None:
            bar.reset(total=total if total >= 0 else None)
            bar.update(offset)
        digest.catch_up(part, offset)
        buf = np.empty(CHUNK, dtype=np.uint8)  # one buffer for the whole file (google_crc32c takes numpy arrays)
        with disk_errors(part), open(part, "r+b" if offset else "wb") as f:
            if offset:
                f.seek(offset)
                f.truncate()
            while n := resp.readinto(memoryview(buf)):
                chunk = buf[:n]
                f.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(n)
            f.flush()
            os.fsync(f.fileno())
            got = f.tell()
    if total >= 0 and got != total:
        raise ConnectionError(f"connection closed at byte {got} of {total}")
    return got


def download(url: str, dest: Path, *, expected_size: int | None = None, expected_sha256: str | None = None,
             retries: int = 5, timeout: float = 30.0, backoff: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Download `url` to `dest` atomically; returns its record: size and sha256 (when one is expected) or crc32c.

    Bytes go to `dest.incomplete` first, which a later attempt or a later call resumes with a Range request.
    Dropped connections, timeouts and 5xx are retried with exponential backoff; 4xx fail at once.
    On a size or hash mismatch the file is deleted and IntegrityError names it.
    """
    part = dest.with_name(dest.name + ".incomplete")
    with disk_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
    show = progress and not progress_disabled()
    kind = kind_for(expected_sha256)
    running = _Digest(kind)
    bar = tqdm(desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024, miniters=1, delay=0.2) if show else None
    try:
        for attempt in range(retries + 1):
            try:
                size = _attempt(url, part, timeout, bar, running)
                break
            except _Fatal as e:
                raise DownloadError(str(e)) from None
            except (ConnectionError, http.client.HTTPException, TimeoutError, urllib.error.URLError) as e:
                reason = getattr(e, "reason", e)
                if attempt == retries:
                    raise DownloadError(f"could not download {url} after {retries + 1} attempts: {reason}. "
                                        f"{part.name} keeps the bytes received; run again to resume") from None
                wait = backoff * 2 ** attempt
                log.warning("download of %s interrupted (%s); resuming in %.1f s", url, reason, wait)
                time.sleep(wait)
    finally:
        if bar is not None:
            bar.close()
    running.catch_up(part, size)  # a no-op unless the whole file was already there (416)
    digest = running.hexdigest()
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"is {size} bytes, expected {expected_size}"
    elif expected_sha256 is not None and digest != expected_sha256:
        problem = f"has sha256 {digest}, expected {expected_sha256}"
    if problem:
        part.unlink()
        raise IntegrityError(f"{dest.name} downloaded from {url} {problem}; the bad file was deleted, run again "
                             "to download it afresh (if it happens again, the server or a proxy is altering it)")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return {"size": size, kind: digest}
