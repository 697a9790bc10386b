"""bfloat16 linears on pre-packed oneDNN weights, and float32 decoding from [out, in] copies of transposed weights,
against F.linear: values, which kernel ran, and when a pack or copy is remade. These are the paths one-row products
take where gpt2hub.native does not run (its tests: tests/test_native.py), so the fixtures turn it off."""

import copy
import gc
import io
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from factory import random_weights, write_openai_folder
from kernel_probe import ONEDNN_OP, PACK_OP, ops, plain

import gpt2hub
from gpt2hub import GPTModel, generate, kernels, native
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.kernels import forget_packs, linear, native_bf16, packed_bytes, packs_made
from gpt2hub.model import Linear

HP = {"n_vocab": 300, "n_ctx": 48, "n_embd": 48, "n_head": 4, "n_layer": 2}
BF16 = torch.bfloat16
CAN_PACK = kernels.PACKING and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture
def packing(monkeypatch):
    """The packed path, also on a CPU that only emulates bfloat16 (oneDNN computes the same products there)."""
    if not CAN_PACK:
        pytest.skip("this PyTorch or CPU has no oneDNN bfloat16: the packed path cannot run here")
    monkeypatch.setattr(kernels, "NATIVE_BF16", True)
    monkeypatch.setattr(native, "ENABLED", False)  # one row too (gpt2hub.native's own kernels: tests/test_native.py)


