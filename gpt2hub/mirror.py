"""A folder in OpenAI's layout made from the cache, for other machines to download from.

    {folder}/{size}/{file}    each of the seven published files: a copy (a reflink where the filesystem has them,
                              else copy_file_range), so that editing the mirror never changes the cache; with
                              `link=True` (`--link`), a hard link: no second copy on disk, but an edit in place then
                              reaches the cache too (its files are read-only to make that hard)
    {folder}/SHA256SUMS       `sha256sum -c` format, paths relative to the folder

Files are written with the process's umask (0644 by default), so a web server running as another user reads them.

Serve the folder with any static HTTP server and set GPT2HUB_OPENAI_URL to it on the other machines: they download
from it as from OpenAI's bucket, with every arrival check and pin applied as usual.

What is mirrored is exactly what the cache recorded: each file must pass the cache's own check (`verify`), must be a
regular file lying in the cache itself (no link anywhere below the cache root), and the bytes that land in the
folder are hashed and compared with the file's record before they appear under their final name. A file kept under
GPT2HUB_IGNORE_PINS=1 is refused unless that opt-out is set now.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .cache import Cache, Entry, EntryKey, enclosing_cache
from .checks import verify
from .errors import CacheError, IntegrityError, UnknownModelError
from .files import (
    atomic_path,
    atomic_write,
    clone_file,
    crc32c_file,
    default_root,
    disk_errors,
    regular_file,
    sha256_file,
    user_mode,
)
from .registry import OPENAI_FILES, ModelSpec, resolve
from .transports import OpenAIMirrors

log = logging.getLogger("gpt2hub")
SUMS = "SHA256SUMS"
_SUM_LINE = re.compile(r"([0-9a-f]{64}) [ *]([A-Za-z0-9._-]+/[A-Za-z0-9._-]+)")


@dataclass(frozen=True)
class MirroredFile:
    """One file written into the mirror: where, its size and sha256, and how: "reflink", "copy_file_range", "copy" or
    "link" (a hard link, with --link)."""

    path: Path
    size: int
    sha256: str
    how: str


def write_mirror(folder: str | Path, names: list[str] | None = None, cache_dir: str | Path | None = None,
                 link: bool = False) -> list[MirroredFile]:
    """Write the cached published files of `names` (default: every model whose seven OpenAI files are all cached)
    into `folder` in OpenAI's layout, `{size}/{file}`, plus `SHA256SUMS`; returns what was written.

    Each file is checked against its cache record and refused (IntegrityError) if damaged; a model not fully cached
    is an error (CacheError) naming the command that fetches it. Files appear atomically; running again replaces them.
    `link=True` hard-links instead of copying (see the module docstring: an edit of the mirror then reaches the cache).
    """
    cache = Cache(Path(cache_dir) if cache_dir is not None else default_root())
    if not cache.open_existing("mirroring from"):
        raise CacheError(f"there is no gpt2hub cache at {cache.root}: run `gpt2hub download NAME` first (or set "
                         "GPT2HUB_CACHE to the cache to mirror)")
    folder = Path(folder)
    _outside_caches(folder)
    chosen = [_named_entry(cache, n) for n in names] if names else _complete_entries(cache)
    written = [f for entry in chosen for f in _mirror_model(entry, folder, link)]
    _write_sums(folder, written, {e.key.size for e in chosen})
    return written


def _outside_caches(folder: Path) -> None:
    """Refuse a folder that is or lies in a gpt2hub cache, links resolved (the cache keeps only its own files)."""
    if (inside := enclosing_cache(folder)) is not None:
        raise CacheError(f"not mirroring into {folder}: it lies in the gpt2hub cache at {inside}, which keeps only its "
                         "own files; mirror into a folder of your own")


def _openai_entry(cache: Cache, spec: ModelSpec) -> Entry:
    return cache.entry(EntryKey("openai", spec.size), OPENAI_FILES, spec.arch)


def _named_entry(cache: Cache, name: str) -> Entry:
    """The openai entry of one named model; an error naming the fix unless all seven files are recorded."""
    spec = resolve(name)
    entry = _openai_entry(cache, spec)
    missing = [n for n in OPENAI_FILES if n not in entry.records()]
    if missing:
        raise CacheError(f"{spec.name} is not fully cached in {entry.dir} (missing {', '.join(missing)}): run "
                         f"`gpt2hub download {spec.name}` first, then mirror it")
    return entry


def _complete_entries(cache: Cache) -> list[Entry]:
    found = []
    for key in cache.entry_keys():
        spec = _spec(key.size) if key.source == "openai" else None
        if spec is not None and set(OPENAI_FILES) <= set((entry := _openai_entry(cache, spec)).records()):
            found.append(entry)
    if not found:
        raise CacheError(f"no model in the cache at {cache.root} has all seven of OpenAI's files: run `gpt2hub "
                         "download NAME` first (or set GPT2HUB_CACHE to the cache to mirror)")
    return found


def _mirror_model(entry: Entry, folder: Path, link: bool) -> list[MirroredFile]:
    """Check one model's cached files (refusing any problem), then put each into `folder/{size}/`."""
    problems = verify(entry, OPENAI_FILES, (), quick=True)
    if problems:
        raise IntegrityError(f"not mirroring {entry.key.size}: {problems[0]}. Load the model once (or `gpt2hub "
                             "download`) to repair it, then mirror again")
    _outside_caches(folder / entry.key.size)  # (a link there into the cache: its files would be replaced by copies)
    spec = _spec(entry.key.size)
    records = entry.records()
    if spec is not None:  # a file kept under GPT2HUB_IGNORE_PINS is refused unless the opt-out is set now
        OpenAIMirrors(spec, progress=False, bases=[]).published().check_records(
            records, str(entry.dir), f"run `gpt2hub cache rm {spec.name}` and download the published files")
    return [_mirror_file(entry, name, records[name], folder / entry.key.size / name, link) for name in OPENAI_FILES]


