"""Generation on any ids -> logits model (the book's loop), argument checks, and memory that follows the tokens."""

import importlib
import math

import pytest
import torch
from book_model import BookGPTModel, book_generate
from tiny_gpt import HP, LargestTensor, left_pad, prompt, tiny_pair, tokenizer

from gpt2hub import generate, generate_stream, generate_text, stream_text

BOOK_CFG = {"vocab_size": HP["n_vocab"], "context_length": HP["n_ctx"], "emb_dim": 32, "n_heads": 4, "n_layers": 2,
            "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def book():
    torch.manual_seed(0)
    return BookGPTModel(BOOK_CFG).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


def test_book_model_greedy_equals_the_books_loop(book):
    idx = prompt(1, 6, seed=9)
    # no context_size: read from the book model's pos_emb (40); 45 new tokens slide the window
    assert torch.equal(generate(book, idx, 45), book_generate(book, idx, 45, 40))
    long = prompt(1, 30, seed=3)
    assert torch.equal(generate(book, long, 25, context_size=16), book_generate(book, long, 25, 16))


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (1.4, 25), (0.7, 3)])
def test_book_model_seeded_sampling_equals_the_books_loop(book, temperature, top_k):
    idx = prompt(1, 5, seed=1)
    torch.manual_seed(123)
    ours = generate(book, idx, 45, temperature=temperature, top_k=top_k)
    torch.manual_seed(123)
    theirs = book_generate(book, idx, 45, 40, temperature=temperature, top_k=top_k)
    assert torch.equal(ours, theirs) and ours.shape == (1, 50)
    eos = int(theirs[0, 15])
    torch.manual_seed(5)
    ours = generate(book, idx, 45, temperature=temperature, top_k=top_k, eos_id=eos)
    torch.manual_seed(5)
    assert torch.equal(ours, book_generate(book, idx, 45, 40, temperature=temperature, top_k=top_k, eos_id=eos))
    assert eos not in ours[0, 5:].tolist()


def test_compiled_and_wrapped_models_take_the_books_loop(book, pair):
    idx = prompt(1, 7, seed=4)
    expected = book_generate(book, idx, 12, 40)
    compiled = torch.compile(book, backend="eager")  # an OptimizedModule: pos_emb is found under _orig_mod
    assert torch.equal(generate(compiled, idx, 12), expected)
    assert torch.equal(generate(Wrapper(book), idx, 12), expected)
    with pytest.raises(ValueError, match="context_size"):
        generate(lambda ids: book(ids), idx, 12)  # nothing to read the context length from
    assert torch.equal(generate(lambda ids: book(ids), idx, 12, context_size=40), expected)
    model, ref = pair  # transformers' model returns an object with .logits
    assert torch.equal(generate(ref, idx, 12, context_size=40),
                       ref.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None))
    assert torch.equal(generate(torch.compile(model, backend="eager"), idx, 12, context_size=30),
                       generate(model, idx, 12, context_size=30))


def test_text_functions_on_the_books_model():
    cfg = {**BOOK_CFG, "vocab_size": 50257, "context_length": 64}
    torch.manual_seed(1)
    book = BookGPTModel(cfg).eval()
    enc = tokenizer()
    ids = torch.tensor([enc.encode("Every effort moves you")])
    expected = enc.decode(book_generate(book, ids, 10, 64)[0].tolist())
    assert generate_text(book, enc, "Every effort moves you", 10, eos_id=None) == expected
    assert "".join(stream_text(book, enc, "Every effort moves you", 10, eos_id=None)) == expected[len("Every effort moves you"):]


def test_models_that_do_not_fit_are_refused(book):
    idx = prompt(2, 5)
    with pytest.raises(ValueError, match="logits"):
        generate(lambda ids: book(ids)[:, -1], idx, 3, context_size=40)
    padded, mask = left_pad([idx[0], idx[1, :2]], 0)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(book, padded, 3, attention_mask=mask)


BAD = [
    ("max_new_tokens", -1), ("max_new_tokens", 2.0), ("max_new_tokens", True), ("max_new_tokens", "3"),
    ("max_new_tokens", None), ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1"), ("temperature", True), ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("top_p", 0),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", math.nan), ("top_p", False), ("context_size", 0),
    ("context_size", -3), ("context_size", 4.0), ("context_size", True), ("repetition_penalty", 0),
    ("repetition_penalty", -1.0), ("repetition_penalty", math.inf), ("repetition_penalty", math.nan),
    ("num_return_sequences", 0), ("num_return_sequences", 1.0), ("num_return_sequences", True), ("eos_id", -1),
    ("eos_id", 1.5), ("decode", "warp"), ("use_cache", "yes"), ("generator", 7),
]