def _weight(layout: str, out_f: int = 80, in_f: int = 48, seed: int = 0) -> torch.Tensor:
    """An [out, in] bfloat16 weight laid out in memory as `layout` says."""
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":  # the middle third of a c_attn-like [in, 3 * out] matrix, as the fused QKV view reads it
        return torch.randn(in_f, 3 * out_f, generator=g).to(BF16)[:, out_f:2 * out_f].t()
    w = torch.randn(out_f, in_f, generator=g).to(BF16)
    return {"out_in": w, "in_out": w.t().contiguous().t(), "rows": torch.cat([w, w])[out_f // 2:out_f // 2 + out_f],
            "strided": torch.randn(out_f, 2 * in_f, generator=g).to(BF16)[:, ::2]}[layout]


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """`y` is F.linear(x, w, b) within bfloat16's rounding, and bit for bit F.linear of `w` stored [out, in]."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == BF16 and y.shape == exact.shape
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(y, F.linear(x, w, b))
    # (F.linear of a transposed view sums in another order at larger sizes)
    assert torch.equal(y, F.linear(x, w.contiguous(), b))


@pytest.mark.parametrize("layout", ["out_in", "in_out", "fused", "rows", "strided"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 13, 48), (3, 5, 48), (5, 48), (48,), "strided"])
def test_packed_linear_matches_f_linear(packing, layout, bias, shape):
    g = torch.Generator().manual_seed(1)
    w = _weight(layout)
    b = torch.randn(80, generator=g).to(BF16) if bias else None
    x = (torch.randn(2, 18, 48, generator=g)[:, ::2] if shape == "strided" else torch.randn(shape, generator=g)).to(BF16)
    made = packs_made()
    with torch.no_grad():
        first_ops, first = ops(lambda: linear(x, w, b))  # the first use reads the dense weight
        second_ops, second = ops(lambda: linear(x, w, b))  # the second packs it
        third_ops, third = ops(lambda: linear(x, w, b))  # later ones reuse the pack
    assert ONEDNN_OP not in first_ops and PACK_OP not in first_ops
    assert {ONEDNN_OP, PACK_OP} <= second_ops and ONEDNN_OP in third_ops and PACK_OP not in third_ops
    assert "aten::linear" not in third_ops and packs_made() == made + 1
    for y in (first, second, third):
        _check(y, x, w, b)
    assert torch.equal(second, third)


@pytest.mark.parametrize("out_f,in_f", [(768, 768), (2304, 768), (3072, 768), (768, 3072), (4096, 1024), (1280, 5120)])
def test_gpt2_matrices_give_f_linears_bits_up_to_the_row_limit(packing, out_f, in_f):
    # what keeps decoding's tokens identical to F.linear's: the same sums in the same order (gpt2-small to -large)
    g = torch.Generator().manual_seed(out_f + in_f)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(BF16)
    b = torch.randn(out_f, generator=g).to(BF16)
    with torch.no_grad():
        for rows in (1, 2, 7, kernels.PACKED_MAX_ROWS):
            x = torch.randn(rows, in_f, generator=g).to(BF16)
            for _ in range(2):
                y = linear(x, w, b)
            assert torch.equal(y, F.linear(x, w, b)), rows


@pytest.mark.parametrize("in_f,rows", [(0, 1), (48, 0)])
def test_empty_products(packing, in_f, rows):
    w = torch.randn(4, in_f).to(BF16)
    x = torch.randn(rows, in_f).to(BF16)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(linear(x, w), F.linear(x, w))


def test_long_inputs_keep_f_linear(packing):
    w = _weight("out_in")
    x = torch.randn(2, kernels.PACKED_MAX_ROWS // 2 + 1, 48).to(BF16)  # a prompt: 34 rows
    made = packs_made()
    with torch.no_grad():
        for _ in range(3):
            names, y = ops(lambda: linear(x, w))
            assert ONEDNN_OP not in names and "aten::linear" in names
            assert torch.equal(y, F.linear(x, w))
        assert packs_made() == made
        for _ in range(2):
            linear(x[:, :16], w)  # 32 rows: packed
        assert packs_made() == made + 1


def _run(lin: Linear, x: torch.Tensor, times: int = 3) -> torch.Tensor:
    """Call `lin` enough times to pack its weight; each output checked against F.linear."""
    with torch.no_grad():
        for _ in range(times):
            y = lin(x)
            _check(y, x, lin.weight, lin.bias)
    return y


def _bf16_linear(seed: int = 0, out_f: int = 80) -> Linear:
    torch.manual_seed(seed)
    return Linear(48, out_f).to(BF16).eval()


def test_every_change_to_a_weight_makes_a_new_pack(packing):
    lin = _bf16_linear()
    x = torch.randn(1, 1, 48).to(BF16)
    before = _run(lin, x)
    made = packs_made()
    with torch.no_grad():
        lin.weight.mul_(-1)  # in place, through the parameter
    assert not torch.equal(_run(lin, x), before)
    lin.load_state_dict({"weight": torch.randn(80, 48).to(BF16), "bias": lin.bias.detach().clone()})  # copy_
    _run(lin, x)
    with torch.no_grad():
        lin.weight[3].zero_()  # through a view of it
    y = _run(lin, x)
    assert torch.equal(y[..., 3], lin.bias[3].expand(1, 1))
    lin.weight = torch.nn.Parameter(torch.randn(80, 48).to(BF16))  # replaced
    _run(lin, x)
    lin.weight.data = torch.randn(80, 48).to(BF16)  # swapped storage under the same parameter
    _run(lin, x)
    assert packs_made() == made + 5
    # writes through .data bypass PyTorch's version counter: forget_packs() is the way to say so
    lin.weight.data.mul_(2)
    forget_packs()
    _run(lin, x)


def test_a_view_of_the_same_matrix_sees_writes_through_another(packing):
    c_attn = torch.randn(48, 240).to(BF16)
    w = c_attn[:, 80:160].t()
    x = torch.randn(1, 48).to(BF16)
    with torch.no_grad():
        for _ in range(2):
            linear(x, w)
        c_attn[:, 100].fill_(1)  # the same storage and version counter, written through the source matrix
        for _ in range(2):
            _check(linear(x, w), x, w, None)
        assert torch.all(linear(x, w)[:, 20] == linear(x, torch.ones(1, 48).to(BF16))[:, 0])


def test_a_pack_lives_as_long_as_its_weight(packing):
    gc.collect()
    start = packed_bytes()
    lin = _bf16_linear(out_f=256)
    _run(lin, torch.randn(1, 48).to(BF16))
    assert packed_bytes() - start == 256 * 48 * 2  # one pack, the size of the weight: no other copy kept
    lin.float()  # converted: the bfloat16 storage, and its pack, are gone
    gc.collect()
    assert packed_bytes() == start
    lin.to(BF16)
    _run(lin, torch.randn(1, 48).to(BF16))
    assert packed_bytes() - start == 256 * 48 * 2
    del lin
    gc.collect()
    assert packed_bytes() == start


def test_training_takes_f_linear_and_its_updates_reach_the_pack(packing):
    lin = _bf16_linear()
    x = torch.randn(4, 48).to(BF16)
    _run(lin, x)
    train_ops, _ = ops(lambda: lin(x).float().square().sum().backward())
    assert ONEDNN_OP not in train_ops and lin.weight.grad is not None
    torch.optim.SGD(lin.parameters(), lr=0.5).step()
    _run(lin, x)


def test_without_native_bfloat16_the_plain_path_stays(monkeypatch):
    monkeypatch.setattr(kernels, "NATIVE_BF16", False)
    monkeypatch.setattr(native, "BF16", False)
    lin = _bf16_linear()
    x = torch.randn(1, 1, 48).to(BF16)
    made = packs_made()
    with torch.no_grad():
        for _ in range(3):
            names, y = ops(lambda: lin(x))
            assert ONEDNN_OP not in names and PACK_OP not in names and "aten::linear" in names
            assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    assert packs_made() == made


def test_native_bfloat16_is_read_from_the_cpu_flags():
    assert not native_bf16("processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n")
    if CAN_PACK:
        assert native_bf16("processor : 0\nflags : fpu avx512f avx512_bf16\n")
        assert native_bf16("processor : 0\nflags : fpu amx_bf16 amx_tile\n")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        assert kernels.NATIVE_BF16 == native_bf16(text) == (CAN_PACK and ("avx512_bf16" in text or "amx_bf16" in text))


def _model(layout: str | None = None, seed: int = 0) -> GPTModel:
    cfg = config_from_hparams(HP)
    weights = random_weights(HP, seed=seed, scale=0.3)
    sd = openai_state_dict(lambda n: weights[f"model/{n}"], cfg, BF16, layout=layout)
    return GPTModel.from_state_dict(cfg, sd)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("b,t", [(1, 1), (1, 13), (3, 6), (1, 40)])
def test_greedy_generation_is_identical_with_and_without_packs(packing, monkeypatch, layout, b, t):
    model = _model(layout, seed=b + t)
    idx = torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(t))
    first = generate(model, idx, 25)
    names, fast = ops(lambda: generate(model, idx, 25))
    with torch.no_grad():
        model(fast[:, -8:])
        logits = model(fast[:, -8:])
    with plain():
        plain_names, slow = ops(lambda: generate(model, idx, 25))
    monkeypatch.setattr(kernels, "NATIVE_BF16", False)  # today's path elsewhere: F.linear, on oneDNN
    today_names, today = ops(lambda: generate(model, idx, 25))
    with torch.no_grad():
        today_logits = model(fast[:, -8:])
    # after the first call every decoding step read packs (the tied head included): no dense product, no new pack
    assert ONEDNN_OP in names and PACK_OP not in names and ("aten::linear" in names) == (b * t > kernels.PACKED_MAX_ROWS)
    assert ONEDNN_OP not in plain_names and ONEDNN_OP not in today_names and "aten::linear" in today_names
    assert torch.equal(fast, slow) and torch.equal(first, fast) and torch.equal(fast, today)
    assert torch.equal(logits, today_logits)


def test_the_tied_head_follows_the_embedding(packing):
    model = _model()
    assert model.tied
    idx = torch.randint(0, HP["n_vocab"], (1, 5), generator=torch.Generator().manual_seed(0))
    generate(model, idx, 4)
    head_bytes = HP["n_vocab"] * HP["n_embd"] * 2
    assert packed_bytes() >= head_bytes
    with torch.no_grad():
        model.tok_emb.weight[:, :8].mul_(-3)  # changes both the embedding and the head
        for _ in range(2):
            fast = model(idx)
        with plain():
            slow = model(idx)
    torch.testing.assert_close(fast, slow)


def test_packs_stay_out_of_state_dict_copies_and_pickles(packing):
    model = _model()
    keys = list(model.state_dict())
    idx = torch.randint(0, HP["n_vocab"], (1, 7), generator=torch.Generator().manual_seed(1))
    out = generate(model, idx, 6)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(generate(twin, idx, 6), out) and torch.equal(generate(loaded, idx, 6), out)


def test_weights_made_in_inference_mode(packing):
    with torch.inference_mode():
        lin = _bf16_linear()
        x = torch.randn(2, 48).to(BF16)
        assert lin.weight.is_inference()
        for _ in range(3):
            _check(lin(x), x, lin.weight, lin.bias)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_torch_compile_traces_linear_whole(packing, dtype):
    lin = Linear(48, 80).to(dtype).eval()
    x = torch.randn(1, 3, 48).to(dtype)
    compiled = torch.compile(lin, backend="eager", fullgraph=True)  # fails on any graph break
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), F.linear(x, lin.weight, lin.bias))


def test_inductor_compiles_linear_on_cpu():
    # inductor lowers oneDNN's linear only on frozen weights: without freezing, linear() must hand it F.linear
    lin = Linear(16, 8).eval()
    x = torch.randn(2, 16)
    compiled = torch.compile(lin, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, lin.weight, lin.bias))


# -- float32: weights stored transposed ([in, out], OpenAI's layout, mapped as it is) decode from an [out, in] copy --
F32 = torch.float32


@pytest.fixture
def onednn_linear(monkeypatch):
    if not kernels.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN linear: float32 takes F.linear and makes no copies")
    monkeypatch.setattr(native, "ENABLED", False)  # one row too (gpt2hub.native's own kernels: tests/test_native.py)


@pytest.fixture
def onednn(onednn_linear, monkeypatch):
    """float32 copies made on a matrix's second use, as bfloat16 packs are, so that small tests exercise them (the
    default use count is tested on its own below)."""
    monkeypatch.setitem(kernels.USES_BEFORE_PACK, F32, 2)


def _transposed(out_f: int = 80, in_f: int = 48, seed: int = 0) -> torch.Tensor:
    """A float32 [out, in] weight stored [in, out]: a view of a Conv1D matrix."""
    return torch.randn(in_f, out_f, generator=torch.Generator().manual_seed(seed)).t()


@pytest.mark.parametrize("bias", [True, False])
def test_float32_decoding_reads_a_copy_of_a_transposed_weight(onednn, bias):
    w = _transposed()
    b = torch.randn(80) if bias else None
    x = torch.randn(1, 1, 48)
    made, start = packs_made(), packed_bytes()
    with torch.no_grad():
        ys = [linear(x, w, b) for _ in range(3)]  # the first reads the view, the second copies it, the third reuses
    assert packs_made() == made + 1 and packed_bytes() - start == 80 * 48 * 4  # one copy, the weight's size
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    for y in ys:
        assert y.dtype == F32
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(ys[1], ys[2])
    with torch.no_grad():  # two rows or more: bit for bit the product with the transposed weight itself
        for rows in (2, 7, kernels.PACKED_MAX_ROWS):
            xr = torch.randn(rows, 48)
            view = torch.ops.mkldnn._linear_pointwise(xr, w, b, "none", [], "")
            assert torch.equal(linear(xr, w, b), view), rows
    assert packs_made() == made + 1


def test_float32_weights_stored_out_in_long_inputs_and_other_views_make_no_copy(onednn):
    # [out, in] already; a prompt (more rows than decoding) over a transposed weight; a slice of a wider matrix
    w, t, middle = torch.randn(80, 48), _transposed(), torch.randn(48, 240)[:, 80:160].t()
    x, long = torch.randn(1, 48), torch.randn(kernels.PACKED_MAX_ROWS + 1, 48)
    made = packs_made()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(linear(x, w), F.linear(x, w))
            torch.testing.assert_close(linear(long, t), F.linear(long, t))
            assert torch.equal(linear(x, middle), F.linear(x, middle))
    assert packs_made() == made


def test_float32_copy_follows_writes_to_its_source(onednn):
    conv1d = torch.randn(48, 80)  # [in, out]
    w = conv1d.t()
    x = torch.randn(1, 48)
    with torch.no_grad():
        for _ in range(3):
            linear(x, w)
        made = packs_made()
        conv1d[:, 20].fill_(1)  # written through the source matrix: same storage, same version counter
        for _ in range(2):
            torch.testing.assert_close(linear(x, w), F.linear(x, w))
        torch.testing.assert_close(linear(x, w)[0, 20], x.sum())
    assert packs_made() == made + 1


@pytest.mark.parametrize("b,t", [(1, 1), (1, 13), (3, 6)])
def test_float32_greedy_generation_with_copies_matches_f_linear(onednn, b, t):
    model = GPTModel.from_state_dict(config_from_hparams(HP), _f32_state_dict(seed=b + t))
    assert model.trf_blocks[0].att.out_proj.weight.t().is_contiguous()  # mapped in OpenAI's layout
    idx = torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(t))
    made = packs_made()
    fast = generate(model, idx, 25)
    assert packs_made() - made == 2 * 4  # per block: the fused QKV, out_proj and the two feed-forward matrices
    with plain():
        slow = generate(model, idx, 25)
    assert torch.equal(fast, slow)


def test_float32_copies_wait_until_decoding_has_run_long_enough_to_repay_them(onednn_linear):
    uses = kernels.USES_BEFORE_PACK[F32]
    assert uses > 2
    model = GPTModel.from_state_dict(config_from_hparams(HP), _f32_state_dict(seed=11))  # 48 positions: enough
    idx = torch.randint(0, HP["n_vocab"], (1, 5), generator=torch.Generator().manual_seed(2))
    made, start = packs_made(), packed_bytes()
    short = generate(model, idx, uses - 1)  # the prompt and uses - 2 decoding steps: every matrix used uses - 1 times
    assert packs_made() == made and packed_bytes() == start  # no copy: neither its time nor its memory
    long = generate(model, idx, uses + 10)  # uses carry over between calls: its prompt's product makes the copies
    assert packs_made() - made == 2 * 4 and packed_bytes() - start == 2 * 12 * HP["n_embd"] ** 2 * 4  # 12 d^2 a block
    with plain():
        assert torch.equal(long, generate(model, idx, uses + 10))
    assert torch.equal(short, long[:, :short.shape[1]])


def test_float32_copies_can_be_turned_off(onednn, monkeypatch):
    monkeypatch.setattr(kernels, "COPY_FLOAT32", False)
    w, x = _transposed(), torch.randn(1, 48)
    made, start = packs_made(), packed_bytes()
    with torch.no_grad():
        for _ in range(3):
            names, y = ops(lambda: linear(x, w))
            assert ONEDNN_OP in names
            torch.testing.assert_close(y, F.linear(x, w))
    assert packs_made() == made and packed_bytes() == start


def _f32_state_dict(seed: int) -> dict[str, torch.Tensor]:
    weights = random_weights(HP, seed=seed, scale=0.3)
    return openai_state_dict(lambda n: weights[f"model/{n}"], config_from_hparams(HP), F32)


# -- float32 copies under attack: every way a weight changes, whole mapped models, threads --
def _f32_model(seed: int = 0) -> GPTModel:
    return GPTModel.from_state_dict(config_from_hparams(HP), _f32_state_dict(seed))


def _reloaded(model: GPTModel) -> GPTModel:
    """`model` saved with torch.save and built again from torch.load: W_query, W_key and W_value still lie side by
    side in one storage (multiplied as one matrix), but each has a version counter of its own."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    return GPTModel.from_state_dict(model.cfg, torch.load(buf))


