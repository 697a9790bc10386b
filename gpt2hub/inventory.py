"""What the cache holds, as data (`scan_cache`, like huggingface_hub's scan_cache_dir), and tidying it: `prune`,
`plan_removal` and `remove`. The CLI only renders these. Every function here first checks that the folder is a
gpt2hub cache (cache.Cache.open_existing): pointed at any other folder, it refuses and touches nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import filelock

from .cache import Cache, Entry, EntryKey
from .checks import Problem, mark, verify
from .errors import CacheError, UnknownModelError
from .files import default_root, disk_error, regular_file, sha256_file, stat_entry, unlink_entry
from .registry import SOURCE_FILES, SOURCES, resolve
from .settings import ignore_pins

log = logging.getLogger("gpt2hub")


def _cache(cache_dir: str | Path | None) -> Cache:
    return Cache(Path(cache_dir) if cache_dir is not None else default_root())


def _entry(cache: Cache, key: EntryKey) -> Entry:
    """An entry as the commands see it: the registered model's config where the size is registered; the Hub's
    files in the repo folder of Hugging Face's cache."""
    try:
        spec = resolve(key.size)
    except UnknownModelError:
        return cache.entry(key)
    external = None
    if key.source == "hf":
        from .transports import HFHub

        external = HFHub(spec).external()
    return cache.entry(key, SOURCE_FILES[key.source], spec.arch, external)


def _registered(size: str) -> bool:
    try:
        return resolve(size).size == size
    except UnknownModelError:
        return False


def entries(cache: Cache) -> list[Entry]:
    """The cache's entries: folders of registered sizes, or holding gpt2hub's own records (a model registered by
    another process); any other folder a user put there is no entry of gpt2hub's and is never listed or removed."""
    found = [_entry(cache, key) for key in cache.entry_keys()]
    return [e for e in found if _registered(e.key.size) or cache.holds_records(e.dir)]


def model_entry(cache_dir: str | Path | None, name: str, source: str = "openai", commit: str | None = None) -> Entry:
    """The entry of a registered model (and, for the Hub, a commit) in a cache, whether it exists yet or not."""
    return _entry(_cache(cache_dir), EntryKey(source, resolve(name).size, commit))


@dataclass(frozen=True)
class Pruned:
    """What `prune` did with one path: "removed" (with the bytes freed) or "skipped" (with why)."""

    path: Path
    action: str
    bytes: int = 0
    why: str = ""


