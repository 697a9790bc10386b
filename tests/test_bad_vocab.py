"""Garbage vocabulary files (encoder.json / vocab.json, vocab.bpe / merges.txt): one-line IntegrityErrors naming the
file, from the arrival check (validate.check_vocab) and from the tokenizer (mergeable_ranks), never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from factory import DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2hub import IntegrityError, load_tokenizer
from gpt2hub.tokenizer import ENDOFTEXT, byte_decoder, encoding_from_files, mergeable_ranks
from gpt2hub.validate import check_vocab

NAMES = ("encoder.json", "vocab.json", "vocab.bpe", "merges.txt")
ALPHABET = "".join(byte_decoder())


def _small_vocab(merges: int = 60) -> tuple[bytes, bytes]:
    """A consistent pair cut from GPT-2's files: the 256 byte tokens and the first `merges` merges."""
    bpe = (DATA / "vocab.bpe").read_bytes().decode().split("\n")[:merges + 1]
    encoder = {k: v for k, v in json.loads((DATA / "encoder.json").read_bytes()).items() if v < 256 + merges}
    return json.dumps(encoder).encode(), ("\n".join(bpe) + "\n").encode()


SMALL = _small_vocab()


def _refused_by_check(tmp_path, name: str, data: bytes) -> str | None:
    """check_vocab's message for `data` as `name` (None if accepted), checked to be one line naming the file."""
    path = tmp_path / name
    path.write_bytes(data)
    try:
        check_vocab(name, path)
    except IntegrityError as e:
        message = str(e)
        assert message.startswith(f"is not a valid {name}: ") and "\n" not in message and len(message) < 400, message
        return message
    return None


def _ranks_or_integrity_error(encoder: bytes, merges: bytes) -> dict | None:
    try:
        return mergeable_ranks(encoder, merges, ("enc-file", "bpe-file"))
    except IntegrityError as e:
        message = str(e)
        assert ("enc-file" in message or "bpe-file" in message) and "\n" not in message and len(message) < 500, message
        return None


def test_the_small_pair_is_consistent():
    assert len(mergeable_ranks(*SMALL)) == 256 + 60


@pytest.mark.parametrize("name, data, wanted", [
    ("vocab.json", b'{"\\u0000": 0}', "'\\x00'"),  # was accepted, then `KeyError: '\x00'` in the tokenizer
    ("vocab.json", b'{"": 0}', "non-empty"),
    ("vocab.json", b'{"a": true}', "id True"),
    ("vocab.json", b'{"a": -1}', "id -1"),
    ("vocab.json", b'{"a": 1, "b": 1}', "share an id"),
    ("vocab.json", b"[" * 100_000, "not JSON"),  # nested deeper than the JSON parser recurses
    ("encoder.json", b"<html>503</html>", "not JSON"),
    ("merges.txt", b"#version: 0.2\na b c\n", "line 2 holds 3 tokens"),  # was `too many values to unpack`
    ("merges.txt", b"#version: 0.2\na \x00\n", "'\\x00'"),
    ("merges.txt", b"#version: 0.2\na\xe2\x80\xa8b c\n", "holds 3 tokens"),  # U+2028: a line break to str.split
    ("vocab.bpe", b"\xff\xfe", "not UTF-8"),
    ("vocab.bpe", b"a b\n", "not '#version"),
])
def test_garbage_is_refused_on_arrival_and_by_the_tokenizer(tmp_path, name, data, wanted):
    message = _refused_by_check(tmp_path, name, data)
    assert message is not None and wanted in message, message
    pair = (data, SMALL[1]) if name.endswith(".json") else (SMALL[0], data)
    with pytest.raises(IntegrityError) as err:
        mergeable_ranks(*pair, (f"x/{NAMES[0]}", f"x/{NAMES[2]}"))
    assert wanted in str(err.value) and "\n" not in str(err.value)
    assert (f"x/{NAMES[0]}" if name.endswith(".json") else f"x/{NAMES[2]}") in str(err.value)


def test_the_published_files_pass(tmp_path):
    for name, source in zip(NAMES, ("encoder.json", "encoder.json", "vocab.bpe", "vocab.bpe"), strict=True):
        assert _refused_by_check(tmp_path, name, (DATA / source).read_bytes()) is None


def test_a_folder_with_a_garbage_vocab_json_is_a_one_line_error_naming_it(tmp_path):
    shutil.copyfile(DATA / "vocab.bpe", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text(json.dumps({"\x00": 0, ENDOFTEXT: 1}))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(IntegrityError) as err:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path / "vocab.json") in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "vocab.json").write_bytes((DATA / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t h\n")
    with pytest.raises(IntegrityError, match="merges.txt.*line 2 holds 3 tokens"):
        encoding_from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENS = st.text(alphabet=st.sampled_from(ALPHABET + " \x00\n\r\t\u2028é<|>"), max_size=6)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=False) | TOKENS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TOKENS, inner, max_size=3), max_leaves=8)


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.binary(max_size=200))
def test_any_bytes_are_refused_in_one_line_or_accepted(tmp_path, name, data):
    _refused_by_check(tmp_path, name, data)
    _ranks_or_integrity_error(data, SMALL[1]) if name.endswith(".json") else _ranks_or_integrity_error(SMALL[0], data)


@FUZZ
@given(tokens=st.dictionaries(TOKENS, JSON, max_size=6))
def test_any_json_object_is_refused_in_one_line_or_accepted(tmp_path, tokens):
    data = json.dumps(tokens).encode()
    for name in NAMES[:2]:
        _refused_by_check(tmp_path, name, data)
    _ranks_or_integrity_error(data, SMALL[1])


@FUZZ
@given(lines=st.lists(st.lists(TOKENS, max_size=4).map(" ".join), max_size=6),
       header=st.sampled_from(["#version: 0.2", "#version", "", "# version"]))
def test_any_merges_text_is_refused_in_one_line_or_accepted(tmp_path, lines, header):
    data = "\n".join([header, *lines]).encode()
    for name in NAMES[2:]:
        _refused_by_check(tmp_path, name, data)
    _ranks_or_integrity_error(SMALL[0], data)


@FUZZ
@given(data=st.data())
def test_damaged_copies_of_a_consistent_pair_raise_only_integrity_errors(data):
    which = data.draw(st.integers(0, 1), label="file")
    files = list(SMALL)
    raw = bytearray(files[which])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        edit = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="edit")
        if edit == "flip" and at < len(raw):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif edit == "cut":
            del raw[at:at + data.draw(st.integers(1, 40))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    files[which] = bytes(raw)
    ranks = _ranks_or_integrity_error(*files)
    assert ranks is None or len(ranks) == 256 + 60  # a damage that still parses and agrees is a pair still
