"""Attacks on int8/int4 storage: a careless or hostile user editing, replacing or linking the quantized file and its
manifest, processes killed mid-quantizing, two at once, read-only caches, full disks, odd weights.

Each ends in a correct load (quantized again) or a one-line typed error naming the file and what to do: never a
segfault, a traceback, or logits other than the true quantized model's.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY64

from gpt2hub import from_pretrained
from gpt2hub.errors import GPT2HubError
from gpt2hub.files import crc32c_file
from gpt2hub.inventory import model_entry

X = torch.arange(40)[None] * 7


@pytest.fixture(autouse=True)
def _pinless(monkeypatch):
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")  # the test checkpoints have random weights


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).float()


def _typed(e: BaseException, *words: str) -> None:
    """A gpt2hub error in one line, naming each of `words`."""
    assert isinstance(e, GPT2HubError), f"{type(e).__name__} escaped: {e}"
    assert "\n" not in str(e) and all(w in str(e) for w in words), str(e)


def _paths(cache: Path, dtype: str) -> tuple[Path, Path]:
    converted = model_entry(cache, TINY64.name).converted
    return converted / f"{dtype}.safetensors", converted / f"{dtype}.json"


def _edit_manifest(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    for k in [k for k, v in changes.items() if v is _DROP]:
        del data[k]
    os.chmod(path, 0o644)
    path.write_text(json.dumps(data))


_DROP = object()


def _vouch(stored: Path, manifest: Path) -> None:
    """Record the stored file's present size, mtime and crc32c in its manifest, as a hostile user would."""
    st = stored.stat()
    _edit_manifest(manifest, bytes=st.st_size, mtime_ns=st.st_mtime_ns, crc32c=crc32c_file(stored))


def _outcome(scheme: str, first: torch.Tensor, *words: str) -> str:
    """Load again: the true logits ("loaded"), or a one-line typed error naming `words` ("refused")."""
    try:
        model = from_pretrained(TINY64.name, dtype=scheme)
    except GPT2HubError as e:
        _typed(e, *words)
        return "refused"
    assert torch.equal(_logits(model), first)
    return "loaded"


MANIFEST_EDITS = {
    "group_size as a string": {"group_size": "64"},
    "group_size 0": {"group_size": 0},
    "group_size -1": {"group_size": -1},
    "group_size 10**9": {"group_size": 10**9},
    "head tied": {"head": "tied"},
    "head int4": {"head": "int4"},
    "scheme int2": {"scheme": "int2"},
    "scheme missing": {"scheme": _DROP},
    "head missing": {"head": _DROP},
    "group_size missing": {"group_size": _DROP},
    "an extra field": {"surprise": [1, 2, 3]},
    "kind converted": {"kind": "converted"},
    "kind mapped": {"kind": "mapped"},
    "crc32c null": {"crc32c": None},
    "bytes a string": {"bytes": "123"},
    "config of another width": {"config": {"n_vocab": 50257, "n_ctx": 64, "n_embd": 128, "n_head": 2, "n_layer": 2}},
}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("edit", list(MANIFEST_EDITS), ids=list(MANIFEST_EDITS))
def test_an_edited_manifest_is_quantized_again_or_refused(hub_env, server, scheme, edit):
    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    stored, manifest = _paths(hub_env, scheme)
    _edit_manifest(manifest, **MANIFEST_EDITS[edit])
    assert _outcome(scheme, first, str(manifest)) == "loaded"


# the stored file replaced, linked, truncated, its header edited ------------------------------------------------------
def _header(stored: Path) -> tuple[dict, bytes]:
    raw = stored.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(stored: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    os.chmod(stored, 0o644)
    stored.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def _tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _past_the_end(h: dict) -> None:
    last = max(_tensors(h), key=lambda k: h[k]["data_offsets"][1])
    h[last]["data_offsets"] = [h[last]["data_offsets"][0] + 64, h[last]["data_offsets"][1] + 64]


def _overlapping(h: dict) -> None:
    a, b = [k for k in _tensors(h) if k.endswith("qweight")][:2]
    if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] == h[b]["data_offsets"][1] - h[b]["data_offsets"][0]:
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    else:
        h[b]["data_offsets"][0] -= 64


