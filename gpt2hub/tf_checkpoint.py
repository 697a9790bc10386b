"""OpenAI's TensorFlow checkpoint read (and, for benchmarks and tests, written) without TensorFlow.

A checkpoint is a tensor bundle: `PREFIX.index`, an SSTable (LevelDB table format) whose empty key holds a
BundleHeaderProto and whose other keys are variable names mapping to BundleEntryProtos, and the shards
`PREFIX.data-0000N-of-0000M`, which hold the raw little-endian tensor bytes at the offsets the entries give.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from .errors import CheckpointError, quoted

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes, then the magic number
_TRAILER_LEN = 5  # compression type byte + masked crc32c of the block
MAX_SHARDS = 99999  # data file names give the shard count in five digits
MAX_RANK = 254  # TensorFlow's TensorShape::MaxDimensions(): a shape with more dimensions is corrupt
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
           10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}


def mask_crc(crc: int) -> int:
    """LevelDB's masking of a stored crc32c (so that a crc of data holding crcs is not itself a crc)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the unsigned varint at `pos`; at most 10 bytes and 64 bits, as protobuf's."""
    result = shift = 0
    while shift < 70:
        if pos >= len(buf):
            raise ValueError("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >= 1 << 64:
                raise ValueError("varint exceeds 64 bits")
            return result, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message; varints as ints, length-delimited fields as bytes."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise ValueError("protobuf message is truncated")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("protobuf message is truncated")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _number(value: int | bytes) -> int:
    """A numeric field's value (varint or fixed); bytes where a number belongs mean the message is corrupt."""
    if not isinstance(value, int):
        raise ValueError("a numeric protobuf field holds bytes")
    return value


def _message(value: int | bytes) -> bytes:
    """A length-delimited field's bytes; a number where a message belongs means the message is corrupt."""
    if not isinstance(value, bytes):
        raise ValueError("a length-delimited protobuf field holds a number")
    return value


def _int64(value: int | bytes) -> int:
    value = _number(value)
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class TensorEntry:
    """Where one variable lives: BundleEntryProto."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int | None


def _shape(buf: bytes) -> tuple[int, ...]:
    """A TensorShapeProto's dimensions (each a message whose field 1 is the size)."""
    dims: list[int] = []
    for n, v in proto_fields(buf):
        if n == 2:
            if len(dims) == MAX_RANK:
                raise CheckpointError(f"its shape has more than {MAX_RANK} dimensions, TensorFlow's limit")
            dims.append(_int64(dict(proto_fields(_message(v))).get(1, 0)))
        elif n == 3 and v:
            raise CheckpointError("its shape is of unknown rank")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TensorEntry:
    """One variable's BundleEntryProto. A value no checkpoint can hold (a negative offset, size or dimension, a
    size that is not the shape's) is a CheckpointError, as is a feature gpt2hub does not read; a message that is
    not protobuf a ValueError. Messages start with the variable's name and leave out the file (read_index adds it)."""
    crc: int | None = None
    shape: tuple[int, ...] = ()
    dtype_code, shard, offset, size, sliced = 0, 0, 0, 0, False
    try:
        for number, value in proto_fields(buf):
            if number == 1:
                dtype_code = _number(value)
            elif number == 2:
                shape = _shape(_message(value))
            elif number == 3:
                shard = _number(value)
            elif number == 4:
                offset = _int64(value)
            elif number == 5:
                size = _int64(value)
            elif number == 6:
                crc = _number(value)
            elif number == 7:
                sliced = True
    except CheckpointError as e:
        raise CheckpointError(f"variable {quoted(name)}: {e}") from None
    where = f"variable {quoted(name)}"
    if sliced:
        raise CheckpointError(f"{where} is stored in slices (partitioned), which gpt2hub does not read")
    if dtype_code not in _DTYPES:
        raise CheckpointError(f"{where} has TensorFlow dtype code {dtype_code}, which gpt2hub does not read")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{where} has a negative or unknown dimension in its shape {quoted(shape)}")
    if offset < 0 or size < 0:
        raise CheckpointError(f"{where} has a negative offset ({offset}) or size ({size}): the index is corrupt")
    dtype = np.dtype(_DTYPES[dtype_code]).newbyteorder("<")
    if math.prod(shape) * dtype.itemsize != size:
        raise CheckpointError(f"{where} of shape {quoted(shape)} and dtype {dtype} claims {size} bytes: "
                              "the index is corrupt")
    return TensorEntry(name, dtype, shape, shard, offset, size, crc)