def _spec(size: str) -> ModelSpec | None:
    try:
        return resolve(size)
    except UnknownModelError:
        return None  # registered by another process: no pins are known here


def _inside_cache(entry: Entry, name: str) -> Path:
    """The cached file's path, refused unless it is a regular file and no link lies between it and the cache root."""
    path = entry.raw_path(name)
    expected = Path(os.path.realpath(entry.cache.root)).joinpath(*entry.key.parts, "raw", name)
    if regular_file(path) is None or Path(os.path.realpath(path)) != expected:
        raise IntegrityError(f"not mirroring {path}: it is not a regular file inside the cache (a link leads out of "
                             f"{entry.cache.root}); run `gpt2hub cache rm {entry.key.size}` and download it again")
    return path


def _mirror_file(entry: Entry, name: str, record: dict, dest: Path, link: bool) -> MirroredFile:
    """Copy (or, with `link`, hard-link) one cached file to `dest`, atomically, after hashing the bytes that will
    appear there."""
    src = _inside_cache(entry, name)
    with atomic_path(dest, None if link else user_mode()) as tmp:  # a link shares the cache's inode and its mode
        how = _link(src, tmp) if link else clone_file(src, tmp)
        digest = sha256_file(tmp)
        if not _matches(tmp, record, digest):
            raise IntegrityError(f"not mirroring {src}: its bytes differ from its record in {entry.files_json} "
                                 f"(damaged on disk): run `gpt2hub cache rm {entry.key.size}`, download it again, then "
                                 "mirror again")
        size = os.path.getsize(tmp)
    log.info("mirrored %s -> %s (%s)", src, dest, how)
    return MirroredFile(dest, size, digest, how)


def _link(src: Path, tmp: Path) -> str:
    """A hard link to `src` at `tmp` (asked for with --link); a copy where the filesystem cannot link."""
    os.unlink(tmp)
    try:
        os.link(src, tmp, follow_symlinks=False)
    except OSError as e:  # another filesystem (EXDEV), or one without hard links
        log.warning("cannot hard-link %s into %s (%s); copying instead", src, tmp.parent, e.strerror or e)
        return clone_file(src, tmp)
    if not os.path.samestat(os.lstat(tmp), os.lstat(src)):
        raise IntegrityError(f"{src} changed while it was being mirrored to {tmp.parent}: run the command again")
    return "link"


def _matches(path: Path, record: dict, sha256: str) -> bool:
    if os.path.getsize(path) != record["size"]:
        return False
    return sha256 == record["sha256"] if "sha256" in record else crc32c_file(path) == record["crc32c"]


def _write_sums(folder: Path, written: list[MirroredFile], sizes: set[str]) -> None:
    """SHA256SUMS: the files just written, plus earlier lines of other models whose files are still there."""
    lines, text = {}, ""
    if regular_file(folder / SUMS, follow=True) is not None:  # (a FIFO would block, a folder cannot be read)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = (folder / SUMS).read_text()
    for line in text.splitlines():
        m = _SUM_LINE.fullmatch(line)
        if m and m.group(2).split("/")[0] not in sizes and os.path.lexists(folder / m.group(2)):
            lines[m.group(2)] = m.group(1)
    for f in written:
        lines[f.path.relative_to(folder).as_posix()] = f.sha256
    with disk_errors(folder / SUMS), atomic_write(folder / SUMS, file_mode=user_mode()) as out:
        out.writelines(f"{digest}  {path}\n" for path, digest in sorted(lines.items()))
