"""GPT-2's tokenizer as a `tiktoken.Encoding`, built offline from a model's encoder.json and vocab.bpe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tiktoken

from .errors import IntegrityError
from .registry import TOKENIZER_SHA256

ENDOFTEXT = "<|endoftext|>"
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


def mergeable_ranks(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    """Token bytes -> rank, as tiktoken derives them: the 256 bytes, then one token per merge in vocab.bpe.

    vocab_bpe may also be Hugging Face's merges.txt, which has the same format.
    """
    decode = byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(decode[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(decode.values())}
    merges = [line.split() for line in vocab_bpe.decode().split("\n")[1:] if line.strip()]
    for n, (first, second) in enumerate(merges, start=len(ranks)):
        ranks[to_bytes(first) + to_bytes(second)] = n
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != ENDOFTEXT}
    if ranks != encoder:
        raise IntegrityError(
            f"the encoder ({len(encoder)} tokens) and the merges ({len(merges)}) disagree: the vocabulary files are damaged")
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
    ranks = mergeable_ranks(blobs["encoder.json"], blobs["vocab.bpe"])
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
