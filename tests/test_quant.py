"""int8 and int4 weights (gpt2hub.quant): each layer against its dequantized reference on both paths, whole models
against bfloat16 and against their own saved files, generation, and the checks on bad arguments."""

import copy
import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from gpt2hub import GPTModel, generate, quant
from gpt2hub.quant import (
    Int4Linear,
    Int8Linear,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_state_dict,
    quantized_model,
    stored_layout,
    unpack_int4,
)
from gpt2hub.safetensors_file import load_safetensors, map_safetensors, save_state_dict

BF16 = torch.bfloat16
CFG = {"vocab_size": 300, "context_length": 64, "emb_dim": 128, "n_heads": 4, "n_layers": 2, "qkv_bias": True,
       "drop_rate": 0.0}
# [in, out] of gpt2-small's to -xl's matrices, and one whose rows are no whole tile (as the head's 50257 are not)
SHAPES = [(768, 2304), (3072, 768), (1024, 4096), (1280, 5120), (6400, 1600), (128, 80)]
SCHEMES = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.fixture(params=["kernel", "plain"])
def path(request, monkeypatch):
    """Both ways a quantized layer multiplies: PyTorch's int8/int4 kernels, and dequantize + F.linear."""
    if request.param == "kernel" and not (quant.KERNELS and quant.int4_kernel_reads_tiles()):
        pytest.skip("this CPU or PyTorch has no fast path for the int8/int4 kernels: only the plain path runs here")
    monkeypatch.setattr(quant, "KERNELS", request.param == "kernel")
    return request.param


