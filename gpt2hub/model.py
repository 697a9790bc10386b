"""GPTModel: GPT-2 with the parameter names of "Build a Large Language Model (From Scratch)"."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import ONEDNN, compiling, linear  # noqa: F401  (ONEDNN: still importable from gpt2hub.model)

GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: `kv` [n_layers, 2, batch, heads, max_len, head_dim] (keys at 0,
    values at 1 of the second dimension), with `k` and `v` as views. `layers[i]` is layer i's share, which the
    attention reads and writes through `LayerCache.update`."""

    kv: torch.Tensor  # a buffer, declared: nn.Module's __getattr__ types it as Tensor | Module

    def __init__(self, cfg: dict, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
        shape = (cfg["n_layers"], 2, batch_size, cfg["n_heads"], max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.layers = [LayerCache(layer) for layer in self.kv]

    def _apply(self, fn: Any, recurse: bool = True) -> KVCache:
        super()._apply(fn, recurse)
        self.layers = [LayerCache(layer) for layer in self.kv]  # moved or converted: the views follow
        return self

    @property
    def k(self) -> torch.Tensor:
        """Keys [n_layers, batch, heads, max_len, head_dim] (a view of `kv`)."""
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        """Values [n_layers, batch, heads, max_len, head_dim] (a view of `kv`)."""
        return self.kv[:, 1]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]


class LayerCache:
    """One layer's keys and values, `kv` [2, batch, heads, max_len, head_dim]; `update` owns the write (gpt-fast's
    KVCache.update)."""

    __slots__ = ("kv",)

    def __init__(self, kv: torch.Tensor):
        self.kv = kv

    def update(self, kv: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Write keys and values `kv` [2, batch, heads, t, head_dim] at positions start..start+t-1 (one copy for
        both); return those to attend over: the first start+t positions, or the whole cache when `start` is a 0-dim
        tensor (the static shapes CUDA graphs replay: positions are then never read on the host)."""
        cache = self.kv if kv.shape[1] == self.kv.shape[1] else self.kv.narrow(1, 0, kv.shape[1])
        t = kv.shape[3]
        if isinstance(start, torch.Tensor):
            cache.index_copy_(3, start + torch.arange(t, device=kv.device), kv.to(cache.dtype))
            return cache
        cache.narrow(3, start, t).copy_(kv)
        return cache.narrow(3, 0, start + t)


def _consecutive(tensors: list[torch.Tensor | None], stride: tuple[int, ...], elements: int) -> bool:
    """Whether the tensors have `stride` and follow one another in one storage, `elements` apart (tensors that merely
    lie side by side, each with a storage of its own as a safetensors file gives them, cannot be viewed as one)."""
    first = tensors[0]
    if first is None:
        return False
    storage = first.untyped_storage()
    return all(t is not None and t.stride() == stride and t.dtype == first.dtype and t.device == first.device
               and t.data_ptr() == first.data_ptr() + i * elements * first.element_size()
               and t.untyped_storage().data_ptr() == storage.data_ptr() for i, t in enumerate(tensors))


class Linear(nn.Linear):
    """nn.Linear whose inference runs on gpt2hub.kernels.linear (oneDNN on CPU; packed weights for bfloat16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T + bias, as nn.Linear computes it."""
        return linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    """The book's causal multi-head attention, with a KV cache for generation.

    W_query, W_key and W_value are three Linear layers; inference multiplies them as one [3 * d_out, d_in] matrix
    when they lie side by side in memory (`fused_qkv`). A model may instead hold them as one layer `W_qkv` (quantized
    models do: gpt2hub.quant), whose output is queries, keys and values side by side.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.context_length = context_length
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.W_qkv: nn.Module | None = None
        self.out_proj = Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self._fused: tuple[tuple[Any, ...], Any] = ((), None)  # fused_qkv() and the layers and addresses it was made for
        # the dtype attention computes in when it is not the activations' (see GPTModel.attention_dtype)
        self.attention_dtype: torch.dtype | None = None

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """W_query, W_key and W_value as one [3 * d_out, d_in] weight (and bias) when they lie side by side in memory:
        the three column blocks of one [d_in, 3 * d_out] matrix (OpenAI's c_attn, mapped from its checkpoint), or the
        three row blocks of one [3 * d_out, d_in] matrix (c_attn converted to nn.Linear's layout); else None, also
        where one of them is not a plain linear layer (a LoRA wrapper, with or without a `weight`, computes more)."""
        layers, d = (self.W_query, self.W_key, self.W_value), self.d_out
        if not all(type(m) in (Linear, nn.Linear) for m in layers):
            return None
        first = self.W_query.weight
        d_in = first.shape[1] if first.dim() == 2 else 0
        if _consecutive([m.weight for m in layers], (1, 3 * d), d):
            w = first.as_strided((3 * d, d_in), (1, 3 * d))
        elif _consecutive([m.weight for m in layers], (d_in, 1), d * d_in):
            w = first.as_strided((3 * d, d_in), (d_in, 1))
        else:
            return None
        if all(m.bias is None for m in layers):
            return w, None
        if not _consecutive([m.bias for m in layers], (1,), d):
            return None
        return w, self.W_query.bias.as_strided((3 * d,), (1,))

    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """fused_qkv(), made again only when a layer is replaced or a weight or bias has moved: the views kept here
        hold the memory they read, so no other tensor can come to lie at the addresses compared."""
        if compiling():  # (addresses cannot be traced; compiled code decides once, as benchmarks/compile_decode.py does)
            return self.fused_qkv()
        layers = (self.W_query, self.W_key, self.W_value)
        key = tuple(x for m in layers for x in (type(m), *(t.data_ptr() if isinstance(t, torch.Tensor) else 0
                                                           for t in (getattr(m, "weight", None), getattr(m, "bias", None)))))
        if self._fused[0] != key:
            self._fused = (key, self.fused_qkv())
        return self._fused[1]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [batch, heads, t, head_dim] and keys with values [2, batch, heads, t, head_dim] for `x` [batch, t, d_in]."""
        b, t, _ = x.shape
        if self.W_qkv is not None:
            qkv = self.W_qkv(x)
        elif not torch.is_grad_enabled() and (fused := self._fused_qkv()) is not None:
            # one product reads the three matrices once; its copy or pack follows writes to W_key and W_value too
            qkv = linear(x, *fused, (self.W_key.weight, self.W_value.weight))
        else:
            q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                       for w in (self.W_query, self.W_key, self.W_value))
            return q, torch.stack([k, v])
        qkv = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1:]

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, start: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over `x` (and the cached keys before `start`); `mask` (True: may attend) replaces the causal one.

        With a 0-dim tensor `start` the whole cache is attended to under `mask` (GPTModel.forward makes it)."""
        b, t, _ = x.shape
        q, kv = self.project(x)
        is_causal = t > 1 and mask is None
        if cache is not None:
            kv = cache.update(kv, start)
            if mask is None and isinstance(start, torch.Tensor):
                mask = (start + torch.arange(t, device=x.device))[:, None] >= torch.arange(kv.shape[3], device=x.device)
            elif mask is None and not isinstance(start, torch.Tensor) and start > 0 and t > 1:
                # queries sit at start..start+t-1 and see every key up to their own position
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            is_causal = is_causal and mask is None
        elif self.attention_dtype is not None:
            kv = kv.to(self.attention_dtype)
        k, v = kv.unbind(0)  # (with a cache, the cache's dtype is the attention's: the write above converted)
        p = self.dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        # [b, heads, t, head_dim] -> [b, t, d_out]; one position needs no transpose
        y = y.reshape(b, t, self.d_out) if t == 1 else y.transpose(1, 2).reshape(b, t, self.d_out)
        return self.out_proj(y.to(x.dtype))


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(Linear(d, 4 * d), GELU(), Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, start: int | torch.Tensor = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """One pre-norm block: attention (see MultiHeadAttention.forward), then the feed-forward, each with a shortcut."""
        if self.training:
            x = x + self.drop_shortcut(self.att(self.norm1(x), cache, start, mask))
            return x + self.drop_shortcut(self.ff(self.norm2(x)))
        x = x + self.att(self.norm1(x), cache, start, mask)  # (dropout is the identity in eval mode)
        return x + self.ff(self.norm2(x))


def state_dict_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """GPTModel(cfg, tie_weights=True).state_dict()'s names and shapes, in its order, the head included: what storage
    and gpt2hub.quant check tensors against without building a model (even on the meta device, building one costs a
    warm load 15-100 ms; test_model checks that the two agree)."""
    d, wide, bias = cfg["emb_dim"], 4 * cfg["emb_dim"], bool(cfg.get("qkv_bias"))
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg["vocab_size"], d),
                                          "pos_emb.weight": (cfg["context_length"], d)}
    for i in range(cfg["n_layers"]):
        p = f"trf_blocks.{i}."
        for n in ("W_query", "W_key", "W_value"):
            shapes[f"{p}att.{n}.weight"] = (d, d)
            if bias:
                shapes[f"{p}att.{n}.bias"] = (d,)
        shapes.update({f"{p}att.out_proj.weight": (d, d), f"{p}att.out_proj.bias": (d,),
                       f"{p}ff.layers.0.weight": (wide, d), f"{p}ff.layers.0.bias": (wide,),
                       f"{p}ff.layers.2.weight": (d, wide), f"{p}ff.layers.2.bias": (d,)})
        shapes.update({f"{p}{norm}.{k}": (d,) for norm in ("norm1", "norm2") for k in ("scale", "shift")})
    shapes.update({"final_norm.scale": (d,), "final_norm.shift": (d,), "out_head.weight": (cfg["vocab_size"], d)})
    return shapes


class GPTModel(nn.Module):
    """GPT-2 built from the book's config dict, with the book's parameter names.

    `GPTModel(cfg)` is the book's model: an untied `out_head`, PyTorch's default initialisation and the same order
    of random draws, so `torch.manual_seed(123); GPTModel(cfg)` holds bit for bit the weights of the book's
    GPTModel. `tie_weights=True` makes `out_head` share `tok_emb`'s weight (GPT-2's head); `init="gpt2"` draws
    GPT-2's initialisation instead: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers).
    """

    def __init__(self, cfg: dict, *, tie_weights: bool = False, init: str = "book"):
        super().__init__()
        missing = {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"} - set(cfg)
        if missing:
            raise ValueError(f"GPTModel config lacks {sorted(missing)}")
        if init not in INITS:
            raise ValueError(f"GPTModel init={init!r} is not one of {INITS}; pass init=\"book\" or init=\"gpt2\"")
        self.cfg = {"drop_rate": 0.0, "qkv_bias": False, **cfg}
        cfg = self.cfg
        meta = torch.empty(0).is_meta  # built for from_state_dict: no initialisation at all
        self.tok_emb = _embedding(cfg["vocab_size"], cfg["emb_dim"], draw=not meta and init == "book")
        self.pos_emb = _embedding(cfg["context_length"], cfg["emb_dim"], draw=not meta and init == "book")
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.register_load_state_dict_pre_hook(_load_hook)
        self.register_load_state_dict_post_hook(_retie_hook)
        if init == "gpt2" and not meta:
            _init_gpt2(self)

    @classmethod
    def from_state_dict(cls, cfg: dict, state_dict: dict[str, torch.Tensor], *, tie_weights: bool = True,
                        modules: Callable[[GPTModel], None] | None = None) -> GPTModel:
        """Built on the meta device and handed the given tensors (no random init, no copy), in eval mode.

        Without an `out_head.weight` in `state_dict`, `tie_weights=True` (GPT-2's checkpoints) makes the head share
        `tok_emb`'s weight; `tie_weights=False` gives it its own contiguous copy, as the book's
        `load_weights_into_gpt` does, so fine-tuning matches the book's. A distinct `out_head.weight` stays distinct.
        `modules`, if given, is called on the model (still on the meta device) before the tensors are handed over:
        gpt2hub.quant puts its quantized layers in there.
        """
        # a full garbage collection triggered by these few hundred objects would cost more than the build itself
        paused = gc.isenabled()
        gc.disable()
        try:
            with torch.device("meta"):
                model = cls(cfg, tie_weights=tie_weights)
                if modules is not None:
                    modules(model)
            model.load_state_dict(state_dict, assign=True, strict=True)
        finally:
            if paused:
                gc.enable()
        return model.eval()

    @property
    def attention_dtype(self) -> torch.dtype:
        """The dtype attention computes in, and generation's KV cache holds: the activations' (the embedding's dtype)
        unless set. Setting float32 on a bfloat16 model costs twice the cache memory and gives other (closer to
        float32) values, but PyTorch's CPU attention reads a float32 cache several times faster at one query per step
        (benchmarks/results/cpu-epyc-2core/decode_step.md): quantized models (gpt2hub.quant) use it."""
        dtype = next((m.attention_dtype for m in self.modules() if isinstance(m, MultiHeadAttention)), None)
        return self.tok_emb.weight.dtype if dtype is None else dtype

    @attention_dtype.setter
    def attention_dtype(self, dtype: torch.dtype | None) -> None:
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                m.attention_dtype = dtype

    @property
    def tied(self) -> bool:
        """Whether `out_head` shares `tok_emb`'s weight (one Parameter)."""
        return getattr(self.out_head, "weight", None) is self.tok_emb.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0, *,
                last_only: bool = False, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for token ids `idx`; with `cache`, `idx` sits at positions start..

        `start` as a 0-dim tensor selects the static-shape path that CUDA graphs replay (no host values read).
        `last_only` computes the logits of the last position alone ([batch, 1, vocab]), as generation needs.
        For left-padded batches: `positions` [batch, tokens] are each row's position ids (default start.. for every
        row) and `key_mask` [batch, keys] (bool, False for padding) the keys each row may attend to, on top of the
        causal mask; its columns are the cache's (idx's own without a cache), and it may be longer than needed. A
        padding query attends to itself alone, so its values stay finite.
        """
        t = idx.shape[1]
        if isinstance(start, torch.Tensor):
            pos = start + torch.arange(t, device=idx.device)
        elif start + t > self.cfg["context_length"]:
            raise ValueError(f"{start + t} positions exceed the context length {self.cfg['context_length']}")
        else:
            pos = torch.arange(start, start + t, device=idx.device)
        mask = None
        if key_mask is not None:
            if cache is None:
                mask = _padding_mask(torch.arange(t, device=idx.device), key_mask[:, :t])
            else:
                mask = _padding_mask(pos, key_mask[:, :cache.max_len if isinstance(start, torch.Tensor) else start + t])
        elif cache is not None and isinstance(start, torch.Tensor):  # the whole cache is read: positions up to each query's
            mask = pos[:, None] >= torch.arange(cache.max_len, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos if positions is None else positions)
        if self.training:
            x = self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if cache is None else cache.layers[i], start, mask)
        return self.out_head(self.final_norm(x[:, -1:] if last_only else x))


def _padding_mask(query_cols: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """[batch, 1, queries, keys]: causal, padded keys hidden, and every query sees its own column."""
    keys = torch.arange(key_mask.shape[1], device=key_mask.device)
    own = keys == query_cols[:, None]
    return ((key_mask[:, None, :] & (keys <= query_cols[:, None])) | own)[:, None]


INITS = ("book", "gpt2")


def _embedding(num: int, dim: int, draw: bool) -> nn.Embedding:
    """nn.Embedding, drawn as PyTorch does (normal(0, 1)) or left undrawn (`_weight`: the first normal_ on the meta
    device costs a second)."""
    return nn.Embedding(num, dim) if draw else nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def _init_gpt2(model: GPTModel) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * n_layers)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight") or name.endswith("layers.2.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * model.cfg["n_layers"]))


def _load_hook(module: GPTModel, state_dict: dict[str, Any], prefix: str, local_metadata: dict, *args: Any) -> None:
    """Accept the book's state_dicts (causal-mask buffers dropped) and GPT-2's (no `out_head.weight`).

    A tied model stays tied unless the weights give the head other values; an untied one keeps its own head, which
    takes `tok_emb`'s values when the state_dict has no head of its own.
    """
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".att.mask")]:
        del state_dict[key]
    if not isinstance(module.out_head, nn.Linear):  # a quantized head (gpt2hub.quant) has tensors of its own
        return
    head_key = prefix + "out_head.weight"
    head, emb = state_dict.get(head_key), state_dict.get(prefix + "tok_emb.weight")
    if emb is None:
        return
    if module.tied:
        if head is None or _same(head, emb):
            state_dict[head_key] = emb  # one tensor for both names: assign=True keeps one storage, re-tied below
        else:
            module.out_head.weight = nn.Parameter(torch.empty_like(module.tok_emb.weight),
                                                  requires_grad=module.tok_emb.weight.requires_grad)
    elif head is None or _shares_storage(head, emb):
        # copied into the head's own Parameter; assign=True would hand over emb's storage, so it gets a copy
        assign = local_metadata.get("assign_to_params_buffers", False)
        state_dict[head_key] = emb.detach().clone(memory_format=torch.contiguous_format) if assign else emb


def _retie_hook(module: GPTModel, incompatible_keys: Any) -> None:
    # load_state_dict(assign=True) gives each name its own Parameter; share one object again when the storage is one
    head, emb = getattr(module.out_head, "weight", None), module.tok_emb.weight
    if head is not None and head is not emb and _shares_storage(head, emb):
        module.out_head.weight = emb


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are the same memory seen the same way (never for meta tensors, which have none)."""
    return (not a.is_meta and a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or _shares_storage(a, b):
        return True
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device, a.dtype)))
