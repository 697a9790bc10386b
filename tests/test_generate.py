import pytest
import torch
from conftest import TINY_HP
from factory import DATA, hf_reference, random_weights

from gpt2hub import GPTModel, generate, generate_stream, generate_text, state_dict_from_hf
from gpt2hub.convert import config_from_hparams
from gpt2hub.generate import sample_next
from gpt2hub.tokenizer import encoding_from_files

HP = {"n_vocab": 500, "n_ctx": 40, "n_embd": 32, "n_head": 4, "n_layer": 2}


@pytest.fixture(scope="module")
def pair():
    weights = random_weights(HP, seed=5, scale=0.3)
    ref = hf_reference(weights, HP)
    cfg = config_from_hparams(HP)
    model = GPTModel.from_state_dict(cfg, state_dict_from_hf(ref.transformer.state_dict(), cfg))
    return model, ref


def _prompt(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [1, 7, 20])
def test_greedy_with_cache_equals_without_and_equals_transformers(pair, t):
    model, ref = pair
    idx = _prompt(1, t, seed=t)
    ours = generate(model, idx, 15)
    assert torch.equal(ours, generate(model, idx, 15, use_cache=False))
    theirs = ref.generate(idx, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_cache_logits_match_full_pass(pair):
    model, _ = pair
    from gpt2hub import KVCache

    idx = _prompt(2, 30, seed=3)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, 2, 40, torch.float32, "cpu")
        first = model(idx[:, :10], cache, 0)
        middle = model(idx[:, 10:25], cache, 10)  # several queries after a cached prefix
        steps = [model(idx[:, i:i + 1], cache, i) for i in range(25, 30)]
    got = torch.cat([first, middle, *steps], dim=1)
    assert torch.allclose(got, full, atol=1e-5)