@pytest.mark.parametrize("name,value", BAD)
def test_every_function_refuses_a_bad_argument_naming_it(pair, name, value):
    model, enc = pair[0], tokenizer()
    kwargs = {"max_new_tokens": 4, name: value}
    calls = [lambda: generate(model, prompt(1, 3), **kwargs),
             lambda: generate_stream(model, prompt(1, 3), **kwargs),  # at the call, before any iteration
             lambda: generate_text(model, enc, "Hi", **kwargs),
             lambda: stream_text(model, enc, "Hi", **kwargs)]
    if value is None:  # max_new_tokens=None is the text functions' default (50, unless max_length is given)
        calls = calls[:2]
    for call in calls:
        with pytest.raises(ValueError, match=name) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and repr(value) in message and "must be" in message


ONES = torch.ones(2, 4, dtype=torch.long)
BAD_PROMPTS = [
    (torch.tensor([1, 2, 3]), None, "idx"), (torch.ones(1, 3), None, "idx"), (torch.zeros(1, 0, dtype=torch.long), None, "idx"),
    (torch.zeros(0, 3, dtype=torch.long), None, "idx"), (torch.ones(1, 3, dtype=torch.bool), None, "idx"),
    ([[1, 2, 3]], None, "idx"), (torch.tensor([[1, HP["n_vocab"]]]), None, "idx"), (torch.tensor([[-1, 2]]), None, "idx"),
    (ONES, torch.ones(2, 3), "attention_mask"), (ONES, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), "attention_mask"),
    (ONES, torch.tensor([[0, 1, 1, 2], [1, 1, 1, 1]]), "attention_mask"),
    (ONES, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "attention_mask"),
    (ONES, torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]), "attention_mask"),
]


@pytest.mark.parametrize("idx,mask,name", BAD_PROMPTS)
def test_bad_prompts_are_refused(pair, idx, mask, name):
    for fn in (generate, generate_stream):
        with pytest.raises(ValueError, match=name) as err:
            fn(pair[0], idx, 3, attention_mask=mask)
        assert "\n" not in str(err.value)


def test_any_integer_prompt_dtype_works(pair, book):
    idx = prompt(2, 5, seed=3)
    for model in (pair[0], book):
        expected = generate(model, idx, 6)
        for dtype in (torch.int32, torch.int16):
            out = generate(model, idx.to(dtype), 6)
            assert out.dtype == torch.long and torch.equal(out, expected)


@pytest.mark.parametrize("stop", ["", [""], [3], 5])
def test_bad_stop_strings_are_refused(pair, stop):
    for fn in (generate_text, stream_text):
        with pytest.raises(ValueError, match="stop"):
            fn(pair[0], tokenizer(), "Hi", 3, stop=stop)


def test_zero_top_k_and_unit_top_p_are_off(pair):
    model, idx = pair[0], prompt(2, 4)
    runs = [generate(model, idx, 15, temperature=1.3, generator=torch.Generator().manual_seed(3), **kw)
            for kw in ({}, {"top_k": 0}, {"top_p": 1.0}, {"top_k": 0, "top_p": 1})]
    assert all(torch.equal(r, runs[0]) for r in runs)
    assert generate(model, idx, 0).shape == (2, 4) and generate(model, idx, 5, top_k=0).shape == (2, 9)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_billion_new_tokens_allocate_nothing_of_that_size(pair, book, use_cache):
    model, idx = pair[0], prompt(1, 6, seed=2)
    eos = int(generate(model, idx, 1)[0, -1])  # the first token: generation stops at once
    with LargestTensor() as sizes:
        out = generate(model, idx, 10**9, eos_id=eos, use_cache=use_cache)
    assert torch.equal(out, idx) and sizes.numel < 10**6
    eos = int(generate(book, idx, 1)[0, -1])
    with LargestTensor() as sizes:
        assert torch.equal(generate(book, idx, 10**9, eos_id=eos), idx)
    assert sizes.numel < 10**6


def test_the_sequence_buffer_grows_as_tokens_come(pair, book, monkeypatch):
    module = importlib.import_module("gpt2hub.generate")  # the package's `generate` attribute is the function
    monkeypatch.setattr(module, "FIRST_ROOM", 4)
    model, idx = pair[0], prompt(1, 5, seed=6)
    n = 50  # room for 9 tokens, then 18, 36, 72: three doublings, and the 40-token window slides
    assert torch.equal(generate(model, idx, n, use_cache=False), book_generate(model, idx, n, HP["n_ctx"]))
    assert torch.equal(generate(model, idx, n), book_generate(model, idx, n, HP["n_ctx"]))
    assert torch.equal(generate(book, idx, n), book_generate(book, idx, n, HP["n_ctx"]))
