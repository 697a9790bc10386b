"""GPT-2's tokenizer as a `tiktoken.Encoding`, built offline from a model's encoder.json and vocab.bpe."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import tiktoken

from .errors import IntegrityError, quoted
from .registry import TOKENIZER_SHA256

ENDOFTEXT = "<|endoftext|>"
MAX_RANK = 1 << 31  # token ids must be below this (tiktoken keeps ranks in 32 bits)
T = TypeVar("T")
# tiktoken's r50k pattern: OpenAI's original GPT-2 split pattern, written to run faster
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in characters for bytes (data gym), mapped back to the bytes."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


def _token_bytes(token: object, decode: dict[str, int]) -> bytes:
    """A vocabulary file's token (GPT-2's printable stand-ins for bytes) as its bytes; ValueError if it is not one."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"token {quoted(token)} is not a non-empty string")
    try:
        return bytes(decode[c] for c in token)
    except KeyError as e:
        raise ValueError(f"token {quoted(token)} holds {quoted(e.args[0])}, not one of GPT-2's 256 byte "
                         "characters") from None


def read_encoder(data: bytes) -> dict[bytes, int]:
    """encoder.json / Hugging Face's vocab.json: token bytes -> id, `<|endoftext|>` left out.

    Anything else than a JSON object of distinct tokens to distinct ids >= 0 is a ValueError saying why, in one line.
    """
    try:
        tokens = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise ValueError(f"not JSON ({quoted(str(e), 80)}; an HTML error page or a cut-off body?)") from None
    if not isinstance(tokens, dict):
        raise ValueError(f"not a JSON object of token ids but a JSON {type(tokens).__name__}")
    decode, out = byte_decoder(), {}
    for token, rank in tokens.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < MAX_RANK:
            raise ValueError(f"token {quoted(token)} has id {quoted(rank)}, not an int from 0 to {MAX_RANK - 1}")
        if token != ENDOFTEXT:
            out[_token_bytes(token, decode)] = rank
    if len(set(out.values())) != len(out):
        raise ValueError("two tokens share an id")
    return out


def read_merges(data: bytes) -> list[tuple[bytes, bytes]]:
    """vocab.bpe / Hugging Face's merges.txt: a '#version' line, then one merge (two tokens) a line, as bytes.

    Anything else is a ValueError saying why, in one line.
    """
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not lines[0].startswith("#version"):
        raise ValueError(f"its first line is {quoted(lines[0][:80])}, not '#version...': not a BPE merges file")
    decode, merges = byte_decoder(), []
    for number, line in enumerate(lines[1:], start=2):
        pair = line.split()
        if pair and len(pair) != 2:
            raise ValueError(f"line {number} holds {len(pair)} tokens, not the two of a merge: {quoted(line)}")
        if pair:
            merges.append((_token_bytes(pair[0], decode), _token_bytes(pair[1], decode)))
    return merges


def _parsed(read: Callable[[bytes], T], data: bytes, name: str) -> T:
    try:
        return read(data)
    except ValueError as e:
        raise IntegrityError(f"{name} is not a GPT-2 vocabulary file: {e}; delete it and download it again") from None


def mergeable_ranks(encoder_json: bytes, vocab_bpe: bytes,
                    names: tuple[str, str] = ("encoder.json", "vocab.bpe")) -> dict[bytes, int]:
    """Token bytes -> rank, as tiktoken derives them: the 256 bytes, then one token per merge in vocab.bpe.

    vocab_bpe may also be Hugging Face's merges.txt (and encoder_json its vocab.json), which have the same formats.
    Files that are not such files, or that disagree, are an IntegrityError naming them (`names`: the files' names or
    paths, for the message).
    """
    encoder = _parsed(read_encoder, encoder_json, names[0])
    merges = _parsed(read_merges, vocab_bpe, names[1])
    ranks = {bytes([b]): i for i, b in enumerate(byte_decoder().values())}
    for n, (first, second) in enumerate(merges, start=len(ranks)):
        ranks[first + second] = n
    if ranks != encoder:
        raise IntegrityError(f"{names[0]} ({len(encoder)} tokens) and {names[1]} ({len(merges)} merges) disagree: the "
                             "vocabulary files are damaged or of two vocabularies; delete them and download them again")
    return ranks


def encoding_from_files(encoder_json: str | Path, vocab_bpe: str | Path, *, verify_hash: bool = True) -> tiktoken.Encoding:
    """A tiktoken Encoding equal to tiktoken's own "gpt2", read from local files only."""
    blobs = {}
    for path, pinned in ((Path(encoder_json), "encoder.json"), (Path(vocab_bpe), "vocab.bpe")):
        data = path.read_bytes()
        if verify_hash and path.name == pinned and hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256[pinned]:
            raise IntegrityError(f"{path} does not have the sha256 tiktoken pins for GPT-2's {pinned}; "
                                 "delete it and download it again")
        blobs[pinned] = data
    ranks = mergeable_ranks(blobs["encoder.json"], blobs["vocab.bpe"], (str(encoder_json), str(vocab_bpe)))
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
