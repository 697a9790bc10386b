"""The cache: what a folder of gpt2hub's is, what each entry in it is, its records, and the only code that deletes.

    {root}/CACHEDIR.TAG                                 the Cache Directory Tagging marker (backup tools skip the folder)
    {root}/gpt2hub-cache.json                           {"gpt2hub_cache": 3, ...}: with the tag, what makes it gpt2hub's
    {root}/openai/{size}/raw/{file}                     OpenAI's published files, byte for byte, read-only
    {root}/openai/{size}/raw/{file}.{pid}.incomplete    a download in progress, resumed (and claimed) by a later call
    {root}/openai/{size}/files.json                     size, sha256 or crc32c, origin and mtime of each file
    {root}/openai/{size}/converted/{dtype}.json         manifest: how the weights of one dtype are stored (storage.py)
    {root}/openai/{size}/converted/{dtype}.safetensors  converted or quantized weights, read-only
    {root}/hf/{size}/refs.json                          Hugging Face revision -> the commit it resolved to
    {root}/hf/{size}/{commit}/files.json, converted/    one entry per commit (the files stay in Hugging Face's cache)
    {root}/locks/{source}--{size}.lock                  per-model lock (flock: released when its process dies)

Identity:
- A cache is a folder gpt2hub created: it holds CACHEDIR.TAG and gpt2hub-cache.json. Commands that list or delete
  refuse any other folder, touching nothing. A cache written by an earlier gpt2hub (no marker, but its own records,
  checked) is marked when next used; a new or empty folder (or one holding only gpt2hub's folders, of registered
  sizes, and its lock files) is marked when a model is first written to it; a folder holding anything else is refused.
- An entry's key holds everything that makes its bytes what they are: the source, the size and, for the Hugging
  Face Hub, the resolved commit. A revision never answers for another.

Invariants:
- Correctness does not depend on the lock: every file appears under its final name whole or not at all (a name
  unique to the writing process, fsync, atomic rename, fsync of the folder); the lock only avoids duplicated work.
- Only a `Gate` (arrival.py) makes what `Entry.record` accepts: no file is recorded without the format's arrival
  check and the published-file check.
- Nothing read from disk names a path to delete. Deletion is by name, from the format's file list, of regular files
  under the cache's own folders; a link is unlinked, never followed; files gpt2hub did not write are left in place.
  Hugging Face's blob behind a link is deleted only when it lies in that repo's `blobs/` and no other link of the
  repo points to it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .__version__ import __version__
from .config import ModelConfig
from .errors import CacheError, NotACacheError
from .files import (
    HEX,
    disk_errors,
    hold_lock,
    read_json,
    real_folder,
    regular_file,
    stat_entry,
    unlink_entry,
    valid_record,
    write_json,
)
from .registry import DTYPES, SOURCE_FILES, SOURCES, names, resolve

log = logging.getLogger("gpt2hub")
FORMAT_VERSION = 2  # of manifests
CACHE_FORMAT = 3  # of the cache as a whole (the version file)
TAG, VERSION_FILE = "CACHEDIR.TAG", "gpt2hub-cache.json"
TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
TAG_TEXT = (f"{TAG_SIGNATURE}\n# This file is a cache directory tag created by gpt2hub.\n"
            "# For information about cache directory tags, see https://bford.info/cachedir/\n")
OWN_NAMES = ("openai", "hf", "locks")  # the only folders gpt2hub makes at the root
COMMIT = re.compile(r"[0-9a-f]{40}")
_LOCK_NAME = re.compile(r"[a-z]+--[A-Za-z0-9][A-Za-z0-9._-]*\.(lock|owner)")  # Cache.lock_path's names
_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]{4,}\.tmp")  # files.atomic_path's temporary names


@dataclass(frozen=True)
class EntryKey:
    """What makes an entry's bytes what they are: the source, OpenAI's size folder and, for the Hub, the commit."""

    source: str
    size: str
    commit: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.size):
            raise ValueError(f"not a cache entry: {self.source!r}/{self.size!r}")
        if (self.source == "hf") != (self.commit is not None and bool(COMMIT.fullmatch(self.commit))):
            raise ValueError(f"a Hugging Face entry needs a 40-hex commit, another none: {self.commit!r}")

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.source, self.size) if self.commit is None else (self.source, self.size, self.commit)

    def __str__(self) -> str:
        return "/".join(self.parts)


@dataclass(frozen=True)
class Manifest:
    """converted/{dtype}.json: how the weights of one dtype are stored, and what was checked."""

    kind: str  # the storage (registry.DTYPES): "mapped" is the published file itself, others a file of their own
    dtype: str
    weights: str  # the published file mapped, or the stored file's name
    config: dict
    bytes: int
    mtime_ns: int
    crc32c: str | None
    extra: dict

    @classmethod
    def parse(cls, data: Any, published: tuple[str, ...], dtype: str) -> Manifest | None:
        """A manifest from JSON, or None unless every field has the type and value gpt2hub writes."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or data.get("dtype") != dtype:
            return None
        kind, weights, crc = data.get("kind"), data.get("weights"), data.get("crc32c")
        if dtype not in DTYPES or kind != DTYPES[dtype].storage or data.get("damaged"):
            return None
        allowed = published if kind == "mapped" else (f"{dtype}.safetensors",)
        if weights not in allowed or not _sizes_ok(data.get("config")):
            return None
        if not _plain_int(data.get("bytes")) or not _plain_int(data.get("mtime_ns")):
            return None
        if kind != "mapped" and not (isinstance(crc, str) and HEX["crc32c"].fullmatch(crc)):
            return None
        return cls(kind, dtype, weights, data["config"], data["bytes"], data["mtime_ns"], crc, data)

    def to_json(self) -> dict:
        return {**self.extra, "format": FORMAT_VERSION, "kind": self.kind, "dtype": self.dtype, "weights": self.weights,
                "config": self.config, "bytes": self.bytes, "mtime_ns": self.mtime_ns, "crc32c": self.crc32c}


