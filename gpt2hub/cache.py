"""The cache: layout, per-model locks, atomic writes, records, verification, and the only code that deletes.

    {root}/{source}/{size}/raw/{file}                     published files, byte for byte (openai source)
    {root}/{source}/{size}/raw/{file}.{pid}.incomplete    a download in progress, resumed (and claimed) by a later call
    {root}/{source}/{size}/files.json                     size, sha256 or crc32c, origin and mtime of each file
    {root}/{source}/{size}/converted/{dtype}.json         manifest: kind "mapped" (float32: the published weights file
                                                          itself) or "converted" (16-bit safetensors beside it)
    {root}/{source}/{size}/converted/{dtype}.safetensors  GPTModel weights in that dtype (converted kind only)
    {root}/locks/{source}--{size}.lock                    per-model lock (flock: released when its process dies)

Invariants:
- Cache correctness does not depend on the lock. Every file appears under its final name whole or not at all
  (temporary name unique to the writing process, fsync, atomic rename, fsync of the folder); a partial download is
  claimed by renaming it to the claiming process's own name; a file present but unrecorded is verified before use.
  The lock only keeps two processes from doing the same work (NFS and Lustre may not honour flock).
- Nothing read from disk names a path to delete. Names in files.json and manifests must be files of the source's
  published list; a record's "path" (Hugging Face's cache) must lie inside that cache. Only regular files under
  the cache's own folder are deleted; a symbolic link found there is unlinked, never followed. Hugging Face's blob
  behind a link is deleted only when the link resolves inside that Hugging Face cache's `blobs/` folder.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import filelock
import google_crc32c
import numpy as np

from .errors import CacheError, LockTimeoutError
from .registry import DTYPE_NAMES, MAPPED_DTYPES, SOURCE_FILES, SOURCES

log = logging.getLogger("gpt2hub")
FORMAT_VERSION = 2
KINDS = ("mapped", "converted")


def default_root() -> Path:
    """GPT2HUB_CACHE, else the platform's user cache folder (e.g. ~/.cache/gpt2hub)."""
    env = os.environ.get("GPT2HUB_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpt2hub"))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return env_flag("GPT2HUB_OFFLINE") or env_flag("HF_HUB_OFFLINE")


def ignore_pins() -> bool:
    """GPT2HUB_IGNORE_PINS=1: accept published files whose sha256 differs from the pinned one (loudly)."""
    return env_flag("GPT2HUB_IGNORE_PINS")


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment; a bad value is an error naming the variable."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise CacheError(f"{name}={raw!r} is not a number of seconds: set it to a number >= 0 (default {default:g})")
    return value


def check_settings() -> None:
    """Read every numeric setting now, so a bad value is an error before any work rather than in the middle of it."""
    env_seconds("GPT2HUB_LOCK_TIMEOUT", 600.0)
    env_seconds("GPT2HUB_READ_TIMEOUT", 60.0)


def _disk_error(path: Path, e: OSError) -> CacheError:
    if e.errno == errno.ENOSPC:
        return CacheError(f"no space left on the device holding {path}: free some space or point GPT2HUB_CACHE "
                          "at a larger disk, then run the command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write to {path} ({e.strerror}): set GPT2HUB_CACHE or cache_dir to a writable folder")
    return CacheError(f"cannot write {path}: {e.strerror or e}")


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
    """A temp path beside `path`, unique to this process; on success it is fsynced and renamed over `path`."""
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
    st = _stat(path, follow)
    return st if st is not None and stat.S_ISREG(st.st_mode) else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def crc32c_file(path: Path) -> str:
    if os.stat(path).st_size == 0:
        return f"{0:08x}"
    return f"{google_crc32c.value(np.memmap(path, dtype=np.uint8, mode='r')):08x}"


DIGESTS = {"sha256": sha256_file, "crc32c": crc32c_file}
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "crc32c": re.compile(r"[0-9a-f]{8}")}


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
    return isinstance(record.get(kind), str) and bool(_HEX[kind].fullmatch(record[kind]))


