"""Published GPT-2 weights (OpenAI TF variables, Hugging Face safetensors, the book's params) -> GPTModel state_dict.

Every source is first named the way OpenAI's checkpoint names it (`h0/attn/c_attn/w`, `ln_f/g`, `wte`), then one
function turns those into GPTModel tensors: Conv1D weights [in, out] become Linear weights [out, in], c_attn is split
into W_query/W_key/W_value. A tensor already in the requested dtype is returned as a view of its source (no copy);
any other is written once, straight into the dtype. The output head is tied to `tok_emb.weight`, so the state_dict
has no `out_head.weight`.

Matrices can be laid out in memory two ways with the same meaning: "out_in" (contiguous, as nn.Linear stores them)
or "in_out" (each weight a transposed view of its [in, out] source, as OpenAI stores them: W_query/W_key/W_value are
then the three column blocks of c_attn, which GPTModel multiplies as one matrix). On CPUs a float32 matrix-vector
product reads [in, out] faster (see benchmarks/), so float32 uses "in_out" and is a set of views of the checkpoint.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConversionError
from .tf_checkpoint import TFCheckpoint

Getter = Callable[[str], Any]


def config_from_hparams(hparams: Mapping[str, Any]) -> dict:
    """The book's config dict from OpenAI's hparams.json or Hugging Face's config.json."""
    pick = {"vocab_size": ("n_vocab", "vocab_size"), "context_length": ("n_ctx", "n_positions"),
            "emb_dim": ("n_embd",), "n_heads": ("n_head",), "n_layers": ("n_layer",)}
    cfg: dict[str, Any] = {}
    for key, names in pick.items():
        found = [hparams[n] for n in names if n in hparams]
        if not found:
            raise ConversionError(f"hyperparameters lack {' or '.join(names)}: {dict(hparams)}")
        cfg[key] = int(found[0])
    return {**cfg, "drop_rate": 0.0, "qkv_bias": True}


def read_hparams(path: str | Path) -> dict:
    path = Path(path)
    try:
        return config_from_hparams(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read hyperparameters from {path}: {e}") from e


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # read-only arrays mapped from a checkpoint: we only ever copy out of them
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(value))


LAYOUTS = ("out_in", "in_out")


def default_layout(dtype: torch.dtype) -> str:
    """The faster layout for batch-1 decoding: [in, out] for float32, nn.Linear's own for 16-bit types."""
    return "in_out" if dtype == torch.float32 else "out_in"


