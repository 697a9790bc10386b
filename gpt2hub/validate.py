"""What each published file must be the moment it arrives, before it is recorded.

Each check raises IntegrityError("is not a valid NAME: why"); the caller prefixes the file or URL. hparams.json /
config.json: a JSON object of positive integers matching the model; `checkpoint`: whole lines naming model.ckpt;
model.ckpt.index: a whole tensor-bundle index (magic, every block's crc32c) holding exactly the float32 tensors the
model's n_layer implies, inside the data file; model.safetensors: a header with exactly those tensors, inside the
file; model.ckpt.meta: a protobuf message; the vocabulary files: well-formed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from . import names
from .config import ModelConfig
from .errors import CheckpointError, ConversionError, IntegrityError, quoted
from .registry import HF_WEIGHTS, INDEX_FILE, ModelSpec
from .tf_checkpoint import proto_fields, read_index
from .tokenizer import read_encoder, read_merges


def bad_file(name: str, why: str) -> IntegrityError:
    return IntegrityError(f"is not a valid {name}: {why}")


def read_json_file(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: nested deep
        raise bad_file(name, f"not JSON ({str(e)[:80]}; an HTML error page or a cut-off body?)") from None


def check_config(data: Any, spec: ModelSpec | None, name: str) -> dict:
    """The book's config from hyperparameters, which must match `spec` when one is given."""
    try:
        cfg = ModelConfig.from_hparams(data, name)
    except ConversionError as e:
        raise IntegrityError(str(e)) from None
    if spec is not None and cfg != spec.arch:
        raise bad_file(name, f"it describes {cfg.hparams()}, not {spec.name} ({spec.hparams()})")
    return cfg.book()


def check_index(path: Path, cfg: dict, data_size: int | None) -> None:
    """A tensor-bundle index must hold exactly the float32 variables an n_layer model has, inside the data file."""
    try:
        entries, shards = read_index(path)  # parses it whole, checking every block's crc32c
    except CheckpointError as e:
        raise bad_file(INDEX_FILE, str(e).removeprefix(f"{path}: ").replace(str(path), "the file")) from None
    want = {"model/" + n: names.openai_shape(n, cfg) for n in names.openai_names(cfg["n_layers"])}
    have = set(entries)
    if shards != 1:
        raise bad_file(INDEX_FILE, f"it spreads the weights over {shards} data files; GPT-2 has one")
    if have != set(want):
        extra, missing = [quoted(n) for n in sorted(have - set(want))[:3]], sorted(set(want) - have)[:3]
        raise bad_file(INDEX_FILE, f"its variables do not fit n_layer={cfg['n_layers']} (unexpected {extra}, missing {missing})")
    for key, entry in entries.items():  # read_index refused negative offsets and sizes, absurd shapes and shards
        end = entry.offset + entry.size
        if entry.dtype != np.dtype("<f4"):
            raise bad_file(INDEX_FILE, f"variable {key} is {entry.dtype}, expected float32")
        if math.prod(entry.shape) != math.prod(want[key]):  # OpenAI's shapes have extra 1s: the count decides
            raise bad_file(INDEX_FILE, f"variable {key} has shape {quoted(entry.shape)}, expected {want[key]}")
        if data_size is not None and end > data_size:
            raise bad_file(INDEX_FILE, f"variable {key} ends at byte {end}, past the data file's {data_size} bytes")


def check_safetensors(path: Path, cfg: dict) -> None:
    """A safetensors file must have a readable header holding exactly a GPT-2's tensors, each inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise bad_file(HF_WEIGHTS, "no safetensors header (truncated, or an HTML page?)")
        header = _header(f.read(n))
    want = {names.hf_name(n): names.openai_shape(n, cfg) for n in names.openai_names(cfg["n_layers"])}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    weights = {k.removeprefix("transformer."): v for k, v in tensors.items() if _maps_to_weight(k)}
    if set(weights) != set(want):
        raise bad_file(HF_WEIGHTS, f"its tensors do not fit n_layer={cfg['n_layers']} "
                               f"(missing {sorted(set(want) - set(weights))[:3]})")
    for key, info in tensors.items():
        if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
            raise bad_file(HF_WEIGHTS, f"tensor {key} has no data offsets")
        if not all(isinstance(o, int) and 0 <= o <= size - 8 - n for o in info["data_offsets"]):
            raise bad_file(HF_WEIGHTS, f"tensor {key} lies outside the file (truncated?)")


def _header(raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_file(HF_WEIGHTS, "its header is not JSON (damaged or truncated)") from None
    if not isinstance(header, dict):
        raise bad_file(HF_WEIGHTS, "its header is not a JSON object")
    return header


def _maps_to_weight(key: str) -> bool:
    try:
        return names.openai_name(key) is not None
    except KeyError:
        raise bad_file(HF_WEIGHTS, f"it holds {key[:80]!r}, which is not a GPT-2 tensor") from None


def check_vocab(name: str, path: Path) -> None:
    """encoder.json / vocab.json: a JSON object of token -> id; vocab.bpe / merges.txt: a header, then pairs; every
    token made of GPT-2's byte characters (what the tokenizer will read, checked now)."""
    read = read_encoder if name.endswith(".json") else read_merges
    try:
        read(path.read_bytes())
    except ValueError as e:
        raise bad_file(name, str(e)) from None


def check_protobuf(path: Path, name: str) -> None:
    """model.ckpt.meta is a serialized MetaGraphDef: it must at least parse as protobuf fields (an HTML page fails)."""
    try:
        fields = proto_fields(path.read_bytes()[: 1 << 20]) if path.stat().st_size <= 1 << 20 else [(1, b"")]
    except (ValueError, IndexError, struct.error):
        raise bad_file(name, "not a protobuf message (an HTML page or a cut-off body?)") from None
    if not fields:
        raise bad_file(name, "empty")


def check_checkpoint_file(path: Path) -> None:
    """TensorFlow's `checkpoint` state file: whole `key: "value"` lines, naming the checkpoint model.ckpt."""
    text = path.read_bytes()[:4096].decode("utf-8", "replace")
    whole = text.endswith("\n") and all(re.fullmatch(r'\w+:\s*"[^"]*"', ln) for ln in text.splitlines() if ln)
    match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.M)
    if not whole:
        raise bad_file("checkpoint", "not whole 'key: \"value\"' lines (cut off, or an HTML page?)")
    if not match or match.group(1) != "model.ckpt":
        raise bad_file("checkpoint", 'it does not name the checkpoint model.ckpt (model_checkpoint_path: "model.ckpt")')
