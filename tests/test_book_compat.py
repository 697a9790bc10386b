"""The checks of "Build a Large Language Model (From Scratch)" (rasbt/LLMs-from-scratch) run against gpt2hub.

Expected values are those the book publishes: the token ids of ch04/01_main-chapter-code/tests.py and
pkg/llms_from_scratch/tests/test_ch04.py, the parameter count printed in chapter 4. Everything else is compared with
tests/book_model.py, the book's chapter-4 GPTModel, given the same seed, weights and data.
"""

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from book_model import BookGPTModel, book_generate
from conftest import TINY
from factory import DATA, tiny_spec

from gpt2hub import GPT_CONFIG_124M, GPTModel, book_state_dict, from_pretrained, generate, load_weights_into_gpt
from gpt2hub.convert import config_from_hparams, params_from_tf, state_dict_from_tf
from gpt2hub.synthetic import write_openai_folder
from gpt2hub.tf_checkpoint import TFCheckpoint
from gpt2hub.tokenizer import encoding_from_files

# the book's test: torch.manual_seed(123); GPTModel(GPT_CONFIG_124M); 10 greedy tokens after "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231, 47062, 34657]
HELLO_TEXT = "Hello, I am Featureiman Byeswickattribute argue logger Normandy Compton analogous"
# chapter 4 prints "Total number of parameters: 163,009,536" and "considering weight tying: 124,412,160"
BOOK_PARAMS, BOOK_PARAMS_TIED = 163_009_536, 124_412_160
# the same with qkv_bias=True, as GPT-2's checkpoints have it (124,439,808 is GPT-2 small's published count)
QKV_PARAMS, QKV_PARAMS_TIED = 163_037_184, 124_439_808
# the configs of the book's training tests: ch05/01_main-chapter-code/tests.py and pkg test_ch07.py
CH05_CONFIG = {"vocab_size": 50257, "context_length": 12, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
               "qkv_bias": False}
CH07_CONFIG = {"vocab_size": 50257, "context_length": 120, "drop_rate": 0.0, "qkv_bias": False, "emb_dim": 12,
               "n_layers": 1, "n_heads": 2}
SPEC = tiny_spec("gpt2-bookcompat", "bookcompat", d=32, layers=2, heads=4, vocab=500, ctx=32)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(".att.mask")}


def _assert_bit_identical(ours: torch.nn.Module, book: torch.nn.Module) -> None:
    mine, theirs = _params(ours), _params(book)
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def seeded_124m():
    """gpt2hub's and the book's GPTModel(GPT_CONFIG_124M) after torch.manual_seed(123), with the RNG state after each."""
    torch.manual_seed(123)
    ours = GPTModel(GPT_CONFIG_124M).eval()
    ours_rng = torch.get_rng_state()
    torch.manual_seed(123)
    book = BookGPTModel(GPT_CONFIG_124M).eval()
    return ours, ours_rng, book, torch.get_rng_state()


def test_seeded_124m_model_is_the_books_bit_for_bit(seeded_124m):
    ours, ours_rng, book, book_rng = seeded_124m
    assert _count(ours) == _count(book) == BOOK_PARAMS
    assert not ours.tied
    _assert_bit_identical(ours, book)
    assert torch.equal(ours_rng, book_rng)  # the same number of draws: what follows in a notebook is the same too


def test_seeded_124m_model_generates_the_books_ids(seeded_124m):
    ours = seeded_124m[0]
    tokenizer = encoding_from_files(DATA / "encoder.json", DATA / "vocab.bpe")
    idx = torch.tensor([tokenizer.encode("Hello, I am")])
    assert idx.tolist() == [HELLO_IDS[:4]]
    ctx = GPT_CONFIG_124M["context_length"]
    out = book_generate(ours, idx, max_new_tokens=10, context_size=ctx)  # the book's generate_text_simple: greedy
    assert out.tolist() == [HELLO_IDS]
    assert tokenizer.decode(out[0].tolist()) == HELLO_TEXT
    assert generate(ours, idx, max_new_tokens=10).tolist() == [HELLO_IDS]  # gpt2hub's own, with its KV cache


