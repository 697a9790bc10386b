"""gpt2hub.native_step: batch-1 decoding's whole step in one call, against the model's own modules and against
float64, for every weight layout it reads; where it must not run, the modules run (and say why)."""

import logging

import pytest
import torch
import torch.nn as nn
from factory import random_weights

from gpt2hub import GPTModel, generate, native, native_step, quant
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.model import KVCache

BF16, F32 = torch.bfloat16, torch.float32
# widths around the kernels' steps: 80 channels (5 heads of 16), 4 * 80 = 320 inputs to the last product
HP = {"n_vocab": 333, "n_ctx": 40, "n_embd": 80, "n_head": 5, "n_layer": 2}
HP_QUANT = {**HP, "n_embd": 128, "n_head": 8}  # int4 groups (32, 64, 128) divide the width; heads of 16
PROMPT, STEPS = 6, 8

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=f"gpt2hub.native does not run here: {native.status()}")


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(native, "STEP", True)


def _sd(layout: str | None = None, hp: dict = HP) -> dict[str, torch.Tensor]:
    cfg = config_from_hparams(hp)
    w = random_weights(hp, seed=3, scale=0.3)
    return openai_state_dict(lambda n: w[f"model/{n}"], cfg, F32, **({} if layout is None else {"layout": layout}))


def _model(kind: str, hp: dict = HP) -> GPTModel:
    """gpt2-like random weights stored as `kind` says."""
    cfg = config_from_hparams(hp)
    if kind == "float32 [in, out]":  # OpenAI's layout, mapped as gpt2hub maps it
        return GPTModel.from_state_dict(cfg, _sd(hp=hp))
    if kind == "float32":
        return GPTModel.from_state_dict(cfg, {k: v.contiguous() for k, v in _sd(hp=hp).items()})
    if kind == "bfloat16":
        return GPTModel.from_state_dict(cfg, {k: v.to(BF16).contiguous() for k, v in _sd(hp=hp).items()})
    scheme, _, rest = kind.partition("-")  # "int4-32-int8": groups of 32, an int8 head
    group, _, head = rest.partition("-")
    size, head = int(group) if group else None, head or None
    return quant.quantized_model(cfg, quant.quantize_state_dict(_sd(hp=hp), scheme, size, head), scheme, size, head)


