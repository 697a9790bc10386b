"""safetensors files written tensor by tensor and read back mapped: the one writer gpt2hub uses, for converted
weights (at once, or while the download arrives: see streaming), exports and tests."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import safetensors
import torch

from .__version__ import __version__

__all__ = ["Layout", "SafetensorsWriter", "layout_of", "load_safetensors", "map_safetensors", "save_state_dict"]


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, mapped (on CPU) rather than read, on `device`."""
    with safetensors.safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of ONE copy-on-write mapping of the whole file (CPU).

    `load_safetensors` gives each tensor a storage of its own; here they share one, so tensors written side by side
    can be viewed as one (GPTModel multiplies W_query, W_key and W_value, written in that order, as one matrix).
    Writes to the tensors never reach the file. A file whose header or offsets do not fit its size, or that holds
    a dtype gpt2hub does not write, raises ValueError naming it.
    """
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path} has a damaged safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} has a damaged safetensors header: not a JSON object")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    data = torch.frombuffer(mapping, dtype=torch.uint8) if size > 8 + n else torch.empty(8 + n, dtype=torch.uint8)
    out = {}
    for name, entry in header.items():
        if name != "__metadata__":
            out[name] = _view(path, data, 8 + n, name, entry)
    return out


def _view(path: Path, data: torch.Tensor, base: int, name: str, entry: Any) -> torch.Tensor:
    """Tensor `name` of a mapped safetensors file: a view of `data` (the whole file), its bytes from `base` on."""
    try:
        dtype, shape, (start, end) = _TORCH_DTYPES.get(entry["dtype"]), list(entry["shape"]), entry["data_offsets"]
        fits = dtype is not None and 0 <= start <= end <= data.numel() - base and end - start == math.prod(
            shape) * dtype.itemsize
    except (KeyError, TypeError, ValueError):
        fits, dtype, shape, start, end = False, None, None, None, None
    if not fits:
        raise ValueError(f"{path}: tensor {name!r} ({entry}) does not fit the file's {data.numel() - base} data bytes "
                         "or has a dtype gpt2hub does not write; delete the file to have it written again")
    assert dtype is not None and shape is not None
    raw = data[base + start:base + end]
    if (base + start) % dtype.itemsize:  # out of step with its element size (gpt2hub's writer never does that)
        raw = raw.clone()
    return raw.view(dtype).view(shape)


Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape), in the file's order


def layout_of(sd: dict[str, torch.Tensor]) -> Layout:
    """The names, dtypes and shapes of tensors (tensors on the "meta" device give them without any data)."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order of `layout`, keeping a running crc32c of its bytes.

    The header is written first, from `layout` alone, so a file can be written while its tensors are still being
    made (`streaming` writes each converted tensor as the download brings it). A tensor that is not dense in CPU
    memory (a transposed view, a GPU tensor) is copied on its own as it is written, so at most one such copy exists at
    a time. `finish` checks that every tensor was written, fsyncs and returns the crc32c as hex.
    """

    def __init__(self, f: BinaryIO, layout: Layout):
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "gpt2hub": __version__}}
        offset = 0
        for k, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[k] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        # the format aligns the data to 8 bytes; gpt2hub to 64, so that mapped tensors whose sizes are multiples of 64
        # (all of GPT-2's, and every quantized layer's codes) start on 64-byte boundaries, as int8 kernels need
        blob += b" " * (-(len(blob) + 8) % 64)
        self.f, self.layout, self.order, self.written, self.crc = f, layout, list(layout), 0, 0
        self._put(len(blob).to_bytes(8, "little") + blob)

    def _put(self, chunk: Any) -> None:
        self.f.write(chunk)
        self.crc = google_crc32c.extend(self.crc, chunk)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `name`, which must be the layout's next tensor, with that dtype and shape."""
        expected = self.order[self.written] if self.written < len(self.order) else None
        if name != expected or (tensor.dtype, tuple(tensor.shape)) != self.layout[name]:
            raise ValueError(f"safetensors writer: got {name!r} {tensor.dtype} {tuple(tensor.shape)}, expected "
                             f"{expected!r} {self.layout.get(expected or '')}")
        self._put(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written += 1

    def finish(self) -> str:
        """Flush and fsync the file once every tensor is written; returns its crc32c as hex."""
        if self.written < len(self.order):
            raise ValueError(f"safetensors writer: {self.order[self.written]!r} was never written")
        self.f.flush()
        os.fsync(self.f.fileno())
        return f"{self.crc:08x}"


def save_state_dict(sd: dict[str, torch.Tensor], path: Path) -> str:
    """Write safetensors straight from the tensors' memory (see SafetensorsWriter); returns its crc32c as hex."""
    with open(path, "wb") as f:
        writer = SafetensorsWriter(f, layout_of(sd))
        for k, v in sd.items():
            writer.write(k, v)
        return writer.finish()
