"""gpt2hub.native_step against models it must not stand in for, and shapes at its edges: each model whose modules
compute something else than decode_step (a module left in training mode, code replaced on a module or its class, an
embedding that renormalizes its rows, the book's LoRA layers) decodes on its modules, with their tokens; tensors the
C step would read past the end of, or read in another dtype than the modules, are never handed to it. And int8
models whose width is not a multiple of 16, whose prompts PyTorch's int8 kernel summed wrongly (or crashed on)."""

import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
from factory import random_weights

from gpt2hub import GPTModel, generate, native, native_step
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.model import GELU, KVCache

BF16 = torch.bfloat16
CFG = {"vocab_size": 70, "context_length": 24, "emb_dim": 24, "n_heads": 3, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
PROMPT = torch.tensor([[5, 17, 3]])

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=f"gpt2hub.native does not run here: {native.status()}")


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(native, "STEP", True)


def _model(**cfg) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel({**CFG, **cfg}).eval()


def _mapped() -> GPTModel:
    """OpenAI's layout as gpt2hub maps it: float32 [in, out] views, W_query..W_value one c_attn matrix."""
    hp = {"n_vocab": 70, "n_ctx": 24, "n_embd": 24, "n_head": 3, "n_layer": 2}
    w = random_weights(hp, seed=1, scale=0.3)
    cfg = config_from_hparams(hp)
    return GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: torch.from_numpy(w[f"model/{n}"]), cfg))


def _decode(model: GPTModel, monkeypatch, new: int = 8, **kwargs) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens with the step allowed, tokens on the modules alone, whole steps taken by the first), each run from
    the same random state."""
    steps = native.steps()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        allowed = generate(model, PROMPT, new, **kwargs)
    taken = native.steps() - steps
    with monkeypatch.context() as m, torch.random.fork_rng():
        m.setattr(native, "STEP", False)
        torch.manual_seed(1)
        modules = generate(model, PROMPT, new, **kwargs)
    return allowed, modules, taken


def _plan(model: GPTModel) -> native_step.DecodeStep | None:
    return native_step.plan(model, KVCache(model.cfg, 1, 8, model.attention_dtype, "cpu"))


def test_the_models_below_do_take_whole_steps(monkeypatch):
    # (so that each test below, which expects the modules, tests the guard and not a step that never runs)
    for model in (_model(), _model(drop_rate=0.5), _mapped()):
        allowed, modules, taken = _decode(model, monkeypatch)
        assert taken == 7 and torch.equal(allowed, modules)


@pytest.mark.parametrize("part", ["trf_blocks.0", "trf_blocks.1.att"])
def test_a_module_left_in_training_mode_decodes_on_the_modules(part, monkeypatch):
    # model.eval() and then one block trained (a frozen-layers recipe): its dropout runs in the modules' forward
    model = _model(drop_rate=0.5)
    model.get_submodule(part).train()
    allowed, modules, taken = _decode(model, monkeypatch)
    assert taken == 0 and torch.equal(allowed, modules)


def _instance_forward(model: GPTModel) -> None:
    ff = model.trf_blocks[0].ff
    ff.forward = lambda x: 2 * ff.layers(x)


def _model_forward(model: GPTModel) -> None:
    model.forward = types.MethodType(lambda self, *a, **k: GPTModel.forward(self, *a, **k) * -1.0, model)


def _project(model: GPTModel) -> None:
    att = model.trf_blocks[1].att
    plain = att.project
    att.project = lambda x: (lambda q, kv: (-q, kv))(*plain(x))


REPLACED = {"a module's forward": _instance_forward, "the model's forward": _model_forward,
            "an attention's project": _project}


@pytest.mark.parametrize("case", sorted(REPLACED))
def test_code_replaced_on_a_module_decodes_on_the_modules(case, monkeypatch):
    model = _model()
    REPLACED[case](model)
    allowed, modules, taken = _decode(model, monkeypatch)
    assert taken == 0 and torch.equal(allowed, modules)


def test_a_class_patched_since_import_decodes_on_the_modules(monkeypatch):
    monkeypatch.setattr(GELU, "forward", lambda self, x: torch.relu(x))  # instrumentation, or a quick experiment
    allowed, modules, taken = _decode(_model(), monkeypatch)
    assert taken == 0 and torch.equal(allowed, modules)


class _ScaledEmbedding(nn.Embedding):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx) * 4.0


@pytest.mark.parametrize("case", ["max_norm", "subclass"])
def test_embeddings_that_compute_more_than_a_lookup_decode_on_the_modules(case, monkeypatch):
    model = _model()
    old = model.tok_emb
    new = nn.Embedding(70, 24, max_norm=0.5) if case == "max_norm" else _ScaledEmbedding(70, 24)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.tok_emb = new
    allowed, modules, taken = _decode(model, monkeypatch)
    assert taken == 0 and torch.equal(allowed, modules)


class LinearWithLoRA(nn.Module):
    """The book's appendix E: a Linear layer plus a low-rank update (no `weight` of its own)."""

    def __init__(self, linear: nn.Linear, rank: int = 2, alpha: float = 4.0):
        super().__init__()
        self.linear = linear
        self.A = nn.Parameter(torch.randn(linear.in_features, rank) * 0.5)
        self.B = nn.Parameter(torch.randn(rank, linear.out_features) * 0.5)  # (trained: not zero)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.alpha * (x @ self.A @ self.B)