def _float64(model: GPTModel) -> GPTModel:
    """The same weights (dequantized where quantized) in a float64 GPTModel."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantLinear):
            for k in [k for k in sd if k.rsplit(".", 1)[0] == name]:
                del sd[k]
            w, b = m.dequantize(torch.float64), None if m.bias is None else m.bias.double()
            parts = ["W_query", "W_key", "W_value"] if name.endswith("W_qkv") else [name.rpartition(".")[2]]
            owner = name.rpartition(".")[0]
            for i, part in enumerate(parts):
                rows, key = slice(i * w.shape[0] // len(parts), (i + 1) * w.shape[0] // len(parts)), f"{owner}.{part}"
                sd[key.lstrip(".")+ ".weight"] = w[rows]
                if b is not None:
                    sd[key.lstrip(".") + ".bias"] = b[rows]
    return GPTModel.from_state_dict(dict(model.cfg), {k: v.contiguous() for k, v in sd.items()}, tie_weights=False)


def _logits(model: GPTModel, tokens: list[int], step: bool) -> tuple[list[torch.Tensor], KVCache]:
    """Logits of each of `tokens` after the first PROMPT (run through the modules), one position at a time, through
    decode_step (`step`) or the modules; and the cache they filled."""
    with torch.inference_mode():
        cache = KVCache(model.cfg, 1, len(tokens), model.attention_dtype if step or model.tok_emb.weight.dtype != torch.float64
                        else torch.float64, "cpu")
        model(torch.tensor([tokens[:PROMPT]]), cache, 0)
        run = native_step.plan(model, cache) if step else None
        assert (run is not None) == step
        out = []
        for pos in range(PROMPT, len(tokens)):
            x = run(tokens[pos], pos) if run is not None else model(torch.tensor([[tokens[pos]]]), cache, pos)[0, -1:]
            assert x is not None
            out.append(x.double())
    return out, cache


def _tokens(n: int = PROMPT + STEPS, seed: int = 0) -> list[int]:
    return torch.randint(0, HP["n_vocab"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


KINDS = ["float32 [in, out]", "float32", "bfloat16", "int8", "int8--tied", "int4", "int4-32", "int4-128-int8"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_step_is_as_close_to_float64_as_the_modules(kind):
    if kind == "bfloat16" and not native.BF16:
        pytest.skip("bfloat16 weights need AVX512-BF16 (the step does not run: test_what_the_step_reads)")
    if kind.startswith("int") and not quant.FAST_CPU:
        pytest.skip("quantized models' modules run the plain path on this CPU")
    model = _model(kind, HP_QUANT if kind.startswith("int") else HP)
    tokens = _tokens()
    exact, _ = _logits(_float64(model), tokens, False)
    stepped, cache = _logits(model, tokens, True)
    modules, cache_modules = _logits(model, tokens, False)
    scale = max(e.abs().max().item() for e in exact)
    err = [max((a - e).abs().max().item() for a, e in zip(got, exact, strict=True)) for got in (stepped, modules)]
    mean = [sum((a - e).abs().mean().item() for a, e in zip(got, exact, strict=True)) / STEPS for got in (stepped, modules)]
    if kind.startswith("float32"):
        # the same float32 sums in another order: far below anything a rounding of the weights would give
        assert err[0] <= 2e-5 * scale and err[1] <= 2e-5 * scale, err
        torch.testing.assert_close(cache.kv, cache_modules.kv, rtol=1e-5, atol=1e-5)
    else:
        # both round activations to bfloat16 before bfloat16 or int8 products; the step keeps its residuals float32
        # (mean errors: one logit of one position may land either side of a rounding, with random weights' margins)
        assert mean[0] <= 1.25 * mean[1], mean
        assert err[0] <= 0.1 * scale, err  # and not merely as bad as a broken modules path
        torch.testing.assert_close(cache.kv.float(), cache_modules.kv.float(), rtol=0.05, atol=0.05 * scale)


def test_the_books_model_three_matrices_without_bias_and_an_untied_head():
    torch.manual_seed(0)
    cfg = {"vocab_size": 97, "context_length": 24, "emb_dim": 48, "n_heads": 3, "n_layers": 3, "qkv_bias": False}
    model = GPTModel(cfg, init="gpt2").eval()  # W_query, W_key and W_value not side by side: three products
    assert model.trf_blocks[0].att.fused_qkv() is None and not model.tied
    tokens = torch.randint(0, 97, (20,)).tolist()
    stepped, _ = _logits(model, tokens, True)
    modules, _ = _logits(model, tokens, False)
    for a, b in zip(stepped, modules, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_bfloat16_cache_holds_what_the_step_wrote():
    if not native.BF16:
        pytest.skip("bfloat16 weights need AVX512-BF16")
    model = _model("bfloat16")
    assert model.attention_dtype == BF16
    tokens = _tokens()
    _, cache = _logits(model, tokens, True)
    _, cache32 = _logits(_model("float32"), tokens, True)
    assert cache.kv.dtype == BF16
    # the prompt's keys and values (the modules') and each step's: within bfloat16's rounding of the float32 ones
    assert (cache.kv.float() - cache32.kv).abs().max() <= 0.06 * cache32.kv.abs().max()
    assert cache.kv[:, :, :, :, PROMPT:].abs().amax() > 0


@pytest.mark.parametrize("kind", ["float32 [in, out]", "int8"])
def test_greedy_decoding_takes_whole_steps_with_the_modules_tokens(kind, monkeypatch):
    if kind == "int8" and not quant.FAST_CPU:
        pytest.skip("quantized models' modules run the plain path on this CPU")
    model = _model(kind)
    idx = torch.tensor([_tokens(PROMPT)])
    steps = native.steps()
    fast = generate(model, idx, 20)
    assert native.steps() - steps == 19  # the first token is the prompt's (the modules')
    monkeypatch.setattr(native, "STEP", False)
    slow = generate(model, idx, 20)
    assert native.steps() - steps == 19
    if kind.startswith("float32"):
        assert torch.equal(fast, slow)
    else:  # (random weights: top-1 margins are tiny, so rounding may pick another token after a while)
        assert torch.equal(fast[:, :PROMPT + 4], slow[:, :PROMPT + 4])


def test_the_last_position_of_the_context_then_the_window(monkeypatch):
    model = _model("float32")
    idx = torch.tensor([_tokens(HP["n_ctx"] - 3)])
    steps = native.steps()
    fast = generate(model, idx, 10)  # the prompt's token, 3 whole steps to fill the context, then the book's window
    assert native.steps() - steps == 3
    monkeypatch.setattr(native, "STEP", False)
    assert torch.equal(fast, generate(model, idx, 10))


@pytest.mark.parametrize("threads", [1, 3])
def test_logits_do_not_depend_on_the_thread_count(threads):
    model = _model("float32 [in, out]")
    tokens = _tokens()
    before = torch.get_num_threads()
    expected, _ = _logits(model, tokens, True)
    torch.set_num_threads(threads)
    try:
        got, _ = _logits(model, tokens, True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, expected, strict=True):  # (float32 [in, out] products add the threads' partial sums)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _Hooked(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


class _Subclass(GPTModel):
    pass


def _wrap_ff(model: GPTModel) -> None:
    model.trf_blocks[1].ff.layers[2] = _Hooked(model.trf_blocks[1].ff.layers[2])


def _hook(model: GPTModel) -> None:
    model.trf_blocks[0].norm2.register_forward_hook(lambda m, i, o: o * 0)


UNREAD = {  # what decode_step does not compute: the modules run, and say so
    "a wrapped linear layer (LoRA)": (_wrap_ff, "trf_blocks.1.ff.layers.2 is a _Hooked"),
    "a forward hook": (_hook, "hooks are registered"),
    "a replaced GELU": (lambda m: setattr(m.trf_blocks[0].ff.layers, "1", nn.ReLU()), "ff.layers.1 is a ReLU"),
    "training mode": (lambda m: m.train(), "training mode"),
    "a subclass": (lambda m: setattr(m, "__class__", _Subclass), "is a _Subclass"),
    "STEP off": (lambda m: setattr(native, "STEP", False), "STEP is False"),
    "oneDNN off": (lambda m: setattr(torch.backends.mkldnn, "enabled", False), "mkldnn.enabled is False"),
}


@pytest.mark.parametrize("case", sorted(UNREAD))
def test_what_the_step_does_not_read_runs_on_the_modules(case, caplog, monkeypatch):
    monkeypatch.setattr(native_step, "_told", set())
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", torch.backends.mkldnn.enabled)
    change, why = UNREAD[case]
    model = _model("float32")
    idx = torch.tensor([_tokens(PROMPT)])
    expected = generate(model, idx, 8)
    change(model)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", torch.backends.mkldnn.enabled)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            reference = None if case == "training mode" else _modules_generate(model, idx, monkeypatch)
            steps = native.steps()
            native_step._told.clear()
            with caplog.at_level(logging.INFO, logger="gpt2hub"):
                torch.manual_seed(0)
                got = generate(model, idx, 8)
    finally:
        model.__class__ = GPTModel
    assert native.steps() == steps
    assert any(why in r.getMessage() and "native_step" in r.getMessage() for r in caplog.records), caplog.text
    if reference is not None:
        assert torch.equal(got, reference)
    if case in ("STEP off", "oneDNN off", "a subclass"):
        assert torch.equal(got, expected)


def _modules_generate(model: GPTModel, idx: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(native, "STEP", False)
        return generate(model, idx, 8)


def test_batches_and_padding_run_on_the_modules():
    model = _model("float32")
    steps = native.steps()
    generate(model, torch.tensor([_tokens(PROMPT), _tokens(PROMPT, 1)]), 6)
    generate(model, torch.tensor([_tokens(PROMPT)]), 6, num_return_sequences=2, temperature=1.0)
    generate(model, torch.tensor([_tokens(PROMPT), _tokens(PROMPT, 1)]), 6,
             attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * PROMPT]))
    assert native.steps() == steps
    generate(model, torch.tensor([_tokens(PROMPT)]), 6)
    assert native.steps() == steps + 5


def test_a_step_checks_its_token_and_position():
    model = _model("float32")
    cache = KVCache(model.cfg, 1, 10, F32, "cpu")
    step = native_step.plan(model, cache)
    assert step is not None
    for token, pos in ((HP["n_vocab"], 0), (-1, 0), (0, 10), (0, -1)):
        with pytest.raises(ValueError, match=f"token {token} at position {pos}"):
            step(token, pos)


def test_logged_once_at_info(caplog, monkeypatch):
    monkeypatch.setattr(native_step, "_told", set())
    model = _model("float32")
    with caplog.at_level(logging.INFO, logger="gpt2hub"):
        generate(model, torch.tensor([[1, 2]]), 3)
        generate(model, torch.tensor([[1, 2]]), 3)
    said = [r.getMessage() for r in caplog.records if "native_step" in r.getMessage()]
    assert said == ["gpt2hub.native_step: one call per decoding step"]


def test_int8_products_with_vnni_as_with_float32_inputs(monkeypatch):
    if not native.VNNI:
        pytest.skip("this CPU lacks AVX512-VNNI")
    model, tokens, got = _model("int8", HP_QUANT), _tokens(), {}
    for vnni in (True, False):
        monkeypatch.setattr(native, "VNNI", vnni)
        step = native_step.plan(model, KVCache(model.cfg, 1, 4, model.attention_dtype, "cpu"))
        assert step is not None and step.layers[0].fc.kind == native.KINDS["int8 vnni" if vnni else "int8"]
        got[vnni], _ = _logits(model, tokens, True)
    # inputs quantized to 16 bits per block of 64: within 2^-15 of each block's largest, far below bfloat16's rounding
    scale = max(e.abs().max().item() for e in got[False])
    assert max((a - b).abs().max().item() for a, b in zip(got[True], got[False], strict=True)) <= 1e-3 * scale
    assert max((a - b).abs().max().item() for a, b in zip(got[True], got[False], strict=True)) > 0


def test_status_names_the_decoding_path(monkeypatch):
    assert "batch-1 decoding on a CPU takes whole steps" in native.status()
    monkeypatch.setattr(native, "STEP", False)
    assert "takes the modules (gpt2hub.native.STEP is False)" in native.status()


def test_planned_once_per_call_and_not_for_one_token(monkeypatch):
    made = []
    real = native_step.plan
    monkeypatch.setattr(native_step, "plan", lambda model, cache: made.append(1) or real(model, cache))
    model = _model("float32")
    generate(model, torch.tensor([[1, 2]]), 1)  # the prompt's token only: no step to plan
    assert made == []
    generate(model, torch.tensor([[1, 2]]), 6)
    assert made == [1]