def matches_record(path: Path, record: dict) -> bool:
    """Whether a file still has the size and digest its files.json record holds."""
    kind = digest_kind(record)
    return os.stat(path).st_size == record["size"] and DIGESTS[kind](path) == record[kind]


_CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def _sizes_ok(config: Any) -> bool:
    """Whether a stored config has every size as a positive integer."""
    return isinstance(config, dict) and all(
        isinstance(config.get(k), int) and not isinstance(config.get(k), bool) and config[k] > 0 for k in _CONFIG_KEYS)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the cache: the file, what is wrong, and what gpt2hub does about it."""

    path: Path
    what: str
    action: str
    name: str = ""  # the published file's name, or "" for a converted file
    dtype: str = ""  # the dtype of a converted file or manifest

    def __str__(self) -> str:
        return f"{self.path}: {self.what}; {self.action}"


@dataclass(frozen=True)
class Manifest:
    """converted/{dtype}.json: how the weights of one dtype are stored, and what was checked."""

    kind: str  # "mapped": the published weights file itself; "converted": {dtype}.safetensors
    dtype: str
    weights: str  # the published file mapped, or the converted file's name
    config: dict
    bytes: int
    mtime_ns: int
    crc32c: str | None
    extra: dict

    @classmethod
    def parse(cls, data: Any, source: str, dtype: str) -> Manifest | None:
        """A manifest from JSON, or None unless every field has the type and value gpt2hub writes."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or data.get("dtype") != dtype:
            return None
        kind, weights = data.get("kind"), data.get("weights")
        if kind != ("mapped" if dtype in MAPPED_DTYPES else "converted") or not _sizes_ok(data.get("config")):
            return None
        allowed = SOURCE_FILES[source] if kind == "mapped" else (f"{dtype}.safetensors",)
        size, mtime_ns = data.get("bytes"), data.get("mtime_ns")
        if kind not in KINDS or weights not in allowed or not isinstance(data.get("config"), dict):
            return None
        if not _plain_int(size) or not _plain_int(mtime_ns):
            return None
        crc = data.get("crc32c")
        if kind == "converted" and not (isinstance(crc, str) and _HEX["crc32c"].fullmatch(crc)):
            return None
        return cls(kind, dtype, weights, data["config"], size, mtime_ns, crc, data)

    def to_json(self) -> dict:
        return {**self.extra, "format": FORMAT_VERSION, "kind": self.kind, "dtype": self.dtype, "weights": self.weights,
                "config": self.config, "bytes": self.bytes, "mtime_ns": self.mtime_ns, "crc32c": self.crc32c}