def openai_state_dict(get: Getter, cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                      progress: Callable[[], Any] | None = None, layout: str | None = None) -> dict[str, torch.Tensor]:
    """GPTModel tensors from a getter of OpenAI variable names (without the `model/` prefix).

    `progress` is called once per variable read (for a progress bar); `layout` defaults to `default_layout(dtype)`.
    """
    layout = layout or default_layout(dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    d, n_layers = cfg["emb_dim"], cfg["n_layers"]

    def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = _tensor(get(name))
        except KeyError:
            raise ConversionError(f"the weights have no variable {name!r}") from None
        if progress is not None:
            progress()
        if t.numel() != int(np.prod(shape)):
            raise ConversionError(f"variable {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.reshape(shape)  # drops the leading 1 of Conv1D weights; a view, no copy

    def copy(src: torch.Tensor) -> torch.Tensor:
        return torch.empty(src.shape, dtype=dtype, device=src.device).copy_(src)

    def out(src: torch.Tensor) -> torch.Tensor:
        return src if src.dtype == dtype else copy(src)

    def matrix(src_in_out: torch.Tensor) -> torch.Tensor:
        """A Linear weight [out, in] from its [in, out] source, in the chosen layout."""
        return out(src_in_out).t() if layout == "in_out" else copy(src_in_out.t())

    sd = {"tok_emb.weight": matrix(fetch("wte", (cfg["vocab_size"], d)).t()),
          "pos_emb.weight": out(fetch("wpe", (cfg["context_length"], d)))}
    for i in range(n_layers):
        h, p = f"h{i}/", f"trf_blocks.{i}."
        w, b = fetch(h + "attn/c_attn/w", (d, 3 * d)), fetch(h + "attn/c_attn/b", (3 * d,))
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            sd[f"{p}att.{name}.weight"] = matrix(w[:, j * d:(j + 1) * d])
            sd[f"{p}att.{name}.bias"] = out(b[j * d:(j + 1) * d])
        for src, dst, n_in, n_out in (("attn/c_proj", "att.out_proj", d, d), ("mlp/c_fc", "ff.layers.0", d, 4 * d),
                                      ("mlp/c_proj", "ff.layers.2", 4 * d, d)):
            sd[f"{p}{dst}.weight"] = matrix(fetch(f"{h}{src}/w", (n_in, n_out)))
            sd[f"{p}{dst}.bias"] = out(fetch(f"{h}{src}/b", (n_out,)))
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            sd[f"{p}{dst}.scale"] = out(fetch(f"{h}{src}/g", (d,)))
            sd[f"{p}{dst}.shift"] = out(fetch(f"{h}{src}/b", (d,)))
    sd["final_norm.scale"] = out(fetch("ln_f/g", (d,)))
    sd["final_norm.shift"] = out(fetch("ln_f/b", (d,)))
    return sd


def state_dict_from_tf(ckpt: TFCheckpoint | str | Path, cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                       progress: Callable[[], Any] | None = None, layout: str | None = None, *, verify: bool = True,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Convert OpenAI's TensorFlow checkpoint, each tensor's crc32c checked as it is read unless verify=False.

    On CPU, float32 weights are views of the mapped data file; with `device`, each published tensor is copied there
    whole first (so c_attn stays one matrix there too).
    """
    ckpt = ckpt if isinstance(ckpt, TFCheckpoint) else TFCheckpoint(ckpt)

    def get(name: str) -> torch.Tensor:
        if f"model/{name}" not in ckpt.entries:
            raise KeyError(name)
        t = _tensor(ckpt.read(f"model/{name}", verify))
        return t if device is None else t.to(device)

    return openai_state_dict(get, cfg, dtype, progress, layout)


_HF_RENAMES = ((re.compile(r"^h\.(\d+)\."), r"h\1/"), (re.compile(r"\.weight$"), "/w"), (re.compile(r"\.bias$"), "/b"))


def _hf_name(key: str) -> str | None:
    key = key.removeprefix("transformer.")
    if key == "lm_head.weight" or re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", key):
        return None  # tied head; causal-mask buffers
    if key in ("wte.weight", "wpe.weight"):
        return key.split(".")[0]
    for pattern, repl in _HF_RENAMES:
        key = pattern.sub(repl, key)
    key = key.replace(".", "/")
    if re.search(r"ln_(\d|f)/", key):
        key = key.replace("/w", "/g")
    return key


def state_dict_from_hf(tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                       progress: Callable[[], Any] | None = None, layout: str | None = None, *,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Convert Hugging Face `openai-community/gpt2*` tensors (model.safetensors, with or without `transformer.`).

    They hold OpenAI's matrices under other names, so float32 weights are views of them, as in state_dict_from_tf.
    """
    by_name = {}
    for key, value in tensors.items():
        name = _hf_name(key)
        if name is not None:
            by_name[name] = value if device is None else value.to(device)
    return openai_state_dict(by_name.__getitem__, cfg, dtype, progress, layout)


def _flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    flat = {"wte": params["wte"], "wpe": params["wpe"], "ln_f/g": params["g"], "ln_f/b": params["b"]}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}/", value)
            else:
                flat[f"{prefix}{key}"] = value

    for i, block in enumerate(params["blocks"]):
        walk(f"h{i}/", block)
    return flat


def state_dict_from_params(params: Mapping[str, Any], cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                           layout: str | None = None) -> dict[str, torch.Tensor]:
    """Convert the book's `params` dict (from `download_and_load_gpt2`)."""
    try:
        flat = _flatten_params(params)
    except KeyError as e:
        raise ConversionError(f"params lacks the key {e}; expected the book's keys blocks, b, g, wpe, wte") from None
    return openai_state_dict(flat.__getitem__, cfg, dtype, layout=layout)


def params_from_tf(ckpt: TFCheckpoint, n_layers: int) -> dict:
    """The book's `params`: {'blocks': [...], 'b', 'g', 'wpe', 'wte'} as squeezed, writable numpy arrays."""
    params: dict[str, Any] = {"blocks": [{} for _ in range(n_layers)]}
    for name in ckpt.names():
        parts = name.split("/")[1:]
        target = params
        if parts[0].startswith("h"):
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(ckpt.read(name)).copy()
    return params
