"""Where published files come from, and how each is trusted the moment it arrives.

A source knows its file list, fetches one file into the cache (validated before it is recorded), reads the model's
config, and hands out the weights by OpenAI's variable names. Three sources:
- `OpenAISource`: OpenAI's bucket and its mirrors, tried in order (a dead mirror is skipped for the rest of the call).
- `HFSource`: `openai-community/gpt2*` through `huggingface_hub` (its own cache holds the files).
- `FolderSource`: a local folder of OpenAI's or Hugging Face's files, read in place; also used to adopt files a user
  already has (the book's `models_dir`) instead of downloading them again.

What each file must be on arrival (else it is deleted, never recorded, and the next mirror is tried):
hparams.json / config.json a JSON object of positive integers matching the model; `checkpoint` names model.ckpt;
model.ckpt.index a whole tensor-bundle index (magic, every block's crc32c) holding exactly the tensors the model's
n_layer implies, inside the data file's size; model.safetensors a header with exactly those tensors; vocabulary files
well-formed; every file its exact size where known and its pinned sha256.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeGuard

from tqdm.auto import tqdm

from . import names
from .cache import ModelCache
from .download import MirrorDown, Tap, download, progress_disabled
from .errors import ConversionError, DownloadError, IntegrityError, OfflineError
from .files import DIGESTS, atomic_path, ignore_pins, kind_for, regular_file
from .registry import (
    DATA_FILE,
    HF_FILES,
    HF_TOKENIZER_FILES,
    HF_WEIGHTS,
    INDEX_FILE,
    OPENAI_FILES,
    OPENAI_TOKENIZER_FILES,
    ModelSpec,
)
from .tf_checkpoint import TFCheckpoint
from .validate import (
    check_checkpoint_file,
    check_config,
    check_index,
    check_protobuf,
    check_safetensors,
    check_vocab,
    read_json_file,
)

log = logging.getLogger("gpt2hub")
DEFAULT_OPENAI_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/models",
                       "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
Getter = Callable[[str], Any]
SMALL, SMALL_LIMIT = ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe"), 4 << 20  # a few KB to 1 MB each


def openai_bases() -> list[str]:
    """Base URLs tried in order: GPT2HUB_OPENAI_URL (several may be given, separated by spaces or commas)."""
    env = os.environ.get("GPT2HUB_OPENAI_URL", "").replace(",", " ").split()
    bad = [b for b in env if not re.match(r"https?://[^/\s]+", b)]
    if bad:
        raise ValueError(f"GPT2HUB_OPENAI_URL holds {bad[0][:100]!r}, not an http(s) URL: set it to base URLs such as "
                         f"{DEFAULT_OPENAI_URLS[0]}")
    return [b.rstrip("/") for b in env] or list(DEFAULT_OPENAI_URLS)


class Source(Protocol):
    key: str
    pins: dict[str, str]
    files: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    weights_file: str

    def fetch(self, cache: ModelCache, name: str, force: bool, tap: Tap | None = None) -> dict: ...
    def done(self) -> None: ...
    def validate(self, name: str, path: Path) -> None: ...
    def config(self, paths: dict[str, Path]) -> dict: ...
    def tensors(self, paths: dict[str, Path], verify: bool) -> Getter: ...


# OpenAI ---------------------------------------------------------------------------------------------------------
class OpenAISource:
    """OpenAI's seven published files from `{base}/{size}/{file}`, bases tried in order."""

    key = "openai"
    files: tuple[str, ...] = OPENAI_FILES  # typed as Source declares them (a fixed-length tuple would not match)
    tokenizer_files: tuple[str, ...] = OPENAI_TOKENIZER_FILES
    weights_file = DATA_FILE

    def __init__(self, spec: ModelSpec, progress: bool = True, adopt_from: Path | None = None,
                 bases: list[str] | None = None):
        self.spec, self.progress, self.adopt_from = spec, progress and not progress_disabled(), adopt_from
        self.bar: tqdm | None = None
        self.bases = bases if bases is not None else openai_bases()
        self.dead: dict[str, str] = {}  # mirrors that failed for this whole call, with why
        self.pins = spec.expected_sha256("openai")
        # a pinned file's size is part of its pin; the data file's follows from the architecture and always holds
        self.sizes = {n: v for n, v in spec.expected_sizes().items() if n == DATA_FILE or not ignore_pins()}

    def validate(self, name: str, path: Path) -> None:
        """Raise IntegrityError unless `path` is a plausible `name` for this model (see the module docstring)."""
        if name == "hparams.json":
            check_config(read_json_file(path, name), self.spec, name)
        elif name == "checkpoint":
            check_checkpoint_file(path)
        elif name == INDEX_FILE:
            check_index(path, self.spec.config(), self.sizes.get(DATA_FILE))
        elif name in self.tokenizer_files:
            check_vocab(name, path)
        elif name == "model.ckpt.meta":
            check_protobuf(path, name)

    def _accept(self, name: str, path: Path) -> dict | None:
        """The record of a local file that passes every arrival check (size, pin, validation), else None."""
        st = regular_file(path, follow=True)
        if st is None or (name in self.sizes and st.st_size != self.sizes[name]):
            return None
        pin = self.pins.get(name)
        kind = kind_for(pin)
        digest = DIGESTS[kind](path)
        if pin and digest != pin and not _pins_ignored(name, path):
            return None
        try:
            self.validate(name, path)
        except IntegrityError as e:
            log.warning("%s %s; not used", path, e)
            return None
        return {"size": st.st_size, kind: digest}

    def fetch(self, cache: ModelCache, name: str, force: bool, tap: Tap | None = None) -> dict:
        """Put `name` into the cache, validated: an unrecorded complete copy, the adopt folder's copy, or a mirror's."""
        dest = cache.raw_path(name)
        if not force and regular_file(dest) and (record := self._accept(name, dest)) is not None:
            return {**record, "url": None}  # complete but unrecorded (a crash between rename and record)
        if os.path.lexists(dest) and not regular_file(dest):  # a link or a FIFO: removed, never followed
            cache.discard(name)
        if self.adopt_from is not None and not force and (record := self._adopt(self.adopt_from, name, dest)) is not None:
            return record
        return self._download(cache, name, dest, tap)

    def _adopt(self, folder: Path, name: str, dest: Path) -> dict | None:
        src = folder / name
        record = self._accept(name, src) if src.is_file() else None  # the user's own file: a link to one is fine
        if record is None:
            return None
        with atomic_path(dest) as tmp:
            clone_file(src, tmp)
        log.info("adopted %s from %s", name, src)
        return {**record, "url": f"file://{src.resolve()}"}

    def _download(self, cache: ModelCache, name: str, dest: Path, tap: Tap | None) -> dict:
        """Each mirror in turn; a file failing its checks is fetched once more from the same mirror, then the next
        mirror is tried. A mirror that cannot be reached, or keeps answering 5xx, is skipped for the rest of the call."""
        reasons, integrity = [], 0
        for base in self.bases:
            if base in self.dead:
                reasons.append(f"{base}: {self.dead[base]}")
                continue
            url = f"{base}/{self.spec.size}/{name}"
            for attempt in range(2):
                try:
                    record = download(url, dest, expected_size=self.sizes.get(name),
                                      expected_sha256=self.pins.get(name), validate=lambda p: self.validate(name, p),
                                      bar=self._bar(), max_size=SMALL_LIMIT if name in SMALL else 64 << 20, tap=tap)
                    return {**record, "url": url}
                except IntegrityError as e:
                    reason, bad_file = str(e), True
                    if attempt == 0:
                        log.warning("%s; fetching it once more", e)
                        continue
                except DownloadError as e:  # unreachable, 4xx, repeated 5xx: this mirror failed this file
                    reason, bad_file = str(e), False
                    if isinstance(e, MirrorDown) or "HTTP 5" in reason or "attempts" in reason:
                        self.dead[base] = reason.removeprefix(url + ": ")
                break
            reasons.append(reason)
            integrity += bad_file
            if len(self.bases) > 1:
                log.warning("%s; trying the next mirror", reason)
        error = IntegrityError if integrity == len(reasons) else DownloadError  # every mirror served a bad file
        raise error(
            f"could not download {name} of {self.spec.name} ({len(self.bases)} mirror(s) tried): "
            + " | ".join(reasons) + f". Cache folder: {cache.dir}. Check the network; GPT2HUB_OFFLINE=1 loads models "
            "already cached; GPT2HUB_OPENAI_URL picks another mirror; --source hf (with HF_ENDPOINT) uses the "
            "Hugging Face Hub")

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

    def config(self, paths: dict[str, Path]) -> dict:
        return check_config(read_json_file(paths["hparams.json"], "hparams.json"), self.spec, str(paths["hparams.json"]))

    @staticmethod
    def tensors(paths: dict[str, Path], verify: bool) -> Getter:
        ckpt = TFCheckpoint(paths[INDEX_FILE].with_suffix(""))  # model.ckpt, never a prefix read from disk

        def get(name: str) -> Any:
            if f"model/{name}" not in ckpt.entries:
                raise KeyError(name)
            return ckpt.read(f"model/{name}", verify)

        return get


