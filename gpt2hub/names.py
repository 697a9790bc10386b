"""One table of tensor names: OpenAI's checkpoint <-> GPTModel (the book's names) <-> Hugging Face's safetensors.

Every mapping in gpt2hub is derived from `NAMES`: reading OpenAI's checkpoint, reading Hugging Face's files,
exporting to Hugging Face, writing synthetic checkpoints, and checking that a checkpoint holds exactly the tensors
its hyperparameters imply. `{}` stands for a block's index.

The one surprise, named where it happens: OpenAI's GPT-2 was written with Conv1D layers, whose weights are stored
[in, out] (with a leading 1 in OpenAI's checkpoint), while nn.Linear multiplies by a weight [out, in]. So every
matrix is transposed on the way in (`CONV1D`), and c_attn, one [d, 3d] matrix, is the three column blocks W_query,
W_key, W_value (`QKV`); its bias [3d] is their three biases (`QKV_BIAS`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

KEEP, CONV1D, QKV, QKV_BIAS = "keep", "conv1d", "qkv", "qkv_bias"

# OpenAI variable (without "model/") -> (GPTModel parameter or parameters, transform, shape from (d, vocab, context))
NAMES: dict[str, tuple[str | tuple[str, ...], str, str]] = {
    "wte": ("tok_emb.weight", KEEP, "vocab,d"),
    "wpe": ("pos_emb.weight", KEEP, "ctx,d"),
    "h{}/ln_1/g": ("trf_blocks.{}.norm1.scale", KEEP, "d"),
    "h{}/ln_1/b": ("trf_blocks.{}.norm1.shift", KEEP, "d"),
    "h{}/attn/c_attn/w": (("trf_blocks.{}.att.W_query.weight", "trf_blocks.{}.att.W_key.weight",
                           "trf_blocks.{}.att.W_value.weight"), QKV, "d,3d"),
    "h{}/attn/c_attn/b": (("trf_blocks.{}.att.W_query.bias", "trf_blocks.{}.att.W_key.bias",
                           "trf_blocks.{}.att.W_value.bias"), QKV_BIAS, "3d"),
    "h{}/attn/c_proj/w": ("trf_blocks.{}.att.out_proj.weight", CONV1D, "d,d"),
    "h{}/attn/c_proj/b": ("trf_blocks.{}.att.out_proj.bias", KEEP, "d"),
    "h{}/ln_2/g": ("trf_blocks.{}.norm2.scale", KEEP, "d"),
    "h{}/ln_2/b": ("trf_blocks.{}.norm2.shift", KEEP, "d"),
    "h{}/mlp/c_fc/w": ("trf_blocks.{}.ff.layers.0.weight", CONV1D, "d,4d"),
    "h{}/mlp/c_fc/b": ("trf_blocks.{}.ff.layers.0.bias", KEEP, "4d"),
    "h{}/mlp/c_proj/w": ("trf_blocks.{}.ff.layers.2.weight", CONV1D, "4d,d"),
    "h{}/mlp/c_proj/b": ("trf_blocks.{}.ff.layers.2.bias", KEEP, "d"),
    "ln_f/g": ("final_norm.scale", KEEP, "d"),
    "ln_f/b": ("final_norm.shift", KEEP, "d"),
}
# GPT2LMHeadModel's names: its GPT2Model's tensors under HF_PREFIX (openai-community/gpt2* omits it), its head
HF_PREFIX, HF_HEAD = "transformer.", "lm_head.weight"
# Hugging Face tensors that carry no weights of their own: the tied head and the causal-mask buffers
HF_DROPPED = (HF_HEAD, "h.{}.attn.bias", "h.{}.attn.masked_bias")


def _expand(pattern: str, n_layers: int) -> list[tuple[str, int | None]]:
    return [(pattern.format(i), i) for i in range(n_layers)] if "{}" in pattern else [(pattern, None)]


def openai_names(n_layers: int) -> list[str]:
    """Every variable (without "model/") an OpenAI checkpoint of `n_layers` blocks holds, in table order."""
    return [name for pattern in NAMES for name, _ in _expand(pattern, n_layers)]


def entries(n_layers: int) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(OpenAI variable, its GPTModel parameter names, transform) for every variable of an `n_layers` model."""
    for pattern, (params, transform, _) in NAMES.items():
        targets = params if isinstance(params, tuple) else (params,)
        for name, i in _expand(pattern, n_layers):
            yield name, tuple(t.format(i) if i is not None else t for t in targets), transform


def openai_shape(name: str, cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape of OpenAI variable `name` (Conv1D weights without their leading 1) for a book config."""
    pattern = re.sub(r"^h\d+/", "h{}/", name)
    if pattern not in NAMES:
        raise KeyError(name)
    sizes = {"d": cfg["emb_dim"], "3d": 3 * cfg["emb_dim"], "4d": 4 * cfg["emb_dim"], "vocab": cfg["vocab_size"],
             "ctx": cfg["context_length"]}
    return tuple(sizes[s] for s in NAMES[pattern][2].split(","))


def hf_name(openai: str) -> str:
    """Hugging Face's name (without "transformer.") of an OpenAI variable: h0/attn/c_attn/w -> h.0.attn.c_attn.weight."""
    if openai in ("wte", "wpe"):
        return openai + ".weight"
    key = re.sub(r"^h(\d+)/", r"h.\1.", openai).replace("/", ".")
    return re.sub(r"\.[wg]$", ".weight", re.sub(r"\.b$", ".bias", key))


_DROPPED = [re.compile("^" + re.escape(p).replace(r"\{\}", r"\d+") + "$") for p in HF_DROPPED]
_FROM_HF = re.compile(r"^h\.(\d+)\.")


def openai_name(hf: str) -> str | None:
    """The OpenAI variable a Hugging Face tensor holds (with or without "transformer."), None for dropped ones.

    Raises KeyError for a name that is neither.
    """
    key = hf.removeprefix(HF_PREFIX)
    if any(p.match(key) for p in _DROPPED):
        return None
    if key in ("wte.weight", "wpe.weight"):
        return key.split(".")[0]
    name = _FROM_HF.sub(r"h\1/", key).replace(".", "/")
    name = re.sub(r"/weight$", "/g" if re.search(r"(^|/)ln_(\d|f)/", name) else "/w", name)
    name = re.sub(r"/bias$", "/b", name)
    if re.sub(r"^h\d+/", "h{}/", name) not in NAMES:
        raise KeyError(hf)
    return name
