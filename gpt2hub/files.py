"""Files as gpt2hub writes and checks them: settings, disk errors, atomic writes, digests, records, the lock.

Every write goes to a temporary name unique to the process, is fsynced and renamed (then the folder fsynced), so a
file appears whole or not at all. Deleting goes through `unlink_entry`, which never follows a link.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import google_crc32c
import numpy as np

from .errors import CacheError, LockTimeoutError
from .settings import check_settings as check_settings  # re-exported: settings live in settings.py
from .settings import default_root as default_root
from .settings import env_flag as env_flag
from .settings import env_seconds as env_seconds
from .settings import ignore_pins as ignore_pins
from .settings import lock_timeout
from .settings import offline as offline

log = logging.getLogger("gpt2hub")
CACHE_MODE = 0o444  # files the cache keeps: an accidental write in place (by anyone but root) fails


def disk_error(path: Path, e: OSError) -> CacheError:
    if e.errno == errno.ENOSPC:
        return CacheError(f"no space left on the device holding {path}: free some space or point GPT2HUB_CACHE "
                          "at a larger disk, then run the command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write to {path} ({e.strerror}): set GPT2HUB_CACHE or cache_dir to a writable folder")
    if e.errno in (errno.EISDIR, errno.ENOTEMPTY):  # a folder where the file goes (os.replace onto it)
        return CacheError(f"{path} is a folder where gpt2hub keeps a file: remove it by hand, then run again")
    return CacheError(f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, no permission) into a CacheError that names the path and what to do."""
    try:
        yield
    except OSError as e:
        if isinstance(e, CacheError):
            raise
        raise disk_error(path, e) from e


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def user_mode() -> int:
    """The mode a new file gets from the process's umask (0644 under the usual 022): for files handed to users."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o22)  # no /proc: read it the only portable way, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temp path beside `path`, unique to this process; on success it is fsynced, given `mode` (default: the
    temporary file's 0600) and renamed over `path`."""
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        with disk_errors(path):
            yield Path(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
                if mode is not None:
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", file_mode: int | None = None) -> Iterator[Any]:
    """Open a file that appears at `path` whole or not at all (with `file_mode`, see atomic_path)."""
    with atomic_path(path, file_mode) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: Path, data: Any, file_mode: int | None = CACHE_MODE) -> None:
    """JSON written atomically; read-only by default, as the cache keeps its records."""
    with atomic_write(path, file_mode=file_mode) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def read_json(path: Path) -> Any:
    """The JSON in a regular file, or None (missing, a link, not a regular file, unreadable or not JSON)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def regular_file(path: Path, follow: bool = False) -> os.stat_result | None:
    """The stat of `path` if it is a regular file, else None (a FIFO, device or folder is never opened). Inside the
    cache a link is not a regular file; `follow=True` (a user's own folder) looks through links."""
    st = stat_entry(path, follow)
    return st if st is not None and stat.S_ISREG(st.st_mode) else None


def _hexdigest(h: Any, path: Path) -> str:
    """`h` (a hashlib object) updated with the file's bytes, as hex."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return str(h.hexdigest())


def sha256_file(path: Path) -> str:
    return _hexdigest(hashlib.sha256(), path)


def git_blob_sha1(path: Path) -> str:
    """The id git gives the file's bytes as a blob (the sha1 of "blob SIZE", a NUL byte, then the bytes): Hugging
    Face names the blobs of files kept in git (not LFS) so."""
    head = f"blob {os.stat(path).st_size}\0".encode()
    return _hexdigest(hashlib.sha1(head, usedforsecurity=False), path)


def crc32c_file(path: Path) -> str:
    if os.stat(path).st_size == 0:
        return f"{0:08x}"
    return f"{google_crc32c.value(np.memmap(path, dtype=np.uint8, mode='r')):08x}"


DIGESTS = {"sha256": sha256_file, "crc32c": crc32c_file}
HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "crc32c": re.compile(r"[0-9a-f]{8}")}


def kind_for(sha256_pin: str | None) -> str:
    """A file with a pinned sha256 is checked against it; any other gets the much cheaper crc32c, to notice damage."""
    return "sha256" if sha256_pin else "crc32c"


def digest_kind(record: dict) -> str:
    """Which digest a files.json record holds."""
    return "sha256" if "sha256" in record else "crc32c"


def valid_record(record: Any) -> bool:
    """Whether a files.json record has the shape gpt2hub writes: a size and one well-formed digest."""
    if not isinstance(record, dict) or isinstance(record.get("size"), bool) or not isinstance(record.get("size"), int):
        return False
    kind = digest_kind(record)
    return isinstance(record.get(kind), str) and bool(HEX[kind].fullmatch(record[kind]))


def matches_record(path: Path, record: dict) -> bool:
    """Whether a file still has the size and digest its files.json record holds."""
    kind = digest_kind(record)
    return os.stat(path).st_size == record["size"] and DIGESTS[kind](path) == record[kind]


def stat_entry(path: Path, follow: bool = False) -> os.stat_result | None:
    """os.lstat (os.stat with `follow`) of `path`, or None if it cannot be read."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None


def real_folder(folder: Path) -> None:
    """Remove a link or file found where gpt2hub keeps a folder (the entry itself, never what a link points to)."""
    st = stat_entry(folder)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        log.warning("%s is %s where gpt2hub keeps a folder: removed (whatever it points to is left alone)", folder, kind)
        with disk_errors(folder):
            os.unlink(folder)


def unlink_entry(path: Path) -> None:
    """Remove a regular file or a link (the link itself); anything else (a folder, a FIFO's target) is left."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is a folder where gpt2hub keeps a file: remove it by hand, then run again")
    with disk_errors(path):
        os.unlink(path)


@contextlib.contextmanager
def hold_lock(lock_path: Path, why: str, timeout: float | None = None) -> Iterator[None]:
    """Hold a model's lock; a waiting process says who holds it and for what.

    GPT2HUB_LOCK_TIMEOUT (seconds, default 600; 0 gives up at once) bounds the wait. The lock only avoids duplicated
    work: cache correctness does not depend on it.
    """
    # what lengthens the wait: the setting, or (a timeout the caller was given, as `cache rm --timeout`) the caller's
    longer = "raise GPT2HUB_LOCK_TIMEOUT" if timeout is None else f"wait longer than {timeout:g} s (`gpt2hub cache rm --timeout`)"
    if timeout is None:
        timeout = lock_timeout()
    real_folder(lock_path.parent)
    with disk_errors(lock_path):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    owner = lock_path.with_suffix(".owner")
    try:
        _acquire(lock, lock_path, owner, why, timeout, longer)
    except OSError as e:
        raise disk_error(lock_path, e) from e
    try:
        _write_owner(owner, f"pid {os.getpid()} {why}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _write_owner(owner: Path, text: str) -> None:
    """Say who holds the lock, never writing through a link planted where the owner file goes."""
    with contextlib.suppress(OSError):
        if os.path.islink(owner):
            os.unlink(owner)
        fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)


def _acquire(lock: filelock.FileLock, lock_path: Path, owner: Path, why: str, timeout: float, longer: str) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except filelock.Timeout:
        pass
    holder = "another process"
    with contextlib.suppress(OSError):
        holder = owner.read_text()[:200].strip() or holder
    log.warning("waiting for %s (held by %s) before %s", lock_path, holder, why)
    start = time.monotonic()
    try:
        lock.acquire(timeout=timeout)
    except filelock.Timeout:
        raise LockTimeoutError(
            f"gave up after {timeout:.0f} s waiting for {lock_path}, held by {holder}; if no other "
            f"gpt2hub process is running, run `gpt2hub cache prune`, or {longer}") from None
    log.info("got %s after %.1f s", lock_path, time.monotonic() - start)


def clone_file(src: Path, dst: Path) -> str:
    """Copy `src` to `dst` as cheaply as the filesystem allows; returns how: "reflink" (btrfs, XFS: the blocks are
    shared until either file is written, so it costs no disk space and an edit of one never reaches the other),
    "copy_file_range" or "copy". Never a hard or symbolic link."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        with contextlib.suppress(OSError, ImportError):
            import fcntl

            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE
            return "reflink"
        size, offset = os.fstat(fin.fileno()).st_size, 0
        try:
            while offset < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - offset)
                if n == 0:
                    break
                offset += n
            return "copy_file_range"
        except (OSError, AttributeError):
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 1 << 20)
            return "copy"