def test_prompt_longer_than_context_is_cropped_and_window_slides(pair):
    model, _ = pair
    idx = _prompt(2, 55, seed=1)  # longer than n_ctx=40
    out = generate(model, idx, 30, context_size=40)
    assert out.shape == (2, 85) and torch.equal(out[:, :55], idx)
    assert torch.equal(out, generate(model, idx, 30, context_size=40, use_cache=False))
    # the book's loop, step by step, is the definition
    ref = idx
    with torch.no_grad():
        for _ in range(30):
            ref = torch.cat([ref, model(ref[:, -40:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    assert torch.equal(generate(model, idx, 10, context_size=12), generate(model, idx, 10, context_size=12, use_cache=False))


def test_per_row_stop_at_eos(pair):
    model, _ = pair
    idx = _prompt(3, 5, seed=2)
    free = generate(model, idx, 12)
    eos = int(free[0, 5 + 3])  # row 0 emits this token at its 4th step
    out = generate(model, idx, 12, eos_id=eos)
    for row in range(3):
        new = free[row, 5:].tolist()
        if eos in new:
            k = new.index(eos)
            assert out[row, 5:5 + k].tolist() == new[:k]
            assert set(out[row, 5 + k:].tolist()) <= {eos}  # finished rows are padded with eos
        else:
            assert out[row, 5:].tolist() == new[:out.shape[1] - 5]
    single = generate(model, idx[:1], 12, eos_id=eos)
    first = free[0, 5:].tolist().index(eos)
    assert single.shape[1] == 5 + first and eos not in single[0, 5:].tolist()  # the book: stop token left out


def test_sampling_is_seedable_and_respects_top_k_top_p(pair):
    model, _ = pair
    idx = _prompt(2, 4)
    kw = dict(temperature=1.5, top_k=50, top_p=0.9)
    a = generate(model, idx, 20, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, idx, 20, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, idx, 20, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k=1 and a tiny top_p both leave only the most likely token: greedy
    greedy = generate(model, idx, 10)
    assert torch.equal(generate(model, idx, 10, temperature=2.0, top_k=1), greedy)
    assert torch.equal(generate(model, idx, 10, temperature=2.0, top_p=1e-6), greedy)


def test_sample_next_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.8, generator=g) for _ in range(2000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 reaches 0.8: the tail is cut
    assert abs(counts[0] - 0.625) < 0.05
    draws = torch.stack([sample_next(logits, 1.0, top_k=3, generator=g) for _ in range(500)]).flatten()
    assert 3 not in draws.tolist()


def test_stream_yields_the_same_tokens(pair):
    model, _ = pair
    idx = _prompt(2, 6)
    cols = list(generate_stream(model, idx, 9))
    assert len(cols) == 9 and all(c.shape == (2,) for c in cols)
    assert torch.equal(torch.stack(cols, 1), generate(model, idx, 9)[:, 6:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(pair, dtype):
    model, _ = pair
    half = GPTModel.from_state_dict(model.cfg, {k: v.to(dtype) for k, v in model.state_dict().items()
                                               if k != "out_head.weight"})
    idx = _prompt(2, 12)
    with torch.no_grad():
        a, b = half(idx).float(), model(idx)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert generate(half, idx, 5).shape == (2, 17)


def test_text_form_round_trips_through_the_tokenizer():
    weights = random_weights(TINY_HP, seed=2)
    cfg = config_from_hparams(TINY_HP)
    from factory import hf_tensors

    model = GPTModel.from_state_dict(cfg, state_dict_from_hf({k: torch.from_numpy(v) for k, v in
                                                              hf_tensors(weights).items()}, cfg))
    enc = encoding_from_files(DATA / "encoder.json", DATA / "vocab.bpe")
    text = generate_text(model, enc, "Every effort moves you", 12, eos_id=None)
    ids = generate(model, torch.tensor([enc.encode("Every effort moves you")]), 12)
    assert text == enc.decode(ids[0].tolist())
    assert text.startswith("Every effort moves you")


@pytest.mark.parametrize("b,t", [(1, 1), (3, 9), (2, 40)])
def test_static_decode_path_matches_eager(pair, b, t):
    model, _ = pair
    idx = _prompt(b, t, seed=b + t)
    assert torch.equal(generate(model, idx, 12, decode="static"), generate(model, idx, 12, decode="eager"))
    from gpt2hub import KVCache

    with torch.no_grad():
        c1, c2 = KVCache(model.cfg, b, 40, torch.float32, "cpu"), KVCache(model.cfg, b, 40, torch.float32, "cpu")
        model(idx[:, :5], c1, 0)
        model(idx[:, :5], c2, torch.tensor(0))
        for i in range(5, min(t, 12)):
            eager = model(idx[:, i:i + 1], c1, i)
            static = model(idx[:, i:i + 1], c2, torch.tensor(i))
            assert torch.allclose(eager, static, atol=1e-5)
    with pytest.raises(ValueError, match="decode"):
        generate(model, idx, 2, decode="warp")


def test_matches_the_books_generate_including_seeded_sampling(pair):
    from book_model import book_generate

    model, _ = pair
    idx = _prompt(1, 6, seed=9)
    assert torch.equal(generate(model, idx, 20, context_size=40), book_generate(model, idx, 20, 40))
    torch.manual_seed(123)
    ours = generate(model=model, idx=idx, max_new_tokens=15, context_size=40, top_k=25, temperature=1.4, use_cache=False)
    torch.manual_seed(123)
    theirs = book_generate(model, idx, 15, 40, temperature=1.4, top_k=25)
    assert torch.equal(ours, theirs)
    eos = int(ours[0, 10])
    torch.manual_seed(5)
    a = generate(model, idx, 15, context_size=40, eos_id=eos)
    torch.manual_seed(5)
    assert torch.equal(a, book_generate(model, idx, 15, 40, eos_id=eos))


def test_last_only_logits_equal_the_last_position(pair):
    model, _ = pair
    idx = _prompt(2, 25, seed=4)
    with torch.no_grad():
        full, last = model(idx), model(idx, last_only=True)
    assert last.shape == (2, 1, HP["n_vocab"]) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_cuda_graph_needs_cuda_and_a_refused_capture_falls_back(pair, monkeypatch, caplog):
    import importlib
    import logging

    g = importlib.import_module("gpt2hub.generate")  # the package's `generate` attribute is the function

    model, _ = pair
    idx = _prompt(2, 5)
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, idx, 3, decode="cuda_graph")

    class RefusedCapture(g._StaticDecoder):
        def __init__(self, model, cache, batch, graph, padding=None):
            if graph:
                raise RuntimeError("operation not permitted when stream is capturing")
            super().__init__(model, cache, batch, graph, padding)

    monkeypatch.setattr(g, "_StaticDecoder", RefusedCapture)
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        out = generate(model, idx, 8, decode="cuda_graph")
    assert "capture failed" in caplog.text and torch.equal(out, generate(model, idx, 8, decode="eager"))
