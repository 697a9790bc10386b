"""How the cache keeps the weights of a dtype, and the model built from them: one class per storage.

- `Mapped` (float32): the verified published file itself (OpenAI's data file or Hugging Face's model.safetensors).
  It already holds every matrix as GPTModel multiplies it, so once checked it is mapped copy-on-write and the
  state_dict is views of it. Nothing is written but the manifest.
- `Converted` (bfloat16, float16): a safetensors file in nn.Linear's layout, written once with its crc32c, while the
  data file downloads where the format allows (a download tap), else from the file on disk.
- `Quantized` (int8, int4): a safetensors file of gpt2hub.quant's tensors (int8 or packed int4 codes with their
  bfloat16 scales; embeddings and norms bfloat16), quantized once from the float32 weights; its manifest names the
  scheme, the int4 group size and the head, and a load whose manifest names others prepares the file again.

Each storage prepares its weights once, under the entry's lock, and records how in the manifest
(converted/{dtype}.json, whose "kind" is the storage's name); every load then builds the model from them. A storage
is one class registered in `STORAGES` under the name that registry.DTYPES gives its dtypes.
"""

from __future__ import annotations

import abc
import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import safetensors
import torch

from .__version__ import __version__
from .cache import Entry, Manifest
from .config import ModelConfig
from .convert import openai_state_dict
from .errors import CheckpointError, ConversionError
from .fetching import Arrived
from .files import CACHE_MODE, atomic_path, disk_error, fsync_dir, unlink_entry
from .formats import Format, Paths
from .model import GPTModel
from .registry import DTYPES
from .safetensors_file import load_safetensors, save_state_dict
from .streaming import StreamedWeights

# what reading stored weights raises when a file is damaged in a way its size and timestamp do not show, or was
# removed since it was checked (`gpt2hub cache rm` in another shell: a warm load checks its files under no lock)
UNREADABLE = (CheckpointError, safetensors.SafetensorError, ValueError, FileNotFoundError)
TORCH_DTYPES = {name: getattr(torch, d.tensors) for name, d in DTYPES.items()}
Progress = Callable[[], Any] | None


def published_tensors(fmt: Format, paths: Paths, cfg: ModelConfig, dtype: torch.dtype,
                      progress: Progress = None) -> dict[str, torch.Tensor]:
    """GPTModel's tensors in `dtype` from the published files (each tensor's checksum checked as it is read), the
    head too where the format keeps one of its own."""
    sd = openai_state_dict(fmt.tensors(paths, cfg, verify=True), cfg.book(), dtype, progress)
    head = fmt.head(paths, cfg)
    if head is not None:
        sd["out_head.weight"] = head.to(dtype)
    return sd


