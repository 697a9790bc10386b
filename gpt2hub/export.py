"""Export a GPTModel: to a Hugging Face folder (transformers, vLLM, TGI read it) or to gpt2hub's own safetensors.

format="hf" writes what `GPT2LMHeadModel.save_pretrained` writes: config.json (GPT2Config's fields) and
model.safetensors under Hugging Face's names. The names and layouts are derived from `names.NAMES` by
`convert.openai_variables`: each Linear weight is transposed back to Conv1D's [in, out], and W_query, W_key and
W_value are concatenated back into c_attn. A tied head is stored once, as in openai-community/gpt2: no
lm_head.weight, and config.json says tie_word_embeddings true; a head of its own is lm_head.weight.

format="safetensors" writes GPTModel's own state_dict (gpt2hub.safetensors, the tied head once) and its config
(gpt2hub.json). `gpt2hub.from_pretrained(folder)` loads both formats back.

An export owns its folder: it refuses a folder that is not empty unless told to overwrite, and then first removes
every file it would write and every file a reader of that format would also read (for "hf": tokenizer.json,
special_tokens_map.json and the other weights and tokenizer files transformers looks for), so that nothing of an
earlier model is mixed into the new one. Every file appears whole or not at all (written beside its place, then
renamed) with the process's umask (0644 by default), so a server running as another user can read it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from . import names
from .cache import enclosing_cache
from .convert import hf_config, hparams_from_config, openai_variables
from .errors import GPT2HubError
from .files import atomic_path, atomic_write, unlink_entry, user_mode, write_json
from .hub import download_files, from_pretrained
from .model import GPTModel
from .quant import QuantLinear
from .registry import (
    DTYPES,
    HF_TOKENIZER_FILES,
    HF_WEIGHTS,
    OPENAI_TOKENIZER_FILES,
    ModelSpec,
    dtype_choices,
    dtype_name,
)
from .safetensors_file import save_state_dict
from .storage import TORCH_DTYPES
from .tokenizer import mergeable_ranks
from .transports import LocalFolder

FORMATS = ("hf", "safetensors")
HF_CONFIG, HF_TOKENIZER_CONFIG = "config.json", "tokenizer_config.json"
OWN_WEIGHTS, OWN_CONFIG = "gpt2hub.safetensors", "gpt2hub.json"
# what each format writes, and what readers of it would also pick up from the folder: removed before an overwrite
OWNED = {"hf": (HF_WEIGHTS, HF_CONFIG, *HF_TOKENIZER_FILES, HF_TOKENIZER_CONFIG, "tokenizer.json",
                "special_tokens_map.json", "added_tokens.json", "generation_config.json", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
                "chat_template.jinja", "chat_template.json", "vocab.txt", "spiece.model", "tokenizer.model"),
         "safetensors": (OWN_WEIGHTS, OWN_CONFIG, *OPENAI_TOKENIZER_FILES)}
SHARDS = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
HEAD = "out_head.weight"
PathLike = str | os.PathLike[str]
TokenizerFiles = PathLike | Sequence[PathLike] | Mapping[str, PathLike]


def save_pretrained(model: GPTModel, folder: PathLike, format: str = "hf", dtype: torch.dtype | str | None = None,
                    tokenizer_files: TokenizerFiles | None = None, overwrite: bool = False) -> Path:
    """Write `model` into `folder` (created if missing; it must be empty unless `overwrite`); returns the folder.

    format="hf": config.json and model.safetensors as `GPT2LMHeadModel.save_pretrained` writes them (the layout
    vLLM and TGI serve), which `transformers.GPT2LMHeadModel.from_pretrained(folder)` and
    `gpt2hub.from_pretrained(folder)` load.
    A head tied to (or equal to) `tok_emb` is stored once, as in openai-community/gpt2; a head of its own is
    written as lm_head.weight with `tie_word_embeddings: false`.
    format="safetensors": gpt2hub.safetensors (GPTModel's state_dict, the tied head once) and gpt2hub.json (the
    config), loaded back by `GPTModel.from_state_dict(json.loads(config), storage.load_safetensors(weights))`.

    dtype: "float32", "bfloat16" or "float16" (or the torch dtype); None keeps the model's.
    tokenizer_files: the vocabulary to write beside the weights (vocab.json, merges.txt and tokenizer_config.json
    for "hf"; encoder.json and vocab.bpe for "safetensors"; the two formats hold the same content): a pair of paths
    (encoder.json or vocab.json, then vocab.bpe or merges.txt), a folder holding such a pair, or the dict
    `download_files` returns. It is checked (the two files must agree) before anything is written.

    overwrite: a folder that already holds files is refused (ValueError naming it) unless True; then the files this
    format writes or its readers read are removed first (see the module docstring) and the others are left alone.

    Raises ValueError naming the argument for an unknown format or dtype, a quantized (int8/int4) model, a folder
    path that is an existing file, a non-empty folder without `overwrite`, or unusable tokenizer files; CacheError
    when the folder cannot be written.
    """
    if not isinstance(model, GPTModel):
        raise ValueError(f"model must be a gpt2hub GPTModel, got {type(model).__name__}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model holds int8/int4 layers, which export does not write (transformers has no reader for "
                         "them): export the float weights, e.g. `gpt2hub export NAME FOLDER --dtype bfloat16`")
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    out = Path(folder)
    dt = torch_dtype(model, dtype)
    vocab = _read_vocab(tokenizer_files, model.cfg["vocab_size"]) if tokenizer_files is not None else None
    _claim(out, format, overwrite)
    mode = user_mode()
    if format == "hf":
        tensors = hf_state_dict(model, dt)
        _write_weights(out / HF_WEIGHTS, tensors, mode)
        write_json(out / HF_CONFIG, _hf_config(model, dt, tied=names.HF_HEAD not in tensors), mode)
    else:
        _write_weights(out / OWN_WEIGHTS, state_dict(model, dt), mode)
        write_json(out / OWN_CONFIG, model.cfg, mode)
    if vocab is not None:
        _write_vocab(out, vocab, format, model.cfg["context_length"])
    return out


def torch_dtype(model: GPTModel, dtype: torch.dtype | str | None) -> torch.dtype:
    """The torch dtype an export writes: `dtype` by any of its names, or the model's own for None."""
    name = dtype_name(model.tok_emb.weight.dtype if dtype is None else dtype)
    if not DTYPES[name].exportable:
        raise ValueError(f"dtype={name!r} is not written by export: use one of {', '.join(dtype_choices(exportable=True))}")
    return TORCH_DTYPES[name]


