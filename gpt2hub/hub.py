"""from_pretrained, download_files and load_tokenizer: the load path as four steps, each asking the cache once.

    name -> spec (registry) -> transport (transports) -> entry (cache: identity)
         -> files, each through its gate (arrival: format + published-file checks)
         -> weights, prepared once per dtype (storage) -> model

Nothing below this module imports it. A step asks again only under the lock, where another process may have done
the work meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
from tqdm.auto import tqdm

from . import names
from .cache import Cache, Entry, Manifest
from .checks import Problem, check_weights, mark, verify
from .errors import CacheError, CheckpointError, DeviceError, IntegrityError, UnknownModelError
from .fetching import Arrived, Fetcher
from .registry import ModelSpec, dtype_name, resolve
from .settings import check_settings, default_root, offline, progress_disabled
from .tokenizer import encoding_from_files
from .transports import LocalFolder, Transport, for_source

if TYPE_CHECKING:  # torch is imported where a model is made: downloading and the tokenizer need none of it
    import torch

    from .model import GPTModel
    from .storage import Storage

log = logging.getLogger("gpt2hub")


@dataclass(frozen=True)
class Weights:
    """Prepared weights: how they are stored (the manifest) and the published files they were checked against."""

    manifest: Manifest
    paths: dict[str, Path]


class Hub:
    """One model of one source in one cache: its entry, files fetched through their gates, weights prepared once per
    dtype. Writes hold the entry's lock."""

    def __init__(self, spec: ModelSpec, transport: Transport, cache: Cache, offline_: bool, progress: bool = True):
        self.spec, self.transport, self.fmt = spec, transport, transport.format
        self.offline, self.progress = offline_, progress and not progress_disabled()
        self.entry = cache.entry(transport.identity(cache), self.fmt.files, spec.arch, transport.external())
        self.fetch = Fetcher(spec, transport, self.entry, offline_)
        self.stages: dict[str, float] = {}  # seconds of the last `weights` call: "fetch" (with what streamed), "prepare"

    # step 2: the files ------------------------------------------------------------------------------------------
    def files(self, names: tuple[str, ...], force: bool = False) -> dict[str, Path]:
        """Paths of the published files `names`, fetching (under the lock) what is missing or damaged."""
        self.fetch(names, force).close()
        return self.entry.paths(names)

    # step 3: the weights ----------------------------------------------------------------------------------------
    def weights(self, store: Storage, force: bool = False) -> Weights:
        """The weights `store` keeps, every file checked; fetching, repairing, converting as needed. A warm cache is
        read once: its records and the manifest, checked by size and timestamp."""
        self.stages = {"fetch": 0.0, "prepare": 0.0}
        store.check(self.spec.arch, self.spec.name)
        if not force:
            records, manifest = self.entry.records(), self.entry.manifest(store.dtype)
            if manifest is not None and not verify(self.entry, self.fmt.files, (store.dtype,), True, records,
                                                   {store.dtype: manifest}):
                self.fetch.check_pins(records)
                return Weights(manifest, self.entry.paths(records=records))
        refetched: set[str] = set()
        while True:
            start = time.perf_counter()
            arrived = self.fetch(self.fmt.files, force and not refetched, store)
            self.stages["fetch"] = time.perf_counter() - start
            try:
                return Weights(self._prepare(store, arrived), self.entry.paths())
            except CheckpointError as e:
                self._blame(e, refetched)
            finally:
                arrived.close()

    def _stored(self, store: Storage, arrived: Arrived, say: bool = True) -> Manifest | None:
        """The manifest of weights already prepared from these very files (none were fetched just now), else None,
        saying what is wrong with them unless they are simply not there."""
        manifest = None if arrived.fresh else self.entry.manifest(store.dtype)
        problem = check_weights(self.entry, store.dtype, True, manifest) if not arrived.fresh else None
        if say and problem is not None and problem.what != "missing":
            log.warning("%s", problem)
        return manifest if problem is None else None

    def _prepare(self, store: Storage, arrived: Arrived) -> Manifest:
        if (m := self._stored(store, arrived)) is not None:
            return m
        with self.entry.lock(f"preparing {self.spec.name} ({self.transport.key}, {store.dtype})"):
            if (m := self._stored(store, arrived, say=False)) is not None:
                return m  # another process prepared it while we waited for the lock
            start = time.perf_counter()
            paths = self.entry.paths()
            with tqdm(desc=f"{store.verb} {self.spec.name} ({store.dtype})", unit="tensor",
                      total=len(names.openai_names(self.spec.n_layers)),
                      disable=arrived.streamed(paths[self.fmt.weights_file]) or not self.progress) as bar:
                manifest = store.prepare(self.entry, self.fmt, paths, self.spec.arch, arrived, bar.update)
            self._write_manifest(manifest)
        self.stages["prepare"] = time.perf_counter() - start
        log.info("%s (%s): fetched in %.3f s, prepared in %.3f s (%s)", self.spec.name, store.dtype, self.stages["fetch"],
                 self.stages["prepare"], manifest.extra.get("prepared", store.kind))
        return manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        """Write the manifest of weights just prepared; where that fails (a full disk), their file goes too: unvouched,
        it would only hold the space the next load needs to prepare them again."""
        try:
            self.entry.write_manifest(manifest)
        except CacheError:
            if manifest.kind != "mapped":
                with contextlib.suppress(CacheError):
                    self.entry.discard_weights(manifest.dtype)
            raise

    def _blame(self, e: CheckpointError, refetched: set[str]) -> None:
        """Discard the one file a checkpoint error names, to be fetched again once; a second failure is final."""
        name = Path(str(e.file)).name if e.file is not None else None
        if name not in self.fmt.files:
            raise IntegrityError(f"{e}; run `gpt2hub cache rm {self.spec.name}` and download again") from e
        record = self.entry.records().get(name, {})
        url = record.get("url") or record.get("path")
        self.entry.discard(name)
        if name in refetched:
            raise IntegrityError(f"{name} of {self.spec.name} is damaged again after downloading it afresh from "
                                 f"{url or 'its source'}: {e}. That server serves a bad file: try another mirror "
                                 "(GPT2HUB_OPENAI_URL) or --source hf") from e
        log.warning("%s; fetching %s again", e, name)
        refetched.add(name)

    # step 4: the model ------------------------------------------------------------------------------------------
    def load(self, store: Storage, device: torch.device, force: bool = False, tie_weights: bool = True) -> GPTModel:
        """A GPTModel in eval mode on `device`, from weights prepared once per dtype."""
        from .storage import UNREADABLE

        start = time.perf_counter()
        weights = self.weights(store, force)
        ready = time.perf_counter()
        try:
            sd = store.state_dict(self.entry, self.fmt, weights.paths, weights.manifest, device)
        except UNREADABLE as e:  # damaged with its size and timestamp kept (the quick check could not tell), or removed
            self._discard_unreadable(weights.manifest, e)
            weights = self.weights(store)
            sd = store.state_dict(self.entry, self.fmt, weights.paths, weights.manifest, device)
        manifest = weights.manifest
        model = store.build(manifest.config, sd, tie_weights)
        self.entry.touch_used(store.dtype)
        log.info("loaded %s from %s (source %s, %s %s) in %.3f s: %.3f s checking the cache, %.3f s building the model",
                 self.spec.name, self.entry.dir, self.transport.key, store.dtype, manifest.kind,
                 time.perf_counter() - start, ready - start, time.perf_counter() - ready)
        return model

    def _discard_unreadable(self, manifest: Manifest, e: Exception) -> None:
        """Discard what could not be read: stored weights, else the published file the error names."""
        log.warning("%s; preparing the weights again", " ".join(str(e).split()))
        if manifest.kind != "mapped":
            self.entry.discard_weights(manifest.dtype)
            return
        name = Path(str(getattr(e, "file", "") or self.fmt.weights_file)).name
        self.entry.discard(name if name in self.fmt.files else self.fmt.weights_file)


