"""gpt2hub.native: the one-row kernels against float64 and F.linear on random inputs of awkward sizes, which calls
reach them, what they leave alone, and what runs where they cannot."""

import logging
import platform
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F
from factory import random_weights

from gpt2hub import GPTModel, generate, kernels, native, quant
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.kernels import packed_bytes

BF16, F32 = torch.bfloat16, torch.float32
HP = {"n_vocab": 300, "n_ctx": 48, "n_embd": 48, "n_head": 4, "n_layer": 2}
# sizes around the kernels' steps (4 rows; 16, 32, 64 inputs) and a few of GPT-2's own
SIZES = [(1, 1), (3, 5), (4, 16), (5, 17), (7, 31), (9, 33), (13, 63), (64, 64), (65, 100), (300, 48), (2304, 768),
         (768, 3072)]

needs_kernels = pytest.mark.skipif(not native.AVAILABLE, reason=f"gpt2hub.native does not run here: {native.status()}")
needs_bf16 = pytest.mark.skipif(not native.BF16, reason="gpt2hub.native's bfloat16 kernel needs AVX512-BF16")


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", True)


def _close_to_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """`y` is x w^T + b computed in float64 from the same (rounded) inputs, within y's dtype's rounding."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = (x.double().abs() @ w.double().abs().T).amax().item() + 1  # the size of the sum's terms
    eps = {F32: 2 ** -20, BF16: 2 ** -7}[y.dtype]
    assert y.shape == exact.shape and y.dtype == x.dtype
    assert (y.double() - exact).abs().max().item() <= eps * scale, (y, exact)


def _one(dtype: torch.dtype, n: int, k: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return torch.randn(1, k, generator=g).to(dtype), w, b


@needs_kernels
def test_the_library_built_where_it_can():
    # a fresh clone's install compiles it on x86-64 Linux with a C compiler: a build that silently failed must not
    # pass as "not available"
    assert native.status().startswith("one-row float32")


def test_the_library_is_built_on_capable_machines():
    capable = (platform.system() == "Linux" and platform.machine() == "x86_64" and native.NEEDS <= native.cpu_flags()
               and shutil.which("cc") is not None)
    assert native.AVAILABLE or not capable, native.status()


@needs_kernels
@pytest.mark.parametrize("n,k", SIZES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_out_in_matches_float64(dtype, n, k, bias):
    if dtype == BF16 and not native.BF16:
        pytest.skip("gpt2hub.native's bfloat16 kernel needs AVX512-BF16")
    x, w, b = _one(dtype, n, k, bias)
    y = native.linear_row(x, w, b)
    assert y is not None
    _close_to_float64(y, x, w, b)
    if dtype == BF16:  # the float32 sum (exact products, float32 additions) rounded once: one bfloat16 step at most
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        step = exact.abs().clamp(min=1e-30).log2().floor().exp2() * 2 ** -7
        assert ((y.double() - exact).abs() <= step + 1e-6 * (exact.abs().max() + 1)).all()


@needs_kernels
@pytest.mark.parametrize("n,k", SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_stored_in_out_matches_float64(n, k, bias):
    x, w, b = _one(F32, n, k, bias)
    t = w.t().contiguous().t()  # [in, out] in memory: OpenAI's layout
    y = native.linear_row(x, t, b)
    assert y is not None
    _close_to_float64(y, x, w, b)


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (5, 17), (13, 63), (64, 64), (65, 100), (70, 130), (768, 3072)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_matches_its_dequantized_weight_in_float64(n, k, bias):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    codes, scale = quant.quantize_int8(w)
    rows = -(-n // 64) * 64  # stored as Int8Linear stores them: whole tiles of 64 rows, the padding zero
    codes = torch.cat([codes, torch.zeros(rows - n, k, dtype=torch.int8)])
    scale = torch.cat([scale, torch.ones(rows - n, dtype=BF16)])
    x = torch.randn(1, k, generator=g).to(BF16)
    b = torch.randn(n, generator=g).to(BF16) if bias else None
    y = native.int8_row(x, codes, scale, b, n)
    assert y is not None and y.shape == (1, n)
    _close_to_float64(y, x, codes[:n].double() * scale[:n].double()[:, None], b)


@needs_kernels
def test_special_values_pass_through():
    x, w, b = _one(F32, 8, 40, True)
    x[0, 3] = float("inf")
    w[5, 3] = 0.0
    y = native.linear_row(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    codes, scale = quant.quantize_int8(w)
    xb = x.to(BF16)
    xb[0, 3] = float("nan")
    assert torch.isnan(native.int8_row(xb, codes, scale, b.to(BF16), 8)).all()


@needs_kernels
def test_rows_do_not_depend_on_the_thread_count():
    x, w, b = _one(F32, 1001, 200, True)
    codes, scale = quant.quantize_int8(w)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((native.linear_row(x, w, b), native.int8_row(x.to(BF16), codes, scale, b.to(BF16), 1001),
                         native.linear_row(x.to(BF16), w.to(BF16), b.to(BF16)) if native.BF16 else None))
    finally:
        torch.set_num_threads(before)
    # each row is one thread's sum, in one order
    assert all(all(a is None and z is None or torch.equal(a, z) for a, z in zip(outs[0], o, strict=True))
               for o in outs[1:])


@needs_kernels
def test_in_out_float32_with_more_threads_than_rows():
    x, w, b = _one(F32, 50, 3, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        y = native.linear_row(x, w.t().contiguous().t(), b)
    finally:
        torch.set_num_threads(before)
    _close_to_float64(y, x, w, b)


@needs_kernels
@pytest.mark.parametrize("case", ["two rows", "strided input", "strided weight", "column view", "bias dtype",
                                  "bias length", "float16", "wrong width", "meta weight", "int8 float32 input",
                                  "int8 short codes", "disabled"])
def test_what_the_kernels_leave_to_the_caller(case, monkeypatch):
    x, w, b = _one(F32, 24, 40, True)
    codes, scale = quant.quantize_int8(w)
    xb = x.to(BF16)
    args = {"two rows": (torch.randn(2, 40), w, b), "strided input": (torch.randn(1, 80)[:, ::2], w, b),
            "strided weight": (x, torch.randn(24, 80)[:, ::2], b), "column view": (x, torch.randn(40, 48)[:, :24].t(), b),
            "bias dtype": (x, w, b.double()), "bias length": (x, w, torch.randn(23)), "float16": (x.half(), w.half(), None),
            "wrong width": (torch.randn(1, 41), w, b), "meta weight": (x, w.to("meta"), b)}
    if case == "disabled":
        monkeypatch.setattr(native, "ENABLED", False)
        assert native.linear_row(x, w, b) is None and native.int8_row(xb, codes, scale, None, 24) is None
    elif case == "int8 float32 input":
        assert native.int8_row(x, codes, scale, None, 24) is None
    elif case == "int8 short codes":
        assert native.int8_row(xb, codes, scale, None, 25) is None
    else:
        assert native.linear_row(*args[case]) is None


@needs_kernels
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_products_with_no_inputs_are_the_bias_for_every_row(rows):
    w, b = torch.empty(5, 0), torch.randn(5)
    codes, scale = torch.empty(64, 0, dtype=torch.int8), torch.ones(64, dtype=BF16)
    with torch.no_grad():
        assert torch.equal(kernels.linear(torch.empty(rows, 0), w, b), b.expand(rows, 5))
    assert native.linear_row(torch.empty(rows, 0), w, b) is None
    assert native.int8_row(torch.empty(rows, 0, dtype=BF16), codes, scale, None, 5) is None


@needs_kernels
def test_kernels_linear_sends_one_row_here_and_more_rows_to_onednn():
    x, w, b = _one(F32, 24, 40, True)
    runs = native.runs()
    with torch.no_grad():
        kernels.linear(x.view(1, 1, 40), w, b)
        assert native.runs() == runs + 1
        kernels.linear(torch.randn(2, 40), w, b)
        assert native.runs() == runs + 1
    with torch.enable_grad():
        y = kernels.linear(x, w.requires_grad_(), b)  # training: F.linear, which keeps the graph
        y.sum().backward()
        assert w.grad is not None
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the user's switch for PyTorch's plain path turns these off too
    try:
        with torch.no_grad():
            kernels.linear(x, w, b)
    finally:
        torch.backends.mkldnn.enabled = before
    assert native.runs() == runs + 1


def _model(dtype: torch.dtype, layout: str | None = None) -> GPTModel:
    cfg = config_from_hparams(HP)
    weights = random_weights(HP, seed=3, scale=0.3)
    args = {} if layout is None else {"layout": layout}
    return GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: weights[f"model/{n}"], cfg, dtype, **args)).eval()


def _one_row_decoding(monkeypatch, model: GPTModel, step: bool) -> None:
    """30 tokens from a one-token prompt (every product one row), with or without native_step's whole steps: each
    of the model's forward passes makes the fused QKV, out_proj and two feed-forward products per block and the head
    on these kernels; the whole steps make them inside decode_step."""
    monkeypatch.setattr(native, "STEP", step)
    runs, steps = native.runs(), native.steps()
    generate(model, torch.tensor([[5]]), 30)
    passes = 1 if step else 30  # (the prompt always runs through the modules)
    assert native.runs() - runs == passes * (4 * HP["n_layer"] + 1)
    assert native.steps() - steps == 30 - passes


@needs_kernels
@pytest.mark.parametrize("step", [False, True], ids=["modules", "whole step"])
def test_float32_decoding_of_mapped_weights_needs_no_copies(monkeypatch, step):
    monkeypatch.setitem(kernels.USES_BEFORE_PACK, F32, 2)
    kernels.forget_packs()
    model = _model(F32)  # OpenAI's [in, out] matrices, as gpt2hub maps them
    assert not model.trf_blocks[0].ff.layers[0].weight.is_contiguous()
    _one_row_decoding(monkeypatch, model, step)
    assert packed_bytes() == 0


@needs_kernels
def test_bfloat16_on_a_cpu_without_avx512_bf16_is_left_to_onednn(monkeypatch):
    monkeypatch.setattr(native, "BF16", False)
    x, w, b = _one(BF16, 24, 40, True)
    assert native.linear_row(x, w, b) is None
    assert native.linear_row(x.float(), w.float(), b.float()) is not None


@needs_bf16
@pytest.mark.parametrize("step", [False, True], ids=["modules", "whole step"])
def test_bfloat16_decoding_needs_no_packs(monkeypatch, step):
    kernels.forget_packs()
    _one_row_decoding(monkeypatch, _model(BF16), step)
    assert packed_bytes() == 0


@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_greedy_tokens_and_logits_match_the_plain_path(dtype, monkeypatch):
    if dtype == BF16 and not native.BF16:
        pytest.skip("gpt2hub.native's bfloat16 kernel needs AVX512-BF16")
    monkeypatch.setattr(native, "STEP", False)  # the modules' products (whole steps: tests/test_native_step.py)
    model = _model(dtype)
    idx = torch.randint(0, HP["n_vocab"], (1, 7), generator=torch.Generator().manual_seed(1))
    runs = native.runs()
    fast = generate(model, idx, 25)
    with torch.no_grad():
        one_token = [model(fast[:, i:i + 1]) for i in range(fast.shape[1])]  # one row: these kernels
    # 24 decoding steps and one pass per token, all one row, and the head over the prompt's last position
    assert native.runs() - runs == (24 + fast.shape[1]) * (4 * HP["n_layer"] + 1) + 1
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        plain = generate(model, idx, 25)
        with torch.no_grad():
            plain_one_token = [model(fast[:, i:i + 1]) for i in range(fast.shape[1])]
    finally:
        torch.backends.mkldnn.enabled = before
    tol = {F32: 1e-4, BF16: 0.05}[dtype]  # (bfloat16 rounds every layer's outputs: 2^-8 relative, 2 layers)
    for a, p in zip(one_token, plain_one_token, strict=True):
        torch.testing.assert_close(a.float(), p.float(), rtol=tol, atol=tol)
    if dtype == F32:
        assert torch.equal(fast, plain)


@needs_kernels
def test_an_int8_model_decodes_on_the_kernel_and_adds_its_bias_once(monkeypatch):
    if not quant.FAST_CPU:
        pytest.skip("quant's fast path does not run on this CPU")
    cfg = config_from_hparams(HP)
    sd = _model(F32, "out_in").state_dict()
    model = quant.quantized_model(cfg, quant.quantize_state_dict(sd, "int8"), "int8")
    for m in model.modules():
        if isinstance(m, quant.Int8Linear) and m.bias is not None:
            m.bias.normal_(0, 2)  # biases large enough that adding one twice, or not at all, shows
    x = torch.randn(1, 1, HP["n_embd"]).to(BF16)
    layer = model.trf_blocks[0].ff.layers[0]
    runs = native.runs()
    with torch.no_grad():
        y = layer(x)
        assert native.runs() == runs + 1
        monkeypatch.setattr(native, "ENABLED", False)
        onednn = layer(x)
        _close_to_float64(y.view(1, -1), x.view(1, -1), layer.dequantize(F32), layer.bias)
    torch.testing.assert_close(y, onednn, rtol=0.02, atol=0.05)


@needs_kernels
def test_threads_decoding_one_model_each_get_its_tokens():
    model = _model(F32)
    prompts = [torch.tensor([[i + 1, 2 * i + 3]]) for i in range(4)]
    expected = [generate(model, p, 12) for p in prompts]
    got: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = generate(model, prompts[i], 12)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], expected[i]) for i in range(4))


def test_status_says_why_the_kernels_are_off(monkeypatch, caplog):
    monkeypatch.setattr(native, "_library_path", lambda: None)
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: native.NEEDS | {"avx512_bf16"})
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    lib, why = native._load()
    assert lib is None and "not compiled at install" in why
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "fma"}))
    assert "lacks avx512bw, avx512f, avx512vl" in native._load()[1]
    monkeypatch.setattr(native, "ENABLED", False)
    assert "ENABLED is False" in native.status()
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(native, "_told", False)
    monkeypatch.setattr(native, "BF16", False)
    assert "no avx512_bf16: bfloat16 runs on oneDNN" in native.status()
    with caplog.at_level(logging.INFO, logger="gpt2hub"):
        native.linear_row(torch.randn(1, 4), torch.randn(3, 4))
    assert caplog.records and caplog.records[0].getMessage() == f"gpt2hub.native: {native.status()}"


def test_a_library_that_does_not_load_is_named(monkeypatch, tmp_path):
    bad = tmp_path / "_native.so"
    bad.write_bytes(b"<html>not a library</html>")
    monkeypatch.setattr(native, "_library_path", lambda: bad)
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: native.NEEDS)
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    lib, why = native._load()
    assert lib is None and str(bad) in why and "reinstall gpt2hub" in why
