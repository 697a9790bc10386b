"""from_pretrained, download_files and load_tokenizer: the load path as one straight line.

    name -> spec -> source -> verified files in the cache -> storage -> state_dict -> model

`registry` resolves the name, `sources` fetches and validates files, `cache` keeps, checks and deletes them,
`storage` maps (float32) or converts (16-bit) the weights once. Nothing below this module imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import tiktoken
import torch
from tqdm.auto import tqdm

from . import distributed, names, storage
from .cache import Manifest, ModelCache, model_cache, touch_used
from .convert import openai_state_dict
from .download import progress_disabled
from .errors import CheckpointError, ConversionError, DeviceError, IntegrityError, OfflineError
from .files import check_settings, default_root, ignore_pins, offline
from .model import GPTModel
from .registry import HF_TOKENIZER_FILES, HF_WEIGHTS, OPENAI_TOKENIZER_FILES, ModelSpec, check_source, dtype_name, resolve
from .sources import FolderSource, HFSource, OpenAISource, Source
from .tokenizer import encoding_from_files
from .validate import read_json_file

log = logging.getLogger("gpt2hub")


def make_source(spec: ModelSpec, source: str, revision: str | None, offline_: bool, progress: bool,
                adopt_from: Path | None = None) -> Source:
    """The Source object for a source name."""
    if check_source(source) == "hf":
        return HFSource(spec, revision, offline_, progress)
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to source='hf' only; OpenAI's files have no revisions")
    return OpenAISource(spec, progress, adopt_from)


class Hub:
    """One model of one source: fetch what is missing, prepare the weights of a dtype, load. Writes hold the lock."""

    def __init__(self, spec: ModelSpec, source: Source, cache: ModelCache, offline_: bool, progress: bool = True):
        self.spec, self.source, self.cache = spec, source, cache
        self.offline, self.progress = offline_, progress and not progress_disabled()
        self.stages: dict[str, float] = {}  # seconds of the last `weights` call: "fetch" (with what streamed), "prepare"

    def files(self, names: tuple[str, ...], force: bool = False) -> dict[str, Path]:
        """Paths of the published files `names`, fetching (under the lock) what is missing or damaged."""
        if force or self.cache.verify(names, (), quick=True):
            with self._locked(f"downloading {self.spec.name} from {self.source.key}", names, force):
                self._repair(names, force)
        return self._paths(names)

    def weights(self, dtype: str, force: bool = False) -> Manifest:
        """The manifest of the weights for `dtype`, every file checked; fetching, repairing, converting as needed."""
        names = self.source.files
        self.stages = {"fetch": 0.0, "prepare": 0.0}
        if not force and not self.cache.verify(names, (dtype,), quick=True) and (manifest := self.cache.manifest(dtype)):
            return manifest
        with self._locked(f"preparing {self.spec.name} ({self.source.key}, {dtype})", names, force):
            refetched: set[str] = set()
            while True:
                with storage.Streaming(self.cache, self.source, dtype) as streaming:
                    start = time.perf_counter()
                    fresh = self._repair(names, force and not refetched, dtype, streaming)
                    self.stages["fetch"] = time.perf_counter() - start
                    try:
                        return self._prepare(dtype, fresh, streaming)
                    except CheckpointError as e:
                        self._blame(e, refetched)

    def _locked(self, why: str, names: tuple[str, ...], force: bool) -> contextlib.AbstractContextManager[None]:
        missing = [p.name for p in self.cache.verify(names, (), quick=True) if p.name] if not force else list(names)
        if self.offline and missing and self.source.key == "openai":
            raise OfflineError(f"{self.spec.name} ({self.source.key}) is not fully cached and {_why_offline()}: "
                               f"missing {', '.join(missing)} in {self.cache.dir}. Run `gpt2hub download "
                               f"{self.spec.name} --source {self.source.key}` with network access first")
        return self.cache.lock(why)

    def _repair(self, names: tuple[str, ...], force: bool, dtype: str | None = None,
                streaming: storage.Streaming | None = None) -> set[str]:
        """Under the lock: fetch every file that is missing or damaged (all with `force`); returns those fetched.

        A damaged file is discarded first (for the hf source, with its blob, else Hugging Face would hand it back).
        The weights file comes last, so that `streaming` can prepare the weights while it arrives (it needs the
        index and hyperparameters first).
        """
        problems = self.cache.verify(names, (dtype,) if dtype else (), quick=True)
        for p in problems:
            if p.what not in ("not downloaded", "missing"):
                log.warning("%s", p)
            if p.dtype:
                self.cache.discard_weights(p.dtype)
            elif p.what != "not downloaded":
                self.cache.discard(p.name)
        bad = list(names) if force else list(dict.fromkeys(p.name for p in problems if p.name))
        bad.sort(key=lambda name: name == self.source.weights_file)
        try:
            for name in bad:
                tap = streaming.tap(name, self._paths(names)) if streaming is not None else None
                self.cache.record_file(name, self.source.fetch(self.cache, name, force, tap))
        finally:
            self.source.done()
        return set(bad)

    def _prepare(self, dtype: str, fresh: set[str], streaming: storage.Streaming) -> Manifest:
        if not fresh and (manifest := self.cache.manifest(dtype)) and not self.cache.check_weights(dtype, quick=True):
            return manifest  # another process prepared it while we waited for the lock
        paths = self._paths(self.source.files)
        verb = "verifying" if storage.kind_of(dtype) == storage.MAPPED else "converting"
        streamed = streaming.complete(paths)  # done while the data file downloaded: nothing left to show
        start = time.perf_counter()
        with tqdm(desc=f"{verb} {self.spec.name} ({dtype})", unit="tensor", disable=streamed or not self.progress) as bar:
            manifest = storage.prepare(self.cache, self.source, paths, dtype, fresh, bar.update, streaming)
        self.stages["prepare"] = time.perf_counter() - start
        log.info("%s (%s): fetched in %.3f s, prepared in %.3f s%s", self.spec.name, dtype, self.stages["fetch"],
                 self.stages["prepare"], f" ({verb} while the data file downloaded)" if streamed else "")
        return manifest

    def _blame(self, e: CheckpointError, refetched: set[str]) -> None:
        """Discard the one file a checkpoint error names, to be fetched again once; a second failure is final."""
        name = Path(str(e.file)).name if e.file is not None else None
        if name not in self.source.files:
            raise IntegrityError(f"{e}; run `gpt2hub cache rm {self.spec.name}` and download again") from e
        url = self.cache.records().get(name, {}).get("url") or self.cache.records().get(name, {}).get("path")
        self.cache.discard(name)
        if name in refetched:
            raise IntegrityError(f"{name} of {self.spec.name} is damaged again after downloading it afresh from "
                                 f"{url or 'its source'}: {e}. That server serves a bad file: try another mirror "
                                 "(GPT2HUB_OPENAI_URL) or --source hf") from e
        log.warning("%s; fetching %s again", e, name)
        refetched.add(name)

    def _discard_unreadable(self, manifest: Manifest, e: Exception) -> None:
        """Discard what could not be read: converted weights, else the published file the error names."""
        log.warning("%s; preparing the weights again", " ".join(str(e).split()))
        if manifest.kind == storage.CONVERTED:
            self.cache.discard_weights(manifest.dtype)
            return
        name = Path(str(getattr(e, "file", "") or self.source.weights_file)).name
        self.cache.discard(name if name in self.source.files else self.source.weights_file)

    def check_pins(self) -> None:
        """Refuse (or, with GPT2HUB_IGNORE_PINS=1, warn about) each cached file whose sha256 differs from its pin.

        Files are checked against their pins on arrival; this catches files kept under the opt-out once it is gone.
        """
        records = self.cache.records()
        for name, pin in self.source.pins.items():
            have = records.get(name, {}).get("sha256")
            if have is None or have == pin:
                continue
            if not ignore_pins():
                raise IntegrityError(f"{self.cache.file_path(name)} has sha256 {have}, not the published file's {pin}; "
                                     f"it was kept under GPT2HUB_IGNORE_PINS=1: set it again, or run `gpt2hub cache rm "
                                     f"{self.spec.name}` to download the published file")
            log.warning("%s is not the published %s (sha256 %s, pinned %s); used because GPT2HUB_IGNORE_PINS is set",
                        self.cache.file_path(name), name, have, pin)

    def _paths(self, names: tuple[str, ...]) -> dict[str, Path]:
        return {n: self.cache.file_path(n) for n in names}

    def load(self, dtype: str, device: torch.device, force: bool = False, tie_weights: bool = True) -> GPTModel:
        """A GPTModel in eval mode on `device`, from weights prepared once per dtype."""
        start = time.perf_counter()
        manifest = self.weights(dtype, force)
        self.check_pins()
        ready = time.perf_counter()
        try:
            sd = storage.state_dict(self.source, self._paths(self.source.files), manifest, self.cache, device)
        except storage.UNREADABLE as e:  # damaged with its size and timestamp kept: the quick check could not tell
            self._discard_unreadable(manifest, e)
            manifest = self.weights(dtype)
            sd = storage.state_dict(self.source, self._paths(self.source.files), manifest, self.cache, device)
        model = GPTModel.from_state_dict(manifest.config, sd, tie_weights=tie_weights)
        touch_used(self.cache, dtype)
        log.info("loaded %s from %s (source %s, %s %s) in %.3f s: %.3f s checking the cache, %.3f s building the model",
                 self.spec.name, self.cache.dir, self.source.key, dtype, manifest.kind, time.perf_counter() - start,
                 ready - start, time.perf_counter() - ready)
        return model


def _why_offline() -> str:
    return "GPT2HUB_OFFLINE/HF_HUB_OFFLINE is set" if offline() else "local_files_only=True"


def check_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device this machine has (cpu, or cuda when PyTorch sees a GPU), else DeviceError."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {str(device)[:60]!r} is not a device PyTorch knows: use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {dev} was asked for, but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                          "use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {dev} is not supported: use 'cpu' or 'cuda'")
    return dev


def open_hub(name: str | ModelSpec, source: str = "openai", revision: str | None = None,
             cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False, progress: bool = True,
             adopt_from: Path | None = None) -> Hub:
    """The Hub of one model of one source in the cache (nothing is fetched until asked)."""
    check_settings()
    spec = resolve(name)
    offline_ = local_files_only or offline()
    src = make_source(spec, source, revision, offline_, progress, adopt_from)
    cache = model_cache(Path(cache_dir) if cache_dir else default_root(), src.key, spec.size)
    return Hub(spec, src, cache, offline_, progress)


def from_folder(folder: str | Path, dtype: str = "float32", device: torch.device | str = "cpu",
                tie_weights: bool = True) -> GPTModel:
    """A GPTModel from a local folder of OpenAI's or Hugging Face's files, read in place (float32 is mapped)."""
    src = FolderSource(Path(folder))
    paths = src.weight_paths()
    cfg = src.config(paths)
    dt = storage.TORCH_DTYPES[dtype_name(dtype)]
    sd = openai_state_dict(src.tensors(paths, verify=True), cfg, dt)
    if src.layout == "hf":
        sd.update(untied_head(paths["config.json"], paths[HF_WEIGHTS], cfg, dt))
    return GPTModel.from_state_dict(cfg, {k: v.to(device) for k, v in sd.items()}, tie_weights=tie_weights)


def untied_head(config: Path, weights: Path, cfg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{"out_head.weight": lm_head.weight} when config.json sets tie_word_embeddings false, else {} (a tied head).

    transformers (and `gpt2hub.save_pretrained`) write a head of its own that way; raises ConversionError when
    config.json unties the head but the weights lack it, or hold it in the wrong shape.
    """
    if read_json_file(config, config.name).get("tie_word_embeddings", True) is not False:
        return {}
    head = storage.load_safetensors(weights).get(names.HF_HEAD)
    want = (cfg["vocab_size"], cfg["emb_dim"])
    if head is None or tuple(head.shape) != want:
        raise ConversionError(f"{config} sets tie_word_embeddings false, but {weights} holds no {names.HF_HEAD} of "
                              f"shape {list(want)} (found {None if head is None else list(head.shape)}): "
                              "add the head, or set tie_word_embeddings true")
    return {"out_head.weight": head.to(dtype)}


