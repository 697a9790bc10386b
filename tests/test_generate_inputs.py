"""Generation arguments at their extremes, and transformers' habits: each works as it means, or is a one-line error
naming the argument and its limit, never a traceback from deep inside torch or an allocation of hundreds of GB."""

from __future__ import annotations

import logging

import pytest
import torch
from factory import hf_reference, random_weights
from tiny_gpt import HP, LargestTensor, prompt, text_model, tiny_pair, tokenizer

from gpt2hub import generate, generate_stream, generate_text, stream_text
from gpt2hub.cli import main
from gpt2hub.generate import penalize_repeats, sample_next

TEXT_HP = {**HP, "n_vocab": 50257}


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def text_pair():
    """gpt2hub's GPTModel and transformers' GPT2LMHeadModel with the same weights and GPT-2's vocabulary."""
    weights = random_weights(TEXT_HP, seed=3)
    return text_model(TEXT_HP, seed=3), hf_reference(weights, TEXT_HP)


ALL = [lambda m, i, **kw: generate(m, i, **kw), lambda m, i, **kw: list(generate_stream(m, i, **kw))]


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    for part in parts:
        assert part in message, message
    return message


# -- tiny temperatures, top_p and penalties work (they were tracebacks from torch.multinomial) ---------------------
@pytest.mark.parametrize("kwargs", [{"temperature": 1e-300}, {"temperature": 1e-40}, {"temperature": 5e-324},
                                    {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 2.0, "top_p": 1e-46}])
def test_tiny_temperatures_and_top_p_decode_greedily(pair, kwargs):
    model, idx = pair[0], prompt(2, 5, seed=4)
    greedy = generate(model, idx, 12)
    assert torch.equal(generate(model, idx, 12, generator=torch.Generator().manual_seed(0), **kwargs), greedy)


def test_a_tiny_temperature_shares_ties_and_never_picks_below_the_largest():
    logits = torch.tensor([[1.0, 1.0, 0.5, -3.0]]).repeat(400, 1)
    draws = sample_next(logits, 1e-300, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {0, 1}  # both largest, nothing else


def test_the_books_arithmetic_is_kept_where_it_does_not_overflow():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 4
    for t in (0.3, 1.0, 1.7):
        book = torch.multinomial(torch.softmax(logits / t, dim=-1), 1, generator=torch.Generator().manual_seed(5))
        assert torch.equal(sample_next(logits, t, generator=torch.Generator().manual_seed(5)), book.squeeze(-1))


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e30, 1e300])
def test_extreme_repetition_penalties_stay_finite_and_decode(pair, penalty):
    model, idx = pair[0], prompt(2, 5, seed=5)
    logits = torch.tensor([[3.0, -2.0, 0.5, 7.0]])
    out = penalize_repeats(logits, torch.tensor([[True, True, False, False]]), penalty)
    assert torch.isfinite(out).all() and out[0, 2:].tolist() == [0.5, 7.0]
    for temperature in (0.0, 0.5, 1.0):
        assert generate(model, idx, 10, temperature=temperature, repetition_penalty=penalty,
                        generator=torch.Generator().manual_seed(1)).shape == (2, 15)


# -- huge counts and ids are refused at once, naming the argument and the limit --------------------------------------
@pytest.mark.parametrize("n", [10**10, 2**62])  # 10**6 rows of gpt2-small would need 201 GB
def test_rows_memory_cannot_hold_are_refused_before_anything_is_allocated(pair, n):
    model, enc = pair[0], tokenizer()
    for call in ALL:
        with LargestTensor() as sizes, pytest.raises(ValueError) as err:
            call(model, prompt(1, 3), max_new_tokens=4, temperature=1.0, num_return_sequences=n)
        _one_line(err, f"num_return_sequences={n}", "memory", "at most")
        assert sizes.numel < 10**6
    with pytest.raises(ValueError) as err:
        generate_text(text_model(TEXT_HP), enc, "Hi", 4, temperature=1.0, num_return_sequences=n)
    _one_line(err, f"num_return_sequences={n}", "rows fit")