def _plain_int(value: object) -> TypeGuard[int]:
    """True for an int that is not a bool (JSON's true/false load as bools, which are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


class CacheChecks(abc.ABC):
    """What can be wrong with one model's files in the cache; `ModelCache` adds the layout, records and deletion."""

    source: str
    dir: Path
    names: tuple[str, ...]
    files_manifest: Path

    @abc.abstractmethod
    def records(self) -> dict[str, dict]: ...
    @abc.abstractmethod
    def file_path(self, name: str, record: dict | None = None) -> Path: ...
    @abc.abstractmethod
    def raw_path(self, name: str) -> Path: ...
    @abc.abstractmethod
    def manifest_path(self, dtype: str) -> Path: ...
    @abc.abstractmethod
    def converted_path(self, dtype: str) -> Path: ...
    @abc.abstractmethod
    def record_file(self, name: str, record: dict) -> None: ...
    @abc.abstractmethod
    def secure(self) -> None: ...

    # checks ---------------------------------------------------------------------------------------------------
    def check_file(self, name: str, record: dict | None, quick: bool = False) -> Problem | None:
        """What is wrong with one published file, or None. `quick` trusts a file whose size and mtime are unchanged."""
        if record is None:
            return Problem(self.raw_path(name), "not downloaded", "it is downloaded on the next load", name)
        path = self.file_path(name, record)
        st = regular_file(path) if "path" not in record else _stat(path, follow=True)
        if st is None or not stat.S_ISREG(st.st_mode):
            what = "missing" if not os.path.lexists(path) else "not a regular file (a link, folder or FIFO)"
            return Problem(path, what, "it is removed and downloaded again", name)
        if st.st_size != record["size"]:
            return Problem(path, f"{st.st_size} bytes, recorded {record['size']}", "it is removed and downloaded again", name)
        if quick and st.st_mtime_ns == record.get("mtime_ns"):
            return None
        if not matches_record(path, record):
            return Problem(path, f"{digest_kind(record)} differs from {self.files_manifest.name}",
                           "it is removed and downloaded again", name)
        if st.st_mtime_ns != record.get("mtime_ns"):  # whole but touched (copied from another machine): remember it
            with contextlib.suppress(CacheError):
                self.record_file(name, record)
        return None

    def manifest(self, dtype: str) -> Manifest | None:
        return Manifest.parse(read_json(self.manifest_path(dtype)), self.source, dtype)

    def check_weights(self, dtype: str, quick: bool = False) -> Problem | None:
        """What is wrong with the stored weights of one dtype (its manifest and, if converted, its file), or None."""
        path = self.manifest_path(dtype)
        m = self.manifest(dtype)
        if m is None:
            what = "missing" if not os.path.lexists(path) else "unreadable or from another gpt2hub version"
            return Problem(path, what, "the weights are prepared again on the next load", dtype=dtype)
        expected = getattr(self, "config", None)
        if expected and any(m.config.get(k) != expected[k] for k in _CONFIG_KEYS):
            return Problem(path, "describes another model", "the weights are prepared again on the next load",
                           dtype=dtype)
        if m.kind == "mapped":
            return None  # the mapped file is a published file: check_file covers it
        weights = self.converted_path(dtype)
        st = regular_file(weights)
        if st is None or st.st_size != m.bytes:
            return Problem(weights, "missing or of the wrong size", "it is converted again on the next load", dtype=dtype)
        if quick and st.st_mtime_ns == m.mtime_ns:
            return None
        if crc32c_file(weights) != m.crc32c:
            return Problem(weights, f"crc32c differs from {path.name}", "it is converted again on the next load",
                           dtype=dtype)
        if st.st_mtime_ns != m.mtime_ns:  # whole but touched: remember, so the next load need not read it again
            with contextlib.suppress(CacheError):
                write_json(path, {**m.to_json(), "mtime_ns": st.st_mtime_ns})
        return None

    def stored_dtypes(self) -> list[str]:
        folder = self.dir / "converted"
        found = {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()
        return sorted(found & set(DTYPE_NAMES.values()))

    def verify(self, names: tuple[str, ...] | None = None, dtypes: tuple[str, ...] | None = None,
               quick: bool = False) -> list[Problem]:
        """Every problem of the given published files (default: all) and stored dtypes (default: those present).

        The one check behind `gpt2hub cache verify` and behind repair on load, so the two cannot drift.
        """
        self.secure()
        records = self.records()
        problems = [p for n in (self.names if names is None else names)
                    if (p := self.check_file(n, records.get(n), quick)) is not None]
        for dtype in self.stored_dtypes() if dtypes is None else dtypes:
            problem = self.check_weights(dtype, quick)
            if problem is not None:
                problems.append(problem)
        return problems



class ModelCache(CacheChecks):
    """One model of one source in the cache: its files, records, manifests, lock, checks and deletions."""

    def __init__(self, root: Path, source: str, size: str, external_root: Path | None = None,
                 config: dict | None = None):
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}")
        self.root, self.source, self.size = Path(root), source, size
        self.names = SOURCE_FILES[source]
        self.dir = self.root / source / size
        self.raw = self.dir / "raw"
        self.files_manifest = self.dir / "files.json"
        self.lock_path = self.root / "locks" / f"{source}--{size}.lock"
        self.external_root = external_root  # this repo's folder in Hugging Face's cache (the hf source's files)
        self.config = config  # the model's book config: stored weights describing another model are not used

    # names and paths ------------------------------------------------------------------------------------------
    def _check_name(self, name: str) -> str:
        if name not in self.names:
            raise CacheError(f"{name!r} is not a file of the {self.source} source ({', '.join(self.names)})")
        return name

    def raw_path(self, name: str) -> Path:
        return self.raw / self._check_name(name)

    def converted_path(self, dtype: str) -> Path:
        return self.dir / "converted" / f"{DTYPE_NAMES[dtype]}.safetensors"

    def manifest_path(self, dtype: str) -> Path:
        return self.dir / "converted" / f"{DTYPE_NAMES[dtype]}.json"

    def _external(self, value: Any) -> Path | None:
        """A record's "path" if it is a file under this repo's `snapshots/` in Hugging Face's cache, reached through
        real folders only (compared without following links; the file itself is Hugging Face's link to a blob)."""
        if self.external_root is None or not isinstance(value, str):
            return None
        path, snapshots = Path(os.path.abspath(value)), Path(os.path.abspath(self.external_root)) / "snapshots"
        if snapshots not in path.parents:
            return None
        folders = [p for p in path.parents if snapshots in p.parents or p == snapshots]
        return path if all((st := _stat(p)) is None or stat.S_ISDIR(st.st_mode) for p in folders) else None

    def secure(self) -> None:
        """Make every folder from the cache root down to this model's files a real folder of the cache: a link (or a
        file) where one belongs is removed, the link itself, never what it points to. Called before any write."""
        for folder in (self.root / self.source, self.dir, self.raw, self.dir / "converted"):
            _real_folder(folder)

    # records --------------------------------------------------------------------------------------------------
    def records(self) -> dict[str, dict]:
        """files.json, keeping only well-formed records of the source's own files (others are logged and ignored)."""
        data = read_json(self.files_manifest)
        if data is None:
            return {}
        if not isinstance(data, dict):
            log.warning("%s is not a JSON object; its records are ignored and the files checked again", self.files_manifest)
            return {}
        good = {}
        for name, record in data.items():
            if name in self.names and valid_record(record) and ("path" not in record or self._external(record["path"])):
                good[name] = record
            else:
                log.warning("%s: ignoring the malformed or foreign record %r", self.files_manifest, str(name)[:80])
        return good

    def file_path(self, name: str, record: dict | None = None) -> Path:
        """Where a published file lives: raw/{name}, or inside Hugging Face's cache for the hf source."""
        record = self.records().get(name) if record is None else record
        external = self._external(record.get("path")) if record else None
        return external or self.raw_path(name)

    def record_file(self, name: str, record: dict) -> None:
        self.secure()
        path = self.file_path(name, record)
        with contextlib.suppress(OSError):
            record = {**record, "mtime_ns": os.stat(path).st_mtime_ns}
        files = self.records()
        files[self._check_name(name)] = record
        write_json(self.files_manifest, files)

    def forget_file(self, name: str) -> None:
        files = self.records()
        if files.pop(name, None) is not None:
            write_json(self.files_manifest, files)

    def present(self, name: str) -> Path | None:
        """The path of a recorded file that is there with its recorded size (no hashing, no network), else None."""
        record = self.records().get(name)
        if record is None:
            return None
        path = self.file_path(name, record)
        try:
            st = os.stat(path) if "path" in record else regular_file(path)
        except OSError:
            return None
        return path if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == record["size"] else None

    # deletion -------------------------------------------------------------------------------------------------
    def discard(self, name: str) -> None:
        """Delete a published file and its record: raw/{name} (a link there is unlinked, not followed), or for the
        hf source the link in Hugging Face's cache and the blob it points to, if that blob is in its `blobs/`."""
        self.secure()
        record = self.records().get(self._check_name(name))
        external = self._external(record.get("path")) if record else None
        if external is not None:
            self._discard_external(external)
        _unlink_entry(self.raw_path(name))
        self.forget_file(name)

    def _discard_external(self, link: Path) -> None:
        if self.external_root is None:  # never: `_external` finds no link without a root
            return
        blobs = Path(os.path.abspath(self.external_root)) / "blobs"
        with contextlib.suppress(OSError):
            target = link.resolve()
            if (st := _stat(blobs)) is not None and stat.S_ISDIR(st.st_mode) and target.parent == blobs \
                    and regular_file(target):
                target.unlink()
        _unlink_entry(link)

    def discard_weights(self, dtype: str) -> None:
        """Delete the stored weights of a dtype (its manifest, and its converted file if any)."""
        self.secure()
        _unlink_entry(self.converted_path(dtype))
        _unlink_entry(self.manifest_path(dtype))

    def partials(self) -> list[Path]:
        """Partial downloads and temporary files left by interrupted processes (regular files only)."""
        self.secure()
        found = []
        for folder in (self.raw, self.dir, self.dir / "converted"):
            if folder.is_dir():
                found += [p for p in folder.iterdir() if (p.name.endswith(".incomplete") or p.name.endswith(".tmp"))
                          and regular_file(p)]
        return sorted(found)

    def remove_all(self) -> int:
        """Delete this model's folder (regular files and folders only, links unlinked); returns the bytes freed."""
        return _remove_tree(self.dir)

    # lock -----------------------------------------------------------------------------------------------------
    def lock(self, why: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold this model's lock (see `hold_lock`)."""
        return hold_lock(self.lock_path, why, timeout)


@contextlib.contextmanager
def hold_lock(lock_path: Path, why: str, timeout: float | None = None) -> Iterator[None]:
    """Hold a model's lock; a waiting process says who holds it and for what.

    GPT2HUB_LOCK_TIMEOUT (seconds, default 600; 0 gives up at once) bounds the wait. The lock only avoids duplicated
    work: cache correctness does not depend on it.
    """
    if timeout is None:
        timeout = env_seconds("GPT2HUB_LOCK_TIMEOUT", 600.0)
    _real_folder(lock_path.parent)
    with disk_errors(lock_path):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    owner = lock_path.with_suffix(".owner")
    try:
        _acquire(lock, lock_path, owner, why, timeout)
    except OSError as e:
        raise _disk_error(lock_path, e) from e
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


def _acquire(lock: filelock.FileLock, lock_path: Path, owner: Path, why: str, timeout: float) -> None:
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
            "gpt2hub process is running, run `gpt2hub cache prune`, or raise GPT2HUB_LOCK_TIMEOUT") from None
    log.info("got %s after %.1f s", lock_path, time.monotonic() - start)


