"""Linear's oneDNN path against nn.Linear's own, on random inputs, alone and inside generation."""

import platform

import pytest
import torch
import torch.nn.functional as F
from factory import random_weights
from kernel_probe import ONEDNN_OP
from kernel_probe import ops as _ops
from kernel_probe import plain as _plain

from gpt2hub import GPTModel, generate, native
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.model import ONEDNN, Linear

HP = {"n_vocab": 300, "n_ctx": 48, "n_embd": 48, "n_head": 4, "n_layer": 2}


def test_onednn_is_there_on_x86():
    # PyTorch's x86 builds ship oneDNN; were it missing, every test below would compare the plain path with itself
    assert ONEDNN or platform.machine().lower() not in ("x86_64", "amd64")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 7, 48), (5, 48), "strided"])
def test_onednn_linear_matches_the_plain_path(layout, bias, shape):
    g = torch.Generator().manual_seed(0)
    lin = Linear(48, 80, bias=bias)
    w = torch.randn(80, 48, generator=g)
    lin.weight = torch.nn.Parameter(w if layout == "out_in" else w.t().contiguous().t(), requires_grad=False)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(80, generator=g), requires_grad=False)
    x = torch.randn(2, 18, 48, generator=g)[:, ::2] if shape == "strided" else torch.randn(shape, generator=g)
    one_row = native.AVAILABLE and x.numel() == 48  # one row: gpt2hub.native's kernel, where it runs
    with torch.no_grad():
        runs = native.runs()
        ops, fast = _ops(lambda: lin(x))
        assert native.runs() - runs == one_row
        with _plain():
            plain_ops, plain = _ops(lambda: lin(x))
        assert native.runs() - runs == one_row
    assert (ONEDNN_OP in ops) == (ONEDNN and not one_row) and ONEDNN_OP not in plain_ops
    assert torch.equal(plain, F.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_training_and_other_dtypes_take_the_plain_path():
    lin = Linear(16, 8)
    x = torch.randn(2, 16, requires_grad=True)
    ops, _ = _ops(lambda: lin(x).square().sum().backward())
    assert ONEDNN_OP not in ops
    assert lin.weight.grad is not None and x.grad is not None
    half = Linear(16, 8).to(torch.float16)  # bfloat16 has its own path: tests/test_kernels.py
    with torch.no_grad():
        ops, y = _ops(lambda: half(x.detach().half()))
    assert ONEDNN_OP not in ops and y.dtype == torch.float16


@pytest.mark.parametrize("b,t", [(1, 1), (1, 13), (3, 6)])
def test_greedy_generation_is_identical_with_and_without_onednn(b, t):
    cfg = config_from_hparams(HP)
    weights = random_weights(HP, seed=b + t, scale=0.3)
    model = GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: weights[f"model/{n}"], cfg))  # float32: [in, out]
    idx = torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(t))
    runs = native.runs()
    ops, fast = _ops(lambda: generate(model, idx, 25))
    ran_native = native.runs() - runs
    with _plain():
        plain = generate(model, idx, 25)
        with torch.no_grad():
            plain_logits = model(fast)
    # one-row products (batch-1 decoding) on gpt2hub.native's kernels where they run, the rest on oneDNN
    assert bool(ran_native) == (native.AVAILABLE and b == 1)
    assert (ONEDNN_OP in ops) == (ONEDNN and (b > 1 or t > 1 or not native.AVAILABLE))
    assert torch.equal(fast, plain)
    with torch.no_grad():
        torch.testing.assert_close(model(fast), plain_logits, rtol=1e-5, atol=1e-5)


def _pair(seed: int) -> tuple[GPTModel, GPTModel]:
    """The same random weights as views of OpenAI's matrices (c_attn fused) and as nn.Linear's own copies."""
    cfg = config_from_hparams(HP)
    weights = random_weights(HP, seed=seed, scale=0.3)
    views, copies = (GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: weights[f"model/{n}"], cfg, layout=lay))
                     for lay in ("in_out", "out_in"))
    return views, copies


@pytest.mark.parametrize("b,t", [(1, 1), (2, 17)])
def test_fused_qkv_matches_three_products(b, t):
    views, rows = _pair(seed=b * t)
    # c_attn converted to nn.Linear's layout is one [3d, d] tensor too: its row blocks are fused; tensors of their
    # own (as a safetensors file gives them) are three products
    copies = GPTModel.from_state_dict(rows.cfg, {k: v.clone() for k, v in rows.state_dict().items()})
    assert all(blk.att.fused_qkv() is not None for blk in views.trf_blocks)
    assert all(blk.att.fused_qkv() is not None for blk in rows.trf_blocks)
    assert all(blk.att.fused_qkv() is None for blk in copies.trf_blocks)
    idx = torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(b + t))
    with torch.no_grad():
        torch.testing.assert_close(views(idx), copies(idx), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows(idx), copies(idx), rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(views, idx, 20), generate(copies, idx, 20))
    assert torch.equal(generate(rows, idx, 20), generate(copies, idx, 20))
    assert torch.equal(generate(views, idx, 12, decode="static"), generate(copies, idx, 12, decode="static"))


def test_fusion_follows_the_weights_it_sees():
    views, copies = _pair(seed=3)
    att = views.trf_blocks[0].att
    idx = torch.randint(0, HP["n_vocab"], (1, 9), generator=torch.Generator().manual_seed(0))
    # a weight replaced by another tensor: three products again, with the new values
    att.W_key.weight = torch.nn.Parameter(att.W_key.weight.detach() * 2, requires_grad=False)
    copies.trf_blocks[0].att.W_key.weight.data.mul_(2)
    assert att.fused_qkv() is None
    with torch.no_grad():
        torch.testing.assert_close(views(idx), copies(idx), rtol=1e-5, atol=1e-5)
    # no biases (qkv_bias=False): the three weights alone are fused
    lin = torch.randn(48, 144)
    att2 = GPTModel({**config_from_hparams(HP), "qkv_bias": False}).trf_blocks[0].att
    for j, m in enumerate((att2.W_query, att2.W_key, att2.W_value)):
        m.weight = torch.nn.Parameter(lin[:, j * 48:(j + 1) * 48].t(), requires_grad=False)
    w, bias = att2.fused_qkv()
    assert bias is None and torch.equal(w, lin.t())
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        fused = att2(x)
        with torch.enable_grad():  # training takes the three separate products
            plain = att2(x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_state_dict_shapes_are_gptmodels_own_in_its_order(qkv_bias, layers):
    """Storage and gpt2hub.quant check tensors against this table instead of building a model: it must stay GPTModel's."""
    from gpt2hub.model import state_dict_shapes

    cfg = {"vocab_size": 97, "context_length": 16, "emb_dim": 24, "n_heads": 2, "n_layers": layers, "drop_rate": 0.0,
           "qkv_bias": qkv_bias}
    with torch.device("meta"):
        real = GPTModel(cfg, tie_weights=True).state_dict()
    assert list(state_dict_shapes(cfg).items()) == [(k, tuple(v.shape)) for k, v in real.items()]
