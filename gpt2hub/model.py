"""GPTModel: GPT-2 with the parameter names of "Build a Large Language Model (From Scratch)"."""

from __future__ import annotations

import gc
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import ONEDNN, linear  # noqa: F401  (ONEDNN: still importable from gpt2hub.model)

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
    """Preallocated keys and values for every layer: [n_layers, batch, heads, max_len, head_dim]."""

    def __init__(self, cfg: dict, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
        shape = (cfg["n_layers"], batch_size, cfg["n_heads"], max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def _consecutive(tensors: list[torch.Tensor | None], stride: tuple[int, ...], elements: int) -> bool:
    """Whether the tensors have `stride` and follow one another in memory, `elements` apart."""
    first = tensors[0]
    return all(t is not None and first is not None and t.stride() == stride and t.dtype == first.dtype
               and t.device == first.device and t.data_ptr() == first.data_ptr() + i * elements * first.element_size()
               for i, t in enumerate(tensors))


class Linear(nn.Linear):
    """nn.Linear whose inference runs on gpt2hub.kernels.linear (oneDNN on CPU; packed weights for bfloat16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T + bias, as nn.Linear computes it."""
        return linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.context_length = context_length
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """W_query, W_key and W_value as one [3 * d_out, d_in] weight (and bias) when they are consecutive column
        blocks of one [d_in, 3 * d_out] matrix, as in OpenAI's c_attn mapped from its checkpoint; else None."""
        layers, d = (self.W_query, self.W_key, self.W_value), self.d_out
        if not _consecutive([m.weight for m in layers], (1, 3 * d), d):
            return None
        w = self.W_query.weight.as_strided((3 * d, self.W_query.weight.shape[1]), (1, 3 * d))
        if all(m.bias is None for m in layers):
            return w, None
        if not _consecutive([m.bias for m in layers], (1,), d):
            return None
        return w, self.W_query.bias.as_strided((3 * d,), (1,))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0) -> torch.Tensor:
        b, t, _ = x.shape
        fused = None if torch.is_grad_enabled() else self.fused_qkv()
        if fused is not None:  # one matrix product reads c_attn once instead of three strided thirds
            q, k, v = linear(x, *fused).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                       for w in (self.W_query, self.W_key, self.W_value))
        is_causal = t > 1
        mask = None
        if cache is not None and isinstance(start, torch.Tensor):
            # static shapes for CUDA graphs: write at positions start.., attend over the whole cache under a mask
            k_cache, v_cache = cache
            pos = start + torch.arange(t, device=x.device)
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            k, v = k_cache, v_cache
            mask = pos[:, None] >= torch.arange(k_cache.shape[2], device=x.device)
            is_causal = False
        elif cache is not None:
            k_cache, v_cache = cache
            k_cache[:b, :, start:start + t] = k
            v_cache[:b, :, start:start + t] = v
            k, v = k_cache[:b, :, :start + t], v_cache[:b, :, :start + t]
            if start > 0 and t > 1:
                # queries sit at start..start+t-1 and see every key up to their own position
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
                is_causal = False
        p = self.dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, self.d_out))


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

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, start))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 built from the book's config dict; `out_head` shares `tok_emb`'s weight unless a checkpoint unties them."""

    def __init__(self, cfg: dict):
        super().__init__()
        missing = {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"} - set(cfg)
        if missing:
            raise ValueError(f"GPTModel config lacks {sorted(missing)}")
        self.cfg = {"drop_rate": 0.0, "qkv_bias": False, **cfg}
        cfg = self.cfg
        # _weight skips nn.Embedding's own init (a slow first call on the meta device); _init_weights does it below
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], _weight=torch.empty(cfg["vocab_size"], cfg["emb_dim"]))
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"],
                                    _weight=torch.empty(cfg["context_length"], cfg["emb_dim"]))
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.out_head.weight = self.tok_emb.weight
        self.register_load_state_dict_pre_hook(_load_hook)
        self.register_load_state_dict_post_hook(_retie_hook)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(_init_weights)
            for name, p in self.named_parameters():
                if name.endswith("out_proj.weight") or name.endswith("layers.2.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    @classmethod
    def from_state_dict(cls, cfg: dict, state_dict: dict[str, torch.Tensor]) -> GPTModel:
        """Built on the meta device and handed the given tensors (no random init, no copy), in eval mode."""
        # a full garbage collection triggered by these few hundred objects would cost more than the build itself
        paused = gc.isenabled()
        gc.disable()
        try:
            with torch.device("meta"):
                model = cls(cfg)
            model.load_state_dict(state_dict, assign=True, strict=True)
        finally:
            if paused:
                gc.enable()
        return model.eval()

    @property
    def tied(self) -> bool:
        return self.out_head.weight is self.tok_emb.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0, *,
                last_only: bool = False) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for token ids `idx`; with `cache`, `idx` sits at positions start..

        `start` as a 0-dim tensor selects the static-shape path that CUDA graphs replay (no host values read).
        `last_only` computes the logits of the last position alone ([batch, 1, vocab]), as generation needs.
        """
        t = idx.shape[1]
        if isinstance(start, torch.Tensor):
            pos = start + torch.arange(t, device=idx.device)
        elif start + t > self.cfg["context_length"]:
            raise ValueError(f"{start + t} positions exceed the context length {self.cfg['context_length']}")
        else:
            pos = torch.arange(start, start + t, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if cache is None else (cache.k[i], cache.v[i]), start)
        return self.out_head(self.final_norm(x[:, -1:] if last_only else x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _load_hook(module: GPTModel, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Accept the book's state_dicts: drop causal-mask buffers; keep the head tied only when the weights say so."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".att.mask")]:
        del state_dict[key]
    head, emb = state_dict.get(prefix + "out_head.weight"), state_dict.get(prefix + "tok_emb.weight")
    if head is None and emb is not None and module.tied:
        state_dict[prefix + "out_head.weight"] = emb
    elif head is not None and emb is not None and module.tied and not _same(head, emb):
        module.out_head.weight = nn.Parameter(torch.empty_like(module.tok_emb.weight))


def _retie_hook(module: GPTModel, incompatible_keys: Any) -> None:
    # load_state_dict(assign=True) gives each name its own Parameter; share one object again when the storage is one
    head, emb = module.out_head.weight, module.tok_emb.weight
    if head is not emb and not emb.is_meta and head.data_ptr() == emb.data_ptr() and head.shape == emb.shape:
        module.out_head.weight = emb


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape):
        return True
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device, a.dtype)))