def _optimizer_step(model: GPTModel, optimizer: type, **kwargs) -> None:
    model.train()
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=0.1, **kwargs)
    with torch.enable_grad():
        model(torch.randint(0, HP["n_vocab"], (2, 5), generator=torch.Generator().manual_seed(5))).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()


def _train_w_value_only(model: GPTModel) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".att.W_value." in name)
    _optimizer_step(model, torch.optim.SGD)


def _assign(model: GPTModel) -> None:
    model.load_state_dict({k: v.clone() for k, v in _f32_model(seed=9).state_dict().items()}, assign=True)


def _swap_data(model: GPTModel) -> None:
    w = model.trf_blocks[1].ff.layers[2].weight
    w.data = (w.data * 2).t().contiguous().t()  # new storage, still stored transposed


CHANGES = {
    "in place": lambda m: m.trf_blocks[0].ff.layers[0].weight.mul_(2),
    "W_value, under the fused view": lambda m: m.trf_blocks[0].att.W_value.weight.add_(1),
    "through the fused view": lambda m: m.trf_blocks[0].att.fused_qkv()[0][100:].mul_(2),
    "load_state_dict": lambda m: m.load_state_dict(_f32_model(seed=9).state_dict()),
    "load_state_dict(assign=True)": _assign,
    "a new Parameter": lambda m: setattr(m.trf_blocks[0].att.out_proj, "weight",
                                         torch.nn.Parameter(m.trf_blocks[0].att.out_proj.weight * 2)),
    ".data = swap": _swap_data,
    "double, written, float": lambda m: (m.double(), m.trf_blocks[0].att.out_proj.weight.mul_(2), m.float()),
    "SGD step": lambda m: _optimizer_step(m, torch.optim.SGD),
    "AdamW step": lambda m: _optimizer_step(m, torch.optim.AdamW),
    "fused AdamW step": lambda m: _optimizer_step(m, torch.optim.AdamW, fused=True),  # writes without a version bump
    "fused SGD step": lambda m: _optimizer_step(m, torch.optim.SGD, fused=True),
    "torch.load, W_key": lambda m: m.trf_blocks[0].att.W_key.weight.mul_(2),
    "torch.load, W_value": lambda m: m.trf_blocks[1].att.W_value.weight.add_(1),
    "torch.load, training W_value alone": _train_w_value_only,
}


