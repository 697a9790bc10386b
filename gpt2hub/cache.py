"""The cache: layout, records, verification, and the only code that deletes (files.py writes, inventory.py lists).

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
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .errors import CacheError
from .files import (
    HEX,
    crc32c_file,
    digest_kind,
    hold_lock,
    matches_record,
    read_json,
    real_folder,
    regular_file,
    remove_tree,
    stat_entry,
    unlink_entry,
    valid_record,
    write_json,
)
from .registry import DTYPE_NAMES, MAPPED_DTYPES, SOURCE_FILES, SOURCES

log = logging.getLogger("gpt2hub")
FORMAT_VERSION = 2
KINDS = ("mapped", "converted")


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
        if kind == "converted" and not (isinstance(crc, str) and HEX["crc32c"].fullmatch(crc)):
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
        st = regular_file(path) if "path" not in record else stat_entry(path, follow=True)
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
        return path if all((st := stat_entry(p)) is None or stat.S_ISDIR(st.st_mode) for p in folders) else None

    def secure(self) -> None:
        """Make every folder from the cache root down to this model's files a real folder of the cache: a link (or a
        file) where one belongs is removed, the link itself, never what it points to. Called before any write."""
        for folder in (self.root / self.source, self.dir, self.raw, self.dir / "converted"):
            real_folder(folder)

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
        unlink_entry(self.raw_path(name))
        self.forget_file(name)

    def _discard_external(self, link: Path) -> None:
        if self.external_root is None:  # never: `_external` finds no link without a root
            return
        blobs = Path(os.path.abspath(self.external_root)) / "blobs"
        with contextlib.suppress(OSError):
            target = link.resolve()
            if (st := stat_entry(blobs)) is not None and stat.S_ISDIR(st.st_mode) and target.parent == blobs \
                    and regular_file(target):
                target.unlink()
        unlink_entry(link)

    def discard_weights(self, dtype: str) -> None:
        """Delete the stored weights of a dtype (its manifest, and its converted file if any)."""
        self.secure()
        unlink_entry(self.converted_path(dtype))
        unlink_entry(self.manifest_path(dtype))

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
        return remove_tree(self.dir)

    # lock -----------------------------------------------------------------------------------------------------
    def lock(self, why: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold this model's lock (see `hold_lock`)."""
        return hold_lock(self.lock_path, why, timeout)


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
                      if (st := stat_entry(d)) is not None and stat.S_ISDIR(st.st_mode)]
    return found


def touch_used(m: ModelCache, dtype: str) -> None:
    """Remember that the weights of `dtype` were just loaded (the manifest's mtime; its content is unchanged)."""
    with contextlib.suppress(OSError):
        os.utime(m.manifest_path(dtype))
