import hashlib
import shutil

import pytest
import tiktoken
from factory import DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2hub import IntegrityError
from gpt2hub.registry import TOKENIZER_SHA256
from gpt2hub.tokenizer import encoding_from_files

TEXTS = ["Every effort moves you", "Hello, world! <|endoftext|> next", "  leading and trailing spaces   ",
         "ünïcödé, 日本語, emoji 🤖🚀, ZWJ 👩‍👩‍👧", "numbers 1234567 3.14159 and 'contractions' don't we'll I'd",
         "tabs\tand\nnewlines\r\n\n\n", "", "a" * 5000]


@pytest.fixture(scope="module")
def ours():
    return encoding_from_files(DATA / "encoder.json", DATA / "vocab.bpe")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken's own "gpt2" encoding, fed the same published files through its cache (no network)."""
    cache = tmp_path_factory.mktemp("tiktoken")
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copyfile(DATA / name, cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        from tiktoken_ext.openai_public import gpt2

        yield tiktoken.Encoding(**gpt2())
    finally:
        mp.undo()


def test_vocabulary_files_are_the_published_ones():
    for name, sha in TOKENIZER_SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == sha


def test_special_token_and_size(ours):
    assert ours.eot_token == 50256 and ours.n_vocab == 50257
    assert ours.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert ours.encode("Every effort moves you") == [6109, 3626, 6100, 345]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken(ours, reference, text):
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert ours.decode(ours.encode(text, allowed_special="all")) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_matches_tiktoken_on_any_text(ours, reference, text):
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_damaged_files_are_refused(tmp_path):
    bad = tmp_path / "encoder.json"
    bad.write_bytes((DATA / "encoder.json").read_bytes().replace(b'"the"', b'"teh"', 1))
    with pytest.raises(IntegrityError, match="encoder.json"):
        encoding_from_files(bad, DATA / "vocab.bpe")
    with pytest.raises(IntegrityError, match="disagree"):
        encoding_from_files(bad, DATA / "vocab.bpe", verify_hash=False)