def _pins_ignored(name: str, path: Path) -> bool:
    if ignore_pins():
        log.warning("%s differs from the published %s's pinned sha256; used because GPT2HUB_IGNORE_PINS is set",
                    path, name)
        return True
    return False


def clone_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` as cheaply as the filesystem allows: a reflink (btrfs, XFS), else copy_file_range, else
    a plain copy. A reflink shares the blocks until either file is written, so it costs no disk space."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        with contextlib.suppress(OSError, ImportError):
            import fcntl

            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE
            return
        size, offset = os.fstat(fin.fileno()).st_size, 0
        try:
            while offset < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - offset)
                if n == 0:
                    break
                offset += n
        except (OSError, AttributeError):
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 1 << 20)


# Hugging Face ---------------------------------------------------------------------------------------------------
class HFSource:
    """`openai-community/gpt2*` through huggingface_hub; files stay in Hugging Face's cache, recorded by path."""

    key = "hf"
    files: tuple[str, ...] = HF_FILES  # typed as Source declares them (a fixed-length tuple would not match)
    tokenizer_files: tuple[str, ...] = HF_TOKENIZER_FILES
    weights_file = HF_WEIGHTS

    def __init__(self, spec: ModelSpec, revision: str | None = None, offline: bool = False, progress: bool = True):
        self.spec, self.revision, self.offline, self.progress = spec, revision, offline, progress
        self.pins = spec.expected_sha256("hf", revision)

    def validate(self, name: str, path: Path) -> None:
        if name == "config.json":
            check_config(read_json_file(path, name), self.spec, name)
        elif name == HF_WEIGHTS:
            check_safetensors(path, self.spec.config())
        elif name in self.tokenizer_files:
            check_vocab(name, path)

    def fetch(self, cache: ModelCache, name: str, force: bool, tap: Tap | None = None) -> dict:
        """Fetch `name` through huggingface_hub and record it; `tap` is unused (huggingface_hub hands over whole files)."""
        path = self._hf_download(name, force)
        pin = self.pins.get(name)
        kind = kind_for(pin)
        digest = DIGESTS[kind](path)
        problem = None
        if pin and digest != pin and not _pins_ignored(name, path):
            problem = (f"has sha256 {digest}, but the published file's is {pin} (pinned); a server that serves other "
                       "weights under these names needs GPT2HUB_IGNORE_PINS=1")
        else:
            try:
                self.validate(name, path)
            except IntegrityError as e:
                problem = str(e)
        if problem:
            cache.record_file(name, {"size": path.stat().st_size, kind: digest, "path": str(path)})
            cache.discard(name)  # the link and its blob, else Hugging Face's cache would hand the bad file back
            raise IntegrityError(f"{name} of {self.spec.hf_repo} ({path}) {problem}; it was deleted, run again to "
                                 "download it afresh")
        return {"size": path.stat().st_size, kind: digest, "path": str(path), "revision": self.revision or "main"}

    def done(self) -> None:
        """Nothing to close: huggingface_hub draws its own bars (HF_HUB_DISABLE_PROGRESS_BARS turns them off)."""

    def _hf_download(self, name: str, force: bool) -> Path:
        from huggingface_hub import hf_hub_download

        endpoint = os.environ.get("HF_ENDPOINT") or None
        try:
            return Path(hf_hub_download(self.spec.hf_repo, name, revision=self.revision, endpoint=endpoint,
                                        force_download=force, local_files_only=self.offline))
        except Exception as e:  # huggingface_hub raises many kinds; all mean the same to our caller
            if self.offline:
                raise OfflineError(f"{name} of {self.spec.hf_repo} is not in the Hugging Face cache and network access "
                                   "is off (GPT2HUB_OFFLINE/HF_HUB_OFFLINE or local_files_only)") from None
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DownloadError(f"could not get {name} of {self.spec.hf_repo} (revision {self.revision or 'main'}) "
                                f"from the Hugging Face Hub at {endpoint or 'huggingface.co'}: {first}. Check the "
                                "network, HF_ENDPOINT and --revision, or use --source openai") from None

    def config(self, paths: dict[str, Path]) -> dict:
        return check_config(read_json_file(paths["config.json"], "config.json"), self.spec, str(paths["config.json"]))

    def tensors(self, paths: dict[str, Path], verify: bool) -> Getter:
        return hf_getter(paths[HF_WEIGHTS])


def hf_getter(path: Path) -> Getter:
    """OpenAI variable name -> tensor of a Hugging Face model.safetensors (mapped, not read)."""
    import safetensors.torch

    by_name = {}
    for key, value in safetensors.torch.load_file(str(path)).items():
        try:
            name = names.openai_name(key)
        except KeyError:
            raise ConversionError(f"{path} holds {key[:80]!r}, which is not a GPT-2 tensor") from None
        if name is not None:
            by_name[name] = value
    return by_name.__getitem__


# a local folder -----------------------------------------------------------------------------------------------------
class FolderSource:
    """A folder holding OpenAI's files (hparams.json) or Hugging Face's (config.json), read in place, checked."""

    key = "folder"

    def __init__(self, folder: Path):
        self.folder = folder
        self.layout = "openai" if (folder / "hparams.json").exists() else "hf"
        hf = self.layout == "hf"
        self.files = HF_FILES if hf else OPENAI_FILES
        self.tokenizer_files = HF_TOKENIZER_FILES if hf else OPENAI_TOKENIZER_FILES
        self.weights_file = HF_WEIGHTS if hf else DATA_FILE

    @staticmethod
    def holds_model(name: object) -> TypeGuard[str | os.PathLike[str]]:
        """Whether `name` is a folder holding OpenAI's (hparams.json) or Hugging Face's (config.json) files."""
        if not isinstance(name, (str, os.PathLike)) or len(os.fspath(name)) > 4096 or not Path(name).is_dir():
            return False
        return (Path(name) / "hparams.json").exists() or (Path(name) / "config.json").exists()

    def paths(self, names_: tuple[str, ...]) -> dict[str, Path]:
        """The folder's files, each required to be a regular file (a FIFO or folder is refused without opening)."""
        out = {}
        for name in names_:
            path = self.folder / name
            try:
                mode = os.stat(path).st_mode
            except OSError:
                raise DownloadError(f"{path} is missing: the folder {self.folder} must hold {', '.join(names_)}") from None
            if not stat.S_ISREG(mode):
                raise DownloadError(f"{path} is not a regular file (a FIFO, device or folder): replace it with the file")
            out[name] = path
        return out

    def weight_paths(self) -> dict[str, Path]:
        needed = ("config.json", HF_WEIGHTS) if self.layout == "hf" else ("hparams.json", INDEX_FILE, DATA_FILE)
        return self.paths(needed)

    def config(self, paths: dict[str, Path]) -> dict:
        """The folder's config, checked against its weights' tensors (exactly those n_layer implies)."""
        name = "config.json" if self.layout == "hf" else "hparams.json"
        checked = INDEX_FILE if self.layout == "openai" else HF_WEIGHTS
        try:
            cfg = check_config(read_json_file(paths[name], name), None, name)
            if self.layout == "openai":
                check_index(paths[INDEX_FILE], cfg, paths[DATA_FILE].stat().st_size)
            else:
                check_safetensors(paths[HF_WEIGHTS], cfg)
        except IntegrityError as e:
            raise IntegrityError(f"{self.folder}: {e} (checked {name} against {checked})") from None
        return cfg

    def tensors(self, paths: dict[str, Path], verify: bool) -> Getter:
        if self.layout == "hf":
            return hf_getter(paths[HF_WEIGHTS])
        return OpenAISource.tensors(paths, verify)