@pytest.mark.parametrize("qkv_bias,tie,expected", [(False, False, BOOK_PARAMS), (False, True, BOOK_PARAMS_TIED),
                                                   (True, False, QKV_PARAMS), (True, True, QKV_PARAMS_TIED)])
def test_parameter_counts_of_the_124m_config(qkv_bias, tie, expected):
    with torch.device("meta"):
        model = GPTModel({**GPT_CONFIG_124M, "qkv_bias": qkv_bias}, tie_weights=tie)
    assert _count(model) == expected and model.tied == tie


@pytest.mark.parametrize("cfg", [CH05_CONFIG, CH07_CONFIG, {**CH05_CONFIG, "vocab_size": 300, "qkv_bias": True}],
                         ids=["ch05", "ch07", "qkv_bias"])
def test_seeded_init_is_the_books_for_the_books_test_configs(cfg):
    torch.manual_seed(123)
    ours, after_ours = GPTModel(cfg), torch.rand(4)
    torch.manual_seed(123)
    book, after_book = BookGPTModel(cfg), torch.rand(4)
    _assert_bit_identical(ours, book)
    assert torch.equal(after_ours, after_book)


def _batches(vocab: int, ctx: int, n: int, batch: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Input and next-token targets, as the book's GPTDatasetV1 makes them from a token stream."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, ctx + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _train(model: torch.nn.Module, batches: list, lr: float = 5e-4) -> list[float]:
    """The book's train_model_simple: AdamW, dropout on, a cross-entropy step per batch; each step's loss and the
    evaluation loss after it (dropout off), as floats."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    torch.manual_seed(123)  # dropout masks
    losses = []
    for x, y in batches:
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            losses += [loss.item(), F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()]
    return losses


@pytest.mark.parametrize("cfg", [CH05_CONFIG, CH07_CONFIG], ids=["ch05", "ch07"])
def test_training_from_the_seeded_init_gives_the_books_losses(cfg):
    batches = _batches(cfg["vocab_size"], cfg["context_length"], 1) * 4  # one batch, as the book's test_ch05 trains
    torch.manual_seed(123)
    ours = GPTModel(cfg)
    torch.manual_seed(123)
    book = BookGPTModel(cfg)
    ours_losses, book_losses = _train(ours, batches), _train(book, batches)
    # dropout draws the same masks in the same order; only the fused kernels' rounding differs
    np.testing.assert_allclose(ours_losses, book_losses, rtol=1e-5)
    assert ours_losses[-1] < ours_losses[0]
    theirs = _params(book)
    for key, value in _params(ours).items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """OpenAI's files for a small model with random weights, and the book's `params` read from them."""
    folder = tmp_path_factory.mktemp("bookcompat") / SPEC.size
    write_openai_folder(folder, SPEC, seed=11)
    with TFCheckpoint(folder) as ckpt:
        params = params_from_tf(ckpt, SPEC.n_layers)
    return folder, params


def _book_with(params: dict, cfg: dict) -> BookGPTModel:
    book = BookGPTModel(cfg)
    load_weights_into_gpt(book, params)
    return book


def _untied(folder, params, cfg, how: str) -> GPTModel:
    if how == "from_pretrained":
        return from_pretrained(folder, tie_weights=False)
    if how == "from_state_dict":
        return GPTModel.from_state_dict(cfg, state_dict_from_tf(TFCheckpoint(folder), cfg), tie_weights=False)
    model = GPTModel(cfg)  # the notebook's path: the book's model, then the book's load_weights_into_gpt
    load_weights_into_gpt(model, params)
    return model


@pytest.mark.parametrize("how", ["from_pretrained", "from_state_dict", "load_weights_into_gpt"])
def test_fine_tuning_untied_pretrained_weights_matches_the_book(pretrained, how):
    folder, params = pretrained
    cfg = config_from_hparams(SPEC.hparams())  # drop_rate 0.0, qkv_bias True: what from_pretrained builds
    batches = _batches(SPEC.vocab_size, SPEC.context_length, 4)
    ours = _untied(folder, params, cfg, how)
    assert not ours.tied
    ours_losses, book_losses = _train(ours, batches), _train(_book_with(params, cfg), batches)
    np.testing.assert_allclose(ours_losses, book_losses, rtol=1e-5)
    # GPT-2's tied head (from_pretrained's default) trains differently: the first step already moves both apart
    tied_losses = _train(from_pretrained(folder), batches)
    assert tied_losses[0] == pytest.approx(book_losses[0], rel=1e-5)
    assert abs(tied_losses[1] - book_losses[1]) > 1e-3


def test_untied_head_is_a_contiguous_copy_and_the_rest_stays_mapped(pretrained):
    folder, _ = pretrained
    cfg = config_from_hparams(SPEC.hparams())
    for dtype in (torch.float32, torch.bfloat16):
        sd = state_dict_from_tf(TFCheckpoint(folder), cfg, dtype)
        model = GPTModel.from_state_dict(cfg, sd, tie_weights=False)
        head, emb = model.out_head.weight, model.tok_emb.weight
        assert not model.tied and isinstance(head, torch.nn.Parameter) and head.is_contiguous()
        assert head.dtype == emb.dtype == dtype and head.device == emb.device and torch.equal(head, emb)
        assert head.data_ptr() != emb.data_ptr()
        assert emb.data_ptr() == sd["tok_emb.weight"].data_ptr()  # handed over, not copied
        q = model.trf_blocks[0].att.W_query.weight
        assert q.data_ptr() == sd["trf_blocks.0.att.W_query.weight"].data_ptr()
        # views of c_attn: its column blocks (float32, OpenAI's layout) or row blocks (bfloat16, nn.Linear's)
        assert model.trf_blocks[0].att.fused_qkv() is not None
        tied = GPTModel.from_state_dict(cfg, sd)
        assert tied.tied and tied.tok_emb.weight.data_ptr() == sd["tok_emb.weight"].data_ptr()


@pytest.mark.parametrize("source,dtype", [("openai", "float32"), ("openai", "bfloat16"), ("hf", "float32")])
def test_from_pretrained_ties_by_default_and_unties_on_request_through_the_cache(hub_env, server, source, dtype):
    tied = from_pretrained(TINY.name, source=source, dtype=dtype)
    untied = from_pretrained(TINY.name, source=source, dtype=dtype, tie_weights=False)
    assert tied.tied and not untied.tied
    head = untied.out_head.weight
    assert head.is_contiguous() and head.dtype == untied.tok_emb.weight.dtype == getattr(torch, dtype)
    assert torch.equal(head, untied.tok_emb.weight) and head.data_ptr() != untied.tok_emb.weight.data_ptr()
    x = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tied(x), untied(x))


def test_load_weights_into_gpt_works_on_both_classes(pretrained):
    _, params = pretrained
    cfg = config_from_hparams(SPEC.hparams())
    wte = torch.from_numpy(params["wte"])
    book, ours = _book_with(params, cfg), GPTModel(cfg)
    load_weights_into_gpt(ours, params)
    tied = GPTModel(cfg, tie_weights=True)
    load_weights_into_gpt(tied, params)
    assert tied.tied and not ours.tied
    for model in (book, ours, tied):
        assert torch.equal(model.out_head.weight, wte) and torch.equal(model.tok_emb.weight, wte)
    for model in (book, ours):  # the book's head is its own Parameter after load_weights_into_gpt; ours too
        assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    x = torch.randint(0, SPEC.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for model in (ours, tied):
            torch.testing.assert_close(model.eval()(x), book.eval()(x), rtol=1e-5, atol=1e-5)


def _models_for_the_book(folder) -> list[GPTModel]:
    """A seeded GPTModel, a tied mapped float32 one (transposed views) and a bfloat16 one."""
    torch.manual_seed(0)
    cfg = config_from_hparams(SPEC.hparams())
    return [GPTModel(cfg), from_pretrained(folder), from_pretrained(folder, dtype="bfloat16")]


def test_book_state_dict_loads_strictly_into_the_books_model(pretrained, tmp_path):
    folder, _ = pretrained
    x = torch.randint(0, SPEC.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    for model in _models_for_the_book(folder):
        was_tied = model.tied
        sd = book_state_dict(model)
        assert all(t.dtype == model.tok_emb.weight.dtype for t in sd.values())
        book = BookGPTModel(model.cfg).eval()
        assert list(sd) == list(book.state_dict())  # the book's names in the book's order, masks included
        book.load_state_dict(sd, strict=True)  # bfloat16 widened to the book's float32: the same values
        assert all(t.is_contiguous() for t in sd.values())
        assert len({t.data_ptr() for t in sd.values()}) == len(sd)  # nothing shared: safetensors takes it
        safetensors.torch.save_file(sd, str(tmp_path / "book.safetensors"))
        assert model.tied == was_tied  # the model itself is left as it was
        with torch.no_grad():
            torch.testing.assert_close(book(x), model.float().eval()(x), rtol=1e-5, atol=1e-5)


def test_the_books_state_dict_loads_into_gpt2hub_and_round_trips():
    cfg = {**CH05_CONFIG, "vocab_size": 300}
    torch.manual_seed(3)
    book = BookGPTModel(cfg).eval()
    sd = book.state_dict()
    loaded = GPTModel(cfg)
    loaded.load_state_dict(sd, strict=True)
    x = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]), generator=torch.Generator().manual_seed(4))
    for ours in (loaded, GPTModel.from_state_dict(cfg, dict(sd), tie_weights=False),
                 GPTModel.from_state_dict(cfg, dict(sd))):
        assert not ours.tied  # the book's head differs from tok_emb: it stays its own, whatever was asked
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), book(x), rtol=1e-5, atol=1e-5)
        back = book_state_dict(ours)
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("assign", [False, True])
def test_untied_model_takes_a_checkpoint_without_head_as_a_copy(pretrained, assign):
    folder, _ = pretrained
    cfg = config_from_hparams(SPEC.hparams())
    sd = state_dict_from_tf(TFCheckpoint(folder), cfg, layout="out_in")
    assert "out_head.weight" not in sd
    model = GPTModel(cfg)
    model.load_state_dict(sd, strict=True, assign=assign)
    assert not model.tied and model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert torch.equal(model.out_head.weight, sd["tok_emb.weight"])
    tied = GPTModel(cfg, tie_weights=True)
    tied.load_state_dict(sd, strict=True, assign=assign)
    assert tied.tied and torch.equal(tied.out_head.weight, sd["tok_emb.weight"])


def test_gpt2_init_and_tied_head_on_request():
    cfg = {**GPT_CONFIG_124M, "context_length": 64, "n_layers": 2, "qkv_bias": True}
    torch.manual_seed(0)
    book_init = GPTModel(cfg)
    torch.manual_seed(0)
    gpt2 = GPTModel(cfg, tie_weights=True, init="gpt2")
    assert gpt2.tied and not book_init.tied
    assert book_init.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.01)  # nn.Embedding's normal(0, 1)
    assert gpt2.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.01)
    block = gpt2.trf_blocks[1]
    assert block.att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.att.out_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.02)  # 1/sqrt(2 * n_layers)
    assert block.ff.layers[2].weight.std().item() == pytest.approx(0.02 / 2, rel=0.02)
    assert not block.att.W_query.bias.any() and not block.ff.layers[0].bias.any()
    assert torch.equal(block.norm1.scale, torch.ones(768)) and not block.norm1.shift.any()
    with pytest.raises(ValueError, match="init='xavier'"):
        GPTModel(cfg, init="xavier")