class _SSTable:
    """The entries of a LevelDB-format table file, read whole (checkpoint indexes are kilobytes)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        if len(self.data) < _FOOTER_LEN:
            raise CheckpointError(f"{path} is {len(self.data)} bytes, too short to be a checkpoint index (truncated?)", file=path)
        footer = self.data[-_FOOTER_LEN:]
        if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
            raise CheckpointError(f"{path} does not end with the table magic number: not a checkpoint index, or truncated",
                                  file=path)
        try:
            pos = 0
            handle = []
            for _ in range(4):  # metaindex offset and size, then index offset and size
                value, pos = _varint(footer, pos)
                handle.append(value)
            self.index_handle = (handle[2], handle[3])
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable table footer ({e})", file=path) from e

    def _block(self, offset: int, size: int) -> bytes:
        end = offset + size
        if end + _TRAILER_LEN > len(self.data) - _FOOTER_LEN:
            raise CheckpointError(f"{self.path}: block at byte {offset} runs past the end of the file (truncated?)",
                                  file=self.path)
        contents = self.data[offset:end]
        kind = self.data[end]
        stored = struct.unpack_from("<I", self.data, end + 1)[0]
        if mask_crc(google_crc32c.value(contents + bytes([kind]))) != stored:
            raise CheckpointError(f"{self.path}: block at byte {offset} fails its crc32c check (the file is corrupt)",
                                  file=self.path)
        if kind != 0:
            raise CheckpointError(f"{self.path}: block at byte {offset} is compressed (type {kind}), which gpt2hub does not read",
                                  file=self.path)
        return contents

    def _entries(self, block: bytes) -> list[tuple[bytes, bytes]]:
        if len(block) < 4:  # even an empty block holds its restart count
            raise CheckpointError(f"{self.path}: a block of {len(block)} bytes is too short to hold entries (corrupt)",
                                  file=self.path)
        n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
        limit = len(block) - 4 - 4 * n_restarts
        if limit < 0:
            raise CheckpointError(f"{self.path}: block restart array is larger than the block (corrupt)", file=self.path)
        entries, key, pos = [], b"", 0
        while pos < limit:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            if shared > len(key) or pos + unshared + value_len > limit:
                raise CheckpointError(f"{self.path}: malformed block entry at byte {pos} (corrupt)", file=self.path)
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            entries.append((key, block[pos:pos + value_len]))
            pos += value_len
        return entries

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for _, handle in self._entries(self._block(*self.index_handle)):
            offset, pos = _varint(handle, 0)
            size, _ = _varint(handle, pos)
            out.extend(self._entries(self._block(offset, size)))
        return out


def find_prefix(path: str | Path) -> Path:
    """The checkpoint prefix for a folder (read from its `checkpoint` file), an index file, or a prefix."""
    path = Path(path)
    if path.is_dir():
        state = path / "checkpoint"
        name = "model.ckpt"
        if state.exists():
            match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(), re.M)
            if match:
                name = match.group(1)
        return path / Path(name).name
    return path.with_suffix("") if path.suffix == ".index" else path


def _require_regular(path: Path) -> None:
    """Refuse a FIFO, device or folder without opening it (reading a FIFO would wait forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder): replace it with the real file",
                              file=path)


def read_index(index_path: Path) -> tuple[dict[str, TensorEntry], int]:
    """(variable name -> entry, number of data shards) of a tensor-bundle index file, every block's crc32c checked.

    Whatever is wrong with the file (truncated, corrupt, a value no checkpoint holds) is a CheckpointError naming it.
    """
    if not index_path.exists():
        raise CheckpointError(f"no checkpoint index at {index_path}", file=index_path)
    _require_regular(index_path)
    try:
        return _bundle(_SSTable(index_path).items())
    except CheckpointError as e:
        message = str(e) if str(e).startswith(str(index_path)) else f"{index_path}: {e}"
        raise CheckpointError(message, file=index_path) from None
    except ValueError as e:  # protobuf or key bytes that are not what they claim (UnicodeDecodeError included)
        raise CheckpointError(f"{index_path}: unreadable entry ({e}); the file is corrupt", file=index_path) from None


def _bundle(items: list[tuple[bytes, bytes]]) -> tuple[dict[str, TensorEntry], int]:
    """The entries and shard count of a bundle's table items: the header under the empty key, then variables."""
    entries: dict[str, TensorEntry] = {}
    header = None
    for key, value in items:
        if key == b"":
            header = dict(proto_fields(value))
        else:
            name = key.decode()
            entries[name] = _parse_entry(name, value)
    if header is None:
        raise CheckpointError("no bundle header: not a tensor-bundle index")
    if _number(header.get(2, 0)) != 0:
        raise CheckpointError("it holds big-endian tensors, which gpt2hub does not read")
    shards = _number(header.get(1, 1))
    if not 1 <= shards <= MAX_SHARDS:
        raise CheckpointError(f"its header counts {shards} data files (1 to {MAX_SHARDS} can be named): corrupt")
    if (stray := next((e for e in entries.values() if e.shard >= shards), None)) is not None:
        raise CheckpointError(f"variable {quoted(stray.name)} lies in data file {stray.shard}, but the header counts "
                              f"{shards}: corrupt")
    return entries, shards


