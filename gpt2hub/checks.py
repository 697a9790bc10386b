"""What can be wrong with an entry of the cache: `verify() -> [Problem]`, the one check behind `gpt2hub cache verify`
and behind repair on load, so the two cannot drift.

A quick check trusts a file whose size and timestamp are those recorded; a full one re-hashes it. A file that
`cache verify` found damaged in place (its size and timestamp kept) is flagged in its record (`mark`), so that the
next load, quick as it is, replaces it: what verify says will happen, happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .cache import Entry, Manifest
from .errors import CacheError
from .files import crc32c_file, digest_kind, matches_record, regular_file, stat_entry

NEXT_LOAD = {"file": "it is downloaded again on the next load", "weights": "they are prepared again on the next load"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the cache: the file, what is wrong, and what happens next."""

    path: Path
    what: str
    action: str
    name: str = ""  # the published file's name, or "" for stored weights
    dtype: str = ""  # the dtype of stored weights or their manifest

    def __str__(self) -> str:
        return f"{self.path}: {self.what}; {self.action}"


def check_file(entry: Entry, name: str, record: dict | None, quick: bool = False) -> Problem | None:
    """What is wrong with one published file, or None. `quick` trusts a file whose size and mtime are unchanged."""
    if record is None:
        return Problem(entry.raw_path(name), "not downloaded", "it is downloaded on the next load", name)
    path = entry.file_path(name, record)
    st = regular_file(path) if "path" not in record else stat_entry(path, follow=True)
    if st is None or not stat.S_ISREG(st.st_mode):
        what = "missing" if not os.path.lexists(path) else "not a regular file (a link, folder or FIFO)"
        return Problem(path, what, NEXT_LOAD["file"], name)
    if isinstance(record.get("damaged"), str):
        return Problem(path, f"{record['damaged']} (found by `gpt2hub cache verify`)", NEXT_LOAD["file"], name)
    if st.st_size != record["size"]:
        return Problem(path, f"{st.st_size} bytes, recorded {record['size']}", NEXT_LOAD["file"], name)
    if quick and st.st_mtime_ns == record.get("mtime_ns"):
        return None
    if not matches_record(path, record):
        return Problem(path, f"damaged ({digest_kind(record)} differs from {entry.files_json.name})", NEXT_LOAD["file"],
                       name)
    if st.st_mtime_ns != record.get("mtime_ns"):  # whole but touched (copied from another machine): remember it
        entry.touch_record(name, record)
    return None


def check_weights(entry: Entry, dtype: str, quick: bool = False, manifest: Manifest | None = None) -> Problem | None:
    """What is wrong with the stored weights of one dtype (its manifest, read unless given, and unless mapped its
    file), or None."""
    path = entry.manifest_path(dtype)
    m = manifest or entry.manifest(dtype)
    if m is None:
        what = "missing" if not os.path.lexists(path) else "unreadable, damaged or from another gpt2hub version"
        return Problem(path, what, NEXT_LOAD["weights"], dtype=dtype)
    if entry.config is not None and not entry.config.same_model(m.config):
        return Problem(path, "describes another model", NEXT_LOAD["weights"], dtype=dtype)
    if m.kind == "quantized" and (stale := _stale(m)) is not None:
        return Problem(path, stale, NEXT_LOAD["weights"], dtype=dtype)
    if m.kind == "mapped":
        return None  # the mapped file is a published file: check_file covers it
    weights = entry.stored_path(dtype)
    st = regular_file(weights)
    if st is None or st.st_size != m.bytes:
        return Problem(weights, "missing or of the wrong size", NEXT_LOAD["weights"], dtype=dtype)
    if quick and st.st_mtime_ns == m.mtime_ns:
        return None
    if crc32c_file(weights) != m.crc32c:
        return Problem(weights, f"damaged (crc32c differs from {path.name})", NEXT_LOAD["weights"], dtype=dtype)
    if st.st_mtime_ns != m.mtime_ns:  # whole but touched: remember, so the next load need not read it again
        with contextlib.suppress(CacheError):  # a read-only cache: checked in full again next time
            entry.write_manifest(dataclasses.replace(m, mtime_ns=st.st_mtime_ns))
    return None


def _stale(m: Manifest) -> str | None:
    """What makes stored weights another gpt2hub's (quantized otherwise), or None."""
    from .storage import storage_for  # imports torch: only for a manifest of quantized weights

    return storage_for(m.dtype).stale(m)


def verify(entry: Entry, names: tuple[str, ...] | None = None, dtypes: tuple[str, ...] | None = None,
           quick: bool = False, records: dict[str, dict] | None = None,
           manifests: dict[str, Manifest] | None = None, secure: bool = True) -> list[Problem]:
    """Every problem of the given published files (default: all) and stored dtypes (default: those present);
    `records` and `manifests` are what the caller already read (read here otherwise). With `secure` (the load path)
    a link or file where one of the entry's folders belongs is removed first; without it (listing, `cache verify`)
    it is a problem of its own and nothing is touched."""
    if secure:
        entry.secure()
    elif misplaced := entry.misplaced():
        return [Problem(f, "a link or file where gpt2hub keeps a folder", "it is removed (never followed) and what "
                        "belongs there fetched or prepared again on the next load") for f in misplaced]
    records = entry.records() if records is None else records
    problems = [p for n in (entry.names if names is None else names)
                if (p := check_file(entry, n, records.get(n), quick)) is not None]
    for dtype in entry.stored_dtypes() if dtypes is None else dtypes:
        if (problem := check_weights(entry, dtype, quick, (manifests or {}).get(dtype))) is not None:
            problems.append(problem)
    return problems


def mark(entry: Entry, problems: list[Problem]) -> None:
    """Flag what `verify` found, so that the next load repairs it even where a quick check could not tell."""
    for p in problems:
        if p.dtype:
            entry.mark_weights_damaged(p.dtype, p.what)
        elif p.what != "not downloaded":
            entry.mark_damaged(p.name, p.what)
