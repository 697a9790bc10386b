"""What the cache holds, as data (`scan_cache`, like huggingface_hub's scan_cache_dir), and tidying it: `prune`,
`plan_removal` and `remove`. The CLI only renders these."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import filelock

from .cache import ModelCache, cached_models, model_cache
from .files import default_root, disk_error, regular_file, stat_entry, unlink_entry
from .registry import SOURCES


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
            raise disk_error(m.lock_path, e) from e
        try:
            for leftover in m.partials():
                freed = leftover.stat().st_size
                unlink_entry(leftover)
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
                unlink_entry(lock_path.with_suffix(".owner"))
                unlink_entry(lock_path)
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
            if (size is not None and entry.name != size) or stat_entry(entry) is None:
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