@functools.lru_cache(maxsize=4)  # each layer serves both paths (quantizing is the slow part)
def _layer(scheme: str, group: int, n_in: int, n_out: int, seed: int = 0):
    """A quantized layer of random weights, the weights, and the dequantized weights (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.02
    bias = torch.randn(n_out, generator=g).to(BF16)
    layer = Int8Linear(n_in, n_out) if scheme == "int8" else Int4Linear(n_in, n_out, group_size=group)
    padded = torch.cat([w, w.new_zeros(layer.qweight.shape[0] - n_out, n_in)])  # whole tiles of 64 rows
    if scheme == "int8":
        layer.qweight, layer.scale = quantize_int8(padded)
    else:
        codes, layer.scale_zero = quantize_int4(padded, group)
        layer.qweight = pack_int4(codes)
    layer.bias = bias
    return layer, w, layer.dequantize(torch.float64)


def _assert_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """`y` is x w^T + b up to bfloat16's rounding of the inputs, the products' sum and the result."""
    exact = F.linear(x.double(), w.double(), b.double())
    bound = F.linear(x.double().abs(), w.double().abs()) * 2 ** -7 + exact.abs() * 2 ** -7 + 1e-6
    assert y.dtype == BF16 and y.shape == exact.shape
    assert bool(((y.double() - exact).abs() <= bound).all()), float(((y.double() - exact).abs() / bound).max())


@pytest.mark.parametrize("path", ["kernel", "plain"], indirect=True)  # first: each layer serves both in turn
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_each_layer_equals_its_dequantized_reference(path, scheme, group, n_in, n_out):
    layer, w, ref = _layer(scheme, group, n_in, n_out, seed=n_in + n_out)
    assert ref.shape == (n_out, n_in)
    # what quantizing lost: int8 a 1/254 of each row's largest weight at most; int4, whose range may clip a tenth
    # of its group's at each end, a sixth of that range
    limit = w.abs().amax(1, keepdim=True) / 250 if scheme == "int8" else (
        (w.view(n_out, -1, group).amax(-1) - w.view(n_out, -1, group).amin(-1)) / 6).repeat_interleave(group, 1)
    assert bool(((ref - w.double()).abs() <= limit).all())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rows in (1, 2, 7, 16, 33):
            x = torch.randn(rows, n_in, generator=g).to(BF16)
            _assert_product(layer(x), x, ref, layer.bias)
        x3 = torch.randn(2, 3, n_in, generator=g).to(BF16)
        _assert_product(layer(x3), x3, ref, layer.bias)
        strided = torch.randn(3, 2 * n_in, generator=g).to(BF16)[:, ::2]
        _assert_product(layer(strided), strided, ref, layer.bias)


def test_int4_codes_are_stored_in_the_documented_tile_order():
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (192, 48) and packed.is_contiguous() and torch.equal(unpack_int4(packed), codes)
    assert pack_int4(codes[:64, :64]).is_contiguous()  # one tile (reshaping could have given a strided view)
    tile = packed.view(3, 96, 32)  # tiles of 64 rows, 32 bytes per input
    t, k, j = 1, 5, 3
    assert int(tile[t, k, j]) == int(codes[64 * t + j, k]) | int(codes[64 * t + 32 + j, k]) << 4
    assert int(tile[t, k, 16 + j]) == int(codes[64 * t + 16 + j, k]) | int(codes[64 * t + 48 + j, k]) << 4
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and quant.FAST_CPU:
        # the order PyTorch's AVX512 kernel reads, which lets it multiply the mapped file as it is
        assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1), packed)


def _tiny() -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(CFG, tie_weights=True, init="gpt2").eval()
    with torch.no_grad():
        for p in model.parameters():  # a model that is not at its initialisation: biases and norms matter
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _dequantized(model: GPTModel) -> dict[str, torch.Tensor]:
    """A plain GPTModel state_dict (float32) with the weights a quantized model multiplies by."""
    sd = {k: v.float() for k, v in model.state_dict().items() if not k.rsplit(".", 1)[0].endswith(
        ("W_qkv", "out_proj", "layers.0", "layers.2", "out_head"))}
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantLinear):
            w, b = m.dequantize(torch.float32), m.bias
            parts = [f"{name.removesuffix('W_qkv')}W_{n}" for n in ("query", "key", "value")] if name.endswith(
                "W_qkv") else [name]
            for part, wi, bi in zip(parts, w.chunk(len(parts)), (None,) * 3 if b is None else b.chunk(len(parts)),
                                    strict=False):
                sd[f"{part}.weight"] = wi
                if bi is not None:
                    sd[f"{part}.bias"] = bi.float()
    return sd


@pytest.mark.parametrize("scheme,group,head", [("int8", None, "int8"), ("int8", None, "tied"), ("int4", 32, "int8"),
                                               ("int4", 64, "int4"), ("int4", 128, "tied")])
def test_quantized_model_computes_its_dequantized_weights_and_stays_close_to_bfloat16(path, scheme, group, head):
    model = _tiny()
    q = quantized_model(CFG, quantize_state_dict(model.state_dict(), scheme, group, head), scheme, group, head)
    assert not q.training and not any(isinstance(m, torch.nn.Linear) for m in q.modules()) == (head != "tied")
    assert q.tied == (head == "tied")
    reference = GPTModel.from_state_dict(CFG, _dequantized(q), tie_weights=False)  # float32, the same weights
    bf16 = GPTModel.from_state_dict(CFG, {k: v.to(BF16) for k, v in model.state_dict().items()})
    idx = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, ref, want, exact = q(idx).float(), reference(idx), bf16(idx).float(), model(idx)
    spread = exact.std().item()
    # the arithmetic: bfloat16 activations around the quantized weights, as close as bfloat16 is to float32
    assert (got - ref).abs().max().item() < 4 * max((want - exact).abs().max().item(), 1e-3)
    # the storage: int8 within a few bfloat16 errors of float32, int4 coarser but the same distribution's shape
    err = (got - exact).abs().mean().item()
    assert err < (0.05 if scheme == "int8" and head != "int4" else 0.25) * spread
    assert torch.corrcoef(torch.stack([got.flatten(), exact.flatten()]))[0, 1] > (0.999 if scheme == "int8" else 0.98)


@pytest.mark.parametrize("load", [load_safetensors, map_safetensors])
@pytest.mark.parametrize("scheme,group,head", [("int8", None, None), ("int4", 32, None), ("int4", 64, "int4")])
def test_saved_and_mapped_model_gives_the_same_logits_without_copies(tmp_path, scheme, group, head, load):
    model = _tiny()
    stored = quantize_state_dict(model.state_dict(), scheme, group, head)
    layout = stored_layout(CFG, scheme, group, head)
    assert list(stored) == list(layout) and {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()} == layout
    assert all(v.dtype in (torch.int8, torch.uint8, BF16) for v in stored.values())
    save_state_dict(stored, tmp_path / "q.safetensors")
    mapped = load(tmp_path / "q.safetensors")
    loaded = quantized_model(CFG, mapped, scheme, group, head)
    direct = quantized_model(CFG, stored, scheme, group, head)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(idx), direct(idx))
    held = {t.data_ptr() for t in mapped.values()}
    assert {t.data_ptr() for t in loaded.state_dict().values()} <= held  # the model holds the mapped tensors


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_strided_stored_tensors_are_read_as_what_they_hold(path, scheme, group):
    stored = quantize_state_dict(_tiny().state_dict(), scheme, group)
    # the same values, laid out with other strides: PyTorch's kernels would read their memory as dense
    strided = {k: torch.stack([v, torch.zeros_like(v)], dim=-1)[..., 0] if v.dim() < 3 else v for k, v in stored.items()}
    assert not strided["trf_blocks.0.att.W_qkv.qweight"].is_contiguous()
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(quantized_model(CFG, strided, scheme, group)(idx), quantized_model(CFG, stored, scheme, group)(idx))


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_greedy_generation_on_a_quantized_model(path, scheme, group):
    q = quantized_model(CFG, quantize_state_dict(_tiny().state_dict(), scheme, group), scheme, group)
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    out = generate(q, idx, 20)
    assert out.shape == (2, 29) and torch.equal(out[:, :9], idx)
    assert torch.equal(out, generate(q, idx, 20, use_cache=False))  # the book's loop: a full pass per token
    assert torch.equal(out, generate(q, idx, 20, decode="static"))
    padded = generate(q, torch.cat([torch.zeros(1, 4, dtype=torch.long), idx[:1, 4:]], 1), 10,
                      attention_mask=torch.tensor([[0] * 4 + [1] * 5]))
    assert torch.equal(padded[:, 4:], generate(q, idx[:1, 4:], 10))


def test_the_path_is_said_once(monkeypatch, caplog):
    q = quantized_model(CFG, quantize_state_dict(_tiny().state_dict(), "int8"), "int8")
    monkeypatch.setattr(quant, "_told", set())
    monkeypatch.setattr(quant, "KERNELS", False)
    idx = torch.tensor([[1, 2, 3]])
    with caplog.at_level(logging.INFO, logger="gpt2hub"), torch.no_grad():
        q(idx)
        q(idx)
    said = [r.getMessage() for r in caplog.records if "gpt2hub.quant" in r.getMessage()]
    assert said == ["gpt2hub.quant: int8 layers dequantize their weights and run F.linear "
                    "(gpt2hub.quant.KERNELS is False)"]


def test_bad_arguments_are_one_line_value_errors_naming_them():
    sd = _tiny().state_dict()
    stored = quantize_state_dict(sd, "int4", 32)
    cases = [
        (lambda: quantize_state_dict(sd, "int3"), "scheme must be one of"),
        (lambda: quantize_state_dict(sd, "int4", 48), "group_size must be one of"),
        (lambda: quantize_state_dict(sd, "int8", head="int2"), "head must be one of"),
        (lambda: quantize_state_dict({k: v for k, v in sd.items() if "norm2" not in k}, "int8"),
         "trf_blocks.0.norm2.scale"),
        (lambda: quantize_state_dict({**sd, "trf_blocks.1.ff.layers.0.weight": torch.zeros(3, 3)}, "int8"),
         "trf_blocks.1.ff.layers.0.weight"),
        (lambda: quantized_model(CFG, stored, "int4", 64), "scale_zero"),
        (lambda: quantized_model({**CFG, "emb_dim": 96, "n_heads": 4}, stored, "int4", 64), "does not divide"),
        (lambda: quantized_model(CFG, {**stored, "extra": torch.zeros(1)}, "int4", 32), "'extra'"),
        (lambda: quantized_model(CFG, {k: v for k, v in stored.items() if k != "out_head.qweight"}, "int4", 32),
         "out_head.qweight"),
        (lambda: quantized_model(CFG, {**stored, "trf_blocks.0.att.W_qkv.qweight":
                                       stored["trf_blocks.0.att.W_qkv.qweight"].to(torch.int8)}, "int4", 32),
         "trf_blocks.0.att.W_qkv.qweight"),
        (lambda: quantized_model(CFG, stored, "int8"), "trf_blocks.0.att.W_qkv.qweight"),
    ]
    for make, words in cases:
        with pytest.raises(ValueError, match=None) as err:
            make()
        message = str(err.value)
        assert words in message and "\n" not in message, message


@pytest.mark.cuda
def test_a_quantized_model_runs_on_cuda():
    for scheme in quant.SCHEMES:
        q = quantized_model(CFG, quantize_state_dict(_tiny().state_dict(), scheme), scheme)
        idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            cpu = q(idx).float()
            gpu = q.to("cuda")(idx.cuda()).float().cpu()
        torch.testing.assert_close(gpu, cpu, atol=0.05 * cpu.std().item(), rtol=0.02)
        assert generate(q, idx.cuda(), 5).shape == (2, 17)


@pytest.mark.parametrize("path", ["kernel", "plain"], indirect=True)
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 64)])
@pytest.mark.parametrize("offset", [2, 8, 24, 40])
def test_layers_read_codes_at_any_address_as_a_mapped_file_gives_them(path, scheme, group, offset):
    """A mapped safetensors file places tensors at any multiple of their item size; PyTorch's int8 kernel once read
    out of bounds (SIGSEGV) on an unaligned weight with a row count off its block (the 50,257-row head)."""
    layer, w, ref = _layer(scheme, group, 128, 50257 % 320, seed=3)  # 17 rows: a tail in every block size
    for name in ("qweight", "scale" if scheme == "int8" else "scale_zero"):
        t = getattr(layer, name)
        raw = torch.empty(t.numel() * t.element_size() + 128, dtype=torch.uint8)
        start = (-raw.data_ptr()) % 64 + offset
        moved = raw[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        moved.copy_(t)
        assert moved.data_ptr() % 64 == offset
        setattr(layer, name, moved)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for rows in (1, 3, 40):  # a decoding step, a short and a long prompt: the kernel's paths differ
            x = torch.randn(rows, 128, generator=g).to(BF16)
            _assert_product(layer(x), x, ref, layer.bias)



@pytest.mark.parametrize("path", ["plain"], indirect=True)
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 64)])
def test_the_plain_path_keeps_its_weight_until_the_codes_change(path, scheme, group):
    """The plain path dequantizes once and keeps the weight (per call, int4 decoded 2.8 tokens/s); a write to the
    codes or the scales in place, or new codes, must be seen at the next call."""
    layer, w, ref = _layer(scheme, group, 128, 64, seed=5)
    layer = copy.deepcopy(layer)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(6)).to(BF16)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)
        scales = layer.scale if scheme == "int8" else layer.scale_zero
        scales.mul_(2)  # in place: the kept weight is stale now
        doubled = layer(x)
        assert not torch.equal(doubled, first)
        _assert_product(doubled, x, layer.dequantize(torch.float64), layer.bias)
        layer.qweight = torch.zeros_like(layer.qweight)  # new codes
        _assert_product(layer(x), x, layer.dequantize(torch.float64), layer.bias)


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 64)])
def test_torch_compile_traces_a_quantized_layer_whole(path, scheme, group):
    layer, w, _ = _layer(scheme, group, 128, 80)
    x = torch.randn(1, 3, 128).to(BF16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fails on any graph break
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(compiled(x), layer(x))