def head_is_tied(model: GPTModel) -> bool:
    """Whether the output head is `tok_emb`'s matrix, or a copy of the same values (tie_weights=False, untrained)."""
    head, emb = model.out_head.weight, model.tok_emb.weight
    return model.tied or (head.shape == emb.shape and head.device == emb.device and torch.equal(head, emb))


def state_dict(model: GPTModel, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """GPTModel's tensors as gpt2hub stores them: each in `dtype` (None: the model's), out_head.weight only when
    the head is not tied to `tok_emb` (`GPTModel.from_state_dict` ties it again when it is absent).

    Tensors already in `dtype` are the model's own (views, some transposed: no copy is made).
    """
    dt = torch_dtype(model, dtype)
    sd = model.state_dict()
    if head_is_tied(model):
        del sd[HEAD]
    return {k: v.to(dt) for k, v in sd.items()}


def hf_state_dict(model: GPTModel, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of GPT2LMHeadModel's model.safetensors for `model` (names with "transformer."), in `dtype`.

    lm_head.weight is there only when the head is not tied to `tok_emb`.
    """
    sd = state_dict(model, dtype)
    tensors = {names.HF_PREFIX + names.hf_name(k): v for k, v in openai_variables(sd, model.cfg).items()}
    if HEAD in sd:
        tensors[names.HF_HEAD] = sd[HEAD]
    return tensors


def contiguous_copy(model: GPTModel) -> GPTModel:
    """A copy of `model` whose every tensor is contiguous and owns its memory, the head tied as in `model`.

    A float32 model loaded from the cache is views of the mapped checkpoint, most matrices transposed ([in, out],
    faster on CPUs), which `safetensors.torch.save_model` refuses; it saves this copy:
    `safetensors.torch.save_model(contiguous_copy(model), path)`, and
    `load_model(GPTModel(cfg, tie_weights=model.tied), path)` reads it.
    """
    sd = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state_dict(model).items()}
    return GPTModel.from_state_dict(model.cfg, sd).train(model.training)


def export_model(name: str | ModelSpec, folder: PathLike, *, format: str = "hf", dtype: torch.dtype | str | None = None,
                 source: str = "openai", revision: str | None = None, cache_dir: PathLike | None = None,
                 local_files_only: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Load a model by name (or from a local folder), then `save_pretrained` it with its vocabulary; returns the folder.

    The weights are read as float32 (mapped from the cache, no converted copy is written) and cast to `dtype` as they
    are written; the other arguments are `from_pretrained`'s. The vocabulary comes from the cache, or from the
    folder itself (which must then hold it). This is what `gpt2hub export` runs.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    if os.path.lexists(folder) and (not Path(folder).is_dir() or (any(Path(folder).iterdir()) and not overwrite)) \
            or enclosing_cache(Path(folder)) is not None:
        _claim(Path(folder), format, overwrite)  # refuse before loading anything
    model = from_pretrained(name, source=source, revision=revision, cache_dir=cache_dir,
                            local_files_only=local_files_only, progress=progress)
    if LocalFolder.holds_model(name):
        vocab: TokenizerFiles = Path(name)  # type: ignore[arg-type]  # holds_model checked it
    else:
        vocab = download_files(name, source=source, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, progress=progress)
    return save_pretrained(model, folder, format, dtype, vocab, overwrite)


def _hf_config(model: GPTModel, dtype: torch.dtype, tied: bool) -> dict:
    """config.json: GPT2Config's fields, the head's tying, the dtype (under both the old and the new key)."""
    p, dt = model.cfg.get("drop_rate", 0.0), dtype_name(dtype)
    return {**hf_config(hparams_from_config(model.cfg)), "tie_word_embeddings": tied, "torch_dtype": dt, "dtype": dt,
            "embd_pdrop": p, "resid_pdrop": p, "attn_pdrop": p}


def _claim(out: Path, format: str, overwrite: bool) -> None:
    """Make `out` an export's own: refuse an existing file, or a folder holding anything unless `overwrite`; with it,
    remove what this format writes or its readers read (regular files and links only, never through a link)."""
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"folder={str(out)!r} is an existing file, not a folder: pass a folder path")
    if (cache := enclosing_cache(out)) is not None:
        raise ValueError(f"folder={str(out)!r} lies in the gpt2hub cache at {cache}, which keeps only its own files: "
                         "export into a folder of your own")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(f"{out} is not empty (it holds {shown}): export into a new or empty folder, or pass "
                         "--overwrite (overwrite=True) to replace an earlier export there")
    for name in held:
        if name in OWNED[format] or SHARDS.fullmatch(name):
            unlink_entry(out / name)


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], mode: int) -> None:
    with atomic_path(path, mode) as tmp:
        save_state_dict(tensors, tmp)


def _vocab_pair(tokenizer_files: TokenizerFiles) -> tuple[Path, Path]:
    """(encoder.json or vocab.json, vocab.bpe or merges.txt) from a pair, a folder, or a dict of file names."""
    if isinstance(tokenizer_files, (str, os.PathLike)) and Path(tokenizer_files).is_dir():
        folder = Path(tokenizer_files)
        tokenizer_files = {n: folder / n for n in OPENAI_TOKENIZER_FILES + HF_TOKENIZER_FILES if (folder / n).is_file()}
    if isinstance(tokenizer_files, Mapping):
        pairs = [p for p in (OPENAI_TOKENIZER_FILES, HF_TOKENIZER_FILES) if all(n in tokenizer_files for n in p)]
        if not pairs:
            raise ValueError(f"tokenizer_files={str(tokenizer_files)[:200]} holds neither encoder.json and vocab.bpe "
                             "nor vocab.json and merges.txt")
        return Path(tokenizer_files[pairs[0][0]]), Path(tokenizer_files[pairs[0][1]])
    if isinstance(tokenizer_files, (str, os.PathLike)) or not isinstance(tokenizer_files, Sequence) or len(tokenizer_files) != 2:
        raise ValueError(f"tokenizer_files={str(tokenizer_files)[:200]!r} is not a pair (encoder.json, vocab.bpe), "
                         "a folder holding them, or the dict download_files returns")
    return Path(tokenizer_files[0]), Path(tokenizer_files[1])


def _read_vocab(tokenizer_files: TokenizerFiles, vocab_size: int) -> tuple[bytes, bytes]:
    """The two vocabulary files' bytes, checked to agree with each other and to fit the model's embedding."""
    encoder, merges = _vocab_pair(tokenizer_files)
    try:
        blobs = encoder.read_bytes(), merges.read_bytes()
        n_tokens = len(mergeable_ranks(*blobs)) + 1  # + <|endoftext|>
    except (OSError, ValueError, KeyError, GPT2HubError) as e:
        raise ValueError(f"tokenizer_files=({str(encoder)!r}, {str(merges)!r}) is not a GPT-2 vocabulary: {e}") from None
    if n_tokens > vocab_size:
        raise ValueError(f"tokenizer_files=({str(encoder)!r}, ...) has {n_tokens} tokens, more than the model's "
                         f"vocab_size {vocab_size}")
    return blobs


def _write_vocab(folder: Path, vocab: tuple[bytes, bytes], format: str, context_length: int) -> None:
    mode = user_mode()
    for name, blob in zip(HF_TOKENIZER_FILES if format == "hf" else OPENAI_TOKENIZER_FILES, vocab, strict=True):
        with atomic_write(folder / name, "wb", mode) as f:
            f.write(blob)
    if format == "hf":
        write_json(folder / HF_TOKENIZER_CONFIG, {"model_max_length": context_length}, mode)