def test_tokens_memory_cannot_hold_are_refused(pair):
    for call in ALL:
        with LargestTensor() as sizes, pytest.raises(ValueError) as err:
            call(pair[0], prompt(2, 3), max_new_tokens=10**12)  # was: ran on, unbounded
        _one_line(err, "max_new_tokens=1000000000000", "memory", "new tokens fit")
        assert sizes.numel < 10**6


@pytest.mark.parametrize("eos_id, wanted", [(2**70, "2**63-1"), (10**5000, "bits"), (HP["n_vocab"], "below 500")],
                         ids=["2**70", "10**5000", "vocab"])
def test_an_eos_id_outside_the_vocabulary_is_refused(pair, eos_id, wanted):
    for call in ALL:
        with pytest.raises(ValueError) as err:  # 2**70 was an OverflowError
            call(pair[0], prompt(1, 3), max_new_tokens=4, eos_id=eos_id)
        _one_line(err, "eos_id", wanted)


def test_an_empty_stop_string_is_refused_in_the_api_and_on_the_command_line(hub_env, server, capsys):
    for fn in (generate_text, stream_text):
        with pytest.raises(ValueError, match="stop"):
            fn(text_model(TEXT_HP), tokenizer(), "Hi", 3, stop="")
    assert main(["generate", "--model", "gpt2-tiny", "--max-new-tokens", "3", "--stop", "", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt2hub: error: ") and "stop" in err


def test_the_command_line_takes_tiny_temperatures_and_top_p(hub_env, server, capsys):
    argv = ["generate", "--model", "gpt2-tiny", "--max-new-tokens", "6", "Every effort"]
    assert main(argv) == 0
    greedy = capsys.readouterr().out
    for extra in (["--temperature", "1e-300"], ["--temperature", "1", "--top-p", "1e-300"]):
        assert main(argv[:-1] + extra + ["--seed", "1", argv[-1]]) == 0  # was a traceback from multinomial
        assert capsys.readouterr().out == greedy


# -- greedy copies ------------------------------------------------------------------------------------------------------
def test_greedy_copies_are_warned_about_once(pair, caplog):
    model, enc = text_model(TEXT_HP), tokenizer()
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        texts = generate_text(model, enc, "Hello", 5, num_return_sequences=3)
    assert len(set(texts)) == 1
    warnings = [r.getMessage() for r in caplog.records if "identical" in r.getMessage()]
    assert len(warnings) == 1 and "num_return_sequences=3" in warnings[0] and "3 identical copies" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        generate_text(model, enc, "Hello", 5, num_return_sequences=3, temperature=1.0)
        generate(pair[0], prompt(1, 3), 2, top_k=1, temperature=1.0, num_return_sequences=2)
    assert [r.getMessage() for r in caplog.records if "identical" in r.getMessage()] == [
        caplog.records[-1].getMessage()] and "top_k 1" in caplog.records[-1].getMessage()


def test_the_command_line_prints_the_greedy_copies_warning(hub_env, server, capsys):
    assert main(["generate", "--model", "gpt2-tiny", "--max-new-tokens", "3", "--num-return-sequences", "3", "Hi"]) == 0
    err = capsys.readouterr().err
    assert err.count("identical copies") == 1 and err.startswith("gpt2hub: ")


# -- transformers' habits ---------------------------------------------------------------------------------------------
def test_do_sample_means_what_it_means_in_transformers(pair, caplog):
    model, idx = pair[0], prompt(2, 4, seed=6)
    seeded = {"max_new_tokens": 10}
    for call in ALL:
        greedy = call(model, idx, **seeded)
        with caplog.at_level(logging.WARNING, logger="gpt2hub"):
            assert _same(call(model, idx, do_sample=False, temperature=0.7, **seeded), greedy)
        assert "temperature=0.7 is not used" in caplog.text
        for sampled, plain in [({"do_sample": True}, {"temperature": 1.0}),
                               ({"do_sample": True, "temperature": 0.6}, {"temperature": 0.6})]:
            a = call(model, idx, generator=torch.Generator().manual_seed(4), **sampled, **seeded)
            b = call(model, idx, generator=torch.Generator().manual_seed(4), **plain, **seeded)
            assert _same(a, b) and not _same(a, greedy)


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_max_length_counts_the_prompt_as_in_transformers(pair, text_pair):
    model, ref = pair
    idx = prompt(1, 5, seed=7)
    assert torch.equal(generate(model, idx, max_length=12), generate(model, idx, 7))
    assert torch.equal(generate(model, idx, max_length=12),
                       ref.generate(idx, max_length=12, do_sample=False, pad_token_id=0, eos_token_id=None))
    assert len(list(generate_stream(model, idx, max_length=9))) == 4
    enc, big = tokenizer(), text_pair[0]
    assert generate_text(big, enc, "Every effort", max_length=6, eos_id=None) == generate_text(
        big, enc, "Every effort", 4, eos_id=None)  # "Every effort" is 2 tokens
    for kwargs, wanted in [({"max_length": 5}, "leaves no room"), ({"max_length": 9, "max_new_tokens": 3}, "both"),
                           ({"max_length": 0}, "max_length must be")]:
        with pytest.raises(ValueError) as err:
            generate(model, idx, **kwargs)
        _one_line(err, wanted)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        generate(model, idx)  # neither


def test_min_new_tokens_holds_back_eos(pair):
    model, idx = pair[0], prompt(1, 4, seed=8)
    first = int(generate(model, idx, 1)[0, -1])
    assert torch.equal(generate(model, idx, 20, eos_id=first), idx)  # stops at once
    out = generate(model, idx, 20, eos_id=first, min_new_tokens=5)
    assert out.shape[1] >= 4 + 5 and first not in out[0, 4:9].tolist()
    texts = generate_text(text_model(TEXT_HP), tokenizer(), "Hi", 6, min_new_tokens=6, eos_id=0)
    assert len(tokenizer().encode(texts)) >= 1 + 6 - 1  # six new tokens (one may merge with its neighbour)


def test_num_beams_above_1_is_refused_with_a_pointer(pair):
    model, enc = text_model(TEXT_HP), tokenizer()
    assert torch.equal(generate(pair[0], prompt(1, 3), 4, num_beams=1), generate(pair[0], prompt(1, 3), 4))
    for call in (lambda: generate(pair[0], prompt(1, 3), 4, num_beams=4),
                 lambda: generate_text(model, enc, "Hi", 4, num_beams=4),
                 lambda: stream_text(model, enc, "Hi", 4, num_beams=4)):
        with pytest.raises(ValueError) as err:
            call()
        _one_line(err, "num_beams=4", "beam search", "num_return_sequences")


@pytest.mark.parametrize("keyword, wanted", [("pad_token_id", "eos_id"), ("eos_token_id", "use eos_id"),
                                             ("temprature", "temperature"), ("min_length", "min_new_tokens")])
def test_an_unknown_keyword_of_the_text_functions_says_what_to_use(keyword, wanted):
    model, enc = text_model(TEXT_HP), tokenizer()
    for fn in (generate_text, stream_text):
        with pytest.raises(TypeError) as err:
            fn(model, enc, "Hi", 4, **{keyword: 1})
        _one_line(err, repr(keyword), wanted)


def test_a_transformers_model_gives_its_own_context_length(pair, text_pair):
    model, ref = pair
    idx = prompt(1, 6, seed=9)
    assert torch.equal(generate(ref, idx, 10), generate(model, idx, 10))  # was: context_size must be given
    ours, theirs = text_pair
    enc = tokenizer()
    assert generate_text(theirs, enc, "Every effort moves", 8) == generate_text(ours, enc, "Every effort moves", 8)
    with pytest.raises(ValueError, match="idx must hold token ids in \\[0, 500\\)"):
        generate(ref, torch.tensor([[HP["n_vocab"]]]), 2)  # its vocabulary is read from config.vocab_size too