def _replace_linear_with_lora(module: nn.Module) -> None:
    """The book's replace_linear_with_lora: every nn.Linear (W_query, W_key, W_value included) wrapped."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, LinearWithLoRA(child))
        else:
            _replace_linear_with_lora(child)


@pytest.mark.parametrize("build", [_model, _mapped], ids=["book", "mapped c_attn"])
def test_the_books_lora_model_generates_on_its_modules(build, monkeypatch):
    # before: W_query..W_value without a `weight` made fused_qkv raise AttributeError, in plan() and in every
    # forward without gradients (the book's evaluation under torch.no_grad() too)
    model = build()
    _replace_linear_with_lora(model)
    ids = torch.tensor([[5, 17, 3, 9]])
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, model(ids).detach())  # with gradients: three products, each layer's forward
    allowed, modules, taken = _decode(model, monkeypatch)
    assert taken == 0 and torch.equal(allowed, modules)


def test_a_lora_wrapper_with_the_base_weight_is_not_fused(monkeypatch):
    # a wrapper exposing its base layer's `weight` (as peft's do) over memory that still lies side by side: neither
    # one product over the three matrices nor the C step may skip its update
    model = _mapped()
    att = model.trf_blocks[0].att
    for name in ("W_query", "W_key", "W_value"):
        wrapped = LinearWithLoRA(getattr(att, name))
        wrapped.weight, wrapped.bias = wrapped.linear.weight, wrapped.linear.bias
        setattr(att, name, wrapped)
    ids = torch.tensor([[5, 17, 3, 9]])
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, model(ids).detach())
    allowed, modules, taken = _decode(model, monkeypatch)
    assert taken == 0 and torch.equal(allowed, modules)


@pytest.mark.parametrize("norm,part", [("trf_blocks.0.norm1", "scale"), ("final_norm", "shift")])
def test_norms_of_another_width_are_not_read(norm, part):
    # the step would read emb_dim floats from a one-element tensor (the modules refuse it: F.layer_norm's error)
    model = _model()
    setattr(model.get_submodule(norm), part, nn.Parameter(torch.ones(1)))
    assert _plan(model) is None
    with pytest.raises(RuntimeError, match="normalized_shape"):
        generate(model, PROMPT, 3)


@pytest.mark.parametrize("case", ["float32 layer in bfloat16", "bfloat16 layer in float32", "float32 head in bfloat16"])
def test_layers_of_another_dtype_than_the_embeddings_are_not_read(case):
    # the modules refuse them (F.linear's dtype error); the step would read them as if they were meant
    model = _model(emb_dim=64, n_heads=4)
    if case == "bfloat16 layer in float32":
        model.trf_blocks[1].ff.layers[0].to(BF16)
    else:
        model.to(BF16)
        (model.out_head if "head" in case else model.trf_blocks[0].att.out_proj).float()
    assert _plan(model) is None


def test_a_cache_of_another_shape_is_not_written():
    # [layers, 1, batch, heads, positions, head_dim]: values would be written past the end of each layer's share
    model = _model()
    cache = KVCache(model.cfg, 1, 8, torch.float32, "cpu")
    cache.kv = torch.zeros(2, 1, 1, 3, 8, 8)
    assert native_step.plan(model, cache) is None


_INT8_CHILD = """
import torch
from gpt2hub import GPTModel, quant
cfg = {{"vocab_size": 70, "context_length": 24, "emb_dim": {width}, "n_heads": {heads}, "n_layers": 1,
       "qkv_bias": True}}
torch.manual_seed(0)
sd = GPTModel(cfg, init="gpt2").state_dict()
model = quant.quantized_model(cfg, quant.quantize_state_dict(sd, "int8"), "int8")
ids = torch.tensor([[5, 17, 3]])
with torch.inference_mode():
    got = model(ids).double()
    quant.KERNELS = False  # dequantized weights, F.linear
    plain = model(ids).double()
print(float((got - plain).abs().max() / plain.abs().max()))
"""


@pytest.mark.parametrize("width,heads", [(20, 4), (24, 3), (56, 4), (64, 4)])
def test_int8_models_of_any_width_prefill_as_dequantized(width, heads):
    # found comparing the step with the modules: PyTorch 2.13's _weight_int8pack_mm, which the int8 modules run on
    # several rows (the prompt), sums rows whose width is not a multiple of 16 wrongly, and crashes on 20
    run = subprocess.run([sys.executable, "-c", _INT8_CHILD.format(width=width, heads=heads)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 0.02, run.stdout
