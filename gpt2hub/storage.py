"""How the weights of one dtype are stored in the cache, named once:

- MAPPED (float32): the verified published file itself (OpenAI's data file or Hugging Face's model.safetensors).
  It already holds every matrix as GPTModel multiplies it, so after one check (each tensor's crc32c for OpenAI's
  checkpoint, the digest taken on arrival for Hugging Face's file) it is mapped copy-on-write and the state_dict is
  views of it. Nothing is written but the manifest.
- CONVERTED (bfloat16, float16): a safetensors file in nn.Linear's layout, written once with its crc32c.

`prepare` runs under the model's lock and writes converted/{dtype}.json (with "kind"); `state_dict` reads it back.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch

from . import names
from .__version__ import __version__
from .cache import Manifest, ModelCache
from .convert import openai_state_dict
from .errors import CheckpointError, GPT2HubError
from .files import atomic_path, disk_error, fsync_dir, write_json
from .registry import INDEX_FILE, MAPPED_DTYPES
from .safetensors_file import load_safetensors, save_state_dict
from .sources import Source
from .streaming import StreamedWeights, plan
from .tf_checkpoint import read_index

MAPPED, CONVERTED = "mapped", "converted"
# what reading stored weights raises when a file is damaged in a way its size and timestamp do not show
UNREADABLE = (CheckpointError, safetensors.SafetensorError, ValueError)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kind_of(dtype: str) -> str:
    """MAPPED for float32 (the published file is already GPTModel's weights), CONVERTED for 16-bit dtypes."""
    return MAPPED if dtype in MAPPED_DTYPES else CONVERTED


class Streaming:
    """Preparing `dtype` while OpenAI's data file downloads (see streaming): `tap` makes the download tap when the
    data file is about to be fetched (the index and hparams.json are in by then); `prepare` uses what it made if the
    downloaded file is exactly what it saw. Use as a context manager: leaving it removes what was not used."""

    def __init__(self, cache: ModelCache, source: Source, dtype: str):
        self.cache, self.source, self.dtype = cache, source, dtype
        self.streamed: StreamedWeights | None = None

    def tap(self, name: str, paths: dict[str, Path]) -> StreamedWeights | None:
        """The tap for downloading `name`: None unless it is OpenAI's data file and its index and hparams.json are good
        (what is wrong with them is then reported by the usual path)."""
        if self.source.key != "openai" or name != self.source.weights_file:
            return None
        try:
            cfg = self.source.config(paths)
            entries, shards = read_index(paths[INDEX_FILE])
        except (GPT2HubError, OSError, ValueError):
            return None
        pieces = plan(entries, cfg) if shards == 1 else None
        if pieces is None:
            return None
        out = self.cache.converted_path(self.dtype)
        self.close()
        self.streamed = StreamedWeights(pieces, cfg, None if kind_of(self.dtype) == MAPPED else TORCH_DTYPES[self.dtype],
                                        out.parent, out.name)
        return self.streamed

    def read(self, paths: dict[str, Path], progress: Callable[[], Any] | None = None) -> bool:
        """Convert the weights file already in the cache with the same converter, read once front to back: one tensor
        in memory at a time, no mapping of the data file. Whether that worked (see `complete`); when it did not, the
        usual path converts the file and reports what is wrong. Not after a tap saw this download and stopped: the
        same bytes would stop it again."""
        if self.streamed is not None:
            return False
        tap = self.tap(self.source.weights_file, paths)
        if tap is None or not tap.heavy:
            return False
        tap.progress = progress
        data = paths[self.source.weights_file]
        with contextlib.suppress(OSError):
            tap.catch_up(data, data.stat().st_size)
        return tap.complete(data)

    def complete(self, paths: dict[str, Path]) -> bool:
        """Whether the weights file in `paths` was seen whole by the tap, every tensor passing its check."""
        return self.streamed is not None and self.streamed.complete(paths[self.source.weights_file])

    def converted(self, paths: dict[str, Path]) -> tuple[Path, str] | None:
        """(the converted file, not yet in place, and its crc32c) once `complete(paths)`, else None."""
        return self.streamed.result(paths[self.source.weights_file]) if self.streamed is not None else None

    def close(self) -> None:
        """Remove the converted file unless `prepare` moved it into place."""
        if self.streamed is not None:
            self.streamed.close()

    def __enter__(self) -> Streaming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare(cache: ModelCache, source: Source, paths: dict[str, Path], dtype: str, fresh: set[str],
            progress: Callable[[], Any] | None = None, streaming: Streaming | None = None) -> Manifest:
    """Check (MAPPED) or convert (CONVERTED) the weights for `dtype` and record how they are stored.

    `fresh` names files whose digest was taken moments ago, so need no second read; `streaming` holds what was
    checked or converted while the weights file arrived, used only if it saw that very file whole. A damaged
    checkpoint raises CheckpointError whose `file` is the file at fault.
    """
    cfg = source.config(paths)
    weights = paths[source.weights_file]
    streamed = streaming is not None and source.weights_file in fresh and streaming.complete(paths)
    if kind_of(dtype) == MAPPED:
        if not streamed and (source.key == "openai" or source.weights_file not in fresh):
            _check_tensors(cache, source, paths, cfg, progress)
        out, crc = weights, None
    else:
        out = cache.converted_path(dtype)
        if streaming is not None and not streamed:  # downloaded earlier (no tap saw it): the converter reads the file
            streamed = streaming.read(paths, progress)
        crc = _place_streamed(streaming, paths, out) if streamed and streaming is not None else None
        if crc is None:  # not OpenAI's checkpoint, or something is wrong with it: this path says what
            get = source.tensors(paths, verify=True)  # each tensor's crc32c checked as it is read (OpenAI's checkpoint)
            sd = openai_state_dict(get, cfg, TORCH_DTYPES[dtype], progress)
            with atomic_path(out) as tmp:
                crc = save_state_dict(sd, tmp)
    st = out.stat()
    manifest = Manifest(kind_of(dtype), dtype, out.name if kind_of(dtype) == CONVERTED else source.weights_file, cfg,
                        st.st_size, st.st_mtime_ns, crc, {
                            "gpt2hub": __version__, "source": source.key, "size": cache.size,
                            "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    if kind_of(dtype) == MAPPED:
        cache.converted_path(dtype).unlink(missing_ok=True)  # a copy an older gpt2hub wrote
    write_json(cache.manifest_path(dtype), manifest.to_json())
    return manifest


def _place_streamed(streaming: Streaming, paths: dict[str, Path], out: Path) -> str | None:
    """Rename the file converted during the download to `out`; its crc32c, or None when there is none to use (it
    was removed since, say by a `cache prune` after the lock file was deleted: the weights are then converted)."""
    made = streaming.converted(paths)
    if made is None:
        return None
    tmp, crc = made
    try:
        os.replace(tmp, out)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise disk_error(out, e) from e
    fsync_dir(out.parent)
    return crc


def _check_tensors(cache: ModelCache, source: Source, paths: dict[str, Path], cfg: dict,
                   progress: Callable[[], Any] | None) -> None:
    """Check the published weights file once before it is first mapped: every tensor's crc32c in OpenAI's
    checkpoint; for Hugging Face's file, the digest recorded when it arrived."""
    if source.key == "openai":
        get = source.tensors(paths, verify=True)
        for name in names.openai_names(cfg["n_layers"]):
            get(name)
            if progress is not None:
                progress()
        return
    problem = cache.check_file(source.weights_file, cache.records().get(source.weights_file))
    if problem is not None:
        raise CheckpointError(f"{problem.path} {problem.what}", file=paths[source.weights_file])


def state_dict(source: Source, paths: dict[str, Path], manifest: Manifest, cache: ModelCache,
               device: torch.device) -> dict[str, torch.Tensor]:
    """The GPTModel tensors of stored weights: views of the mapped published file, or of the converted file."""
    if manifest.kind == CONVERTED:
        return load_safetensors(cache.converted_path(manifest.dtype), device)
    get = source.tensors(paths, verify=False)  # checked when the manifest was written; size and mtime since
    if device.type != "cpu":
        cpu_get = get

        def get(name: str) -> Any:  # each published tensor copied whole, so c_attn stays one matrix there too
            return torch.as_tensor(cpu_get(name)).to(device)

    return openai_state_dict(get, manifest.config, torch.float32)