def _stat(path: Path, follow: bool = False) -> os.stat_result | None:
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None


def _real_folder(folder: Path) -> None:
    st = _stat(folder)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        log.warning("%s is %s where gpt2hub keeps a folder: removed (whatever it points to is left alone)", folder, kind)
        with disk_errors(folder):
            os.unlink(folder)


def _unlink_entry(path: Path) -> None:
    """Remove a regular file or a link (the link itself); anything else (a folder, a FIFO's target) is left."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is a folder where gpt2hub keeps a file: remove it by hand, then run again")
    with disk_errors(path):
        os.unlink(path)


def _remove_tree(folder: Path) -> int:
    """Delete a folder's contents bottom-up without following any link; returns the bytes of regular files freed."""
    st = _stat(folder)
    if st is None:
        return 0
    if not stat.S_ISDIR(st.st_mode):  # a link (or file) where a model folder should be: remove the entry itself
        _unlink_entry(folder)
        return 0
    freed = 0
    for dirpath, dirnames, filenames in os.walk(folder, topdown=False, followlinks=False):
        for entry in [*filenames, *dirnames]:
            path = Path(dirpath) / entry
            est = os.lstat(path)
            with disk_errors(path):
                if stat.S_ISDIR(est.st_mode):
                    os.rmdir(path)
                else:
                    freed += est.st_size if stat.S_ISREG(est.st_mode) else 0
                    os.unlink(path)
    with disk_errors(folder):
        os.rmdir(folder)
    return freed