def check_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device this machine has (cpu, or cuda when PyTorch sees a GPU), else DeviceError."""
    import torch

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
    """The Hub of one model of one source in the cache (nothing is fetched until asked, but a Hugging Face branch or
    tag seen for the first time is resolved to its commit)."""
    check_settings()
    spec = resolve(name)
    offline_ = local_files_only or offline()
    transport = for_source(source, spec, revision, offline_, progress, adopt_from)
    cache = Cache(Path(cache_dir) if cache_dir else default_root())
    cache.open_for_loading()
    return Hub(spec, transport, cache, offline_, progress)


def repair(entry: Entry) -> list[Problem]:
    """Fetch again what is missing or damaged in an entry of the cache and prepare again the weights it stored (what
    `gpt2hub cache verify --repair` runs); returns the problems left (none when repaired)."""
    from .storage import storage_for

    try:
        spec = resolve(entry.key.size)
    except UnknownModelError:
        raise CacheError(f"cannot repair {entry.dir}: no model of size {entry.key.size!r} is registered in this "
                         "process (gpt2hub.register it, then repair), and its files stay as they are") from None
    transport = for_source(entry.key.source, spec, entry.key.commit, offline(), progress=True)
    hub = Hub(spec, transport, entry.cache, offline())
    dtypes = [d for d in entry.stored_dtypes()]
    problems = verify(hub.entry)
    mark(hub.entry, problems)
    hub.fetch(hub.fmt.files).close()
    for dtype in dtypes:
        hub.weights(storage_for(dtype))
    return verify(hub.entry)


def load_folder(folder: Path, store: Storage, device: torch.device, tie_weights: bool = True) -> GPTModel:
    """A GPTModel from a local folder of OpenAI's, Hugging Face's or gpt2hub's own files, read in place and checked."""
    local = LocalFolder(folder)
    paths = local.weight_paths()
    cfg = local.format.check_folder(paths)
    store.check(cfg, str(folder))
    return store.build(cfg.book(), store.in_memory(local.format, paths, cfg, device), tie_weights)