def _plain_int(value: object) -> TypeGuard[int]:
    """True for an int that is not a bool (JSON's true/false load as bools, which are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _sizes_ok(config: Any) -> bool:
    try:
        ModelConfig.from_hparams(config)
    except Exception:  # noqa: BLE001 - any way a stored config fails makes it unusable
        return False
    return True


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class CacheFolder:
    """What a cache folder is: gpt2hub's (marked), an earlier gpt2hub's, new, or not a cache at all (see the module
    docstring). `Cache` adds what it holds."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def state(self) -> str:
        """"missing", "marked", "legacy" (an earlier gpt2hub's, recognised by its records), "unmarked" (empty, or
        only gpt2hub's folders and lock files), "newer" (a later gpt2hub's format) or "foreign" (anything else)."""
        try:
            st = os.stat(self.root)  # the root itself may be a link (~/.cache/gpt2hub -> /data/gpt2hub)
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "foreign"
        if not stat.S_ISDIR(st.st_mode):
            return "foreign"
        if (version := self._version()) is not None:
            return "marked" if version <= CACHE_FORMAT else "newer"
        try:
            top = {p.name for p in self.root.iterdir()}
        except OSError:
            return "foreign"
        if not all(n in OWN_NAMES or n in (TAG, VERSION_FILE) or _marker_temporary(n) for n in top):
            return "foreign"  # (the marker's own files: another process is marking it right now)
        if any(self._own_records(p) for p in self._candidate_dirs()):
            return "legacy"
        return "unmarked" if self._only_own_folders() else "foreign"

    def _only_own_folders(self) -> bool:
        """Whether openai/, hf/ and locks/ hold nothing but what gpt2hub makes before it records a file (folders of
        registered sizes, lock files): else they are the user's, as `~/projects/openai/` would be. (A link or file
        where gpt2hub keeps a folder is its to replace: it is removed, never followed.)"""
        sizes = {resolve(n).size for n in names()}
        return all(_LOCK_NAME.fullmatch(p.name) if name == "locks" else p.name in sizes
                   for name in OWN_NAMES for p in _listing(self.root / name))

    def _version(self) -> int | None:
        """The cache format its marker names, or None when it has no marker (CACHEDIR.TAG and the version file)."""
        version = read_json(self.root / VERSION_FILE)
        if self._tagged() and isinstance(version, dict) and _plain_int(version.get("gpt2hub_cache")):
            return version["gpt2hub_cache"]
        return None

    def _tagged(self) -> bool:
        try:
            return regular_file(self.root / TAG) is not None and (self.root / TAG).read_text()[:200].startswith(TAG_SIGNATURE)
        except (OSError, UnicodeDecodeError):
            return False

    def _candidate_dirs(self) -> Iterator[Path]:
        for source in SOURCES:
            for d in _subdirs(self.root / source):
                yield d
                yield from (c for c in _subdirs(d) if COMMIT.fullmatch(c.name))

    @classmethod
    def holds_records(cls, folder: Path) -> bool:
        """Whether a folder holds gpt2hub's records (a files.json of published files, or a manifest)."""
        return cls._own_records(folder) or any(isinstance(read_json(folder / "converted" / f"{d}.json"), dict)
                                               for d in DTYPES)

    @staticmethod
    def _own_records(folder: Path) -> bool:
        data = read_json(folder / "files.json")
        return isinstance(data, dict) and bool(data) and all(
            isinstance(k, str) and any(k in files for files in SOURCE_FILES.values()) and valid_record(v)
            for k, v in data.items())

    def _refusal(self, state: str, doing: str) -> NotACacheError:
        why = {"newer": "it was written by a newer gpt2hub: upgrade gpt2hub to use it",
               "foreign": f"it is not a gpt2hub cache (no {TAG} and {VERSION_FILE}, and it holds files gpt2hub did not "
                          "write); nothing in it was touched: point GPT2HUB_CACHE or --cache-dir at the cache folder, or "
                          "at a new or empty folder"}[state]
        return NotACacheError(f"not {doing} {self.root}: {why}")

    def mark(self) -> None:
        """Write the marker (CACHEDIR.TAG and the version file); the folder is created if needed."""
        with disk_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        if not self._tagged():
            with disk_errors(self.root / TAG):
                (self.root / TAG).unlink(missing_ok=True)
            from .files import atomic_write

            with atomic_write(self.root / TAG, file_mode=0o444) as f:
                f.write(TAG_TEXT)
        write_json(self.root / VERSION_FILE, {"gpt2hub_cache": CACHE_FORMAT, "created_by": f"gpt2hub {__version__}",
                                              "created": now()})

    def open_for_loading(self) -> None:
        """Before a load or download: mark a new, empty or earlier gpt2hub's folder; refuse a foreign or newer one.
        A read-only cache that cannot be marked is still read (what it holds loads)."""
        state = self.state()
        if state in ("foreign", "newer"):
            raise self._refusal(state, "using")
        if state != "marked":
            try:
                self.mark()
            except CacheError:
                if state == "missing":
                    raise
                log.info("cannot mark %s as a gpt2hub cache (read-only?); reading it as it is", self.root)

    def open_existing(self, doing: str) -> bool:
        """Before a command that lists or deletes: False when there is no folder at all; True for a gpt2hub cache
        (marking an earlier gpt2hub's); NotACacheError for any other folder, touching nothing."""
        state = self.state()
        if state == "missing":
            return False
        if state == "legacy":
            with contextlib.suppress(CacheError):
                self.mark()
            return True
        if state not in ("marked", "unmarked"):  # unmarked: empty, or only what gpt2hub makes before marking
            raise self._refusal(state, doing)
        return True