def hf_cache_root() -> Path:
    """Hugging Face's hub cache folder, as huggingface_hub resolves it now (HF_HUB_CACHE, HF_HOME)."""
    import huggingface_hub.constants

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def model_cache(root: Path, source: str, size: str) -> ModelCache:
    """The ModelCache of one model: the hf source's files live in this repo's folder of Hugging Face's cache, and
    stored weights must describe the registered model of this size (when one is registered)."""
    from .registry import resolve

    try:
        spec = resolve(size)
    except ValueError:
        return ModelCache(root, source, size)
    repo = hf_cache_root() / f"models--{spec.hf_repo.replace('/', '--')}" if source == "hf" else None
    return ModelCache(root, source, size, repo, spec.config())


def cached_models(root: Path) -> list[ModelCache]:
    """Every model folder in the cache (folders only; links and stray files are not models)."""
    found = []
    for source in SOURCES:
        if (root / source).is_dir() and not (root / source).is_symlink():
            found += [model_cache(root, source, d.name) for d in sorted((root / source).iterdir())
                      if (st := _stat(d)) is not None and stat.S_ISDIR(st.st_mode)]
    return found


@dataclass(frozen=True)
class Pruned:
    """What `prune` did with one path: "removed" (with the bytes freed) or "skipped" (with why)."""

    path: Path
    action: str
    bytes: int = 0
    why: str = ""


