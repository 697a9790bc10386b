"""Prompts of different lengths in one batch, several sequences per prompt, repetition penalty and stop strings."""

import pytest
import torch
from conftest import TINY_HP
from tiny_gpt import HP, left_pad, prompt, text_model, tiny_pair, tokenizer

from gpt2hub import KVCache, generate, generate_stream, generate_text, stream_text
from gpt2hub.generate import penalize_repeats, seen_tokens

LENGTHS = [3, 9, 1, 14]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def text():
    return text_model(TINY_HP), tokenizer()


def _rows(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, HP["n_vocab"], (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("kw", [{}, {"decode": "static"}, {"use_cache": False}, {"context_size": 12},
                                {"context_size": 12, "decode": "static"}, {"context_size": 12, "use_cache": False}])
def test_each_padded_row_equals_its_prompt_alone(pair, kw):
    model = pair[0]
    rows = _rows()
    idx, mask = left_pad(rows, pad_id=7)
    out = generate(model, idx, 20, attention_mask=mask, **kw)  # context_size=12: windows slide, prompts are cropped
    width = idx.shape[1]
    assert torch.equal(out[:, :width], idx)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, width:], generate(model, row[None], 20, **kw)[0, len(row):]), i
    again, _ = left_pad(rows, pad_id=123)  # what the padding holds does not matter
    assert torch.equal(generate(model, again, 20, attention_mask=mask, **kw)[:, width:], out[:, width:])
    cols = list(generate_stream(model, idx, 20, attention_mask=mask, **kw))
    assert torch.equal(torch.stack(cols, 1), out[:, width:])


def test_padded_batch_matches_transformers(pair):
    model, ref = pair
    idx, mask = left_pad(_rows(seed=3), pad_id=0)
    theirs = ref.generate(idx, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, idx, 15, attention_mask=mask), theirs)
    ones = torch.ones_like(idx)  # no padding: the plain path, same tokens as without a mask
    assert torch.equal(generate(model, idx, 15, attention_mask=ones), generate(model, idx, 15))


def test_forward_with_positions_and_key_mask_equals_each_row_alone(pair):
    model = pair[0]
    rows = _rows([4, 11, 7], seed=1)
    idx, mask = left_pad(rows, pad_id=5)
    pad = (mask == 0).sum(1)
    cols = torch.arange(idx.shape[1])
    positions, keys = (cols - pad[:, None]).clamp(min=0), mask.bool()
    with torch.no_grad():
        full = model(idx, positions=positions, key_mask=keys)
        cache = KVCache(model.cfg, 3, 20, torch.float32, "cpu")
        first = model(idx[:, :6], cache, 0, positions=positions[:, :6], key_mask=keys)
        rest = model(idx[:, 6:], cache, 6, positions=positions[:, 6:], key_mask=keys)
        static = KVCache(model.cfg, 3, 20, torch.float32, "cpu")
        whole = torch.cat([keys, torch.ones(3, 9, dtype=torch.bool)], 1)  # the static path reads all 20 columns
        model(idx[:, :6], static, torch.tensor(0), positions=positions[:, :6], key_mask=whole)
        steps = [model(idx[:, i:i + 1], static, torch.tensor(i), positions=positions[:, i:i + 1], key_mask=whole)
                 for i in range(6, idx.shape[1])]
        # a padding query attends to itself alone, at position 0 (never to nothing, which some kernels turn to NaN)
        for i, j in (mask == 0).nonzero().tolist():
            torch.testing.assert_close(full[i, j], model(idx[i, j].view(1, 1))[0, 0], rtol=1e-5, atol=1e-5)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            n = len(row)
            torch.testing.assert_close(full[i, -n:], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat([first, rest], 1)[i, -n:], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat(steps, 1)[i, -min(n, len(steps)):], alone[-min(n, len(steps)):],
                                       rtol=1e-5, atol=1e-5)


def test_generate_text_takes_a_list_of_prompts(text):
    model, enc = text
    prompts = ["Every effort moves you", "Hi", "The quick brown fox jumps over the lazy"]
    out = generate_text(model, enc, prompts, 10, eos_id=None)
    assert isinstance(out, list) and out == [generate_text(model, enc, p, 10, eos_id=None) for p in prompts]
    assert all(isinstance(generate_text(model, enc, p, 3), str) for p in prompts)
    for p, o in zip(prompts, out, strict=True):
        ids = enc.encode(p)
        assert o == enc.decode(generate(model, torch.tensor([ids]), 10)[0].tolist())


