"""bfloat16 linears on pre-packed oneDNN weights, and float32 decoding from [out, in] copies of transposed weights,
against F.linear: values, which kernel ran, and when a pack or copy is remade."""

import copy
import gc
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factory import random_weights
from kernel_probe import ONEDNN_OP, PACK_OP, ops, plain

from gpt2hub import GPTModel, generate, kernels
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
def onednn():
    if not kernels.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN linear: float32 takes F.linear and makes no copies")


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