def prune(root: Path) -> list[Pruned]:
    """Delete partial downloads and temporary files of models nobody is working on, and the lock files of models
    no longer cached (a lock file of a cached model stays: unlinking one another process is about to open would
    split the lock)."""
    done: list[Pruned] = []
    for m in cached_models(root):
        lock = filelock.FileLock(str(m.lock_path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            done.append(Pruned(m.dir, "skipped", why=f"another process holds {m.lock_path}"))
            continue
        except OSError as e:
            raise _disk_error(m.lock_path, e) from e
        try:
            for leftover in m.partials():
                freed = leftover.stat().st_size
                _unlink_entry(leftover)
                done.append(Pruned(leftover, "removed", freed))
        finally:
            lock.release()
    locks = root / "locks"
    for lock_path in sorted(locks.glob("*.lock")) if locks.is_dir() and not locks.is_symlink() else []:
        source, _, size = lock_path.stem.partition("--")
        if (root / source / size).exists() or not regular_file(lock_path):
            continue
        lock = filelock.FileLock(str(lock_path))
        with contextlib.suppress(filelock.Timeout):
            lock.acquire(timeout=0)
            try:
                _unlink_entry(lock_path.with_suffix(".owner"))
                _unlink_entry(lock_path)
                done.append(Pruned(lock_path, "removed"))
            finally:
                lock.release()
    return done


@dataclass(frozen=True)
class CachedModel:
    """One model of one source as the cache holds it (what `gpt2hub cache list` shows)."""

    name: str  # the registered name, or the folder's name for a model not registered in this process
    source: str
    size: str
    path: Path
    bytes_on_disk: int  # regular files under `path`
    bytes_elsewhere: int  # files recorded in Hugging Face's cache (source "hf")
    files: tuple[str, ...]  # published files recorded and present
    missing: tuple[str, ...]  # published files not (or no longer) there
    partial_bytes: int  # interrupted downloads and temporary files
    dtypes: tuple[str, ...]  # dtypes whose weights are prepared
    last_modified: float  # newest mtime under `path` (seconds since the epoch)
    last_used: float | None  # last load (the newest manifest mtime), None if never loaded

    @property
    def status(self) -> str:
        """"complete" (every published file), "partial" (some, or an interrupted download), or "empty"."""
        if not self.missing and self.files:
            return "complete"
        return "partial" if self.files or self.partial_bytes else "empty"


@dataclass(frozen=True)
class CacheInfo:
    """Everything in one cache folder: `scan_cache`'s answer."""

    root: Path
    models: tuple[CachedModel, ...]

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes_on_disk for m in self.models)


def _walk_sizes(folder: Path) -> tuple[int, float]:
    total, newest = 0, 0.0
    for dirpath, _, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            st = regular_file(Path(dirpath) / name)
            if st is not None:
                total += st.st_size
                newest = max(newest, st.st_mtime)
    return total, newest


def describe(m: ModelCache) -> CachedModel:
    """What one model folder holds, without hashing anything."""
    from .registry import resolve  # names of registered sizes

    try:
        name = resolve(m.size).name
    except ValueError:
        name = m.size
    records = m.records()
    present = tuple(n for n in m.names if n in records and m.present(n) is not None)
    on_disk, newest = _walk_sizes(m.dir)
    used = [st.st_mtime for d in m.stored_dtypes() if (st := regular_file(m.manifest_path(d))) is not None]
    return CachedModel(name, m.source, m.size, m.dir, on_disk,
                       sum(r["size"] for n, r in records.items() if "path" in r and n in present),
                       present, tuple(n for n in m.names if n not in present),
                       sum(p.stat().st_size for p in m.partials()), tuple(m.stored_dtypes()), newest,
                       max(used) if used else None)


def scan_cache(cache_dir: str | Path | None = None) -> CacheInfo:
    """Every model in the cache (GPT2HUB_CACHE or `cache_dir`), as dataclasses, like huggingface_hub.scan_cache_dir."""
    root = Path(cache_dir) if cache_dir is not None else default_root()
    return CacheInfo(root, tuple(describe(m) for m in cached_models(root)))


def touch_used(m: ModelCache, dtype: str) -> None:
    """Remember that the weights of `dtype` were just loaded (the manifest's mtime; its content is unchanged)."""
    with contextlib.suppress(OSError):
        os.utime(m.manifest_path(dtype))


@dataclass(frozen=True)
class Removal:
    """One thing `remove` will delete: a model folder (or a link where one should be), or one dtype's weights."""

    cache: ModelCache
    what: str
    bytes: int
    dtype: str | None = None
    include_hf: bool = False


def _size_of(name: str) -> str:
    from .registry import resolve

    try:
        return resolve(name).size
    except ValueError:
        return name  # a folder `cache list` shows for a model this process has not registered


def plan_removal(cache_dir: str | Path | None, name: str | None, source: str | None = None, dtype: str | None = None,
                 include_hf: bool = False) -> list[Removal]:
    """What `remove` would delete for a model name (None: every model), a source and a dtype; nothing is touched."""
    root = Path(cache_dir) if cache_dir is not None else default_root()
    size = _size_of(name) if name is not None else None
    plan = []
    for src in [source] if source else list(SOURCES):
        folder = root / src
        entries = sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
        for entry in entries:
            if (size is not None and entry.name != size) or _stat(entry) is None:
                continue
            m = model_cache(root, src, entry.name)
            if not stat.S_ISDIR(os.lstat(entry).st_mode):
                plan.append(Removal(m, f"{entry} (not a folder)", 0))
            elif dtype is not None:
                files = [p for p in (m.converted_path(dtype), m.manifest_path(dtype)) if regular_file(p)]
                if files:
                    plan.append(Removal(m, f"{m.dir}/converted/{dtype}.*", sum(p.stat().st_size for p in files), dtype))
            else:
                hf = sum(r["size"] for r in m.records().values() if "path" in r) if include_hf else 0
                plan.append(Removal(m, str(m.dir) + (" and its files in the Hugging Face cache" if hf else ""),
                                    _walk_sizes(m.dir)[0] + hf, include_hf=include_hf))
    return plan


def remove(plan: list[Removal], timeout: float | None = None) -> int:
    """Delete what `plan_removal` planned, each model under its lock; returns the bytes freed."""
    freed = 0
    for item in plan:
        with item.cache.lock(f"removing {item.what}", timeout):
            if item.dtype is not None:
                item.cache.discard_weights(item.dtype)
                freed += item.bytes
                continue
            if item.include_hf:
                for name, record in item.cache.records().items():
                    if "path" in record:
                        freed += record["size"]
                        item.cache.discard(name)
            freed += item.cache.remove_all()
    return freed