@pytest.mark.parametrize("change", CHANGES)
def test_float32_copies_follow_every_change_to_a_model(onednn, change):
    model = _f32_model()
    if change.startswith("torch.load"):
        model = _reloaded(model)
        assert model.trf_blocks[0].att.fused_qkv() is not None  # still one product over the three matrices
    _decoding_follows(model, CHANGES[change], rtol=1e-4, atol=1e-4)


def test_a_torch_loaded_bfloat16_models_fused_pack_follows_w_key(packing):
    model = _reloaded(_model())  # nn.Linear's layout: the fused view spans three row blocks of one storage
    assert model.trf_blocks[0].att.fused_qkv() is not None
    _decoding_follows(model, lambda m: m.trf_blocks[0].att.W_key.weight.mul_(2), rtol=2 ** -7, atol=2e-2)


def _decoding_follows(model: GPTModel, change: Callable[[GPTModel], Any], rtol: float, atol: float) -> None:
    """Logits of 3 rows (decoding's path: copies or packs) after `change` are those the plain path computes."""
    idx = torch.randint(0, HP["n_vocab"], (1, 3), generator=torch.Generator().manual_seed(2))  # (keys matter)
    with torch.no_grad():
        for _ in range(3):
            before = model(idx)  # the copies are made
        change(model)
        for _ in range(3):
            fast = model(idx)
        with plain():
            slow = model(idx)
    assert (before.float() - slow.float()).abs().max() > 0.1  # the change changed the model
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=atol)


