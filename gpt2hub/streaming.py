"""Preparing OpenAI's weights while the data file arrives.

OpenAI's data file is the checkpoint's variables back to back at offsets its index gives, so once the index is in,
each variable can be checked (its crc32c) and, for 16-bit dtypes, converted and written as soon as its last byte
arrives: converting overlaps the download instead of following it, and the data file is not read a second time.

A `StreamedWeights` is a download tap (`download.Tap`): it sees the data file's bytes in order from the first byte,
and again from the start whenever the download starts over (`catch_up`). The cases:
- every variable arrives and passes its crc32c: `result` gives the converted file (or, for float32, says that every
  variable was checked), which the storage (storage.py) uses only for the file the download then accepted, whole (size,
  pinned sha256, validation) and exactly as long as what the tap saw.
- anything unexpected (an index that does not match the hyperparameters, a failed crc32c, a full disk) turns the
  tap off, silently: the weights are then prepared from the downloaded file afterwards, the path that reports errors
  and blames the file at fault. Streaming only ever saves time; it never decides what is accepted.
- the process dies: the converted file is a temporary one beside its final name (`.{name}.*.tmp`, as every atomic
  write of the cache), which `cache prune` removes; `close` removes it on every other exit.
A data file downloaded earlier is converted by the same tap fed from the file on disk (`storage.Converted`):
one tensor in memory at a time, the file read once front to back.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import google_crc32c
import numpy as np

from . import names
from .download import replay
from .files import stat_entry
from .tf_checkpoint import TensorEntry, mask_crc

if TYPE_CHECKING:  # torch only where tensors are converted: checking a download needs none of it
    import torch

    from .convert import VariableConverter
    from .safetensors_file import Layout, SafetensorsWriter

log = logging.getLogger("gpt2hub")
_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class Piece:
    """One variable of the data file: where its bytes are and what they become."""

    name: str  # OpenAI's variable, without "model/"
    offset: int
    size: int
    crc32c: int | None
    shape: tuple[int, ...]  # as names.openai_shape gives it (Conv1D weights without their leading 1)
    targets: tuple[str, ...]
    transform: str


def plan(entries: Mapping[str, TensorEntry], cfg: Mapping[str, Any]) -> list[Piece] | None:
    """The variables of a one-shard float32 checkpoint in the order of the data file, or None when the index is not
    exactly the variables `cfg` implies (the usual path then reports what is wrong)."""
    pieces = []
    for name, targets, transform in names.entries(cfg["n_layers"]):
        e, shape = entries.get(f"model/{name}"), names.openai_shape(name, cfg)
        if e is None or e.shard != 0 or e.dtype != _F32 or math.prod(e.shape) != math.prod(shape) or \
                e.size != math.prod(shape) * 4:
            return None
        pieces.append(Piece(name, e.offset, e.size, e.crc32c, shape, targets, transform))
    pieces.sort(key=lambda p: p.offset)
    if any(a.offset + a.size > b.offset for a, b in zip(pieces, pieces[1:], strict=False)):
        return None
    return pieces


def converted_layout(pieces: list[Piece], convert: VariableConverter) -> Layout:
    """The converted file's tensors, in the order they will arrive (computed on "meta" tensors: no data)."""
    import torch

    from .safetensors_file import layout_of

    sd: dict[str, torch.Tensor] = {}
    for p in pieces:
        sd.update(convert(p.name, torch.empty(p.shape, device="meta"), p.targets, p.transform))
    return layout_of(sd)


def _converter(cfg: Mapping[str, Any], dtype: torch.dtype | None) -> VariableConverter | None:
    """The converter to `dtype`; None for a tap that only checks (which needs no torch)."""
    if dtype is None:
        return None
    from .convert import VariableConverter

    return VariableConverter(cfg, dtype)