class Cache(CacheFolder):
    """One cache folder with what it holds: its entries, the refs of Hugging Face revisions, its locks."""

    def entry(self, key: EntryKey, names: tuple[str, ...] | None = None, config: ModelConfig | None = None,
              external: Path | None = None) -> Entry:
        return Entry(self, key, names or SOURCE_FILES[key.source], config, external)

    def entry_keys(self) -> list[EntryKey]:
        """Every entry folder the cache holds (real folders with gpt2hub's names or records; links are not entries)."""
        keys = []
        for d in _subdirs(self.root / "openai"):
            with contextlib.suppress(ValueError):
                keys.append(EntryKey("openai", d.name))
        for d in _subdirs(self.root / "hf"):
            for c in _subdirs(d):
                if COMMIT.fullmatch(c.name):
                    with contextlib.suppress(ValueError):
                        keys.append(EntryKey("hf", d.name, c.name))
        return keys

    def adopt_legacy_hf(self, size: str, ref: str) -> str | None:
        """An earlier gpt2hub kept the Hub's records at hf/{size}/ with no commit level: when they are all of revision
        `ref` and of one commit's files, move them (and the weights it prepared) into that commit's entry, remember
        `ref` for it, and return the commit. None when there is nothing such to move (nothing is downloaded again)."""
        folder = self.root / "hf" / size
        records = read_json(folder / "files.json") if _real_dirs(folder) else None  # never through a link
        if not isinstance(records, dict) or not records or not all(isinstance(r, dict) for r in records.values()):
            return None
        commits = {Path(r["path"]).parent.name if isinstance(r.get("path"), str) else "" for r in records.values()}
        revisions = {str(r.get("revision", "main")) for r in records.values()}  # (a list there: never `ref`)
        commit = commits.pop() if len(commits) == 1 else ""
        if not COMMIT.fullmatch(commit) or revisions != {ref} or os.path.lexists(folder / commit / "files.json"):
            return None
        try:  # files.json moves last: a process killed before then leaves it here, and the next call moves the rest
            (folder / commit).mkdir(exist_ok=True)
            if not _real_dirs(folder / commit):
                return None  # a link where the entry goes: secured (removed) before anything is written there
            converted = stat_entry(folder / "converted")
            if converted is not None and stat.S_ISDIR(converted.st_mode) and not os.path.lexists(folder / commit / "converted"):
                os.replace(folder / "converted", folder / commit / "converted")
            os.replace(folder / "files.json", folder / commit / "files.json")
        except OSError:
            return None  # another process moved them first, or the cache is read-only: resolved as usual
        self.set_ref(size, ref, commit)
        log.info("moved %s's records of %s into %s (the cache now keeps one entry per commit)", folder, ref, commit)
        return commit

    # refs of Hugging Face revisions -----------------------------------------------------------------------------
    def refs_path(self, size: str) -> Path:
        return self.root / "hf" / size / "refs.json"

    def refs(self, size: str) -> dict[str, str]:
        data = read_json(self.refs_path(size)) if _real_dirs(self.root / "hf" / size) else None  # never through a link
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and COMMIT.fullmatch(v)}

    def set_ref(self, size: str, revision: str, commit: str) -> None:
        real_folder(self.root / "hf")
        real_folder(self.root / "hf" / size)
        write_json(self.refs_path(size), {**self.refs(size), revision: commit})

    def temporaries(self) -> list[Path]:
        """Temporary files a killed process left beside the cache's own root files (its marker) and refs, by the
        names atomic writes give them; regular files only."""
        found = [p for p in _listing(self.root) if _marker_temporary(p.name)]
        for folder in _subdirs(self.root / "hf"):
            found += [p for p in _listing(folder) if (m := _TEMPORARY.fullmatch(p.name)) and m.group(1) == "refs.json"]
        return [p for p in found if regular_file(p) is not None]

    def forget_stale_refs(self) -> None:
        """Drop the refs that name a commit no longer cached, and a size's folder once it is empty."""
        for folder in _subdirs(self.root / "hf"):
            commits = {c.name for c in _subdirs(folder) if COMMIT.fullmatch(c.name)}
            refs = self.refs(folder.name)
            if refs and not commits:
                unlink_entry(self.refs_path(folder.name))
            elif any(c not in commits for c in refs.values()):
                write_json(self.refs_path(folder.name), {r: c for r, c in refs.items() if c in commits})
            with contextlib.suppress(OSError):
                folder.rmdir()

    def lock_path(self, key: EntryKey) -> Path:
        return self.root / "locks" / f"{key.source}--{key.size}.lock"