@pytest.mark.parametrize("how", [".data", "inference mode"])
def test_float32_writes_that_escape_the_version_counter_need_forget_packs(onednn, how):
    # as documented (gpt2hub.kernels): a stale copy until forget_packs(); F.linear sees the write at once
    if how == "inference mode":
        with torch.inference_mode():
            model = _f32_model()
    else:
        model = _f32_model()
    w = model.trf_blocks[0].ff.layers[0].weight
    idx = torch.randint(0, HP["n_vocab"], (1, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for _ in range(3):
            model(idx)
        if how == "inference mode":
            w.mul_(2)
        else:
            w.data.mul_(2)
        stale = model(idx)
        with plain():
            slow = model(idx)
        forget_packs()
        fresh = [model(idx) for _ in range(3)]
    assert not torch.allclose(stale, slow, atol=1e-2)
    for y in fresh:
        torch.testing.assert_close(y, slow, rtol=1e-4, atol=1e-4)


@pytest.fixture
def mapped_f32(onednn, tmp_path):
    """A folder of OpenAI's files for a small float32 model, and packed_bytes() before any model was loaded."""
    write_openai_folder(tmp_path / "tiny", {**HP, "n_ctx": 96}, seed=4)
    gc.collect()
    return tmp_path / "tiny", packed_bytes()


def _load_mapped(folder: Path) -> GPTModel:
    """The model as gpt2hub loads float32: transposed views of the mapped checkpoint."""
    model = gpt2hub.from_pretrained(str(folder))
    assert model.trf_blocks[0].att.out_proj.weight.t().is_contiguous() and model.trf_blocks[0].att.fused_qkv()
    return model


@pytest.mark.parametrize("b,t", [(1, 1), (1, 5), (2, 7), (1, 33), (3, 40), (8, 2)])
def test_float32_mapped_model_decodes_the_same_tokens_three_ways(mapped_f32, monkeypatch, b, t):
    folder, start = mapped_f32
    model = _load_mapped(folder)
    idx = torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(b * 100 + t))
    made = packs_made()
    copies = generate(model, idx, 20)
    assert packs_made() - made == 4 * HP["n_layer"] and packed_bytes() > start
    with plain():
        onednn_off = generate(model, idx, 20)
    monkeypatch.setattr(kernels, "COPY_FLOAT32", False)
    mapped = generate(model, idx, 20)
    assert torch.equal(copies, mapped) and torch.equal(copies, onednn_off)


def test_float32_copies_stay_out_of_state_dicts_copies_and_pickles_and_die_with_the_model(mapped_f32):
    folder, start = mapped_f32
    model = _load_mapped(folder)
    idx = torch.randint(0, HP["n_vocab"], (1, 3), generator=torch.Generator().manual_seed(1))
    out = generate(model, idx, 6)
    copies = packed_bytes() - start
    head = HP["n_vocab"] * HP["n_embd"] * 4  # (stored [out, in]: read as it is)
    assert copies == sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear)) - head
    saved, whole = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), saved)
    torch.save(model, whole)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert saved.tell() < weights + copies / 2 and whole.tell() < weights + copies / 2  # the weights, not their copies
    whole.seek(0)
    twin, loaded, again = copy.deepcopy(model), torch.load(whole, weights_only=False), _load_mapped(folder)
    for other in (twin, loaded, again):  # (a second model mapped from the same file included)
        assert torch.equal(generate(other, idx, 6), out)
    del model, twin, loaded, again, other
    gc.collect()
    assert packed_bytes() == start


