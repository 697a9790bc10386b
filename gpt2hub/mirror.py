"""A folder in OpenAI's layout made from the cache, for other machines to download from.

    {folder}/{size}/{file}    each of the seven published files: a hard link to the cached file where the folder
                              is on the cache's filesystem, else a reflink or copy
    {folder}/SHA256SUMS       `sha256sum -c` format, paths relative to the folder

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

from .cache import ModelCache, cached_models, model_cache
from .errors import CacheError, IntegrityError, UnknownModelError
from .files import atomic_path, atomic_write, crc32c_file, default_root, disk_errors, regular_file, sha256_file
from .hub import Hub
from .registry import OPENAI_FILES, ModelSpec, resolve
from .sources import OpenAISource, clone_file

log = logging.getLogger("gpt2hub")
SUMS = "SHA256SUMS"
_SUM_LINE = re.compile(r"([0-9a-f]{64}) [ *]([A-Za-z0-9._-]+/[A-Za-z0-9._-]+)")


@dataclass(frozen=True)
class MirroredFile:
    """One file written into the mirror: where, its size and sha256, and "link" (hard link) or "copy"."""

    path: Path
    size: int
    sha256: str
    how: str


def write_mirror(folder: str | Path, names: list[str] | None = None,
                 cache_dir: str | Path | None = None) -> list[MirroredFile]:
    """Write the cached published files of `names` (default: every model whose seven OpenAI files are all cached)
    into `folder` in OpenAI's layout, `{size}/{file}`, plus `SHA256SUMS`; returns what was written.

    Each file is checked against its cache record and refused (IntegrityError) if damaged; a model not fully cached
    is an error (CacheError) naming the command that fetches it. Files appear atomically; running again replaces them.
    """
    root = Path(cache_dir) if cache_dir is not None else default_root()
    folder = Path(folder)
    caches = [_named_cache(root, n) for n in names] if names else _complete_caches(root)
    written = [f for cache in caches for f in _mirror_model(cache, folder)]
    _write_sums(folder, written, {c.size for c in caches})
    return written


def _named_cache(root: Path, name: str) -> ModelCache:
    """The openai cache of one named model; an error naming the fix unless all seven files are recorded."""
    spec = resolve(name)
    cache = model_cache(root, "openai", spec.size)
    missing = [n for n in OPENAI_FILES if n not in cache.records()]
    if missing:
        raise CacheError(f"{spec.name} is not fully cached in {cache.dir} (missing {', '.join(missing)}): run "
                         f"`gpt2hub download {spec.name}` first, then mirror it")
    return cache


def _complete_caches(root: Path) -> list[ModelCache]:
    found = [m for m in cached_models(root) if m.source == "openai" and set(OPENAI_FILES) <= set(m.records())]
    if not found:
        raise CacheError(f"no model in the cache at {root} has all seven of OpenAI's files: run `gpt2hub download "
                         "NAME` first (or set GPT2HUB_CACHE to the cache to mirror)")
    return found


def _mirror_model(cache: ModelCache, folder: Path) -> list[MirroredFile]:
    """Check one model's cached files (refusing any problem), then put each into `folder/{size}/`."""
    problems = cache.verify(OPENAI_FILES, (), quick=True)
    if problems:
        raise IntegrityError(f"not mirroring {cache.size}: {problems[0]}. Load the model once (or `gpt2hub "
                             "download`) to repair it, then mirror again")
    spec = _spec(cache.size)
    if spec is not None:  # a file kept under GPT2HUB_IGNORE_PINS is refused unless the opt-out is set now
        Hub(spec, OpenAISource(spec, progress=False, bases=[]), cache, offline_=True, progress=False).check_pins()
    records = cache.records()
    return [_mirror_file(cache, name, records[name], folder / cache.size / name) for name in OPENAI_FILES]


def _spec(size: str) -> ModelSpec | None:
    try:
        return resolve(size)
    except UnknownModelError:
        return None  # registered by another process: no pins are known here


def _inside_cache(cache: ModelCache, name: str) -> Path:
    """The cached file's path, refused unless it is a regular file and no link lies between it and the cache root."""
    path = cache.raw_path(name)
    expected = Path(os.path.realpath(cache.root)) / cache.source / cache.size / "raw" / name
    if regular_file(path) is None or Path(os.path.realpath(path)) != expected:
        raise IntegrityError(f"not mirroring {path}: it is not a regular file inside the cache (a link leads out of "
                             f"{cache.root}); run `gpt2hub cache rm {cache.size}` and download it again")
    return path


def _mirror_file(cache: ModelCache, name: str, record: dict, dest: Path) -> MirroredFile:
    """Link (else clone) one cached file to `dest`, atomically, after hashing the bytes that will appear there."""
    src = _inside_cache(cache, name)
    with atomic_path(dest) as tmp:
        how = _link_or_copy(src, tmp)
        if how == "link" and not os.path.samestat(os.lstat(tmp), os.lstat(src)):
            raise IntegrityError(f"{src} changed while it was being mirrored to {dest}: run the command again")
        digest = sha256_file(tmp)
        if not _matches(tmp, record, digest):
            raise IntegrityError(f"not mirroring {src}: its bytes differ from its record in {cache.files_manifest} "
                                 f"(damaged on disk): run `gpt2hub cache rm {cache.size}`, download it again, then mirror again")
        size = os.path.getsize(tmp)
    log.info("mirrored %s -> %s (%s)", src, dest, how)
    return MirroredFile(dest, size, digest, how)


def _link_or_copy(src: Path, tmp: Path) -> str:
    """Put `src`'s content at the (empty, just created) `tmp`: a hard link where the filesystem allows, else a clone."""
    os.unlink(tmp)
    try:
        os.link(src, tmp, follow_symlinks=False)
        return "link"
    except OSError as e:  # another filesystem (EXDEV), or one without hard links
        log.info("cannot hard-link %s into %s (%s); copying", src, tmp.parent, e.strerror or e)
    clone_file(src, tmp)
    return "copy"


def _matches(path: Path, record: dict, sha256: str) -> bool:
    if os.path.getsize(path) != record["size"]:
        return False
    return sha256 == record["sha256"] if "sha256" in record else crc32c_file(path) == record["crc32c"]


def _write_sums(folder: Path, written: list[MirroredFile], sizes: set[str]) -> None:
    """SHA256SUMS: the files just written, plus earlier lines of other models whose files are still there."""
    lines = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (folder / SUMS).read_text().splitlines():
            m = _SUM_LINE.fullmatch(line)
            if m and m.group(2).split("/")[0] not in sizes and os.path.lexists(folder / m.group(2)):
                lines[m.group(2)] = m.group(1)
    for f in written:
        lines[f.path.relative_to(folder).as_posix()] = f.sha256
    with disk_errors(folder / SUMS), atomic_write(folder / SUMS) as out:
        out.writelines(f"{digest}  {path}\n" for path, digest in sorted(lines.items()))
