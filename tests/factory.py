"""Test data in OpenAI's exact layout: random GPT-2 weights, TensorFlow checkpoints, the real vocabulary files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from gpt2hub.registry import TOKENIZER_SHA256, ModelSpec

DATA = Path(__file__).parent / "data"
VOCAB_FILES = ("encoder.json", "vocab.bpe")
CHECKPOINT_FILE = 'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'



def random_weights(hp: dict, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """OpenAI variable names and shapes (`model/h0/attn/c_attn/w` is [1, d, 3d]) with random float32 values."""
    rng = np.random.default_rng(seed)
    d, v, n = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model/wte": r(v, d), "model/wpe": r(n, d), "model/ln_f/g": 1 + r(d), "model/ln_f/b": r(d)}
    for i in range(hp["n_layer"]):
        h = f"model/h{i}/"
        w.update({h + "ln_1/g": 1 + r(d), h + "ln_1/b": r(d), h + "ln_2/g": 1 + r(d), h + "ln_2/b": r(d),
                  h + "attn/c_attn/w": r(1, d, 3 * d), h + "attn/c_attn/b": r(3 * d),
                  h + "attn/c_proj/w": r(1, d, d), h + "attn/c_proj/b": r(d),
                  h + "mlp/c_fc/w": r(1, d, 4 * d), h + "mlp/c_fc/b": r(4 * d),
                  h + "mlp/c_proj/w": r(1, 4 * d, d), h + "mlp/c_proj/b": r(d)})
    return w


def write_tf_checkpoint(prefix: Path, weights: dict[str, np.ndarray]) -> None:
    """Save with TensorFlow's graph-mode Saver, as OpenAI did (writes PREFIX.index, .data-*, .meta, checkpoint)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.Variable(value, name=name.split(":")[0]) for name, value in weights.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix))


def write_openai_folder(folder: Path, hp: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A model folder exactly as OpenAI publishes it: the seven files, real vocabulary included."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(hp, seed)
    write_tf_checkpoint(folder / "model.ckpt", weights)
    (folder / "checkpoint").write_text(CHECKPOINT_FILE)  # OpenAI's: relative, not this machine's absolute path
    (folder / "hparams.json").write_text(json.dumps(hp, indent=2))
    for name in VOCAB_FILES:
        shutil.copyfile(DATA / name, folder / name)
    return weights


def tiny_spec(name: str = "gpt2-tiny", size: str = "tiny", d: int = 32, layers: int = 2, heads: int = 4,
              vocab: int = 50257, ctx: int = 64) -> ModelSpec:
    return ModelSpec(name, size, f"test-org/{name}", d, layers, heads, vocab_size=vocab, context_length=ctx,
                     sha256={"openai": TOKENIZER_SHA256})


def hf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights as `openai-community/gpt2*`'s model.safetensors names them (with its mask buffers)."""
    out = {}
    for name, value in weights.items():
        key = name.removeprefix("model/")
        key = re.sub(r"^h(\d+)/", r"h.\1.", key).replace("/", ".")
        key = re.sub(r"\.g$", ".weight", re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", key)))
        out[key if key not in ("wte", "wpe") else key + ".weight"] = np.ascontiguousarray(value.reshape(value.shape[-2:])
                                                                                         if value.ndim == 3 else value)
    n_ctx = weights["model/wpe"].shape[0]
    for i in range(sum(1 for k in weights if k.endswith("attn/c_attn/w"))):
        out[f"h.{i}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), dtype=np.float32))[None, None]
    return out


def hf_config(hp: dict) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": hp["n_vocab"],
            "n_positions": hp["n_ctx"], "n_ctx": hp["n_ctx"], "n_embd": hp["n_embd"], "n_head": hp["n_head"],
            "n_layer": hp["n_layer"], "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": 50256, "eos_token_id": 50256}


def hf_reference(weights: dict[str, np.ndarray], hp: dict):
    """transformers' GPT2LMHeadModel holding `weights`: the independent reference."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**hf_config(hp), attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)).eval()
    mask = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")
    sd = {("transformer." + k): torch.from_numpy(v) for k, v in hf_tensors(weights).items() if not mask.search(k)}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(mask.search(k) for k in missing), missing
    return model
