"""A GPT-2's architecture: the five sizes, checked once, in every spelling gpt2hub meets them.

The one home of the config keys. OpenAI's hparams.json (`n_vocab`, `n_ctx`, `n_embd`, `n_head`, `n_layer`), Hugging
Face's config.json (`vocab_size`, `n_positions`, ...) and the book's config dict (`vocab_size`, `context_length`,
`emb_dim`, `n_heads`, `n_layers`, plus `drop_rate` and `qkv_bias`) are read into a `ModelConfig` and written back
from it. Every size must be a positive integer within what a GPT-2-shaped model can be (a hostile hparams.json with
`n_layer: 10**9` is refused here, before anything is allocated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from .errors import ConversionError

# book key -> (OpenAI's key, Hugging Face's keys..., the largest value accepted)
KEYS: dict[str, tuple[tuple[str, ...], int]] = {
    "vocab_size": (("n_vocab", "vocab_size"), 1 << 20),
    "context_length": (("n_ctx", "n_positions"), 1 << 17),
    "emb_dim": (("n_embd",), 1 << 16),
    "n_heads": (("n_head",), 1 << 10),
    "n_layers": (("n_layer",), 1 << 10),
}
MAX_PARAMETERS = 20_000_000_000  # 13x GPT-2 XL: anything larger is not a GPT-2 checkpoint


class GPTConfig(TypedDict, total=False):
    """The book's config dict, as `GPTModel.cfg` holds it (GPT_CONFIG_124M's keys)."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float
    qkv_bias: bool


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """The five sizes of a GPT-2, each a positive integer (checked by `from_hparams`)."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int

    @classmethod
    def from_hparams(cls, data: Any, where: str = "hyperparameters") -> ModelConfig:
        """From OpenAI's hparams.json, Hugging Face's config.json or the book's dict; ConversionError names `where`
        and the bad value (missing, not a positive integer, too large, n_embd not a multiple of n_head)."""
        if not isinstance(data, Mapping):
            raise ConversionError(f"{where} is not a JSON object (got {type(data).__name__})")
        sizes: dict[str, int] = {}
        for key, (names, largest) in KEYS.items():
            found = [data[n] for n in (*names, key) if n in data]
            if not found:
                raise ConversionError(f"{where} lacks {' or '.join(names)}")
            value = found[0]
            if not _size(value) or value > largest:
                raise ConversionError(f"{where}: {names[0]} must be a positive integer up to {largest}, got "
                                      f"{str(value)[:40]!r}")
            sizes[key] = value
        cfg = cls(**sizes)
        if cfg.emb_dim % cfg.n_heads:
            raise ConversionError(f"{where}: n_embd {cfg.emb_dim} is not a multiple of n_head {cfg.n_heads}")
        if cfg.n_params > MAX_PARAMETERS:
            raise ConversionError(f"{where} describes a model of {cfg.n_params:,} parameters, far more than any GPT-2 "
                                  "(1.5 billion): the file is not a GPT-2's hyperparameters")
        return cfg

    @property
    def n_params(self) -> int:
        """Parameters of the checkpoint (the embedding counted once: GPT-2's head is tied to it)."""
        d = self.emb_dim
        per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return self.vocab_size * d + self.context_length * d + self.n_layers * per_block + 2 * d

    def book(self, drop_rate: float = 0.0) -> dict:
        """The book's config dict (GPT_CONFIG_124M's keys), with GPT-2's query/key/value biases."""
        return {"vocab_size": self.vocab_size, "context_length": self.context_length, "emb_dim": self.emb_dim,
                "n_heads": self.n_heads, "n_layers": self.n_layers, "drop_rate": drop_rate, "qkv_bias": True}

    def hparams(self) -> dict:
        """OpenAI's hparams.json."""
        return {"n_vocab": self.vocab_size, "n_ctx": self.context_length, "n_embd": self.emb_dim,
                "n_head": self.n_heads, "n_layer": self.n_layers}

    def hf(self) -> dict:
        """Hugging Face's config.json (GPT2Config's fields) for this architecture."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
                "n_positions": self.context_length, "n_ctx": self.context_length, "n_embd": self.emb_dim,
                "n_head": self.n_heads, "n_layer": self.n_layers, "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256}

    def same_model(self, other: Mapping[str, Any]) -> bool:
        """Whether a book config dict (a manifest's, say) describes this architecture."""
        return all(other.get(k) == getattr(self, k) for k in KEYS)


def book_config(data: Any, where: str = "hyperparameters") -> dict:
    """The book's config dict from any spelling of a GPT-2's hyperparameters (see `ModelConfig.from_hparams`)."""
    return ModelConfig.from_hparams(data, where).book()