def _swapped_dtype(h: dict) -> None:
    for k in _tensors(h):
        if h[k]["dtype"] in ("I8", "U8"):
            h[k]["dtype"] = "U8" if h[k]["dtype"] == "I8" else "I8"


def _other_shape(h: dict) -> None:
    k = next(k for k in _tensors(h) if k.endswith("qweight"))
    h[k]["shape"] = [h[k]["shape"][1], h[k]["shape"][0]]


def _swapped_tensors(h: dict) -> None:
    """Two tensors of the same dtype and shape trade places: a valid file with other logits."""
    same = {}
    for k in _tensors(h):
        same.setdefault((h[k]["dtype"], tuple(h[k]["shape"])), []).append(k)
    a, b = next(v for v in same.values() if len(v) > 1 and v[0].endswith("qweight"))[:2]
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


HEADER_EDITS = {"offsets past the end": _past_the_end, "overlapping offsets": _overlapping,
                "int8 and uint8 swapped": _swapped_dtype, "a transposed shape": _other_shape,
                "two layers swapped": _swapped_tensors}


@pytest.mark.parametrize("vouched", [False, True], ids=["manifest as it was", "manifest vouching for it"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("edit", list(HEADER_EDITS), ids=list(HEADER_EDITS))
def test_an_edited_header_is_quantized_again_or_refused(hub_env, server, scheme, edit, vouched):
    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    stored, manifest = _paths(hub_env, scheme)
    header, data = _header(stored)
    HEADER_EDITS[edit](header)
    _rewrite(stored, header, data)
    if vouched:
        _vouch(stored, manifest)
    if vouched and edit == "two layers swapped":
        pytest.xfail("a valid file with its checksum recorded anew cannot be told from the one quantized")
    assert _outcome(scheme, first, str(stored)) == "loaded"


def _replace(stored: Path, how: str, outside: Path) -> None:
    body = stored.read_bytes()
    os.chmod(stored, 0o644)
    stored.unlink()
    if how == "a link to a copy outside":
        (outside / "copy.safetensors").write_bytes(body)
        stored.symlink_to(outside / "copy.safetensors")
    elif how == "a link to other bytes outside":
        (outside / "other.safetensors").write_bytes(b"\0" * len(body))
        stored.symlink_to(outside / "other.safetensors")
    elif how == "a folder":
        stored.mkdir()
        (stored / "inside").write_bytes(b"x")
    elif how == "an empty file":
        stored.write_bytes(b"")
    elif how == "truncated":
        stored.write_bytes(body[:len(body) // 2])
    elif how == "a FIFO":
        os.mkfifo(stored)


REPLACEMENTS = ["a link to a copy outside", "a link to other bytes outside", "a folder", "an empty file", "truncated",
                "a FIFO"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("how", REPLACEMENTS)
def test_a_replaced_stored_file_is_quantized_again_and_nothing_outside_changes(hub_env, server, tmp_path, scheme, how):
    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    stored, manifest = _paths(hub_env, scheme)
    outside = tmp_path / "outside"
    outside.mkdir()
    _replace(stored, how, outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    if how == "a folder":  # what is in it may be the user's: refused, before quantizing, saying what to do
        assert _outcome(scheme, first, str(stored), "is a folder", "remove it by hand") == "refused"
        assert [p.name for p in stored.iterdir()] == ["inside"]
        os.unlink(stored / "inside")
        os.rmdir(stored)
    assert _outcome(scheme, first, str(stored)) == "loaded"
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_an_int4_file_renamed_to_int8_with_its_manifest_edited_to_match(hub_env, server):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    from_pretrained(TINY64.name, dtype="int4")
    int8, manifest = _paths(hub_env, "int8")
    int4, _ = _paths(hub_env, "int4")
    os.chmod(int8, 0o644)
    os.replace(int4, int8)
    _vouch(int8, manifest)
    assert _outcome("int8", first, str(int8)) == "loaded"
