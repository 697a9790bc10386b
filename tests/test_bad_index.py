"""Malformed `model.ckpt.index` files: every one is a short CheckpointError naming the file, never a traceback.

The indexes here are built by a small table writer of this file's own (LevelDB's format: blocks of prefix-compressed
entries, each with a crc32c trailer, an index block and a footer), so that a damaged block can carry a valid crc32c
and reach the parser behind the checksum, as a mirror serving a crafted file would.
"""

from __future__ import annotations

import logging
import struct

import google_crc32c
import numpy as np
import pytest
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2hub import CheckpointError, IntegrityError, TFCheckpoint, from_pretrained
from gpt2hub.registry import INDEX_FILE
from gpt2hub.tf_checkpoint import MAX_RANK, mask_crc, proto_field, read_index, write_checkpoint
from gpt2hub.validate import check_index

MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)
HEADER = proto_field(1, 1) + proto_field(3, proto_field(1, 1))  # one shard, little endian


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A block of entries without prefix compression (every entry a restart point)."""
    out, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(out))
        out += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def table(data_blocks: list[bytes], index_block: bytes | None = None) -> bytes:
    """A table file holding `data_blocks` (contents), each with a valid trailer; the index block made to point at
    them unless given."""
    out, handles = bytearray(), []

    def emit(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + b"\0" + struct.pack("<I", mask_crc(google_crc32c.value(contents + b"\0"))))
        return handle

    for i, contents in enumerate(data_blocks):
        handles.append((b"\xff" * (i + 1), emit(contents)))
    meta = emit(block([]))
    index = emit(index_block if index_block is not None else block(handles))
    return bytes(out) + (meta + index).ljust(40, b"\0") + MAGIC


def entry(shape: tuple[int, ...], offset: int, size: int, dtype: int = 1, shard: int = 0) -> bytes:
    dims = b"".join(proto_field(2, proto_field(1, d & (1 << 64) - 1)) for d in shape)
    return (proto_field(1, dtype) + proto_field(2, dims) + proto_field(3, shard) + proto_field(4, offset & (1 << 64) - 1)
            + proto_field(5, size & (1 << 64) - 1))


def index_of(*variables: tuple[bytes, bytes]) -> bytes:
    return table([block([(b"", HEADER), *variables])])


GOOD = index_of((b"model/b", entry((3,), 0, 12)), (b"model/w", entry((2, 3), 12, 24)))


def refused(path, *match: str) -> str:
    """read_index's error for `path`, checked to be one short line naming the file."""
    with pytest.raises(CheckpointError) as err:
        read_index(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and len(message) < 400, message
    assert err.value.file == path
    for m in match:
        assert m in message, message
    return message


def test_the_writer_here_makes_an_index_that_reads(tmp_path):
    (tmp_path / "i.index").write_bytes(GOOD)
    entries, shards = read_index(tmp_path / "i.index")
    assert shards == 1 and {n: (e.shape, e.offset, e.size) for n, e in entries.items()} == {
        "model/b": ((3,), 0, 12), "model/w": ((2, 3), 12, 24)}


@pytest.mark.parametrize("contents", [b"", b"\x01\x00", b"\x00\x00\x00"], ids=["empty", "2 bytes", "3 bytes"])
def test_an_empty_or_truncated_block_with_a_valid_crc_is_refused(tmp_path, contents):
    path = tmp_path / "i.index"
    path.write_bytes(table([contents]))  # a data block
    refused(path, "too short")
    path.write_bytes(table([], index_block=contents))  # the index block itself
    refused(path, "too short")


def test_a_fixed_width_field_cut_off_at_the_end_of_an_entry_is_refused(tmp_path):
    # wire type 1 (8 bytes) with 3 left: was `struct.error: unpack_from requires a buffer of at least N bytes`
    path = tmp_path / "i.index"
    path.write_bytes(index_of((b"model/w", entry((2,), 0, 8) + varint(6 << 3 | 1) + b"\x01\x02\x03")))
    refused(path, "truncated")


@pytest.mark.parametrize("offset, size", [(-4, 8), (0, -8), (-(1 << 40), 8)])
def test_a_negative_offset_or_size_is_refused_when_the_index_is_read(tmp_path, offset, size):
    path = tmp_path / "i.index"
    path.write_bytes(index_of((b"model/w", entry((2,), offset, size))))
    refused(path, "model/w", "negative")


def test_a_size_that_is_not_the_shapes_is_refused_when_the_index_is_read(tmp_path):
    path = tmp_path / "i.index"
    path.write_bytes(index_of((b"model/w", entry((2, 3), 0, 25))))
    refused(path, "model/w", "claims 25 bytes")


def test_a_shape_with_absurdly_many_dimensions_is_refused_in_a_short_message(tmp_path):
    path = tmp_path / "i.index"
    path.write_bytes(index_of((b"model/w", entry((1,) * 300_000, 0, 4))))  # was a one-line error of 300,193 chars
    refused(path, "model/w", f"more than {MAX_RANK} dimensions")
    path.write_bytes(index_of((b"model/w", entry((1,) * MAX_RANK, 0, 4))))  # TensorFlow's own limit still reads
    assert read_index(path)[0]["model/w"].shape == (1,) * MAX_RANK


def test_a_long_variable_name_is_cut_in_messages(tmp_path):
    path = tmp_path / "i.index"
    path.write_bytes(index_of((b"model/" + b"x" * 100_000, entry((2,), -1, 8))))
    assert "xxxx..." in refused(path, "negative")


@pytest.mark.parametrize("header, wanted", [
    (proto_field(1, 0), "counts 0 data files"),
    (proto_field(1, 10**6), "counts 1000000 data files"),
    (proto_field(1, b"\x01"), "numeric"),
], ids=["no shards", "too many shards", "bytes"])
def test_an_impossible_header_is_refused(tmp_path, header, wanted):
    path = tmp_path / "i.index"
    path.write_bytes(table([block([(b"", header), (b"model/w", entry((2,), 0, 8))])]))
    refused(path, wanted)


def test_a_variable_in_a_shard_the_header_does_not_count_is_refused(tmp_path):
    path = tmp_path / "i.index"
    path.write_bytes(index_of((b"model/w", entry((2,), 0, 8, shard=3))))
    refused(path, "model/w", "data file 3")


def _tiny_index(path, header: bytes = HEADER, **wrong: dict) -> None:
    """The tiny model's index (zeros), with the entry fields in `wrong[name]` replaced."""
    offset, items = 0, []
    for name, shape in sorted(_shapes(TINY.config()).items()):
        fields = {"shape": shape, "offset": offset, "size": 4 * int(np.prod(shape)), **wrong.get(name, {})}
        items.append((f"model/{name}".encode(), entry(**fields)))
        offset += 4 * int(np.prod(shape))
    path.write_bytes(table([block([(b"", header), *items])]))


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from gpt2hub import names

    return {n: names.openai_shape(n, cfg) for n in names.openai_names(cfg["n_layers"])}


@pytest.mark.parametrize("header, wrong, message", [
    (HEADER, {"wte": {"shard": 1}}, "'model/wte' lies in data file 1, but the header counts 1"),
    (proto_field(1, 2), {"wte": {"shard": 1}}, "spreads the weights over 2 data files"),
    (HEADER, {"wte": {"dtype": 19, "size": 2 * 50257 * 32}}, "model/wte is float16, expected float32"),
    (HEADER, {"wpe": {"shape": (7,), "size": 28}}, "model/wpe has shape (7,), expected (64, 32)"),
], ids=["shard past the header's count", "two shards", "dtype", "shape"])
def test_check_index_says_what_is_wrong_with_a_variable(tmp_path, header, wrong, message):
    path = tmp_path / "model.ckpt.index"
    _tiny_index(path)
    check_index(path, TINY.config(), None)  # the good one passes
    _tiny_index(path, header, **wrong)
    with pytest.raises(IntegrityError) as err:
        check_index(path, TINY.config(), None)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- fuzzing: truncations and bit flips of a valid index, behind the crc32c or not ---------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    write_checkpoint(folder / "model.ckpt", {"model/wte": rng.standard_normal((7, 4)).astype(np.float32),
                                             "model/h0/b": np.zeros(3, np.float16), "model/count": np.arange(2)})
    return (folder / "model.ckpt.index").read_bytes()


def _only_checkpoint_errors(path, raw: bytes) -> None:
    path.write_bytes(raw)
    try:
        read_index(path)
    except CheckpointError as e:
        assert str(path) in str(e) and "\n" not in str(e) and len(str(e)) < 400, str(e)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_truncated_or_flipped_files_raise_only_checkpoint_errors(tmp_path, written, data):
    raw = bytearray(written[:data.draw(st.integers(0, len(written)), label="length")])
    for _ in range(data.draw(st.integers(0, 3), label="flips")):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    _only_checkpoint_errors(tmp_path / "f.index", bytes(raw))


def _mutate(data: st.DataObject, raw: bytes, label: str) -> bytes:
    """`raw` cut, flipped, spliced or extended, as hypothesis draws it."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label=f"{label} edits")):
        at = data.draw(st.integers(0, len(out)), label=f"{label} at")
        kind = data.draw(st.sampled_from(["cut", "flip", "insert", "delete"]), label=f"{label} edit")
        if kind == "cut":
            del out[at:]
        elif kind == "flip" and at < len(out):
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(max_size=12), label=f"{label} bytes")
        else:
            del out[at:at + data.draw(st.integers(1, 8))]
    return bytes(out)


@FUZZ
@given(data=st.data())
def test_damage_behind_a_valid_crc_raises_only_checkpoint_errors(tmp_path, data):
    """Blocks and entries damaged, then sealed with correct crc32c trailers: the parser itself meets the damage."""
    variables = [(b"model/b", entry((3,), 0, 12)), (b"model/w", entry((2, 3), 12, 24)), (b"model/z", entry((), 36, 4))]
    level = data.draw(st.sampled_from(["entry", "header", "block", "index block"]), label="level")
    if level == "entry":
        i = data.draw(st.integers(0, len(variables) - 1))
        variables[i] = (variables[i][0], _mutate(data, variables[i][1], "entry"))
    header = _mutate(data, HEADER, "header") if level == "header" else HEADER
    contents = block([(b"", header), *variables])
    if level == "block":
        contents = _mutate(data, contents, "block")
    index_block = None
    if level == "index block":
        index_block = _mutate(data, block([(b"\xff", varint(0) + varint(len(contents)))]), "index")
    _only_checkpoint_errors(tmp_path / "f.index", table([contents], index_block))


# -- served: a malformed index is refused on arrival and the next mirror serves the good one ------------------------
@pytest.mark.parametrize("damage", ["empty block", "negative offset"])
def test_a_mirror_serving_a_malformed_index_is_passed_over(hub_env, server, monkeypatch, caplog, damage):
    good = server.served.files[f"/{TINY.size}/{INDEX_FILE}"]
    if damage == "empty block":
        bad = table([b""])
    else:  # the real index with model/wte's offset made negative, every crc32c valid
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            Path(d, "i.index").write_bytes(good)
            raw = read_index(Path(d, "i.index"))[0]
        bad = index_of(*[(n.encode(), entry(e.shape, -e.offset - 1 if n == "model/wte" else e.offset, e.size))
                         for n, e in sorted(raw.items())])
    for key, body in list(server.served.files.items()):
        if key.startswith(f"/{TINY.size}/"):
            server.served.files["/bad" + key] = bad if key.endswith(INDEX_FILE) else body
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", f"{server.url}/bad {server.url}")
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        model = from_pretrained("gpt2-tiny")
    assert model.tok_emb.weight.shape[0] == TINY.vocab_size
    assert len(server.served.requests("GET", f"/bad/{TINY.size}/{INDEX_FILE}")) == 2  # once more, then the next mirror
    refusals = [r.getMessage() for r in caplog.records if INDEX_FILE in r.getMessage()]
    assert refusals and all("is not a valid model.ckpt.index" in m and len(m) < 600 for m in refusals), refusals
    assert TFCheckpoint(hub_env / "openai" / TINY.size / "raw" / "model.ckpt").read("model/wte").shape[0] == TINY.vocab_size
