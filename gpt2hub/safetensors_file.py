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

__all__ = ["Layout", "SafetensorsWriter", "layout_of", "load_safetensors", "save_state_dict"]


def load_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, mapped (on CPU) rather than read, on `device`."""
    with safetensors.safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8"}
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
        blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
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