def from_pretrained(name: str | ModelSpec = "gpt2-small", *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, source: str = "openai", revision: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, force_download: bool = False,
                    local_files_only: bool = False, progress: bool = True, tie_weights: bool = True,
                    shared_cache: bool | None = None) -> GPTModel:
    """A ready GPTModel (eval mode) for a name such as "gpt2-small", "355M" or "openai-community/gpt2-xl".

    The first call downloads the published files into the cache, checks them, and maps (float32) or converts
    (16-bit) them once; later calls make no network request. `name` may also be a folder holding OpenAI's or
    Hugging Face's files, read in place. `revision` (source="hf" only) is passed to the Hugging Face Hub.
    `tie_weights=True` (the default, as in GPT-2 and transformers) shares one matrix between `tok_emb` and
    `out_head`; `tie_weights=False` gives the head its own copy, as the book's `load_weights_into_gpt` does, and
    reproduces the book's fine-tuning numbers exactly. A Hugging Face folder whose config.json sets
    tie_word_embeddings false loads its own head (lm_head.weight), as transformers does.
    Inside an initialised torch.distributed process group, one rank per cache (local rank 0 of each node; global
    rank 0 if `shared_cache=True` or GPT2HUB_SHARED_CACHE=1) fetches and converts while the others wait on the
    group, then every rank loads the same files with network access off (see `gpt2hub.distributed`).
    """
    dev, dt = check_device(device), dtype_name(dtype)
    if FolderSource.holds_model(name):
        return from_folder(Path(name), dt, dev, tie_weights)
    hub = open_hub(name, source, revision, cache_dir, local_files_only, progress)
    if distributed.prepare_once(lambda: hub.weights(dt, force_download), shared_cache):  # prepared for the whole group
        hub, force_download = open_hub(name, source, revision, cache_dir, True, progress), False
    return hub.load(dt, dev, force=force_download, tie_weights=tie_weights)


