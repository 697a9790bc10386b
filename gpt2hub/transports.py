"""Where published bytes come from: OpenAI's bucket and its mirrors, the Hugging Face Hub, a local folder.

A transport brings one named file at a time and hands it to the `Gate` the hub gives it (arrival.py): it never
decides what a file must be, and it cannot record a file the gate did not accept. Each transport also says which
entry of the cache its bytes belong to (`identity`: for the Hub, the revision resolved to a commit) and what is
known of its published files (`published`: pins and sizes).

- `OpenAIMirrors`: `{base}/{size}/{file}` from each base URL in turn (GPT2HUB_OPENAI_URL), resumed with Range,
  retried, a file failing its gate fetched once more from the same mirror and then from the next; a mirror that
  cannot be reached is skipped for the rest of the call. Files a user already has (the book's `models_dir`) are
  adopted through the same gate instead of downloaded.
- `HFHub`: `openai-community/gpt2*` through huggingface_hub (HF_ENDPOINT, HF_HOME); its files stay in Hugging
  Face's cache. A revision must be a valid git ref name; it is resolved to a commit once and remembered.
- `LocalFolder`: a folder of OpenAI's, Hugging Face's or gpt2hub's own files, read in place (nothing is fetched).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import urllib.parse
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from .arrival import Accepted, Gate
from .cache import COMMIT, Cache, Entry, EntryKey
from .download import MirrorDown, download
from .errors import CacheError, DownloadError, IntegrityError, OfflineError
from .files import CACHE_MODE, HEX, atomic_path, clone_file, disk_error, git_blob_sha1, regular_file, sha256_file
from .formats import FORMATS, Format, for_folder
from .published import Published
from .registry import ModelSpec, check_source
from .settings import progress_disabled

log = logging.getLogger("gpt2hub")
DEFAULT_OPENAI_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/models",
                       "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
SMALL, SMALL_LIMIT = ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe"), 4 << 20  # a few KB to 1 MB each


class Transport(Protocol):
    """What the hub needs of a source of published files."""

    key: str  # the cache's folder for it: "openai" or "hf"
    format: Format
    serves_offline: bool  # whether it can hand over files without the network (from a cache of its own)

    def external(self) -> Path | None: ...
    def identity(self, cache: Cache) -> EntryKey: ...
    def published(self) -> Published: ...
    def fetch(self, entry: Entry, gate: Gate, force: bool) -> Accepted: ...
    def done(self) -> None: ...


def for_source(source: str, spec: ModelSpec, revision: str | None, offline: bool, progress: bool = True,
               adopt_from: Path | None = None) -> Transport:
    """The transport of a source name ("openai" or "hf")."""
    if check_source(source) == "hf":
        return HFHub(spec, revision, offline, progress)
    if revision is not None:
        raise ValueError(f"revision={str(revision)[:60]!r} applies to source='hf' only; OpenAI's files have no revisions")
    return OpenAIMirrors(spec, progress, adopt_from)


def openai_bases() -> list[str]:
    """Base URLs tried in order: GPT2HUB_OPENAI_URL (several may be given, separated by spaces or commas)."""
    env = os.environ.get("GPT2HUB_OPENAI_URL", "").replace(",", " ").split()
    bad = [b for b in env if not re.match(r"https?://[^/\s]+", b)]
    if bad:
        raise ValueError(f"GPT2HUB_OPENAI_URL holds {bad[0][:100]!r}, not an http(s) URL: set it to base URLs such as "
                         f"{DEFAULT_OPENAI_URLS[0]}")
    return [b.rstrip("/") for b in env] or list(DEFAULT_OPENAI_URLS)


# OpenAI ---------------------------------------------------------------------------------------------------------
class OpenAIMirrors:
    """OpenAI's seven published files from `{base}/{size}/{file}`, bases tried in order."""

    key = "openai"
    format = FORMATS["openai"]
    serves_offline = False

    def __init__(self, spec: ModelSpec, progress: bool = True, adopt_from: Path | None = None,
                 bases: list[str] | None = None):
        self.spec, self.progress, self.adopt_from = spec, progress and not progress_disabled(), adopt_from
        self.bar: tqdm | None = None
        self.bases = bases if bases is not None else openai_bases()
        self.dead: dict[str, str] = {}  # mirrors that failed for this whole call, with why

    def identity(self, cache: Cache) -> EntryKey:
        return EntryKey("openai", self.spec.size)

    def external(self) -> Path | None:
        """None: OpenAI's files are kept in the entry's own raw/ folder."""
        return None

    def published(self) -> Published:
        return Published(f"{self.spec.name} (openai)", self.spec.expected_sha256("openai"),
                         self.spec.pinned_sizes("openai"), self.format.sizes(self.spec.arch))

    def fetch(self, entry: Entry, gate: Gate, force: bool) -> Accepted:
        """Put `gate.name` into `entry`, accepted by `gate`: a complete copy already there but not recorded (a crash
        between rename and record), the adopt folder's copy, or a mirror's."""
        name, dest = gate.name, entry.raw_path(gate.name)
        if not force and regular_file(dest) is not None:
            with contextlib.suppress(IntegrityError):
                return gate(dest).at(url=None)
        if os.path.lexists(dest):  # a link, a FIFO or a bad copy: removed, never followed
            entry.discard(name)
        if self.adopt_from is not None and not force and (accepted := self._adopt(self.adopt_from / name, gate, dest)):
            return accepted
        return self._download(entry, gate, dest)

    @staticmethod
    def _adopt(src: Path, gate: Gate, dest: Path) -> Accepted | None:
        """The user's own copy (the book's models_dir; a link to one is fine) if it passes the gate, cloned in."""
        if regular_file(src, follow=True) is None:
            return None
        try:
            accepted = gate(src)
        except IntegrityError as e:
            log.warning("%s %s; not used", src, e)
            return None
        with atomic_path(dest, CACHE_MODE) as tmp:
            clone_file(src, tmp)
        log.info("adopted %s from %s", gate.name, src)
        return accepted.at(url=f"file://{src.resolve()}")

    def _download(self, entry: Entry, gate: Gate, dest: Path) -> Accepted:
        """Each mirror in turn; a file failing its gate is fetched once more from the same mirror, then the next mirror
        is tried. A mirror that cannot be reached, or keeps answering 5xx, is skipped for the rest of the call."""
        reasons, bad_files = [], 0
        for base in self.bases:
            if base in self.dead:
                reasons.append(f"{base}: {self.dead[base]}")
                continue
            outcome = self._from_mirror(f"{base}/{self.spec.size}/{gate.name}", gate, dest, base)
            if isinstance(outcome, Accepted):
                return outcome
            reason, bad_file = outcome
            reasons.append(reason)
            bad_files += bad_file
            if len(self.bases) > 1:
                log.warning("%s; trying the next mirror", reason)
        error = IntegrityError if bad_files == len(reasons) else DownloadError  # every mirror served a bad file
        raise error(
            f"could not download {gate.name} of {self.spec.name} ({len(self.bases)} mirror(s) tried): "
            + " | ".join(reasons) + f". Cache folder: {entry.dir}. Check the network; GPT2HUB_OFFLINE=1 loads models "
            "already cached; GPT2HUB_OPENAI_URL picks another mirror; --source hf (with HF_ENDPOINT) uses the "
            "Hugging Face Hub")

    def _from_mirror(self, url: str, gate: Gate, dest: Path, base: str) -> Accepted | tuple[str, bool]:
        """The file, accepted; else (why this mirror failed, whether it served a bad file)."""
        for attempt in range(2):
            gate.entry.secure()  # a folder linked since the last attempt (another user of a shared cache) is removed
            try:
                accepted = download(url, dest, lambda part, digest: gate(part, digest, url), digest_kind=gate.digest_kind,
                                    expected_size=gate.expected_size, bar=self._bar(), tap=gate.tap,
                                    max_size=SMALL_LIMIT if gate.name in SMALL else 64 << 20)
                return accepted.at(url=url)
            except IntegrityError as e:
                if attempt == 0:
                    log.warning("%s; fetching it once more", e)
                    continue
                return str(e), True
            except DownloadError as e:  # unreachable, 4xx, repeated 5xx: this mirror failed this file
                reason = str(e)
                if isinstance(e, MirrorDown) or "HTTP 5" in reason or "attempts" in reason:
                    self.dead[base] = reason.removeprefix(url + ": ")
                return reason, False
        raise AssertionError("unreachable")

    def _bar(self) -> tqdm | None:
        """One progress bar for every file this call downloads (bytes of all files), made at the first one."""
        if self.bar is None and self.progress:
            self.bar = tqdm(desc=f"downloading {self.spec.name}", unit="B", unit_scale=True, unit_divisor=1024, total=0,
                            delay=0.5)
        return self.bar

    def done(self) -> None:
        """Close the progress bar of the downloads made so far."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Hugging Face ---------------------------------------------------------------------------------------------------
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^/|/$|^\.|/\.|\.lock$|\.lock/|\.$|^@$")


def check_revision(revision: object) -> str | None:
    """`revision` if it can name a git ref or commit (git's check-ref-format rules, at most 255 bytes), else a
    ValueError before any request: `..`, control characters, spaces, `~^:?*[\\`, a 5,000-character name."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not revision or len(revision.encode("utf-8", "replace")) > 255 \
            or _REF_FORBIDDEN.search(revision):
        shown = repr(revision)[:60] + ("..." if len(repr(revision)) > 60 else "")
        raise ValueError(f"revision={shown} cannot be a git branch, tag or commit (no '..', spaces, control characters "
                         "or ~^:?*[\\, at most 255 bytes): pass a branch such as main, a tag, or a commit hash")
    return revision


class HFHub:
    """`openai-community/gpt2*` through huggingface_hub; files stay in Hugging Face's cache, recorded by path."""

    key = "hf"
    format = FORMATS["hf"]
    serves_offline = True  # from Hugging Face's own cache

    def __init__(self, spec: ModelSpec, revision: str | None = None, offline: bool = False, progress: bool = True):
        self.spec, self.revision, self.offline, self.progress = spec, check_revision(revision), offline, progress
        self.commit: str | None = None
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.checked_network = False

    @property
    def ref(self) -> str:
        return self.revision or "main"

    def external(self) -> Path:
        """This repo's folder in Hugging Face's cache (HF_HUB_CACHE, HF_HOME), as huggingface_hub resolves it now:
        where its files stay. Its links resolved as huggingface_hub resolves them (a cache reached through a link,
        ~/.cache/huggingface -> /data/hf, hands out paths under /data/hf)."""
        import huggingface_hub.constants

        hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE).expanduser().resolve()
        return hub_cache / f"models--{self.spec.hf_repo.replace('/', '--')}"

    def identity(self, cache: Cache) -> EntryKey:
        """The entry of the commit this revision names: a commit hash as it is; a branch or tag as resolved earlier
        (remembered in the cache), else asked of the Hub (its config.json is fetched to learn the commit)."""
        if self.commit is None:
            if self.revision is not None and COMMIT.fullmatch(self.revision):
                self.commit = self.revision
            else:
                self.commit = (cache.refs(self.spec.size).get(self.ref) or cache.adopt_legacy_hf(self.spec.size, self.ref)
                               or self._resolve(cache))
        return EntryKey("hf", self.spec.size, self.commit)

    def _resolve(self, cache: Cache) -> str:
        path = self._hf_download(self.format.config_file, None, force=False)
        commit = path.parent.name
        if not COMMIT.fullmatch(commit):
            raise DownloadError(f"the Hugging Face Hub at {self.endpoint or 'huggingface.co'} gave {path} for "
                                f"{self.spec.hf_repo} revision {self.ref!r}, not a commit's file: check HF_ENDPOINT")
        try:
            cache.set_ref(self.spec.size, self.ref, commit)
        except CacheError as e:  # a read-only cache: what it holds of this commit still loads; asked again next time
            log.info("%s; %s not remembered", e, self.ref)
        return commit

    def published(self) -> Published:
        return Published(f"{self.spec.name} (hf {self.ref})", self.spec.expected_sha256("hf", self.revision),
                         self.spec.pinned_sizes("hf") if self.revision in (None, "main") else {})

    def fetch(self, entry: Entry, gate: Gate, force: bool) -> Accepted:
        """Fetch `gate.name` of this commit through huggingface_hub and hand it to the gate; a file the gate refuses
        is deleted with its blob (else Hugging Face's cache would hand it back) and the error names it."""
        path = self._hf_download(gate.name, self.commit, force)
        try:
            digest = self._check_blob(path, gate.digest_kind)
            return gate(path, digest).at(path=str(path), revision=self.ref, commit=self.commit)
        except IntegrityError as e:
            real = os.path.realpath(path)
            gone = entry.discard_external(path)  # only inside this repo's folder of Hugging Face's cache
            then = "it was deleted, run again to download it afresh" if gone else (
                f"its bytes at {real} lie outside this repo's folders in Hugging Face's cache (a linked folder?) and "
                "were left alone: delete that file by hand, then run again")
            raise IntegrityError(f"{gate.name} of {self.spec.hf_repo} ({path}) {e}; {then}") from None

    @staticmethod
    def _check_blob(path: Path, kind: str) -> str | None:
        """Check the bytes Hugging Face's cache hands over against the name of their blob, which is their sha256 (LFS
        files) or git blob id (others): a blob changed after its download (in place, by anyone) is refused, not
        adopted. Returns the file's `kind` digest when it was taken on the way (sha256), else None."""
        blob = os.path.basename(os.path.realpath(path))
        if HEX["sha256"].fullmatch(blob):
            got = sha256_file(path)
            if got != blob:
                raise IntegrityError(f"does not hash to the name of its blob in Hugging Face's cache (sha256 {got}): "
                                     "it changed after it was downloaded")
            return got if kind == "sha256" else None
        if COMMIT.fullmatch(blob) and git_blob_sha1(path) != blob:  # (a git object id, shaped as a commit's)
            raise IntegrityError("does not hash to the name of its blob in Hugging Face's cache (git blob id): it "
                                 "changed after it was downloaded")
        return None

    def done(self) -> None:
        """Nothing to close: huggingface_hub draws its own bars (HF_HUB_DISABLE_PROGRESS_BARS turns them off)."""

    def _hf_download(self, name: str, commit: str | None, force: bool) -> Path:
        from huggingface_hub import hf_hub_download

        if not self.offline:
            self._check_reachable()
        try:
            return Path(hf_hub_download(self.spec.hf_repo, name, revision=commit or self.ref, endpoint=self.endpoint,
                                        force_download=force, local_files_only=self.offline))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS):  # the disk's fault, not the network's
                raise disk_error(self.external(), e) from None
            raise self._failure(name, e) from None
        except Exception as e:  # huggingface_hub raises many kinds; each means the same to our caller
            raise self._failure(name, e) from None

    def _failure(self, name: str, e: Exception) -> Exception:
        from huggingface_hub.errors import RevisionNotFoundError

        where = f"{self.spec.hf_repo} (revision {self.ref})"
        if isinstance(e, RevisionNotFoundError):
            return DownloadError(f"revision {self.ref!r} does not exist in {self.spec.hf_repo} on the Hugging Face Hub "
                                 f"at {self.endpoint or 'huggingface.co'}: pass a branch, tag or commit it has")
        if self.offline:
            return OfflineError(f"{name} of {where} is not in the Hugging Face cache and network access is off "
                                "(GPT2HUB_OFFLINE/HF_HUB_OFFLINE or local_files_only): run once with network access")
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return DownloadError(f"could not get {name} of {where} from the Hugging Face Hub at "
                             f"{self.endpoint or 'huggingface.co'}: {first}. Check the network, HF_ENDPOINT and "
                             "--revision, or use --source openai")

    def _check_reachable(self) -> None:
        """Fail at once, naming the endpoint, when its host cannot be resolved or refuses connections (huggingface_hub
        would retry for over 20 s before saying the same)."""
        if self.checked_network:
            return
        url = urllib.parse.urlsplit(self.endpoint or "https://huggingface.co")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=10).close()
        except (socket.gaierror, ConnectionRefusedError) as e:
            raise DownloadError(f"cannot reach the Hugging Face Hub at {url.geturl()} ({e}): check the network and "
                                "HF_ENDPOINT, set GPT2HUB_OFFLINE=1 to use cached files only, or use --source openai") from None
        except OSError:
            pass  # slow or filtered: huggingface_hub's own timeouts decide
        self.checked_network = True