def enclosing_cache(path: Path) -> Path | None:
    """The gpt2hub cache (a folder with its marker) that `path` is or lies in, links resolved; None if there is none:
    what hands files out (export, mirror) refuses to write there."""
    real = Path(os.path.realpath(path))
    return next((p for p in (real, *real.parents) if CacheFolder(p)._version() is not None), None)


def _marker_temporary(name: str) -> bool:
    m = _TEMPORARY.fullmatch(name)
    return m is not None and m.group(1) in (TAG, VERSION_FILE)


def _real_dirs(folder: Path) -> bool:
    """Whether `folder` (hf/{size}) and its parent are real folders, not links (which are never followed)."""
    return all((st := stat_entry(f)) is not None and stat.S_ISDIR(st.st_mode) for f in (folder, folder.parent))


def _subdirs(folder: Path) -> list[Path]:
    """The real folders inside `folder` (never through a link), sorted; [] when it is not a real folder."""
    st = stat_entry(folder)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return []
    try:
        return sorted(p for p in folder.iterdir() if (s := stat_entry(p)) is not None and stat.S_ISDIR(s.st_mode))
    except OSError:
        return []


class EntryLayout:
    """Where one entry of the cache (one model of one source, and commit) keeps its files, and its lock;
    `EntryRecords` adds the records and manifests, `Entry` deletion."""

    def __init__(self, cache: Cache, key: EntryKey, names: tuple[str, ...], config: ModelConfig | None = None,
                 external: Path | None = None):
        self.cache, self.key, self.names, self.config = cache, key, names, config
        self.dir = cache.root.joinpath(*key.parts)
        self.raw, self.converted = self.dir / "raw", self.dir / "converted"
        self.files_json = self.dir / "files.json"
        self.lock_path = cache.lock_path(key)
        # the hf source: this repo's folder in Hugging Face's cache, where its files stay
        self.external = external
        self.snapshot = external / "snapshots" / key.commit if external is not None and key.commit else None

    def __repr__(self) -> str:
        return f"Entry({self.dir})"

    def lock(self, why: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold this model's lock (see files.hold_lock)."""
        return hold_lock(self.lock_path, why, timeout)

    def folders(self) -> list[Path]:
        """Every folder from the cache root down to this entry's files."""
        chain = [self.cache.root.joinpath(*self.key.parts[:i]) for i in range(1, len(self.key.parts) + 1)]
        return [*chain, self.raw, self.converted]

    def secure(self) -> None:
        """Make every folder from the cache root down to this entry's files a real folder: a link (or a file) where
        one belongs is removed (the link itself, never what it points to). Called before any write."""
        for folder in self.folders():
            real_folder(folder)

    def misplaced(self) -> list[Path]:
        """The links or files found where this entry's folders belong (what `secure` would remove), touching nothing."""
        return [f for f in self.folders() if (st := stat_entry(f)) is not None and not stat.S_ISDIR(st.st_mode)]

    # names and paths --------------------------------------------------------------------------------------------
    def check_name(self, name: str) -> str:
        if name not in self.names:
            raise CacheError(f"{name!r} is not a file of the {self.key.source} source ({', '.join(self.names)})")
        return name

    def raw_path(self, name: str) -> Path:
        return self.raw / self.check_name(name)

    def stored_path(self, dtype: str) -> Path:
        """The file a non-mapped storage keeps the weights of `dtype` in."""
        return self.converted / f"{DTYPES[dtype].name}.safetensors"

    def manifest_path(self, dtype: str) -> Path:
        return self.converted / f"{DTYPES[dtype].name}.json"

    def external_path(self, value: Any) -> Path | None:
        """A record's "path" if it is a file of this entry's commit in Hugging Face's cache (`snapshots/{commit}/`),
        reached through real folders only (the file itself is Hugging Face's link to a blob)."""
        if self.snapshot is None or not isinstance(value, str):
            return None
        path, snapshot = Path(os.path.abspath(value)), Path(os.path.abspath(self.snapshot))
        if path.parent != snapshot or path.name not in self.names:
            return None
        folders = [snapshot, *(p for p in snapshot.parents if Path(os.path.abspath(self.external or "")) in p.parents)]
        return path if all((st := stat_entry(p)) is None or stat.S_ISDIR(st.st_mode) for p in folders) else None



class EntryRecords(EntryLayout):
    """An entry's records (files.json) and manifests (converted/{dtype}.json)."""

    def file_path(self, name: str, record: dict | None = None) -> Path:
        """Where a published file lives: raw/{name}, or this commit's file in Hugging Face's cache."""
        record = self.records().get(name) if record is None else record
        external = self.external_path(record.get("path")) if record else None
        return external or self.raw_path(name)

    def paths(self, names: tuple[str, ...] | None = None, records: dict[str, dict] | None = None) -> dict[str, Path]:
        """Where each of `names` (default: all) lives, by `records` (read if not given)."""
        records = self.records() if records is None else records
        return {n: self.file_path(n, records.get(n, {})) for n in (names or self.names)}

    # records ----------------------------------------------------------------------------------------------------
    def records(self) -> dict[str, dict]:
        """files.json, keeping only well-formed records of this source's own files (others logged and ignored)."""
        data = read_json(self.files_json)
        if data is None:
            return {}
        if not isinstance(data, dict):
            log.warning("%s is not a JSON object; its records are ignored and the files checked again", self.files_json)
            return {}
        good = {}
        for name, record in data.items():
            if name in self.names and valid_record(record) and ("path" not in record or self.external_path(record["path"])):
                good[name] = record
            else:
                log.warning("%s: ignoring the malformed or foreign record %r", self.files_json, str(name)[:80])
        return good

    def record(self, accepted: Any) -> None:
        """Record a file that passed its gate (arrival.Gate made `accepted`; nothing else is recorded)."""
        from .arrival import Accepted

        if not isinstance(accepted, Accepted) or accepted.gate.entry is not self:
            raise TypeError("Entry.record takes what this entry's Gate accepted")
        self._write_record(accepted.name, accepted.record)

    def _write_record(self, name: str, record: dict) -> None:
        self.secure()
        with contextlib.suppress(OSError):
            record = {**record, "mtime_ns": os.stat(self.file_path(name, record)).st_mtime_ns}
        files = self.records()
        files[self.check_name(name)] = record
        write_json(self.files_json, files)

    def touch_record(self, name: str, record: dict) -> None:
        """Remember a recorded file's new timestamp after it was checked whole (copied from another machine)."""
        with contextlib.suppress(CacheError):
            self._write_record(name, {k: v for k, v in record.items() if k != "damaged"})

    def add_sha256(self, name: str, record: dict, sha256: str) -> dict:
        """Keep a file's sha256 in its record (a pinned file recorded without one, say through a revision that has no
        pins): from then on it is checked against the sha256. Returns the new record."""
        record = {**record, "sha256": sha256}
        with contextlib.suppress(CacheError):
            self._write_record(name, record)
        return record

    def mark_damaged(self, name: str, what: str) -> None:
        """Flag a recorded file so that the next load replaces it (what `cache verify` does without --repair)."""
        records = self.records()
        if name in records:
            records[name] = {**records[name], "damaged": what}
            write_json(self.files_json, records)

    def forget(self, name: str) -> None:
        files = self.records()
        if files.pop(name, None) is not None:
            write_json(self.files_json, files)

    # manifests --------------------------------------------------------------------------------------------------
    def manifest(self, dtype: str) -> Manifest | None:
        return Manifest.parse(read_json(self.manifest_path(dtype)), self.names, dtype)

    def write_manifest(self, manifest: Manifest) -> None:
        self.secure()
        write_json(self.manifest_path(manifest.dtype), manifest.to_json())

    def mark_weights_damaged(self, dtype: str, what: str) -> None:
        data = read_json(self.manifest_path(dtype))
        if isinstance(data, dict):
            write_json(self.manifest_path(dtype), {**data, "damaged": what})

    def stored_dtypes(self) -> list[str]:
        """The dtypes whose manifests are here (valid or not: `verify` says which are wrong)."""
        return [d for d in DTYPES if regular_file(self.manifest_path(d)) is not None]

    def touch_used(self, dtype: str) -> None:
        """Remember that the weights of `dtype` were just loaded (the manifest's mtime; its content is unchanged)."""
        with contextlib.suppress(OSError):
            os.utime(self.manifest_path(dtype))


class Entry(EntryRecords):
    """An entry of the cache, with the only code that deletes its files (see the module docstring)."""

    def discard(self, name: str) -> None:
        """Delete a published file and its record: raw/{name} (a link there is unlinked, never followed), or for the
        hf source this commit's link in Hugging Face's cache and its blob, unless another link of the repo needs it."""
        self.secure()
        record = self.records().get(self.check_name(name))
        external = self.external_path(record.get("path")) if record else None
        if external is not None and self.external is not None:
            discard_external(self.external, external, damaged=True)
        unlink_entry(self.raw_path(name))
        self.forget(name)

    def discard_external(self, path: Path) -> bool:
        """Delete a file of this commit that the Hub's cache handed over and that failed its gate: the link and its
        blob, only when `path` is this commit's file in this repo's folder, reached through real folders. Whether
        its bytes are gone (a blob outside the repo's own blobs/ folder is left alone)."""
        link = self.external_path(str(path))
        if link is None or self.external is None:
            return False
        target = Path(os.path.realpath(link))
        discard_external(self.external, link, damaged=True)
        return not os.path.lexists(target)

    def discard_weights(self, dtype: str) -> None:
        """Delete the stored weights of a dtype (its manifest, and its own file if any)."""
        self.secure()
        unlink_entry(self.stored_path(dtype))
        unlink_entry(self.manifest_path(dtype))

    def own_files(self) -> dict[Path, tuple[str, ...]]:
        """Each folder of the entry, with the names of the files gpt2hub keeps there."""
        stored = tuple(f"{d}.{ext}" for d in DTYPES for ext in ("json", "safetensors"))
        return {self.raw: self.names, self.dir: ("files.json",), self.converted: stored}

    def partials(self) -> list[Path]:
        """Partial downloads and temporary files left by interrupted processes, recognised by the names gpt2hub
        gives them (`{file}.{pid}.incomplete`, `.{file}.XXXXXXXX.tmp`) and regular files only. Lists only: callers that
        delete them call `secure` first."""
        found = []
        incomplete = re.compile("(" + "|".join(map(re.escape, self.names)) + r")\.(\d+\.)?incomplete")
        for folder, finals in self.own_files().items():
            for p in _listing(folder):
                temp = _TEMPORARY.fullmatch(p.name)
                ours = (temp and temp.group(1) in finals) or (folder == self.raw and incomplete.fullmatch(p.name))
                if ours and regular_file(p) is not None:
                    found.append(p)
        return sorted(found)

    def remove(self, include_external: bool = False) -> tuple[int, list[Path]]:
        """Delete every file gpt2hub keeps for this entry, by name, then its folders if they are left empty.
        Returns (bytes freed, files left in place because gpt2hub did not write them)."""
        self.secure()
        freed = 0
        if include_external and self.external is not None:
            for record in self.records().values():
                if (path := self.external_path(record.get("path"))) is not None:
                    freed += discard_external(self.external, path)
        for path in self.partials():
            freed += _unlink_counted(path)
        for folder, finals in self.own_files().items():
            for name in finals:
                freed += _unlink_counted(folder / name)
        for folder in (self.raw, self.converted, self.dir):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: what gpt2hub did not write stays
        left = [p for folder in self.own_files() for p in _listing(folder)
                if (st := stat_entry(p)) is not None and not stat.S_ISDIR(st.st_mode)]
        return freed, left


def _listing(folder: Path) -> list[Path]:
    st = stat_entry(folder)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return []
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _unlink_counted(path: Path) -> int:
    """Unlink a regular file or link (never a folder, never through a link); the bytes a regular file freed."""
    st = stat_entry(path)
    if st is None or stat.S_ISDIR(st.st_mode):
        return 0
    unlink_entry(path)
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def discard_external(repo: Path, link: Path, damaged: bool = False) -> int:
    """Delete a file of a repo in Hugging Face's cache: the link (snapshots/{commit}/{name}) and the blob it points to,
    when that blob lies in the repo's `blobs/` and no other snapshot's link points to it, or the file is `damaged`
    (a blob is its content: the other links are as damaged, and huggingface_hub would hand it back instead of
    downloading it again; they download it on their next use). Returns the bytes freed."""
    blobs = Path(os.path.realpath(repo)) / "blobs"  # (the repo's folder may be linked to another disk; its blobs/ not)
    freed = 0
    with contextlib.suppress(OSError):
        target = link.resolve()
        st = stat_entry(blobs)
        if st is not None and stat.S_ISDIR(st.st_mode) and target.parent == blobs and regular_file(target):
            snapshots = Path(os.path.abspath(repo)) / "snapshots"  # every link below it, subfolders too (onnx/)
            links = [Path(d, n) for d, _, names in os.walk(snapshots) for n in names]  # (never into a linked folder)
            others = [p for p in links if p != Path(os.path.abspath(link)) and p.is_symlink() and p.resolve() == target]
            if damaged or not others:
                freed = _unlink_counted(target)
    unlink_entry(link)
    return freed
