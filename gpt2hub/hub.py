"""from_pretrained and load_tokenizer: name -> spec -> files in the cache -> converted state_dict -> model."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import google_crc32c
import safetensors.torch
import tiktoken
import torch
from tqdm.auto import tqdm

from . import __version__
from .cache import (
    DIGESTS,
    FORMAT_VERSION,
    SOURCES,
    ModelCache,
    atomic_path,
    crc32c_file,
    default_root,
    kind_for,
    matches_record,
    offline,
    read_json,
    write_json,
)
from .convert import config_from_hparams, read_hparams, state_dict_from_hf, state_dict_from_tf
from .download import download, progress_disabled
from .errors import CacheError, CheckpointError, DeviceError, DownloadError, IntegrityError, OfflineError
from .model import GPTModel
from .registry import HF_FILES, HF_TOKENIZER_FILES, OPENAI_FILES, OPENAI_TOKENIZER_FILES, ModelSpec, resolve
from .tf_checkpoint import TFCheckpoint
from .tokenizer import encoding_from_files

log = logging.getLogger("gpt2hub")
DEFAULT_OPENAI_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/models",
                       "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DATA_FILE = "model.ckpt.data-00000-of-00001"


def openai_bases() -> list[str]:
    """Base URLs tried in order: GPT2HUB_OPENAI_URL (several may be given, separated by spaces or commas)."""
    env = os.environ.get("GPT2HUB_OPENAI_URL", "").replace(",", " ").split()
    return [b.rstrip("/") for b in env] or list(DEFAULT_OPENAI_URLS)


def dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    return str(DTYPES[dtype]).removeprefix("torch.")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")


class Hub:
    """Fetch and convert one model of one source; every write happens under the model's lock."""

    def __init__(self, spec: ModelSpec, source: str = "openai", cache_dir: str | Path | None = None,
                 local_files_only: bool = False, progress: bool = True):
        _check_source(source)
        self.spec, self.source = spec, source
        self.cache = ModelCache(Path(cache_dir) if cache_dir else default_root(), source, spec.size)
        self.offline = local_files_only or offline()
        self.progress = progress and not progress_disabled()

    # raw files ---------------------------------------------------------------------------------------------
    def _have(self, name: str) -> Path | None:
        """The cached copy of a raw file, if it is recorded and present (no network)."""
        record = self.cache.files().get(name)
        if record is None:
            return None
        path = self.cache.file_path(name, record)
        return path if path.exists() and path.stat().st_size == record["size"] else None

    def _missing(self, names: tuple[str, ...], force: bool) -> list[str]:
        return list(names) if force else [n for n in names if self._have(n) is None]

    def _check_offline(self, names: tuple[str, ...], force: bool) -> None:
        """Fail at once, before any lock, when offline and files are missing (hf files may be in HF's own cache)."""
        missing = self._missing(names, force)
        if self.offline and missing and self.source == "openai":
            raise self._offline_error(missing)

    def _offline_error(self, missing: list[str]) -> OfflineError:
        why = "GPT2HUB_OFFLINE/HF_HUB_OFFLINE is set" if offline() else "local_files_only=True"
        return OfflineError(f"{self.spec.name} ({self.source}) is not fully cached and {why}: missing "
                            f"{', '.join(missing)} in {self.cache.dir}. Run `gpt2hub download {self.spec.name} "
                            f"--source {self.source}` with network access first")

    def files(self, names: tuple[str, ...], force: bool = False) -> dict[str, Path]:
        """Paths of the raw files `names`, downloading what is missing (under the lock)."""
        if self._missing(names, force):
            self._check_offline(names, force)
            with self.cache.lock(f"downloading {self.spec.name} from {self.source}"):
                self._fetch_locked(names, force)
        return {n: self._have(n) for n in names}

    def _fetch_locked(self, names: tuple[str, ...], force: bool) -> list[str]:
        """Fetch what is missing; returns the names fetched (their digests were just taken)."""
        self._check_offline(names, force)
        fetched = self._missing(names, force)  # re-read: another process may have fetched them meanwhile
        for name in fetched:
            record = self._fetch_openai(name, force) if self.source == "openai" else self._fetch_hf(name, force)
            self.cache.record_file(name, record)
        return fetched

    def _fetch_openai(self, name: str, force: bool) -> dict:
        dest = self.cache.raw_path(name)
        size_pin = self.spec.expected_sizes().get(name)
        sha_pin = self.spec.expected_sha256("openai").get(name)
        if force:  # start afresh; the cached copy is replaced only once the new one is complete and verified
            dest.with_name(dest.name + ".incomplete").unlink(missing_ok=True)
        elif dest.exists():  # present but unrecorded (a crash between rename and record): check it, don't refetch
            kind = kind_for(sha_pin)
            digest = DIGESTS[kind](dest)
            if (size_pin is None or dest.stat().st_size == size_pin) and sha_pin in (None, digest):
                return {"size": dest.stat().st_size, kind: digest, "url": None}
            dest.unlink()
        errors = []
        for base in openai_bases():
            url = f"{base}/{self.spec.size}/{name}"
            try:
                record = download(url, dest, expected_size=size_pin, expected_sha256=sha_pin, progress=self.progress)
                return {**record, "url": url}
            except IntegrityError:
                raise
            except DownloadError as e:
                errors.append(str(e))
                log.warning("%s; trying the next mirror", e)
        raise DownloadError(f"could not download {name} for {self.spec.name} from any mirror:\n  " + "\n  ".join(errors)
                            + "\nCheck the network, or set GPT2HUB_OPENAI_URL to a reachable mirror")

    def _fetch_hf(self, name: str, force: bool) -> dict:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(self.spec.hf_repo, name, endpoint=os.environ.get("HF_ENDPOINT") or None,
                                        force_download=force, local_files_only=self.offline))
        except Exception as e:  # huggingface_hub raises many kinds; all mean the same to our caller
            if self.offline:
                raise self._offline_error([name]) from e
            raise DownloadError(f"could not get {name} of {self.spec.hf_repo} from the Hugging Face Hub "
                                f"(HF_ENDPOINT={os.environ.get('HF_ENDPOINT', 'default')}): {e}") from e
        pinned = self.spec.expected_sha256("hf").get(name)
        kind = kind_for(pinned)
        digest = DIGESTS[kind](path)
        if pinned and digest != pinned:
            _unlink(path)
            raise IntegrityError(f"{path} ({self.spec.hf_repo}/{name}) has sha256 {digest}, expected {pinned}; "
                                 "the bad file was deleted, run again to download it afresh")
        return {"size": path.stat().st_size, kind: digest, "path": str(path)}

    # converted weights ----------------------------------------------------------------------------------------
    def mapped(self, dtype: str) -> bool:
        """float32 needs no converted copy: the published weights file holds every weight as GPTModel reads it."""
        return dtype == "float32"

    def weights_name(self) -> str:
        return DATA_FILE if self.source == "openai" else "model.safetensors"

    def _converted_ok(self, dtype: str, repair: bool = False) -> bool:
        """Whether the weights for `dtype` are whole: size always; crc32c whenever they changed since last verified.

        With `repair` (under the lock), a damaged raw file that float32 maps is deleted, to be downloaded again.
        """
        manifest_path = self.cache.converted_manifest(dtype)
        manifest = read_json(manifest_path)
        if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION
                or bool(manifest.get("mapped")) != self.mapped(dtype)):
            return False
        path = weights_file(self.cache, manifest)
        if not path.exists():
            return False
        st = path.stat()
        if st.st_size == manifest.get("bytes") and st.st_mtime_ns == manifest.get("mtime_ns"):
            return True  # untouched since its crc32c was checked: no need to read 0.5-6 GB again
        if st.st_size != manifest.get("bytes") or not weights_intact(self.cache, manifest):
            log.warning("%s is damaged (size or crc32c differ from %s)", path, manifest_path)
            if repair and manifest.get("mapped"):
                self._discard(manifest["mapped"])
            return False
        with contextlib.suppress(CacheError):  # whole but touched (copied from another machine): remember it
            write_json(manifest_path, {**manifest, "mtime_ns": st.st_mtime_ns})
        return True

    def converted(self, dtype: str, force: bool = False) -> dict:
        """The manifest of the weights for `dtype` (its "config" is the model's), converting once under the lock."""
        if force or not self._converted_ok(dtype):
            self._check_offline(self.raw_names(), force)
            with self.cache.lock(f"converting {self.spec.name} ({self.source}) to {dtype}"):
                if force or not self._converted_ok(dtype, repair=True):
                    fetched = self._fetch_locked(self.raw_names(), force)
                    self._convert_locked(dtype, fetched)
        return read_json(self.cache.converted_manifest(dtype))

    def load(self, dtype: str, device: torch.device, force: bool = False, tie_weights: bool = True) -> GPTModel:
        manifest = self.converted(dtype, force)
        cfg = manifest["config"]
        if not manifest.get("mapped"):
            return load_converted(self.cache.converted_path(dtype), cfg, device, tie_weights)
        if self.source == "openai":
            sd = state_dict_from_tf(TFCheckpoint(self.cache.raw), cfg, verify=False, device=device)
        else:
            sd = state_dict_from_hf(safetensors.torch.load_file(weights_file(self.cache, manifest)), cfg, device=device)
        return GPTModel.from_state_dict(cfg, sd, tie_weights=tie_weights)

    def raw_names(self) -> tuple[str, ...]:
        return OPENAI_FILES if self.source == "openai" else HF_FILES

    def _convert_locked(self, dtype: str, fetched: list[str]) -> None:
        files = {n: self._have(n) for n in self.raw_names()}
        if self.source == "openai":
            cfg = read_hparams(files["hparams.json"])
        else:
            cfg = config_from_hparams(json.loads(files["config.json"].read_text()))
        expected = self.spec.config()
        if {k: cfg[k] for k in expected} != expected:
            raise IntegrityError(f"the hyperparameters in {self.cache.dir} ({cfg}) are not those of {self.spec.name} "
                                 f"({expected}); run `gpt2hub cache rm {self.spec.name}` and download again")
        verb = "verifying" if self.mapped(dtype) else "converting"
        bar = tqdm(total=4 + 12 * cfg["n_layers"], desc=f"{verb} {self.spec.name} ({dtype})", unit="tensor",
                   disable=not self.progress)
        with bar:
            if self.source == "openai":
                try:  # every tensor's crc32c is checked as it is read
                    sd = state_dict_from_tf(TFCheckpoint(self.cache.raw), cfg, DTYPES[dtype], progress=bar.update)
                except CheckpointError as e:
                    self._discard(DATA_FILE)
                    raise IntegrityError(f"{e}. The damaged {DATA_FILE} was removed from the cache; run again to "
                                         "download it afresh") from e
            else:
                if (self.mapped(dtype) and "model.safetensors" not in fetched  # else hashed a moment ago
                        and not weights_intact(self.cache, {"mapped": "model.safetensors"})):
                    self._discard("model.safetensors")
                    raise IntegrityError(f"{files['model.safetensors']} differs from the digest recorded when it was "
                                         "downloaded; it was removed, run again to download it afresh")
                tensors = safetensors.torch.load_file(files["model.safetensors"])
                sd = state_dict_from_hf(tensors, cfg, DTYPES[dtype], progress=bar.update)
        if self.mapped(dtype):  # checked above; nothing to write
            record, out = {"mapped": self.weights_name()}, files[self.weights_name()]
            self.cache.converted_path(dtype).unlink(missing_ok=True)  # a copy an older gpt2hub wrote
        else:
            out = self.cache.converted_path(dtype)
            with atomic_path(out) as tmp:
                record = {"crc32c": save_state_dict(sd, tmp)}
        raw, st = self.cache.files(), out.stat()
        write_json(self.cache.converted_manifest(dtype), {
            "format": FORMAT_VERSION, "gpt2hub": __version__, "model": self.spec.name, "size": self.spec.size,
            "source": self.source, "dtype": dtype, "config": cfg, **record, "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "raw": {n: {k: v for k, v in raw[n].items() if k != "url"} for n in self.raw_names()}})

    def _discard(self, name: str) -> None:
        """Delete a raw file and its record (in Hugging Face's cache: the link and the blob it points to)."""
        record = self.cache.files().get(name)
        _unlink(self.cache.file_path(name, record) if record else self.cache.raw_path(name))
        self.cache.forget_file(name)


def _unlink(path: Path) -> None:
    """Delete a file, and the file it links to (a Hugging Face cache entry is a link to a blob it would reuse)."""
    for p in (path.resolve(), path):
        with contextlib.suppress(OSError):
            p.unlink()


def weights_file(cache: ModelCache, manifest: dict) -> Path:
    """The file a converted manifest describes: the converted safetensors, or the raw weights file it maps."""
    if not manifest.get("mapped"):
        return cache.converted_path(manifest["dtype"])
    return cache.file_path(manifest["mapped"], cache.files().get(manifest["mapped"], {}))


def weights_intact(cache: ModelCache, manifest: dict) -> bool:
    """Whether the weights a converted manifest describes pass their checks: crc32c of a converted file; each
    tensor's crc32c for OpenAI's checkpoint; the digest recorded at download for Hugging Face's safetensors."""
    path = weights_file(cache, manifest)
    if not manifest.get("mapped"):
        return crc32c_file(path) == manifest.get("crc32c")
    if manifest["mapped"] != DATA_FILE:
        record = cache.files().get(manifest["mapped"])
        return record is not None and matches_record(path, record)
    try:
        with TFCheckpoint(cache.raw) as ckpt:
            for name in ckpt.names():
                ckpt.read(name)  # checks the tensor's crc32c
    except CheckpointError:
        return False
    return True


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_state_dict(sd: dict[str, torch.Tensor], path: Path) -> str:
    """Write safetensors straight from the tensors' memory (no staging copy); returns its crc32c as hex."""
    tensors = {k: v.contiguous() for k, v in sd.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "gpt2hub": __version__}}
    offset = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    crc = 0
    with open(path, "wb") as f:
        for chunk in [len(blob).to_bytes(8, "little") + blob,
                      *(v.reshape(-1).view(torch.uint8).numpy() for v in tensors.values())]:
            f.write(chunk)
            crc = google_crc32c.extend(crc, chunk)
    return f"{crc:08x}"


def load_converted(path: Path, cfg: dict, device: str | torch.device = "cpu", tie_weights: bool = True) -> GPTModel:
    """A GPTModel built on the meta device and given the stored tensors, mapped: no random init, no second copy."""
    with safetensors.safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return GPTModel.from_state_dict(cfg, sd, tie_weights=tie_weights)


def _model_folder(name: object) -> Path | None:
    """`name` as a local folder of OpenAI's files (hparams.json) or Hugging Face's (config.json), else None."""
    if isinstance(name, (str, os.PathLike)) and Path(name).is_dir():
        folder = Path(name)
        if (folder / "hparams.json").exists() or (folder / "config.json").exists():
            return folder
    return None


def _from_folder(folder: Path, device: torch.device, dtype: str, tie_weights: bool = True) -> GPTModel:
    if (folder / "hparams.json").exists():  # float32 on CPU: views of the mapped checkpoint
        cfg = read_hparams(folder / "hparams.json")
        sd = state_dict_from_tf(TFCheckpoint(folder), cfg, DTYPES[dtype], device=device)
        return GPTModel.from_state_dict(cfg, sd, tie_weights=tie_weights)
    cfg = config_from_hparams(json.loads((folder / "config.json").read_text()))
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))  # mapped, as the data file above
    return GPTModel.from_state_dict(cfg, state_dict_from_hf(tensors, cfg, DTYPES[dtype], device=device), tie_weights=tie_weights)