def download_files(name: str | ModelSpec, *, source: str = "openai", revision: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, force_download: bool = False, local_files_only: bool = False,
                   progress: bool = True, adopt_from: str | Path | None = None) -> dict[str, Path]:
    """Fetch every published file of a model into the cache; returns their paths.

    `adopt_from` is a folder that may already hold some of the files (the book's `models_dir/124M`): each one that
    passes every check a download would is copied in (a reflink where the filesystem can) instead of downloaded.
    """
    hub = open_hub(name, source, revision, cache_dir, local_files_only, progress,
               Path(adopt_from) if adopt_from is not None else None)
    return hub.files(hub.source.files, force=force_download)


def load_tokenizer(name: str | ModelSpec = "gpt2-small", *, source: str = "openai", revision: str | None = None,
                   cache_dir: str | Path | None = None, local_files_only: bool = False,
                   progress: bool = True) -> tiktoken.Encoding:
    """GPT-2's tiktoken Encoding from the model's vocabulary files (only those two are downloaded)."""
    if FolderSource.holds_model(name):
        folder = FolderSource(Path(name))
        pairs = (OPENAI_TOKENIZER_FILES, HF_TOKENIZER_FILES)
        pair = next((p for p in pairs if (folder.folder / p[0]).exists()), folder.tokenizer_files)
        paths = folder.paths(pair)
        return encoding_from_files(paths[pair[0]], paths[pair[1]])
    hub = open_hub(name, source, revision, cache_dir, local_files_only, progress)
    names = hub.source.tokenizer_files
    paths = hub.files(names)
    try:
        return encoding_from_files(paths[names[0]], paths[names[1]])
    except IntegrityError:
        for n in names:
            hub.cache.discard(n)
        raise
