"""Batch-1 decoding in one call: a GPTModel's whole step run by gpt2hub/_native.c.

Decoding one token through gpt2-small through its modules makes about 30 operator calls per block (norms, three
reshapes and a permute for attention, the cache write, residual adds), each with PyTorch's dispatch and an OpenMP
fork and join of its own, which cost 1.3-2.3 ms a token beside the products' own time (step_breakdown.md in
benchmarks/results/cpu-epyc-2core). `decode_step` runs the whole step (embedding, every block's layer norms,
products, attention with the cache write, GELU and residuals, the final norm and the head) in one OpenMP region, as
ggml's graph does, on the same kernels as gpt2hub.native's one-row products, reading the weights as the model holds
them: float32 [out, in] or mapped [in, out], bfloat16, and gpt2hub.quant's int8 and int4 layers (the int4 codes in
their documented tile order; int8 with AVX512-VNNI where the CPU has it, on inputs quantized to 16 bits per block of
64). Against the commit before (the modules on gpt2hub.native's one-row kernels), 5 alternating rounds on a 2-core
EPYC (native_step_decode.md): 1.37x to 1.96x the tokens/s for gpt2-small and -medium at every precision; beside
ggml's examples/gpt-2 on the same weights, 1.13x to 1.63x (ggml_compare.md).

Activations stay float32 through the step (as ggml keeps them); products with bfloat16 weights read them rounded to
bfloat16, and keys and values are stored in the cache's dtype. So bfloat16, int8 and int4 models' logits here are
closer to float64's than their modules' (which round every activation to bfloat16; native_accuracy.md), and a
float32 model's differ from its modules' only in the order of sums (tests/test_native_step.py holds both to float64
and to each other).

It runs only where every part of the model is exactly what it reads: gpt2hub's own GPTModel, blocks, attention,
norms, GELU and linear layers and PyTorch's nn.Embedding (no subclass, no replaced module such as a LoRA layer, no
method replaced on a module or patched on its class since import, no hook, no max_norm), each weight in the
embeddings' dtype or quantized, the model and every block in eval mode, on the CPU, one row, no padding; everywhere
else the modules run. `plan(model, cache)` says which, and `why_not` why. A step is made for one generate call and
reads the weights the model held then (writes to them in place are seen; a module or tensor replaced during a
stream is not; bfloat16 norms are read from float32 copies made then).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn as nn

from . import native
from .model import GELU, FeedForward, GPTModel, KVCache, LayerNorm, Linear, MultiHeadAttention, TransformerBlock
from .quant import Int4Linear, Int8Linear

__all__ = ["DecodeStep", "Unsupported", "plan", "why_not"]

log = logging.getLogger("gpt2hub")
F32, BF16 = torch.float32, torch.bfloat16
M = TypeVar("M", bound=nn.Module)
_told: set[str] = set()


class Unsupported(Exception):
    """Something in the model that decode_step does not read (the message names it)."""


class DecodeStep:
    """One token at a time through a GPTModel and its KVCache (batch 1), in one call to gpt2hub/_native.c.

    Holds every tensor the C structures point to (float32 copies of the norms, the cache, the model's weights), so
    none is freed while the step may run. Calling it returns float32 logits [1, vocab], or None where the kernels
    did not run (the caller then runs the modules).
    """

    def __init__(self, model: GPTModel, cache: KVCache):
        self.keep: list[torch.Tensor] = []
        emb, pos = (_lookup(model.tok_emb, "tok_emb"), _lookup(model.pos_emb, "pos_emb"))
        if emb.dtype not in (F32, BF16) or pos.dtype != emb.dtype:
            raise Unsupported(f"embeddings of {emb.dtype} and {pos.dtype}")
        # the modules' products take the embeddings' dtype (F.linear refuses another): so does every weight read here
        self.dtype, c = emb.dtype, emb.shape[1]
        self.vocab, self.context = emb.shape[0], pos.shape[0]
        self.max_len = cache.max_len
        caches = _layer_caches(model, cache)
        blocks = [_exact(b, TransformerBlock, f"trf_blocks.{i}") for i, b in enumerate(model.trf_blocks)]
        atts = [_exact(b.att, MultiHeadAttention, f"trf_blocks.{i}.att") for i, b in enumerate(blocks)]
        heads = {att.num_heads for att in atts} or {1}
        if pos.shape[1] != c or any(att.d_out != c for att in atts):
            raise Unsupported("the embeddings and blocks are of different widths")
        self.layers = (native.Layer * len(caches))(*(self._layer(b, att, kv, f"trf_blocks.{i}") for i, (b, att, kv)
                                                      in enumerate(zip(blocks, atts, caches, strict=True))))
        lnf_w, lnf_b, epsf = self._norm(model.final_norm, "final_norm", c)
        self.model = native.Model(C=c, H=heads.pop(),
                                  V=self.vocab, L=len(model.trf_blocks), max_len=self.max_len,
                                  emb_bf16=int(emb.dtype == BF16), cache_bf16=int(cache.kv.dtype == BF16),
                                  tok_emb=emb.data_ptr(), pos_emb=pos.data_ptr(), lnf_w=lnf_w, lnf_b=lnf_b,
                                  epsf=epsf, head=self._matrix(model.out_head, "out_head", c, self.vocab),
                                  layers=self.layers)
        self.keep += [emb, pos, cache.kv]

    def __call__(self, token: int, pos: int) -> torch.Tensor | None:
        """Logits [1, vocab] of `token` at position `pos` (keys and values of 0..pos-1 in the cache already)."""
        if not (0 <= token < self.vocab and 0 <= pos < min(self.max_len, self.context)):
            raise ValueError(f"decode_step: token {token} at position {pos} is outside the vocabulary ({self.vocab}) "
                             f"or the cache ({min(self.max_len, self.context)} positions)")
        logits = torch.empty(1, self.vocab, dtype=F32, device="cpu")
        return logits if native.decode_step(self.model, token, pos, logits) else None

    def _norm(self, module: Any, name: str, c: int) -> tuple[int, int, float]:
        """(scale, shift) [c] as float32 copies the step keeps, and eps."""
        norm = _exact(module, LayerNorm, name)
        w, b = (_tensor(t, f"{name}.{n}", (c,)).float().contiguous() for t, n in ((norm.scale, "scale"), (norm.shift, "shift")))
        self.keep += [w, b]
        return w.data_ptr(), b.data_ptr(), float(norm.eps)

    def _matrix(self, layer: Any, name: str, n_in: int, n_out: int) -> native.Matrix:
        """The Matrix of a gpt2hub linear layer [n_out, n_in] (Linear, Int8Linear or Int4Linear)."""
        if type(layer) is Linear:
            return self._dense(layer.weight, layer.bias, name, n_in, n_out)
        if type(layer) not in (Int8Linear, Int4Linear):
            raise Unsupported(f"{name} is a {type(layer).__name__}, not one of gpt2hub's linear layers")
        if (layer.in_features, layer.out_features) != (n_in, n_out) or _hooked(layer):
            raise Unsupported(f"{name} has hooks or is not [{n_out}, {n_in}]")
        bias = None if layer.bias is None else _tensor(layer.bias, f"{name}.bias", (n_out,), BF16)
        codes = _tensor(layer.qweight, f"{name}.qweight")
        if isinstance(layer, Int8Linear):
            rows, group, scale = codes.shape[0], 0, _tensor(layer.scale, f"{name}.scale", None, BF16)
            kind = "int8 vnni" if native.VNNI else "int8"
            ok = codes.dtype == torch.int8 and codes.shape == (rows, n_in) and scale.shape == (rows,)
        else:
            rows, group, kind = codes.shape[0], layer.group_size, "int4"
            scale = _tensor(layer.scale_zero, f"{name}.scale_zero", None, BF16)
            ok = (codes.dtype == torch.uint8 and codes.shape == (rows, n_in // 2) and rows % 64 == 0 and group % 16 == 0
                  and n_in % group == 0 and scale.shape == (n_in // group, rows, 2))
        if not (ok and rows >= n_out):
            raise Unsupported(f"{name}'s {kind} tensors are not in gpt2hub.quant's layout")
        self.keep += [t for t in (codes, scale, bias) if t is not None]
        return native.Matrix(kind=native.KINDS[kind], group=group, bias_bf16=1, n=n_out, k=n_in, rows=rows,
                             w=codes.data_ptr(), scale=scale.data_ptr(), bias=_ptr(bias))

    def _dense(self, w: torch.Tensor, b: torch.Tensor | None, name: str, n_in: int, n_out: int) -> native.Matrix:
        """The Matrix of a float32 or bfloat16 weight [n_out, n_in] (float32 may be a transposed view: [in, out])."""
        w = _tensor(w, f"{name}.weight", (n_out, n_in), self.dtype, transposed=None)
        if w.dtype == F32:
            kind = "float32" if native.plain(w) else "float32 [in, out]"
        elif w.dtype == BF16 and native.BF16 and native.plain(w):
            kind = "bfloat16"
        else:
            raise Unsupported(f"{name}.weight is {w.dtype} {'' if native.plain(w) else 'strided '}"
                              "(float32, or bfloat16 [out, in] on a CPU with AVX512-BF16, are read)")
        bias = None if b is None else _tensor(b, f"{name}.bias", (n_out,), w.dtype)
        self.keep += [t for t in (w, bias) if t is not None]
        return native.Matrix(kind=native.KINDS[kind], bias_bf16=int(w.dtype == BF16), n=n_out, k=n_in, rows=n_out,
                             w=w.data_ptr(), bias=_ptr(bias))

    def _qkv(self, att: MultiHeadAttention, name: str, c: int) -> list[native.Matrix]:
        """Queries, keys and values as one product (W_qkv, or W_query..W_value side by side) or three."""
        if att.W_qkv is not None:
            return [self._matrix(att.W_qkv, f"{name}.W_qkv", c, 3 * c)]
        # (fused_qkv also takes nn.Linear layers, whose forward is not one this step stands for; hooks: why_not)
        ours = all(type(m) is Linear for m in (att.W_query, att.W_key, att.W_value))
        fused = att.fused_qkv() if ours else None
        if fused is not None:
            return [self._dense(*fused, f"{name}.W_qkv (fused)", c, 3 * c)]
        return [self._matrix(getattr(att, n), f"{name}.{n}", c, c) for n in ("W_query", "W_key", "W_value")]

    def _layer(self, block: TransformerBlock, att: MultiHeadAttention, kv: torch.Tensor, name: str) -> native.Layer:
        """The Layer of one TransformerBlock (its attention `att` checked) whose cache is `kv` [2, heads, max_len,
        head_dim]."""
        ff = _exact(block.ff, FeedForward, f"{name}.ff")
        c = att.d_out
        if (att.attention_dtype not in (None, kv.dtype) or att.num_heads * att.head_dim != c or kv.shape[1] != att.num_heads
                or kv.shape[3] != att.head_dim or type(ff.layers) is not nn.Sequential or len(ff.layers) != 3):
            raise Unsupported(f"{name}'s attention or feed-forward is not GPTModel's")
        _exact(ff.layers[1], GELU, f"{name}.ff.layers.1")
        ln1_w, ln1_b, eps1 = self._norm(block.norm1, f"{name}.norm1", c)
        ln2_w, ln2_b, eps2 = self._norm(block.norm2, f"{name}.norm2", c)
        qkv = self._qkv(att, f"{name}.att", c) + [native.Matrix()] * 2
        return native.Layer(qkv=(native.Matrix * 3)(*qkv[:3]), out=self._matrix(att.out_proj, f"{name}.att.out_proj", c, c),
                            fc=self._matrix(ff.layers[0], f"{name}.ff.layers.0", c, 4 * c),
                            proj=self._matrix(ff.layers[2], f"{name}.ff.layers.2", 4 * c, c), ln1_w=ln1_w, ln1_b=ln1_b,
                            ln2_w=ln2_w, ln2_b=ln2_b, eps1=eps1, eps2=eps2, kv=kv.data_ptr())


def _lookup(module: Any, name: str) -> torch.Tensor:
    """The weight of an embedding that only looks rows up (an nn.Embedding with max_norm renormalizes them)."""
    emb = _exact(module, nn.Embedding, name)
    if emb.max_norm is not None:
        raise Unsupported(f"{name} renormalizes the rows it reads (max_norm={emb.max_norm})")
    return _tensor(emb.weight, f"{name}.weight", (emb.num_embeddings, emb.embedding_dim))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _exact(m: Any, cls: type[M], name: str) -> M:
    """`m`, which must be a `cls` itself (no subclass) with no hooks."""
    if type(m) is not cls or _hooked(m):
        raise Unsupported(f"{name} is a {type(m).__name__}{' with hooks' if type(m) is cls else ''}, not gpt2hub's "
                          f"{cls.__name__}")
    return m


def _tensor(t: Any, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
            transposed: bool | None = False) -> torch.Tensor:
    """`t`, checked: a plain CPU tensor of `shape` and `dtype` (where given) whose memory the kernels read in order
    (`transposed` None: in order or transposed)."""
    if t is None:
        raise Unsupported(f"{name} is missing")
    ok = native.plain(t) or (transposed is None and t.dim() == 2 and native.plain(t, transposed=True))
    if not ok or (shape is not None and tuple(t.shape) != shape) or (dtype is not None and t.dtype != dtype):
        raise Unsupported(f"{name} is {t.dtype} {tuple(t.shape)} on {t.device}, not as decode_step reads it")
    return t.detach()


def _layer_caches(model: GPTModel, cache: KVCache) -> list[torch.Tensor]:
    """Each block's [2, heads, max_len, head_dim] share of a batch-1 cache."""
    kv = cache.kv
    if (kv.dim() != 6 or kv.shape[0] != len(model.trf_blocks) or kv.shape[1] != 2 or kv.shape[2] != 1
            or kv.dtype not in (F32, BF16)):
        raise Unsupported(f"the KV cache is {kv.dtype} {tuple(kv.shape)} (batch 1, float32 or bfloat16 is read)")
    _tensor(kv, "the KV cache")
    return [layer[:, 0] for layer in kv]


def plan(model: nn.Module, cache: KVCache) -> DecodeStep | None:
    """A DecodeStep for `model` and its batch-1 `cache` where decode_step reads every part of them, else None (and
    the reason logged once at INFO)."""
    why = why_not(model, cache)
    step = None
    if why is None and isinstance(model, GPTModel):  # (why_not said it is one)
        try:
            step = DecodeStep(model, cache)
        except Unsupported as e:
            why = str(e)
    _tell(why)
    return step


def why_not(model: nn.Module, cache: KVCache) -> str | None:
    """Why decode_step cannot run `model` as a whole (None: the model's kind, mode, device and code allow it; its
    parts are checked when the step is made)."""
    modules = list(model.modules())  # (listed once: each walk through a model's modules costs 0.1-0.2 ms)
    checks: list[tuple[Callable[[], bool], str]] = [
        (lambda: native.ENABLED and native.STEP and native.AVAILABLE, native.status() if not native.AVAILABLE else
         "gpt2hub.native.ENABLED or STEP is False"),
        (lambda: bool(torch.backends.mkldnn.enabled), "torch.backends.mkldnn.enabled is False"),
        (lambda: type(model) is GPTModel, f"the model is a {type(model).__name__}, not gpt2hub's GPTModel"),
        # (dropout runs where the model, a block or an attention is in training mode: model.eval() and then a block's
        # train() leaves the others as they were)
        (lambda: not any(m.training for m in modules if isinstance(m, _DROPOUT)),
         "the model or one of its blocks is in training mode (dropout)"),
        (lambda: not _global_hooks() and not any(_hooked(m) for m in modules), "hooks are registered"),
        (lambda: model.tok_emb.weight.device.type == "cpu", "the model is not on the CPU"),  # type: ignore[union-attr]
        (lambda: cache.kv.shape[2] == 1, "more than one row"),
    ]
    return next((why for ok, why in checks if not ok()), None) or _replaced(model, modules)


# the code decode_step stands for: these classes' methods as defined when gpt2hub was imported (a class patched since
# then, or a method set on one module, computes something else)
_CODE = {cls: {name: getattr(cls, name) for name in names} for cls, names in [
    (GPTModel, ("forward",)), (TransformerBlock, ("forward",)), (MultiHeadAttention, ("forward", "project")),
    (FeedForward, ("forward",)), (nn.Sequential, ("forward",)), (LayerNorm, ("forward",)), (GELU, ("forward",)),
    (nn.Embedding, ("forward",)), (Linear, ("forward",)), (Int8Linear, ("forward", "_row", "_kernel")),
    (Int4Linear, ("forward", "_kernel"))]}


def _replaced(model: nn.Module, modules: list[nn.Module]) -> str | None:
    """Where code has replaced a method decode_step stands for since import, on its class or on one module."""
    for kind, methods in _CODE.items():
        if any(getattr(kind, method) is not code for method, code in methods.items()):
            return f"{kind.__name__}'s code has been replaced since gpt2hub was imported"
    for m in modules:
        if shadowing := _CODE.get(type(m), {}).keys() & m.__dict__.keys():
            name = next(n for n, x in model.named_modules() if x is m) or "the model"
            return f"{name}.{min(shadowing)} is set on the module, not its class's"
    return None


_DROPOUT = (GPTModel, TransformerBlock, MultiHeadAttention)  # whose forward applies dropout in training mode


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _tell(why: str | None) -> None:
    said = why or ""
    if said not in _told:
        _told.add(said)
        log.info("gpt2hub.native_step: %s", "one call per decoding step" if why is None else
                 f"decoding runs the model's modules ({why})")
