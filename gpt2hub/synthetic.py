"""Random GPT-2 weights in OpenAI's exact layout (and Hugging Face's), for benchmarks and tests without real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import names
from .convert import config_from_hparams, hf_config
from .registry import ModelSpec
from .tf_checkpoint import proto_field, write_checkpoint

META_FILE = proto_field(1, b"gpt2hub synthetic checkpoint: no graph")  # a protobuf message, as MetaGraphDef is
CHECKPOINT_FILE = 'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'


def random_weights(hp: dict, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """OpenAI variable names and shapes (`model/h0/attn/c_attn/w` is [1, d, 3d]) with random float32 values."""
    rng = np.random.default_rng(seed)
    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    cfg = config_from_hparams(hp)
    w = {}
    for name in names.openai_names(cfg["n_layers"]):
        shape = names.openai_shape(name, cfg)
        value = r(*shape)
        if name.endswith("/g"):  # layer-norm gains sit around 1
            value += 1
        w["model/" + name] = value[None] if name.endswith("/w") else value  # Conv1D weights carry a leading 1
    return w


def placeholder_vocab() -> tuple[bytes, bytes]:
    """A consistent byte-level vocabulary (256 tokens, no merges) for folders whose tokenizer is not under test."""
    from .tokenizer import byte_decoder

    encoder = {ch: i for i, ch in enumerate(byte_decoder())}
    return json.dumps(encoder).encode(), b"#version: 0.2\n"


def write_openai_folder(folder: Path, spec: ModelSpec, vocab: tuple[bytes, bytes] | None = None,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """The seven files OpenAI publishes for a model, with random weights and the given (or a placeholder) vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(spec.hparams(), seed)
    write_checkpoint(folder / "model.ckpt", weights)
    (folder / "checkpoint").write_text(CHECKPOINT_FILE)
    (folder / "hparams.json").write_text(json.dumps(spec.hparams(), indent=2) + "\n")  # byte for byte as OpenAI's
    (folder / "model.ckpt.meta").write_bytes(META_FILE)
    encoder, merges = vocab or placeholder_vocab()
    (folder / "encoder.json").write_bytes(encoder)
    (folder / "vocab.bpe").write_bytes(merges)
    return weights


def hf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights as `openai-community/gpt2*`'s model.safetensors names them (with its mask buffers)."""
    out = {names.hf_name(name.removeprefix("model/")): np.ascontiguousarray(value.reshape(value.shape[-2:]) if value.ndim == 3
                                                                             else value)
           for name, value in weights.items()}
    n_ctx = weights["model/wpe"].shape[0]
    for i in range(sum(1 for k in weights if k.endswith("attn/c_attn/w"))):
        out[f"h.{i}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), dtype=np.float32))[None, None]
    return out


def write_hf_folder(folder: Path, hp: dict, weights: dict[str, np.ndarray], vocab: tuple[bytes, bytes]) -> None:
    """The files of `openai-community/gpt2*` on the Hugging Face Hub for the same weights."""
    import safetensors.numpy

    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(hf_tensors(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(hp)))
    (folder / "vocab.json").write_bytes(vocab[0])
    (folder / "merges.txt").write_bytes(vocab[1])