def test_num_return_sequences(pair):
    model = pair[0]
    idx = prompt(2, 5, seed=8)
    greedy = generate(model, idx, 10, num_return_sequences=3)
    assert greedy.shape == (6, 15) and torch.equal(greedy, generate(model, idx, 10).repeat_interleave(3, dim=0))
    kw = dict(temperature=1.5, top_k=40)
    many = generate(model, idx, 10, num_return_sequences=4, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(many, generate(model, idx.repeat_interleave(4, dim=0), 10,
                                      generator=torch.Generator().manual_seed(1), **kw))
    assert torch.equal(many[:, :5], idx.repeat_interleave(4, dim=0))
    assert len({tuple(r) for r in many[:4, 5:].tolist()}) > 1  # each row sampled on its own
    padded, mask = left_pad(_rows([2, 6]), pad_id=0)
    both = generate(model, padded, 8, attention_mask=mask, num_return_sequences=2)
    assert torch.equal(both, generate(model, padded, 8, attention_mask=mask).repeat_interleave(2, dim=0))


def test_generate_text_with_several_sequences(text):
    model, enc = text
    out = generate_text(model, enc, ["Hi", "Every effort"], 6, num_return_sequences=2, temperature=1.0,
                        generator=torch.Generator().manual_seed(0), eos_id=None)
    assert len(out) == 4 and out[0].startswith("Hi") and out[1].startswith("Hi") and out[2].startswith("Every effort")
    one = generate_text(model, enc, "Hi", 6, num_return_sequences=2)
    assert isinstance(one, list) and len(one) == 2 and one[0] == one[1]  # greedy: the same twice
    with pytest.raises(ValueError, match="num_return_sequences"):
        stream_text(model, enc, "Hi", 6, num_return_sequences=2)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers_processor(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(int(penalty * 10))
    scores = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 30), generator=g)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    assert torch.equal(penalize_repeats(scores, seen_tokens(ids, 50), penalty), theirs)
    real = torch.arange(30) >= torch.tensor([0, 5, 12, 29])[:, None]  # padding is not part of the row
    assert torch.equal(seen_tokens(ids, 50, real)[2], seen_tokens(ids[2:3, 12:], 50)[0])


def test_repetition_penalty_in_generation(pair):
    model, ref = pair
    idx = prompt(2, 8, seed=2)
    for penalty in (1.5, 0.8):
        ours = generate(model, idx, 20, repetition_penalty=penalty)
        theirs = ref.generate(idx, max_new_tokens=20, do_sample=False, repetition_penalty=penalty, pad_token_id=0,
                              eos_token_id=None)
        assert torch.equal(ours, theirs)
    assert not torch.equal(generate(model, idx, 20, repetition_penalty=1.5), generate(model, idx, 20))
    rows = _rows([3, 10])
    padded, mask = left_pad(rows, pad_id=int(rows[0][0]))  # the padding id occurs in row 0: not penalized for row 1
    out = generate(model, padded, 12, attention_mask=mask, repetition_penalty=1.5)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, 10:], generate(model, row[None], 12, repetition_penalty=1.5)[0, len(row):])


def _continuation(model, enc, p, n=30):
    return generate_text(model, enc, p, n, eos_id=None)[len(p):]


def test_stop_strings_end_generation_and_cut_the_text(text):
    model, enc = text
    p = "Every effort moves you"
    free = _continuation(model, enc, p)
    stop = free[7:11]
    cut = free.index(stop)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        pieces = list(stream_text(model, enc, p, 30, eos_id=None, stop=stop))
    finally:
        hook.remove()
    assert "".join(pieces) == free[:cut] and len(calls) < 30  # nothing past the stop, and generation ended
    assert generate_text(model, enc, p, 30, eos_id=None, stop=[stop]) == p + free[:cut]
    assert generate_text(model, enc, p, 30, eos_id=None, stop=["\x00never", free[3:6], stop]) == p + free[:free.index(free[3:6])]
    unfinished = free[7:11] + "\x00"  # its start appears, held back, then released when the rest does not follow
    assert "".join(stream_text(model, enc, p, 30, eos_id=None, stop=unfinished)) == free
    assert generate_text(model, enc, p, 30, eos_id=None, stop="\x00never") == p + free


def test_stop_strings_per_row_in_a_batch(text):
    model, enc = text
    prompts = ["Every effort moves you", "Hi"]
    free = [_continuation(model, enc, p) for p in prompts]
    stops = [free[0][5:9], free[1][12:15]]  # each row ends at the first of them it produces
    out = generate_text(model, enc, prompts, 30, eos_id=None, stop=stops)
    for p, f, o in zip(prompts, free, out, strict=True):
        cut = min(f.index(s) for s in stops if s in f)
        assert o == p + f[:cut]


def _op_counts(fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


# what a padding mask takes beyond the causal one each path always had (static: `pos >= arange`, every step)
MASK_OPS = ("aten::bitwise_and", "aten::bitwise_or", "aten::__and__", "aten::__or__", "aten::le", "aten::eq")


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_no_padding_builds_no_mask_per_token(pair, decode):
    model = pair[0]
    idx = prompt(1, 6, seed=3)
    counts = [_op_counts(lambda n=n: generate(model, idx, n, decode=decode)) for n in (5, 25)]
    assert {op: counts[1].get(op, 0) - counts[0].get(op, 0) for op in MASK_OPS} == dict.fromkeys(MASK_OPS, 0)
    # the same measure sees the mask of a padded batch being built at every step
    padded, mask = left_pad(_rows([2, 6]), pad_id=0)
    counts = [_op_counts(lambda n=n: generate(model, padded, n, attention_mask=mask, decode=decode)) for n in (5, 25)]
    assert sum(counts[1].get(op, 0) - counts[0].get(op, 0) for op in MASK_OPS) >= 20
