"""The cache: where files live, per-model locks, atomic writes, manifests and verification.

    {root}/{source}/{size}/raw/{file}                 published files, byte for byte (openai source)
    {root}/{source}/{size}/raw/{file}.incomplete      a download in progress, resumed from its length
    {root}/{source}/{size}/files.json                 size, sha256 (pinned files) or crc32c, origin of each raw file
    {root}/{source}/{size}/converted/{dtype}.safetensors   GPTModel weights, tied head stored once
    {root}/{source}/{size}/converted/{dtype}.json     format version, source files, size and crc32c; for float32
                                                      it names the raw weights file, mapped as it is
    {root}/locks/{source}--{size}.lock                per-model lock (flock: released when its process dies)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import google_crc32c
import numpy as np

from .errors import CacheError, LockTimeoutError

log = logging.getLogger("gpt2hub")
FORMAT_VERSION = 1
SOURCES = ("openai", "hf")


def default_root() -> Path:
    env = os.environ.get("GPT2HUB_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpt2hub"))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return env_flag("GPT2HUB_OFFLINE") or env_flag("HF_HUB_OFFLINE")


def _disk_error(path: Path, e: OSError) -> CacheError:
    if e.errno == errno.ENOSPC:
        return CacheError(f"no space left on the device holding {path}: free some space or point GPT2HUB_CACHE "
                          "at a larger disk, then run the command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write to {path} ({e.strerror}): set GPT2HUB_CACHE or cache_dir to a writable folder")
    return CacheError(f"cannot write {path}: {e}")


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, no permission) into a CacheError that names the path and what to do."""
    try:
        yield
    except OSError as e:
        if isinstance(e, CacheError):
            raise
        raise _disk_error(path, e) from e


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write; on success it is fsynced and renamed over `path`, else removed."""
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
            finally:
                os.close(fd)
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[Any]:
    """Open a file that appears at `path` whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def crc32c_file(path: Path) -> str:
    if path.stat().st_size == 0:
        return f"{0:08x}"
    return f"{google_crc32c.value(np.memmap(path, dtype=np.uint8, mode='r')):08x}"


DIGESTS = {"sha256": sha256_file, "crc32c": crc32c_file}


def kind_for(sha256_pin: str | None) -> str:
    """A file with a pinned sha256 is checked against it; any other gets the much cheaper crc32c, to notice damage."""
    return "sha256" if sha256_pin else "crc32c"


def digest_kind(record: dict) -> str:
    """Which digest a files.json record holds."""
    return "sha256" if "sha256" in record else "crc32c"


def matches_record(path: Path, record: dict) -> bool:
    """Whether a raw file still has the size and digest its files.json record holds."""
    kind = digest_kind(record)
    return path.stat().st_size == record["size"] and kind in record and DIGESTS[kind](path) == record[kind]


class ModelCache:
    """One model of one source in the cache."""

    def __init__(self, root: Path, source: str, size: str):
        self.root, self.source, self.size = Path(root), source, size
        self.dir = self.root / source / size
        self.raw = self.dir / "raw"
        self.files_manifest = self.dir / "files.json"
        self.lock_path = self.root / "locks" / f"{source}--{size}.lock"

    def raw_path(self, name: str) -> Path:
        return self.raw / name

    def file_path(self, name: str, record: dict) -> Path:
        """Where a recorded raw file lives: in raw/, or where its record says (files in Hugging Face's cache)."""
        return Path(record["path"]) if "path" in record else self.raw_path(name)

    def converted_path(self, dtype_name: str) -> Path:
        return self.dir / "converted" / f"{dtype_name}.safetensors"

    def converted_manifest(self, dtype_name: str) -> Path:
        return self.dir / "converted" / f"{dtype_name}.json"

    def files(self) -> dict[str, dict]:
        return read_json(self.files_manifest) or {}

    def record_file(self, name: str, record: dict) -> None:
        files = self.files()
        files[name] = record
        write_json(self.files_manifest, files)

    def forget_file(self, name: str) -> None:
        files = self.files()
        if files.pop(name, None) is not None:
            write_json(self.files_manifest, files)

    @contextlib.contextmanager
    def lock(self, why: str, timeout: float | None = None) -> Iterator[None]:
        """Hold this model's lock; a waiting process says who holds it and for what."""
        if timeout is None:
            timeout = float(os.environ.get("GPT2HUB_LOCK_TIMEOUT", "600"))
        with disk_errors(self.lock_path):
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.lock_path))
        owner = self.lock_path.with_suffix(".owner")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            holder = owner.read_text().strip() if owner.exists() else "another process"
            log.warning("waiting for %s (held by %s) before %s", self.lock_path, holder, why)
            start = time.monotonic()
            try:
                lock.acquire(timeout=timeout)
            except filelock.Timeout:
                raise LockTimeoutError(
                    f"gave up after {timeout:.0f} s waiting for {self.lock_path}, held by {holder}; if no other "
                    "gpt2hub process is running, run `gpt2hub cache prune`, or raise GPT2HUB_LOCK_TIMEOUT") from None
            log.info("got %s after %.1f s", self.lock_path, time.monotonic() - start)
        except OSError as e:
            raise _disk_error(self.lock_path, e) from e
        try:
            with contextlib.suppress(OSError):
                owner.write_text(f"pid {os.getpid()} {why}\n")
            yield
        finally:
            with contextlib.suppress(OSError):
                owner.unlink()
            lock.release()


def cached_models(root: Path) -> list[ModelCache]:
    return [ModelCache(root, d.parent.name, d.name) for src in SOURCES if (root / src).is_dir()
            for d in sorted((root / src).iterdir()) if d.is_dir()]