# a local folder -----------------------------------------------------------------------------------------------------
class LocalFolder:
    """A folder of OpenAI's (hparams.json), gpt2hub's own (gpt2hub.json) or Hugging Face's (config.json) files, read in
    place and checked; nothing is fetched and nothing is cached."""

    key = "folder"

    def __init__(self, folder: Path):
        fmt = for_folder(folder)
        if fmt is None:
            raise DownloadError(f"{folder} holds no hparams.json, gpt2hub.json or config.json: not a model folder")
        self.folder, self.format = folder, fmt

    @staticmethod
    def holds_model(name: object) -> bool:
        """Whether `name` is a folder holding a model's files in a format gpt2hub reads."""
        if not isinstance(name, (str, os.PathLike)) or len(os.fspath(name)) > 4096:
            return False
        with contextlib.suppress(OSError):
            return Path(name).is_dir() and for_folder(Path(name)) is not None
        return False

    def paths(self, names: tuple[str, ...]) -> dict[str, Path]:
        """The folder's files, each required to be a regular file (a FIFO or folder is refused without opening)."""
        out = {}
        for name in names:
            path = self.folder / name
            try:
                mode = os.stat(path).st_mode
            except OSError:
                raise DownloadError(f"{path} is missing: the folder {self.folder} must hold {', '.join(names)}") from None
            if not stat.S_ISREG(mode):
                raise DownloadError(f"{path} is not a regular file (a FIFO, device or folder): replace it with the file")
            out[name] = path
        return out

    def weight_paths(self) -> dict[str, Path]:
        fmt = self.format
        return self.paths(tuple(n for n in fmt.files if n not in fmt.tokenizer_files and n not in ("checkpoint",
                                                                                                  "model.ckpt.meta")))

    def tokenizer_paths(self) -> dict[str, Path]:
        return self.paths(self.format.tokenizer_files)