class StreamedWeights:
    """A download tap that checks each variable of the data file as it arrives and, given a 16-bit `dtype`, converts
    it and appends it to a safetensors file (a temporary file in `out_dir`, named after `out_name`)."""

    def __init__(self, pieces: list[Piece], cfg: Mapping[str, Any], dtype: torch.dtype | None = None,
                 out_dir: Path | None = None, out_name: str = ""):
        self.pieces, self.out_dir, self.out_name = pieces, out_dir, out_name
        self.convert = _converter(cfg, dtype)
        self.heavy = self.convert is not None  # checking crc32c alone is light: see download.Tap
        self.progress: Callable[[], Any] | None = None  # called once per variable checked or converted
        self.layout: Layout = converted_layout(pieces, self.convert) if self.convert is not None else {}
        self.tmp: Path | None = None
        self.file: BinaryIO | None = None
        self.made: os.stat_result | None = None  # the temporary file as made, to know it again
        self.error: str | None = None
        self._restart()

    def _restart(self) -> None:
        self.length, self.done, self.crc = 0, 0, 0
        self.buffer: np.ndarray | None = None
        self.writer: SafetensorsWriter | None = None

    # -- the Tap protocol ---------------------------------------------------------------------------------------------
    def catch_up(self, part: Path, offset: int) -> None:
        """Make what this tap has seen the first `offset` bytes of `part` (the download resumes or starts over: a
        tap that stopped on bad bytes starts afresh on a download from the first byte)."""
        if offset == 0 and self.error:
            self.error, self.file, self.tmp, self.made = None, None, None, None
        elif offset == self.length or self.error:
            return
        self._restart()
        if offset == 0:  # starting over (the partial file may be gone)
            return
        try:
            replay(part, offset, self.update)
        except OSError as e:
            self._fail(f"cannot read {part} back: {e}")

    def update(self, chunk: bytes) -> None:
        """The next bytes of the data file. Never raises: a problem turns the tap off (see the module docstring)."""
        if self.error:
            return
        try:
            self._consume(memoryview(chunk))
        except Exception as e:  # whatever it is, the download goes on and the weights are prepared after it
            self._fail(f"{type(e).__name__}: {e}")

    # -- consuming ----------------------------------------------------------------------------------------------------
    def _consume(self, view: memoryview) -> None:
        pos = self.length
        self.length += len(view)
        while view and self.done < len(self.pieces):
            p = self.pieces[self.done]
            if pos < p.offset:  # bytes between variables
                skip = min(len(view), p.offset - pos)
                view, pos = view[skip:], pos + skip
                continue
            take = min(len(view), p.offset + p.size - pos)
            self._take(p, view[:take], pos - p.offset)
            view, pos = view[take:], pos + take
            if pos == p.offset + p.size:
                self._complete(p)
                self.done += 1

    def _take(self, p: Piece, data: memoryview, at: int) -> None:
        raw = np.frombuffer(data, dtype=np.uint8)  # google_crc32c takes arrays, not memoryviews
        self.crc = google_crc32c.extend(self.crc, raw)
        if self.convert is not None:
            if at == 0:
                self.buffer = np.empty(p.size, dtype=np.uint8)
            assert self.buffer is not None
            self.buffer[at:at + len(raw)] = raw

    def _complete(self, p: Piece) -> None:
        if p.crc32c is not None and mask_crc(self.crc) != p.crc32c:
            raise ValueError(f"variable {p.name!r} fails its crc32c check")
        self.crc = 0
        if self.progress is not None:
            self.progress()
        if self.convert is None:
            return
        assert self.buffer is not None
        import torch

        t = torch.from_numpy(self.buffer.view(_F32)).reshape(p.shape)
        writer = self.writer or self._open()
        for k, v in self.convert(p.name, t, p.targets, p.transform).items():
            writer.write(k, v)
        self.buffer = None

    def _open(self) -> SafetensorsWriter:
        from .safetensors_file import SafetensorsWriter

        assert self.out_dir is not None
        if self.file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            st = stat_entry(self.out_dir)
            if st is None or not stat.S_ISDIR(st.st_mode):  # a link planted since the cache's folders were checked
                raise ValueError(f"{self.out_dir} is not a folder of the cache")
            fd, tmp = tempfile.mkstemp(prefix=f".{self.out_name}.", suffix=".tmp", dir=self.out_dir)
            self.tmp, self.file, self.made = Path(tmp), os.fdopen(fd, "wb"), os.fstat(fd)
        self.file.seek(0)
        self.file.truncate()
        self.writer = SafetensorsWriter(self.file, self.layout)
        return self.writer

    def _fail(self, why: str) -> None:
        log.debug("preparing the weights during the download stopped (%s); they are prepared after it", why)
        self.error, self.buffer = why, None
        self.close()  # give back the disk space at once (on a full disk the download itself may need it)

    # -- the outcome --------------------------------------------------------------------------------------------------
    def complete(self, data_file: Path) -> bool:
        """Whether every variable of `data_file` (the downloaded file, whole) arrived here and passed its check."""
        try:
            size = data_file.stat().st_size
        except OSError:
            return False
        return not self.error and self.done == len(self.pieces) and self.length == size

    def result(self, data_file: Path) -> tuple[Path, str] | None:
        """(the converted file, fsynced, and its crc32c) once `complete(data_file)`; None otherwise or when checking
        only. The caller renames the file into place."""
        if self.convert is None or not self.complete(data_file) or self.file is None:
            return None
        try:
            assert self.writer is not None and self.tmp is not None
            crc = self.writer.finish()
            self.file.close()
            if not self._ours():
                raise ValueError(f"{self.tmp} was removed or replaced since it was written")
            return self.tmp, crc
        except (OSError, ValueError) as e:
            self._fail(str(e))
            return None

    def _ours(self) -> bool:
        """Whether the temporary file's name still holds the file this tap made (no process removed or replaced it,
        no link was planted at its folder)."""
        st = stat_entry(self.tmp) if self.tmp is not None else None
        return st is not None and self.made is not None and os.path.samestat(st, self.made)

    def close(self) -> None:
        """Remove the temporary file unless it was renamed into place (only the file this tap made, never another
        found at its name)."""
        if self.file is not None and not self.file.closed:
            self.file.close()
        if self.tmp is not None and self._ours():
            self.tmp.unlink(missing_ok=True)