def _device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device} was asked for, but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                           "use device='cpu'")
    return device


def from_pretrained(name: str | ModelSpec = "gpt2-small", *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, source: str = "openai",
                    cache_dir: str | Path | None = None, force_download: bool = False,
                    local_files_only: bool = False, progress: bool = True, tie_weights: bool = True) -> GPTModel:
    """A ready GPTModel (eval mode) for a name such as "gpt2-small", "355M" or "openai-community/gpt2-xl".

    The first call downloads the published files into the cache and converts them once per dtype; later calls
    make no network request. `name` may also be a folder holding OpenAI's or Hugging Face's files.
    `tie_weights=True` (default, as GPT-2 and transformers have it) makes `out_head` share `tok_emb`'s weight;
    `tie_weights=False` gives the head its own copy, as the book's `load_weights_into_gpt` does, and reproduces the
    book's fine-tuning numbers exactly.
    """
    dev, dt = _device(device), dtype_name(dtype)
    folder = _model_folder(name)
    if folder is not None:
        return _from_folder(folder, dev, dt, tie_weights)
    hub = Hub(resolve(name), source, cache_dir, local_files_only, progress)
    return hub.load(dt, dev, force=force_download, tie_weights=tie_weights)


def download_files(name: str | ModelSpec, *, source: str = "openai", cache_dir: str | Path | None = None,
                   force_download: bool = False, local_files_only: bool = False, progress: bool = True) -> dict[str, Path]:
    """Fetch every published file of a model into the cache; returns their paths."""
    hub = Hub(resolve(name), source, cache_dir, local_files_only, progress)
    return hub.files(hub.raw_names(), force=force_download)


def load_tokenizer(name: str | ModelSpec = "gpt2-small", *, source: str = "openai", cache_dir: str | Path | None = None,
                   local_files_only: bool = False, progress: bool = True) -> tiktoken.Encoding:
    """GPT-2's tiktoken Encoding from the model's vocabulary files (only those two are downloaded)."""
    folder = _model_folder(name)
    if folder is not None:
        pair = ("encoder.json", "vocab.bpe") if (folder / "encoder.json").exists() else ("vocab.json", "merges.txt")
        return encoding_from_files(folder / pair[0], folder / pair[1])
    hub = Hub(resolve(name), source, cache_dir, local_files_only, progress)
    names = OPENAI_TOKENIZER_FILES if source == "openai" else HF_TOKENIZER_FILES
    paths = hub.files(names)
    try:
        return encoding_from_files(paths[names[0]], paths[names[1]])
    except IntegrityError:
        for n in names:
            hub._discard(n)
        raise
