import shutil
import struct

import google_crc32c
import numpy as np
import pytest
from factory import write_tf_checkpoint

from gpt2hub import CheckpointError, TFCheckpoint
from gpt2hub.tf_checkpoint import _parse_entry, _SSTable, _varint, mask_crc, proto_field


def _tf_load(prefix, name):
    import tensorflow as tf

    return tf.train.load_variable(str(prefix), name)


def test_reads_every_variable_as_tensorflow_does(tf_tiny_folder):
    folder, weights = tf_tiny_folder
    ckpt = TFCheckpoint(folder)
    assert sorted(ckpt.names()) == sorted(weights)
    for name in ckpt.names():
        got = ckpt.read(name)
        np.testing.assert_array_equal(got, _tf_load(folder / "model.ckpt", name))
        assert got.shape == weights[name].shape and got.dtype == np.float32
    assert ckpt.entries["model/h0/attn/c_attn/w"].shape == (1, 32, 96)


def test_multi_block_index_and_other_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    # TensorFlow's index blocks hold 256 KiB; long keys that differ early defeat prefix compression
    weights = {f"model/{i:04d}_{'long_variable_name_' * 12}/w": rng.standard_normal((3, i % 5 + 1)).astype(np.float32)
               for i in range(1500)}
    weights["model/steps"] = np.arange(7, dtype=np.int64)
    weights["model/half"] = rng.standard_normal((4, 4)).astype(np.float16)
    write_tf_checkpoint(tmp_path / "model.ckpt", weights)
    table = _SSTable(tmp_path / "model.ckpt.index")
    assert len(table._entries(table._block(*table.index_handle))) >= 2  # several data blocks
    ckpt = TFCheckpoint(tmp_path / "model.ckpt")
    assert len(ckpt.names()) == len(weights)
    for name in list(weights)[::97] + ["model/steps", "model/half"]:
        np.testing.assert_array_equal(ckpt.read(name), _tf_load(tmp_path / "model.ckpt", name))
        assert ckpt.read(name).dtype == weights[name].dtype


def _copy(tiny_folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_folder[0], dst)
    return dst


def test_corrupt_tensor_names_file_and_tensor(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    ckpt = TFCheckpoint(folder)
    entry = ckpt.entries["model/h1/mlp/c_fc/w"]
    data = folder / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 10] ^= 0x01
    data.write_bytes(bytes(raw))
    ckpt = TFCheckpoint(folder)
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001.*model/h1/mlp/c_fc/w.*crc32c"):
        ckpt.read("model/h1/mlp/c_fc/w")
    ckpt.read("model/h0/mlp/c_fc/w")  # the others are intact


def test_truncated_data_file(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    ckpt = TFCheckpoint(folder)
    last = max(ckpt.entries.values(), key=lambda e: e.offset)
    with pytest.raises(CheckpointError, match=r"truncated"):
        ckpt.read(last.name)


@pytest.mark.parametrize("cut", [10, 100, 1000])
def test_truncated_or_corrupt_index(tiny_folder, tmp_path, cut):
    folder = _copy(tiny_folder, tmp_path)
    index = folder / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-cut])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index"):
        TFCheckpoint(folder)


def test_flipped_index_byte_fails_block_crc(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    index = folder / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[40] ^= 0x20
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"crc32c|corrupt"):
        TFCheckpoint(folder)


@pytest.mark.parametrize("entry, wanted", [
    (proto_field(1, 1) + proto_field(2, 7), "length-delimited"),  # the shape message given as a number
    (proto_field(1, 1) + proto_field(2, proto_field(2, 5)), "length-delimited"),  # a dimension message as a number
    (proto_field(1, b"\x01"), "numeric"),  # the dtype code given as bytes
    (proto_field(1, 1) + proto_field(4, b"\x00"), "numeric"),  # the offset given as bytes
], ids=["shape", "dimension", "dtype", "offset"])
def test_index_entry_field_of_the_wrong_wire_type_is_refused(entry, wanted):
    # read_index turns this ValueError into a CheckpointError naming the index file ("unreadable entry")
    with pytest.raises(ValueError, match=f"a {wanted} protobuf field holds"):
        _parse_entry("model/wte", entry)


def test_compressed_block_is_refused_clearly(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    index = folder / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    # the first data block's handle is the first value of the index block
    table = _SSTable(index)
    _, handle = table._entries(table._block(*table.index_handle))[0]
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    raw[offset + size] = 1  # snappy
    crc = mask_crc(google_crc32c.value(bytes(raw[offset:offset + size]) + b"\x01"))
    raw[offset + size + 1:offset + size + 5] = struct.pack("<I", crc)
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="compressed"):
        TFCheckpoint(folder)


def test_missing_data_file_and_missing_index(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        TFCheckpoint(folder).read("model/wte")
    with pytest.raises(CheckpointError, match="no checkpoint index"):
        TFCheckpoint(tmp_path / "nothing")


def test_masked_crc_matches_what_tensorflow_stores(tf_tiny_folder):
    # TensorFlow wrote each entry's crc32c field; the masked crc of the raw bytes must reproduce it exactly
    ckpt = TFCheckpoint(tf_tiny_folder[0])
    data = (tf_tiny_folder[0] / "model.ckpt.data-00000-of-00001").read_bytes()
    for e in ckpt.entries.values():
        crc = google_crc32c.value(data[e.offset:e.offset + e.size])
        assert mask_crc(crc) == e.crc32c and mask_crc(crc) != crc


def test_our_writer_is_read_by_tensorflow(tmp_path):
    from gpt2hub.tf_checkpoint import write_checkpoint

    rng = np.random.default_rng(1)
    tensors = {f"model/h{i}/{'x' * 300}/w": rng.standard_normal((2, 3)).astype(np.float32) for i in range(1200)}
    tensors["model/wte"] = rng.standard_normal((50, 8)).astype(np.float32)
    tensors["model/count"] = np.arange(5, dtype=np.int64)
    tensors["model/scalar"] = np.float32(2.5).reshape(())
    write_checkpoint(tmp_path / "model.ckpt", tensors)
    table = _SSTable(tmp_path / "model.ckpt.index")
    assert len(table._entries(table._block(*table.index_handle))) >= 2
    import tensorflow as tf

    reader, ours = tf.train.load_checkpoint(str(tmp_path / "model.ckpt")), TFCheckpoint(tmp_path / "model.ckpt")
    assert sorted(reader.get_variable_to_shape_map()) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
        np.testing.assert_array_equal(ours.read(name), value)


def test_the_test_checkpoints_written_by_gpt2hub_hold_what_tensorflow_writes(tiny_folder, tf_tiny_folder):
    """The test suite's checkpoints come from gpt2hub's writer; TensorFlow's, from the same weights, read the same
    and load into the same model, so the tests built on them prove what they proved with TensorFlow's."""
    import torch

    from gpt2hub import from_pretrained

    ours, theirs = TFCheckpoint(tiny_folder[0]), TFCheckpoint(tf_tiny_folder[0])
    assert sorted(ours.names()) == sorted(theirs.names())
    for name in ours.names():
        np.testing.assert_array_equal(ours.read(name), theirs.read(name))
        np.testing.assert_array_equal(ours.read(name), _tf_load(tiny_folder[0] / "model.ckpt", name))
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(from_pretrained(tiny_folder[0])(idx), from_pretrained(tf_tiny_folder[0])(idx))
