"""Published GPT-2 weights (OpenAI TF variables, Hugging Face safetensors, the book's params) -> GPTModel state_dict.

Every source is first named the way OpenAI's checkpoint names it (`h0/attn/c_attn/w`, `ln_f/g`, `wte`), then one
function turns those into GPTModel tensors: Conv1D weights [in, out] become Linear weights [out, in], c_attn is split
into W_query/W_key/W_value. A tensor already in the requested dtype is returned as a view of its source (no copy);
any other is written once, straight into the dtype. The output head is tied to `tok_emb.weight`, so the state_dict
has no `out_head.weight`.

Matrices can be laid out in memory two ways with the same meaning: "out_in" (contiguous, as nn.Linear stores them)
or "in_out" (each weight a transposed view of its [in, out] source, as OpenAI stores them: W_query/W_key/W_value are
then the three column blocks of c_attn, which GPTModel multiplies as one matrix). float32 uses "in_out": it is a set
of views of the checkpoint, mapped without a copy (decoding on CPU multiplies [out, in] copies, which oneDNN reads
faster: gpt2hub.kernels).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import names
from .config import ModelConfig, book_config
from .errors import ConversionError
from .tf_checkpoint import TFCheckpoint

Getter = Callable[[str], Any]


def config_from_hparams(hparams: Any, where: str = "hyperparameters") -> dict:
    """The book's config dict from OpenAI's hparams.json or Hugging Face's config.json, checked (see
    `config.ModelConfig.from_hparams`): every size a positive integer in range, n_embd a multiple of n_head."""
    return book_config(hparams, where)


def hparams_from_config(cfg: Mapping[str, Any]) -> dict:
    """OpenAI's hparams.json for a book config: the inverse of `config_from_hparams`."""
    return ModelConfig.from_hparams(cfg, "config").hparams()


def hf_config(hp: Mapping[str, Any]) -> dict:
    """config.json of a Hugging Face GPT-2 (`GPT2Config`'s fields) with OpenAI's hyperparameters `hp`."""
    return ModelConfig.from_hparams(hp, "hparams").hf()