class TFCheckpoint:
    """Variables of a TensorFlow V2 checkpoint. `read` returns arrays mapped copy-on-write from the data files
    (writing to one never reaches the file)."""

    def __init__(self, path: str | Path):
        self.prefix = find_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        self.entries, self.num_shards = read_index(self.index_path)
        self._maps: dict[int, mmap.mmap | bytes] = {}  # an empty data file has no map: b""

    def data_path(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def _map(self, shard: int) -> mmap.mmap | bytes:
        if shard not in self._maps:
            path = self.data_path(shard)
            if path.exists():
                _require_regular(path)
            try:
                with open(path, "rb") as f:
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else b""
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint data file {path} is missing", file=path) from None
        return self._maps[shard]

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The variable `name`, its crc32c checked unless verify=False."""
        try:
            e = self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.index_path} has no variable {quoted(name)}", file=self.index_path) from None
        buf = self._map(e.shard)
        if e.offset + e.size > len(buf):
            raise CheckpointError(
                f"{self.data_path(e.shard)} ends at byte {len(buf)} but variable {quoted(name)} needs bytes up to "
                f"{e.offset + e.size}: the file is truncated", file=self.data_path(e.shard))
        raw = np.frombuffer(buf, dtype=np.uint8, count=e.size, offset=e.offset)
        if verify and e.crc32c is not None and mask_crc(google_crc32c.value(raw)) != e.crc32c:
            raise CheckpointError(
                f"{self.data_path(e.shard)}: variable {quoted(name)} fails its crc32c check: the file is corrupt",
                    file=self.data_path(e.shard))
        return raw.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        # arrays returned by read() may still view the maps; each map closes when its last view goes
        self._maps.clear()

    def __enter__(self) -> TFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing ---------------------------------------------------------------------------------------------------------
_BLOCK_SIZE = 256 * 1024  # TensorFlow's block size for bundle indexes
_RESTART_INTERVAL = 16
_DTYPE_CODES = {np.dtype(v).newbyteorder("<"): k for k, v in _DTYPES.items()}


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def proto_field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _put_varint(number << 3 | 2) + _put_varint(len(value)) + value
    return _put_varint(number << 3) + _put_varint(value)


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(prev)) and key[shared] == prev[shared]:
                shared += 1
        out += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        out += key[shared:] + value
        prev = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def write_checkpoint(prefix: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Write a single-shard V2 checkpoint (PREFIX.index, PREFIX.data-00000-of-00001) that TensorFlow reads."""
    prefix = Path(prefix)
    entries = [(b"", proto_field(1, 1) + proto_field(3, proto_field(1, 1)))]  # header: one shard, little endian, producer 1
    offset = 0
    with open(f"{prefix}.data-00000-of-00001", "wb") as data:
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name])
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            raw = array.view(np.uint8).reshape(-1)
            data.write(raw.data)
            shape = b"".join(proto_field(2, proto_field(1, d)) for d in array.shape)
            entry = (proto_field(1, _DTYPE_CODES[array.dtype]) + proto_field(2, shape) + proto_field(4, offset)
                     + proto_field(5, raw.size)
                     + _put_varint(6 << 3 | 5) + struct.pack("<I", mask_crc(google_crc32c.value(raw))))
            entries.append((name.encode(), entry))
            offset += raw.size
    out, index = bytearray(), []

    def emit(block: bytes) -> bytes:
        handle = _put_varint(len(out)) + _put_varint(len(block))
        out.extend(block + b"\0" + struct.pack("<I", mask_crc(google_crc32c.value(block + b"\0"))))
        return handle

    start = 0
    while start < len(entries):
        end, size = start, 0
        while end < len(entries) and (end == start or size < _BLOCK_SIZE):
            size += len(entries[end][0]) + len(entries[end][1]) + 8
            end += 1
        index.append((entries[end - 1][0], emit(_block(entries[start:end], _RESTART_INTERVAL))))
        start = end
    meta_handle = emit(_block([], 1))
    index_handle = emit(_block(index, 1))
    footer = (meta_handle + index_handle).ljust(_FOOTER_LEN - 8, b"\0") + struct.pack("<Q", _TABLE_MAGIC)
    Path(f"{prefix}.index").write_bytes(bytes(out) + footer)