def prune(root: Path) -> list[Pruned]:
    """Delete partial downloads and temporary files (by gpt2hub's own names) of models nobody is working on, and the
    lock files of models no longer cached (a lock of a cached model stays: unlinking one another process is about to
    open would split the lock)."""
    cache = Cache(root)
    if not cache.open_existing("pruning"):
        return []
    done: list[Pruned] = []
    for entry in entries(cache):
        lock = filelock.FileLock(str(entry.lock_path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            done.append(Pruned(entry.dir, "skipped", why=f"another process holds {entry.lock_path}"))
            continue
        except OSError as e:
            raise disk_error(entry.lock_path, e) from e
        try:
            entry.secure()
            for leftover in entry.partials():
                freed = leftover.stat().st_size
                unlink_entry(leftover)
                done.append(Pruned(leftover, "removed", freed))
        finally:
            lock.release()
    for leftover in cache.temporaries():
        st = regular_file(leftover)
        if st is not None and time.time() - st.st_mtime > 60:  # not one another process is writing right now
            unlink_entry(leftover)
            done.append(Pruned(leftover, "removed", st.st_size))
    return done + _stale_locks(cache)


_LOCK = re.compile(r"(" + "|".join(SOURCES) + r")--([A-Za-z0-9][A-Za-z0-9._-]*)\.lock")


def _stale_locks(cache: Cache) -> list[Pruned]:
    """The lock files gpt2hub names `{source}--{size}.lock` whose model has no folder left; nothing else."""
    done = []
    locks = cache.root / "locks"
    st = stat_entry(locks)
    listing = sorted(locks.iterdir()) if st is not None and stat.S_ISDIR(st.st_mode) else []
    for lock_path in listing:
        m = _LOCK.fullmatch(lock_path.name)
        if not m or os.path.lexists(cache.root / m.group(1) / m.group(2)) or not regular_file(lock_path):
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
    """One entry of the cache (a model of one source, and for the Hub one commit): what `gpt2hub cache list` shows."""

    name: str  # the registered name, or the folder's name for a model not registered in this process
    source: str
    size: str
    path: Path
    bytes_on_disk: int  # regular files gpt2hub keeps under `path`
    bytes_elsewhere: int  # files recorded in Hugging Face's cache (source "hf")
    files: tuple[str, ...]  # published files recorded and present
    missing: tuple[str, ...]  # published files not (or no longer) there
    partial_bytes: int  # interrupted downloads and temporary files
    dtypes: tuple[str, ...]  # dtypes whose weights are prepared
    last_modified: float  # newest mtime under `path` (seconds since the epoch)
    last_used: float | None  # last load (the newest manifest mtime), None if never loaded
    commit: str | None = None  # the Hub's commit
    revisions: tuple[str, ...] = ()  # the Hub's branches and tags known to resolve to `commit`

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
    exists: bool = True  # False: no folder at all (nothing was ever cached there)

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes_on_disk for m in self.models)


def own_bytes(entry: Entry) -> tuple[int, float]:
    """(bytes, newest mtime) of the regular files gpt2hub keeps in `entry` (partial downloads included)."""
    total, newest = 0, 0.0
    paths = [folder / n for folder, names in entry.own_files().items() for n in names] + entry.partials()
    for path in paths:
        if (st := regular_file(path)) is not None:
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest


def describe(entry: Entry) -> CachedModel:
    """What one entry holds, without hashing anything."""
    key = entry.key
    try:
        name = resolve(key.size).name
    except UnknownModelError:
        name = key.size
    records = entry.records()
    present = tuple(n for n in entry.names if n in records and not _problem(entry, n))
    on_disk, newest = own_bytes(entry)
    used = [st.st_mtime for d in entry.stored_dtypes() if (st := regular_file(entry.manifest_path(d))) is not None]
    refs = entry.cache.refs(key.size) if key.commit else {}
    return CachedModel(name, key.source, key.size, entry.dir, on_disk,
                       sum(r["size"] for n, r in records.items() if "path" in r and n in present),
                       present, tuple(n for n in entry.names if n not in present),
                       sum(p.stat().st_size for p in entry.partials()), tuple(entry.stored_dtypes()), newest,
                       max(used) if used else None, key.commit, tuple(sorted(r for r, c in refs.items() if c == key.commit)))


def _problem(entry: Entry, name: str) -> bool:
    return bool(verify(entry, (name,), (), quick=True, secure=False))


def scan_cache(cache_dir: str | Path | None = None) -> CacheInfo:
    """Every entry of the cache (GPT2HUB_CACHE or `cache_dir`), as dataclasses, like huggingface_hub.scan_cache_dir;
    NotACacheError for a folder that is not a gpt2hub cache."""
    cache = _cache(cache_dir)
    if not cache.open_existing("listing"):
        return CacheInfo(cache.root, (), exists=False)
    return CacheInfo(cache.root, tuple(describe(e) for e in entries(cache)))


@dataclass(frozen=True)
class CheckedCache:
    """`check_cache`'s answer: each entry with what is wrong with it; `entries` is None when there is no cache."""

    root: Path
    entries: list[tuple[Entry, list[Problem]]] | None


def check_cache(cache_dir: str | Path | None = None, mark_problems: bool = True) -> CheckedCache:
    """Every entry re-hashed in full (`checks.verify`); with `mark_problems`, what is found is flagged so that the next
    load repairs it, even a file damaged in place with its size and timestamp kept."""
    cache = _cache(cache_dir)
    if not cache.open_existing("verifying"):
        return CheckedCache(cache.root, None)
    found = []
    for entry in entries(cache):
        problems = verify(entry, secure=False)
        if problems and mark_problems:
            try:
                with entry.lock(f"marking the problems cache verify found in {entry.key}"):
                    mark(entry, problems)
            except CacheError as e:  # a read-only cache: the problems are still reported
                log.warning("%s; not marked", e)
        found.append((entry, problems + pin_problems(entry)))
    return CheckedCache(cache.root, found)


def pin_problems(entry: Entry) -> list[Problem]:
    """The pinned files an entry keeps that are not the published ones (kept under GPT2HUB_IGNORE_PINS=1, or fetched
    through a revision that has no pins but is the default revision's commit), unless the opt-out is set now."""
    if ignore_pins() or not _registered(entry.key.size):
        return []
    spec = resolve(entry.key.size)
    if entry.key.source == "hf" and entry.cache.refs(entry.key.size).get("main") != entry.key.commit:
        return []  # pins hold for the default revision only
    found = []
    for name, pin in spec.expected_sha256(entry.key.source).items():
        record = entry.records().get(name)
        path = entry.file_path(name, record) if record else None
        if record is None or path is None or regular_file(path, follow=True) is None:
            continue
        if (record["sha256"] if "sha256" in record else sha256_file(path)) != pin:
            found.append(Problem(path, "not the published file (its sha256 differs from the pin)",
                                 f"loads refuse it unless GPT2HUB_IGNORE_PINS=1: `gpt2hub cache rm {spec.name}` removes it",
                                 name))
    return found


@dataclass(frozen=True)
class Removal:
    """One thing `remove` will delete: an entry, one dtype's stored weights in an entry, or (`entry` None) a link or
    file found where a registered model's folder belongs (`path`: the entry itself, never what it points to)."""

    entry: Entry | None
    what: str
    bytes: int
    dtype: str | None = None
    include_hf: bool = False
    path: Path | None = None


def plan_removal(cache_dir: str | Path | None, name: str | None, source: str | None = None, dtype: str | None = None,
                 include_hf: bool = False) -> list[Removal]:
    """What `remove` would delete for a registered model name (None: every entry), a source and a dtype; nothing is
    touched. UnknownModelError (with a suggestion) for a name that is not registered."""
    cache = _cache(cache_dir)
    size = resolve(name).size if name is not None else None
    if not cache.open_existing("removing from"):
        return []
    plan = [Removal(None, f"{p} (not a folder: the link or file itself; what it points to is left alone)", 0, path=p)
            for p in _misplaced(cache, size, source)] if dtype is None else []
    for entry in entries(cache):
        if (size is not None and entry.key.size != size) or (source is not None and entry.key.source != source):
            continue
        if dtype is not None:
            files = [p for p in (entry.stored_path(dtype), entry.manifest_path(dtype)) if regular_file(p)]
            if files:
                plan.append(Removal(entry, f"{entry.converted}/{dtype}.*", sum(p.stat().st_size for p in files), dtype))
            continue
        hf = _external_bytes(entry) if include_hf else 0
        plan.append(Removal(entry, str(entry.dir) + (" and its files in the Hugging Face cache" if hf else ""),
                            own_bytes(entry)[0] + hf, include_hf=include_hf))
    return plan


def _misplaced(cache: Cache, size: str | None, source: str | None) -> list[Path]:
    """Links or files where a registered model's folder belongs (only the entry itself is ever removed)."""
    found = []
    for src in [source] if source else list(SOURCES):
        folder = cache.root / src
        names = [p.name for p in folder.iterdir()] if folder.is_dir() and not folder.is_symlink() else []
        for name in names:
            st = stat_entry(folder / name)
            if (size is None or name == size) and _registered(name) and st is not None and not stat.S_ISDIR(st.st_mode):
                found.append(folder / name)
    return found


def _external_bytes(entry: Entry) -> int:
    """Bytes of the Hub's blobs this entry's links point to (what --include-hf may free, shared blobs included)."""
    total = 0
    for record in entry.records().values():
        path = entry.external_path(record.get("path"))
        with contextlib.suppress(OSError):
            if path is not None:
                total += path.stat().st_size
    return total


@dataclass(frozen=True)
class Removed:
    """What `remove` did: the bytes freed, and files left in place because gpt2hub did not write them."""

    bytes: int
    left: tuple[Path, ...]


def remove(plan: list[Removal], timeout: float | None = None) -> Removed:
    """Delete what `plan_removal` planned, each entry under its lock."""
    freed, left = 0, list[Path]()
    for item in plan:
        if item.entry is None:
            if item.path is not None:
                unlink_entry(item.path)
            continue
        with item.entry.lock(f"removing {item.what}", timeout):
            if item.dtype is not None:
                before = sum(p.stat().st_size for p in (item.entry.stored_path(item.dtype),
                                                        item.entry.manifest_path(item.dtype)) if regular_file(p))
                item.entry.discard_weights(item.dtype)
                freed += before
                continue
            gone, kept = item.entry.remove(include_external=item.include_hf)
            freed, left = freed + gone, left + kept
    for cache in {i.entry.cache.root: i.entry.cache for i in plan if i.entry is not None}.values():
        cache.forget_stale_refs()
    return Removed(freed, tuple(left))