class Storage(abc.ABC):
    """One way of keeping a dtype's weights in the cache."""

    kind: ClassVar[str]  # the manifest's "kind", registry.DType.storage
    verb: ClassVar[str] = "converting"  # what the progress bar says while `prepare` runs

    def __init__(self, dtype: str):
        self.dtype, self.torch_dtype = dtype, TORCH_DTYPES[dtype]

    def check(self, cfg: ModelConfig, name: str) -> None:  # noqa: B027 - a hook: most storages hold any model
        """Refuse (ConversionError naming the model `name`) a model this storage cannot hold, before any download."""

    def tap(self, fmt: Format, entry: Entry, paths: Paths, cfg: ModelConfig) -> StreamedWeights | None:
        """The tap for the weights file's download: each tensor checked as its last byte arrives (see streaming)."""
        pieces = fmt.stream_plan(paths, cfg)
        return StreamedWeights(pieces, cfg.book()) if pieces is not None else None

    @abc.abstractmethod
    def prepare(self, entry: Entry, fmt: Format, paths: Paths, cfg: ModelConfig, arrived: Arrived,
                progress: Progress = None) -> Manifest:
        """Check or convert the weights once and return the manifest to write (the hub writes it)."""

    @abc.abstractmethod
    def state_dict(self, entry: Entry, fmt: Format, paths: Paths, manifest: Manifest,
                   device: torch.device) -> dict[str, torch.Tensor]:
        """GPTModel's tensors from the stored weights, on `device`."""

    def build(self, cfg: dict, sd: dict[str, torch.Tensor], tie_weights: bool = True) -> GPTModel:
        """The model (eval mode) holding `sd`; without an `out_head.weight`, the head is tied or copied."""
        return GPTModel.from_state_dict(cfg, sd, tie_weights=tie_weights)

    def in_memory(self, fmt: Format, paths: Paths, cfg: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
        """GPTModel's tensors straight from a folder's files (each tensor's checksum checked), nothing cached."""
        return {k: v.to(device) for k, v in published_tensors(fmt, paths, cfg, self.torch_dtype).items()}

    def stale(self, manifest: Manifest) -> str | None:
        """What makes weights stored as `manifest` records not this gpt2hub's (made again on the next load), or None."""
        return None

    def manifest(self, entry: Entry, weights: Path, cfg: ModelConfig, crc32c: str | None, **extra: Any) -> Manifest:
        st = weights.stat()
        return Manifest(self.kind, self.dtype, weights.name, cfg.book(), st.st_size, st.st_mtime_ns, crc32c, {
            "gpt2hub": __version__, "source": entry.key.source, "size": entry.key.size, **extra,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})


class Mapped(Storage):
    """float32: the published weights file itself, checked once, then mapped (see the module docstring)."""

    kind = "mapped"
    verb = "verifying"

    def prepare(self, entry: Entry, fmt: Format, paths: Paths, cfg: ModelConfig, arrived: Arrived,
                progress: Progress = None) -> Manifest:
        from .checks import check_file

        name = fmt.weights_file
        how = "while downloading" if arrived.streamed(paths[name]) else "on arrival"
        if name not in arrived.fresh:  # fetched earlier (`gpt2hub download`): check it whole before its first mapping
            how = "before its first mapping"
            record = entry.records().get(name)
            problem = check_file(entry, name, record)
            if problem is not None:
                raise CheckpointError(f"{problem.path} {problem.what}", file=paths[name])
            if record is not None and record.get("tensors") != "checked":  # recorded by an earlier gpt2hub
                fmt.check_tensors(paths, cfg, progress)
        unlink_entry(entry.stored_path(self.dtype))  # a copy an older gpt2hub wrote (a folder there: CacheError)
        return self.manifest(entry, paths[name], cfg, None, prepared=f"checked {how}")

    def state_dict(self, entry: Entry, fmt: Format, paths: Paths, manifest: Manifest,
                   device: torch.device) -> dict[str, torch.Tensor]:
        cfg = ModelConfig.from_hparams(manifest.config)
        get = fmt.tensors(paths, cfg, verify=False)  # checked when the manifest was written; size and mtime since
        if device.type != "cpu":
            cpu_get = get

            def get(name: str) -> Any:  # each published tensor copied whole, so c_attn stays one matrix there too
                return torch.as_tensor(cpu_get(name)).to(device)

        return openai_state_dict(get, manifest.config, torch.float32)


class Converted(Storage):
    """bfloat16 and float16: a safetensors file of GPTModel's tensors, converted once (see the module docstring)."""

    kind = "converted"

    def tap(self, fmt: Format, entry: Entry, paths: Paths, cfg: ModelConfig) -> StreamedWeights | None:
        """The tap that converts each tensor as it arrives and appends it to a temporary file beside its place."""
        pieces = fmt.stream_plan(paths, cfg)
        if pieces is None:
            return None
        out = entry.stored_path(self.dtype)
        entry.secure()
        return StreamedWeights(pieces, cfg.book(), self.torch_dtype, out.parent, out.name)

    def prepare(self, entry: Entry, fmt: Format, paths: Paths, cfg: ModelConfig, arrived: Arrived,
                progress: Progress = None) -> Manifest:
        entry.secure()
        out = entry.stored_path(self.dtype)
        weights = paths[fmt.weights_file]
        crc, how = None, "from the mapped file"
        if fmt.weights_file in arrived.fresh and arrived.tap is not None:
            crc, how = self._place(arrived.tap, weights, out), "while downloading"
        elif fmt.weights_file not in arrived.fresh:  # downloaded earlier: the same converter reads it once
            crc, how = self._convert_from_disk(fmt, entry, paths, cfg, out, progress), "reading the file once"
        if crc is None:  # not OpenAI's checkpoint, or something is wrong with it: this path says what
            how = "from the mapped file"
            sd = openai_state_dict(fmt.tensors(paths, cfg, verify=True), cfg.book(), self.torch_dtype, progress)
            with atomic_path(out, CACHE_MODE) as tmp:
                crc = save_state_dict(sd, tmp)
        return self.manifest(entry, out, cfg, crc, prepared=f"converted {how}")

    def _convert_from_disk(self, fmt: Format, entry: Entry, paths: Paths, cfg: ModelConfig, out: Path,
                           progress: Progress) -> str | None:
        """Feed the weights file on disk to the converting tap, read front to back: one tensor in memory at a time,
        no mapping. Its crc32c, or None when it did not convert every tensor (the usual path then says why)."""
        tap = self.tap(fmt, entry, paths, cfg)
        if tap is None:
            return None
        try:
            tap.progress = progress
            data = paths[fmt.weights_file]
            tap.catch_up(data, data.stat().st_size)
            return self._place(tap, data, out)
        except OSError:
            return None
        finally:
            tap.close()

    @staticmethod
    def _place(tap: StreamedWeights, data: Path, out: Path) -> str | None:
        """Rename the file the tap converted to `out` (read-only); its crc32c, or None when there is none to use (the
        tap stopped, or its file was removed since, say by a `cache prune`: the weights are then converted)."""
        made = tap.result(data)
        if made is None:
            return None
        tmp, crc = made
        try:
            os.chmod(tmp, CACHE_MODE)
            os.replace(tmp, out)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise disk_error(out, e) from e
        fsync_dir(out.parent)
        return crc

    def state_dict(self, entry: Entry, fmt: Format, paths: Paths, manifest: Manifest,
                   device: torch.device) -> dict[str, torch.Tensor]:
        return load_safetensors(entry.stored_path(manifest.dtype), device)


class Quantized(Storage):
    """int8 and int4: gpt2hub.quant's tensors in a safetensors file, quantized once (see the module docstring).

    The scheme is the dtype's name; the int4 group size and the head are quant's documented defaults
    (DEFAULT_GROUP_SIZE, HEADS_DEFAULT), recorded in the manifest. The head is a quantized copy of the embedding,
    whatever `tie_weights` says: there is no float matrix to share.
    """

    kind = "quantized"
    verb = "quantizing"

    def __init__(self, dtype: str):
        from . import quant

        super().__init__(dtype)
        self.group_size = quant.DEFAULT_GROUP_SIZE if dtype == "int4" else None
        self.head = quant.HEADS_DEFAULT[dtype]

    def check(self, cfg: ModelConfig, name: str) -> None:
        from . import quant

        try:
            quant.stored_layout(cfg.book(), self.dtype, self.group_size, self.head)
        except ValueError as e:
            raise ConversionError(f"{name} cannot be stored as {self.dtype}: {e}; load it with dtype='int8' or "
                                  "'bfloat16'") from None

    def how(self) -> dict[str, Any]:
        """What the manifest records about the scheme; a stored file made otherwise is made again."""
        return {"scheme": self.dtype, "group_size": self.group_size, "head": self.head}

    def stale(self, manifest: Manifest) -> str | None:
        recorded = {k: manifest.extra.get(k) for k in self.how()}
        return None if recorded == self.how() else f"quantized with {recorded}, this gpt2hub uses {self.how()}"

    def quantize(self, fmt: Format, paths: Paths, cfg: ModelConfig, progress: Progress = None) -> dict[str, torch.Tensor]:
        """The stored tensors, from the published float32 weights (each tensor's checksum checked as it is read)."""
        from . import quant

        sd = published_tensors(fmt, paths, cfg, torch.float32, progress)
        try:
            return quant.quantize_state_dict(sd, self.dtype, self.group_size, self.head)
        except ValueError as e:  # weights that are not numbers (a diverged fine-tune's NaNs): nothing to quantize
            raise ConversionError(f"{paths[fmt.weights_file]} cannot be quantized to {self.dtype}: {e}") from None

    def prepare(self, entry: Entry, fmt: Format, paths: Paths, cfg: ModelConfig, arrived: Arrived,
                progress: Progress = None) -> Manifest:
        entry.secure()
        out = entry.stored_path(self.dtype)
        unlink_entry(out)  # the file or link there failed its check; a folder there is refused before any work
        stored = self.quantize(fmt, paths, cfg, progress)
        with atomic_path(out, CACHE_MODE) as tmp:
            crc = save_state_dict(stored, tmp)
        return self.manifest(entry, out, cfg, crc, prepared="quantized from the float32 weights", **self.how())

    def state_dict(self, entry: Entry, fmt: Format, paths: Paths, manifest: Manifest,
                   device: torch.device) -> dict[str, torch.Tensor]:
        from . import quant

        path = entry.stored_path(manifest.dtype)
        if (stale := self.stale(manifest)) is not None:  # (checks.check_weights saw it unless it changed since)
            raise CheckpointError(f"{path} was {stale}", file=path)
        stored = load_safetensors(path, device)
        layout = quant.stored_layout(manifest.config, self.dtype, self.group_size, self.head)
        if {k: (t.dtype, tuple(t.shape)) for k, t in stored.items()} != layout:
            raise CheckpointError(f"{path} does not hold the tensors of a {self.dtype} model", file=path)
        return stored

    def build(self, cfg: dict, sd: dict[str, torch.Tensor], tie_weights: bool = True) -> GPTModel:
        from . import quant

        return quant.quantized_model(cfg, sd, self.dtype, self.group_size, self.head)

    def in_memory(self, fmt: Format, paths: Paths, cfg: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.quantize(fmt, paths, cfg).items()}


STORAGES: dict[str, type[Storage]] = {cls.kind: cls for cls in (Mapped, Converted, Quantized)}


def storage_for(dtype: str) -> Storage:
    """The storage of a dtype (a canonical name: registry.dtype_name)."""
    return STORAGES[DTYPES[dtype].storage](dtype)
