"""How the weights of one dtype are stored in the cache, named once:

- MAPPED (float32): the verified published file itself (OpenAI's data file or Hugging Face's model.safetensors).
  It already holds every matrix as GPTModel multiplies it, so after one check (each tensor's crc32c for OpenAI's
  checkpoint, the digest taken on arrival for Hugging Face's file) it is mapped copy-on-write and the state_dict is
  views of it. Nothing is written but the manifest.
- CONVERTED (bfloat16, float16): a safetensors file in nn.Linear's layout, written once with its crc32c.

`prepare` runs under the model's lock and writes converted/{dtype}.json (with "kind"); `state_dict` reads it back.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import safetensors
import torch

from . import names
from .__version__ import __version__
from .cache import Manifest, ModelCache
from .convert import openai_state_dict
from .errors import CheckpointError
from .files import atomic_path, write_json
from .registry import MAPPED_DTYPES
from .sources import Source

MAPPED, CONVERTED = "mapped", "converted"
# what reading stored weights raises when a file is damaged in a way its size and timestamp do not show
UNREADABLE = (CheckpointError, safetensors.SafetensorError, ValueError)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kind_of(dtype: str) -> str:
    """MAPPED for float32 (the published file is already GPTModel's weights), CONVERTED for 16-bit dtypes."""
    return MAPPED if dtype in MAPPED_DTYPES else CONVERTED


def prepare(cache: ModelCache, source: Source, paths: dict[str, Path], dtype: str, fresh: set[str],
            progress: Callable[[], Any] | None = None) -> Manifest:
    """Check (MAPPED) or convert (CONVERTED) the weights for `dtype` and record how they are stored.

    `fresh` names files whose digest was taken moments ago, so need no second read. A damaged checkpoint raises
    CheckpointError whose `file` is the file at fault.
    """
    cfg = source.config(paths)
    weights = paths[source.weights_file]
    if kind_of(dtype) == MAPPED:
        if source.key == "openai" or source.weights_file not in fresh:
            _check_tensors(cache, source, paths, cfg, progress)
        out, crc = weights, None
    else:
        get = source.tensors(paths, verify=True)  # each tensor's crc32c checked as it is read (OpenAI's checkpoint)
        sd = openai_state_dict(get, cfg, TORCH_DTYPES[dtype], progress)
        out = cache.converted_path(dtype)
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


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, mapped (on CPU) rather than read, on `device`."""
    with safetensors.safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_state_dict(sd: dict[str, torch.Tensor], path: Path) -> str:
    """Write safetensors straight from the tensors' memory; returns its crc32c as hex.

    A tensor that is not dense in CPU memory (a transposed view, a GPU tensor) is copied on its own as it is
    written, so at most one such copy exists at a time.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "gpt2hub": __version__}}
    offset = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    crc = 0
    with open(path, "wb") as f:
        data = (v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() for v in sd.values())
        for chunk in itertools.chain([len(blob).to_bytes(8, "little") + blob], data):
            f.write(chunk)  # type: ignore[arg-type]  # ndarrays are buffers; numpy's stubs say so for Python >= 3.12 only
            crc = google_crc32c.extend(crc, chunk)
        f.flush()
        os.fsync(f.fileno())
    return f"{crc:08x}"