def read_hparams(path: str | Path) -> dict:
    """The book's config from a hparams.json or config.json file (see `config_from_hparams`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read hyperparameters from {path}: {e}") from e
    return config_from_hparams(data, str(path))


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # read-only arrays mapped from a checkpoint: we only ever copy out of them
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(value))


LAYOUTS = ("out_in", "in_out")


def default_layout(dtype: torch.dtype) -> str:
    """The layout each dtype is stored in: [in, out] for float32 (views of the checkpoint), nn.Linear's own for 16-bit
    types."""
    return "in_out" if dtype == torch.float32 else "out_in"


class VariableConverter:
    """Turns one OpenAI variable into its GPTModel tensors, in `dtype` and `layout` (see the module docstring).

    `openai_state_dict` calls it for every variable of a checkpoint; `streaming` calls it for each variable as its
    bytes arrive. On tensors of the "meta" device it computes nothing and gives the shapes and dtypes of the result.
    """

    def __init__(self, cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32, layout: str | None = None):
        self.d, self.dtype = cfg["emb_dim"], dtype
        self.layout = layout or default_layout(dtype)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def _copy(self, src: torch.Tensor) -> torch.Tensor:
        return torch.empty(src.shape, dtype=self.dtype, device=src.device).copy_(src)

    def _out(self, src: torch.Tensor) -> torch.Tensor:
        return src if src.dtype == self.dtype else self._copy(src)

    def _matrix(self, src_in_out: torch.Tensor) -> torch.Tensor:
        """A Linear weight [out, in] from its Conv1D source [in, out], in the chosen layout.

        For "out_in" the dtype is changed first (a straight pass) and the transpose then copies the (often smaller)
        result once: 2.5x faster than one strided copy that casts and transposes together."""
        if self.layout == "in_out":
            return self._out(src_in_out).t()
        if src_in_out.t().is_contiguous():  # the embedding: already [out, in] in memory, so only its dtype changes
            return self._out(src_in_out.t())
        cast = self._copy(src_in_out) if src_in_out.dtype != self.dtype else src_in_out
        return cast.t().clone(memory_format=torch.contiguous_format) if cast is src_in_out else cast.t().contiguous()

    def __call__(self, name: str, t: torch.Tensor, targets: tuple[str, ...], transform: str) -> dict[str, torch.Tensor]:
        """{GPTModel parameter: tensor} for OpenAI variable `name` holding `t` (in its OpenAI shape, see names)."""
        if transform == names.CONV1D:
            return {targets[0]: self._matrix(t)}
        if transform in (names.QKV, names.QKV_BIAS):
            # c_attn holds W_query, W_key, W_value side by side: converted whole (one cast, one transpose), then
            # split into row blocks of its [3d, d] Linear form (for "in_out", views of the checkpoint's columns)
            whole = self._matrix(t) if transform == names.QKV else self._out(t)
            return {target: whole[j * self.d:(j + 1) * self.d] for j, target in enumerate(targets)}
        if name == "wte":  # the embedding is also the tied head's matrix: laid out like the other matrices
            return {targets[0]: self._matrix(t.t())}
        return {targets[0]: self._out(t)}


def openai_state_dict(get: Getter, cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                      progress: Callable[[], Any] | None = None, layout: str | None = None) -> dict[str, torch.Tensor]:
    """GPTModel tensors from a getter of OpenAI variable names (without the `model/` prefix), by `names.NAMES`.

    `progress` is called once per variable read (for a progress bar); `layout` defaults to `default_layout(dtype)`.
    """
    convert = VariableConverter(cfg, dtype, layout)
    sd: dict[str, torch.Tensor] = {}
    for name, targets, transform in names.entries(cfg["n_layers"]):
        t = _fetch(get, name, names.openai_shape(name, cfg))
        if progress is not None:
            progress()
        sd.update(convert(name, t, targets, transform))
    return sd


def openai_variables(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """OpenAI variables (Conv1D weights [in, out], without their leading 1) from GPTModel tensors, by `names.NAMES`.

    The inverse of `openai_state_dict`: each Linear weight [out, in] is transposed back (a view, no copy),
    W_query/W_key/W_value are concatenated back into c_attn [d, 3d] and their biases into [3d] (zeros for a model
    built with qkv_bias=False, which computes the same). Raises ConversionError naming a missing tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for name, targets, transform in names.entries(cfg["n_layers"]):
        missing = [t for t in targets if t not in sd and transform != names.QKV_BIAS]
        if missing:
            raise ConversionError(f"the state_dict has no tensor {missing[0]!r}: not a GPTModel of {cfg['n_layers']} blocks")
        if transform == names.CONV1D:
            out[name] = sd[targets[0]].t()
        elif transform == names.QKV:
            out[name] = torch.cat([sd[t].t() for t in targets], dim=1)
        elif transform == names.QKV_BIAS:
            weight = sd[targets[0].replace(".bias", ".weight")]
            out[name] = torch.cat([sd[t] if t in sd else weight.new_zeros(weight.shape[0]) for t in targets])
        else:
            out[name] = sd[targets[0]]
    return out


def _fetch(get: Getter, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        t = _tensor(get(name))
    except KeyError:
        raise ConversionError(f"the weights have no variable {name!r}") from None
    if t.numel() != int(np.prod(shape)):
        raise ConversionError(f"variable {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t.reshape(shape)  # drops the leading 1 of Conv1D weights; a view, no copy


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


def state_dict_from_hf(tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                       progress: Callable[[], Any] | None = None, layout: str | None = None, *,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Convert Hugging Face `openai-community/gpt2*` tensors (model.safetensors, with or without `transformer.`).

    They hold OpenAI's matrices under other names, so float32 weights are views of them, as in state_dict_from_tf.
    """
    by_name = {}
    for key, value in tensors.items():
        try:
            name = names.openai_name(key)
        except KeyError:
            raise ConversionError(f"unexpected tensor {key!r}: not a GPT-2 weight") from None
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