def _views_used_twice(done: threading.Event) -> None:
    """400 transposed matrices in one storage (a mapped safetensors file is one), each used twice: copies made."""
    flat, x = torch.randn(400 * 16), torch.randn(1, 4)
    with torch.no_grad():
        for j in range(400):
            w = flat[j * 16:(j + 1) * 16].view(4, 4).t()
            linear(x, w)
            linear(x, w)
    done.set()


def _packed_bytes_until(done: threading.Event, errors: list[BaseException]) -> None:
    try:
        while not done.is_set():
            packed_bytes()
    except RuntimeError as e:  # "dictionary changed size during iteration"
        errors.append(e)
        done.set()


def test_packed_bytes_while_another_thread_makes_copies(onednn):
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible (before the fix: failed in every round)
    errors: list[BaseException] = []
    try:
        for _ in range(5):
            done = threading.Event()
            threads = [threading.Thread(target=_views_used_twice, args=(done,)),
                       threading.Thread(target=_packed_bytes_until, args=(done, errors))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []


def test_float32_threads_decoding_one_model_give_its_tokens(onednn):
    model = _f32_model()
    idx = torch.randint(0, HP["n_vocab"], (2, 4), generator=torch.Generator().manual_seed(3))
    with plain():
        expected = generate(model, idx, 12)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(3):
                forget_packs()  # copies made and dropped while the other thread decodes
                results.append(generate(model, idx, 12))
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 9 and all(torch.equal(r, expected) for r in results)