def from_pretrained(name: str | ModelSpec = "gpt2-small", *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, source: str = "openai", revision: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, force_download: bool = False,
                    local_files_only: bool = False, progress: bool = True, tie_weights: bool = True,
                    shared_cache: bool | None = None) -> GPTModel:
    """A ready GPTModel (eval mode) for a name such as "gpt2-small", "355M" or "openai-community/gpt2-xl".

    The first call downloads the published files into the cache, checks them, and maps (float32) or converts
    (16-bit) them once; later calls make no network request. `name` may also be a folder holding OpenAI's,
    Hugging Face's or gpt2hub's own (`export --format safetensors`) files, read in place. `revision` (source="hf"
    only) is a branch, tag or commit of the Hugging Face repo; each commit is its own entry in the cache.
    `tie_weights=True` (the default, as in GPT-2 and transformers) shares one matrix between `tok_emb` and
    `out_head`; `tie_weights=False` gives the head its own copy, as the book's `load_weights_into_gpt` does, and
    reproduces the book's fine-tuning numbers exactly. A Hugging Face folder whose config.json sets
    tie_word_embeddings false loads its own head (lm_head.weight), as transformers does.
    Inside an initialised torch.distributed process group, one rank per cache (local rank 0 of each node; global
    rank 0 if `shared_cache=True` or GPT2HUB_SHARED_CACHE=1) fetches and converts while the others wait on the
    group, then every rank loads the same files with network access off (see `gpt2hub.distributed`).
    """
    from . import distributed
    from .storage import storage_for

    dev, store = check_device(device), storage_for(dtype_name(dtype))
    if LocalFolder.holds_model(name):
        return load_folder(Path(name), store, dev, tie_weights)  # type: ignore[arg-type]  # holds_model checked it
    hub = open_hub(name, source, revision, cache_dir, local_files_only, progress)
    if distributed.prepare_once(lambda: hub.weights(store, force_download), shared_cache):  # prepared for the group
        hub, force_download = open_hub(name, source, revision, cache_dir, True, progress), False
    return hub.load(store, dev, force=force_download, tie_weights=tie_weights)


def download_files(name: str | ModelSpec, *, source: str = "openai", revision: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, force_download: bool = False, local_files_only: bool = False,
                   progress: bool = True, adopt_from: str | Path | None = None) -> dict[str, Path]:
    """Fetch every published file of a model into the cache; returns their paths.

    `adopt_from` is a folder that may already hold some of the files (the book's `models_dir/124M`): each one that
    passes every check a download would is copied in (a reflink where the filesystem can) instead of downloaded.
    """
    hub = open_hub(name, source, revision, cache_dir, local_files_only, progress,
                   Path(adopt_from) if adopt_from is not None else None)
    return hub.files(hub.fmt.files, force=force_download)


def load_tokenizer(name: str | ModelSpec = "gpt2-small", *, source: str = "openai", revision: str | None = None,
                   cache_dir: str | Path | None = None, local_files_only: bool = False,
                   progress: bool = True) -> tiktoken.Encoding:
    """GPT-2's tiktoken Encoding from the model's vocabulary files (only those two are downloaded)."""
    if LocalFolder.holds_model(name):
        local = LocalFolder(Path(name))  # type: ignore[arg-type]  # holds_model checked it
        paths = local.tokenizer_paths()
        return encoding_from_files(*(paths[n] for n in local.format.tokenizer_files))
    hub = open_hub(name, source, revision, cache_dir, local_files_only, progress)
    names = hub.fmt.tokenizer_files
    paths = hub.files(names)
    try:
        return encoding_from_files(paths[names[0]], paths[names[1]])
    except IntegrityError:
        for n in names:
            hub.entry.discard(n)
        raise
