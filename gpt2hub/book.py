"""The notebook API of "Build a Large Language Model (From Scratch)", backed by the gpt2hub cache."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .convert import params_from_tf, state_dict_from_params
from .errors import ConversionError
from .files import atomic_path, clone_file, disk_errors, user_mode
from .hub import download_files
from .model import GPT_CONFIG_124M, GPTModel
from .registry import model_configs, resolve
from .tf_checkpoint import TFCheckpoint

__all__ = ["GPT_CONFIG_124M", "assign", "book_state_dict", "download_and_load_gpt2", "load_weights_into_gpt",
           "model_configs", "text_to_token_ids", "token_ids_to_text"]


def _place(src: Path, dst: Path) -> None:
    """Copy a cached file to `dst`, a reflink where the filesystem can (never a hard or symbolic link: editing the
    notebook's copy must not touch the cache), with the process's umask. A file already there that the cache adopted
    is left as it is."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and filecmp.cmp(src, dst, shallow=False):
        return
    with atomic_path(dst, user_mode()) as tmp:
        clone_file(src, tmp)


def _models_folder(models_dir: str | os.PathLike, size: str) -> Path:
    """`models_dir/size`, refused before any download when it (or models_dir) exists and is not a folder."""
    for path in (Path(models_dir), Path(models_dir) / size):
        if os.path.lexists(path) and not path.is_dir():
            raise ValueError(f"models_dir: {path} exists and is not a folder: pass a folder (the book uses "
                             "models_dir=\"gpt2\"), or move that file away")
    return Path(models_dir) / size


def download_and_load_gpt2(model_size: str, models_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(settings, params) as the book returns them, fetched through the cache; `models_dir/model_size` is filled.

    Files already in `models_dir/<size>` (the book's own download) are adopted into the cache once they pass every
    check a download would (size, pinned sha256, structure), instead of being downloaded again.
    """
    spec = resolve(model_size)
    folder = _models_folder(models_dir, spec.size)
    paths = download_files(spec, source="openai", adopt_from=folder if folder.is_dir() else None)
    with disk_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        _place(path, folder / name)
    settings = json.loads((folder / "hparams.json").read_text())
    with TFCheckpoint(folder) as ckpt:
        params = params_from_tf(ckpt, settings["n_layer"])
    return settings, params


def assign(left: torch.Tensor, right: Any) -> torch.nn.Parameter:
    """The book's `assign`: `right` (numpy array or tensor) as a new Parameter, once its shape is `left`'s."""
    if left.shape != right.shape:
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return torch.nn.Parameter(torch.tensor(right) if isinstance(right, np.ndarray) else right.clone().detach())


def load_weights_into_gpt(gpt: torch.nn.Module, params: dict) -> None:
    """Copy the book's `params` into a GPTModel (gpt2hub's or the book's own class).

    As in the book, an untied `out_head` receives a copy of `wte`; a gpt2hub model built with `tie_weights=True` keeps
    one shared tensor.
    """
    cfg = {"vocab_size": params["wte"].shape[0], "context_length": params["wpe"].shape[0],
           "emb_dim": params["wte"].shape[1], "n_layers": len(params["blocks"])}
    ref = gpt.get_parameter("tok_emb.weight")
    sd = state_dict_from_params(params, cfg, ref.dtype, layout="out_in")  # copied into nn.Linear's own layout
    sd["out_head.weight"] = sd["tok_emb.weight"]
    missing, unexpected = gpt.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(".mask")]
    if missing or unexpected:
        raise ConversionError(f"params do not fit this model: missing {missing}, unexpected {unexpected}")


def book_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """`model`'s weights as the book's own GPTModel saves them: its `load_state_dict(..., strict=True)` takes them.

    Every layer gets the book's causal-mask buffer `trf_blocks.N.att.mask` (1 above the diagonal, in the model's
    dtype), `out_head.weight` is its own tensor even when the head is tied, and every tensor is contiguous in
    nn.Linear's [out, in] layout (a mapped float32 model's transposed views are copied; other tensors are shared
    with the model, as `state_dict()` shares them). No two entries share memory, so `torch.save` and safetensors'
    `save_file` both take it.
    """
    cfg, sd = model.cfg, model.state_dict()
    emb = sd["tok_emb.weight"]
    ctx = cfg["context_length"]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("trf_blocks.") and key.endswith(".att.W_query.weight"):  # the book's buffer comes first
            out[key.replace("W_query.weight", "mask")] = torch.ones(ctx, ctx, dtype=emb.dtype, device=emb.device).triu(1)
        out[key] = value.detach().contiguous()
    if out["out_head.weight"].data_ptr() == out["tok_emb.weight"].data_ptr():
        out["out_head.weight"] = out["tok_emb.weight"].clone()
    return out


def text_to_token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """The book's `text_to_token_ids`: `text` encoded ("<|endoftext|>" allowed) as a [1, tokens] tensor."""
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Any) -> str:
    """The book's `token_ids_to_text`: a [1, tokens] tensor decoded to a string."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


