"""torch.hub entry points: `torch.hub.load("<owner>/gpt2hub", "gpt2")`, or `(repo_folder, "gpt2", source="local")`.

torch.hub's own `source=` picks where the repository comes from ("github" or "local"), so gpt2hub's source of the
weights is `weights_source=` here ("openai", the default, or "hf"). Every other keyword argument (`revision`,
`cache_dir`, `local_files_only`, `tie_weights`, ...) is passed to `gpt2hub.from_pretrained`.
"""

from __future__ import annotations

from typing import Any as _Any

dependencies = ["torch", "numpy", "safetensors", "tiktoken", "google_crc32c", "filelock", "platformdirs", "tqdm",
                "huggingface_hub"]


def from_pretrained(name: str = "gpt2-small", dtype: _Any = None, device: _Any = None, weights_source: str = "openai",
                    **kwargs: _Any) -> _Any:
    """A GPTModel (eval mode) for any name gpt2hub knows ("gpt2-small", "355M", "openai-community/gpt2-xl") or a
    local folder of OpenAI's or Hugging Face's files, in any of `from_pretrained`'s dtypes ("int8" and "int4":
    quantized once into the cache); `weights_source` is `from_pretrained`'s `source`."""
    import gpt2hub

    return gpt2hub.from_pretrained(name, dtype=dtype, device=device, source=weights_source, **kwargs)


def gpt2(dtype: _Any = None, device: _Any = None, weights_source: str = "openai", **kwargs: _Any) -> _Any:
    """GPT-2 124M ("gpt2-small"); see `from_pretrained` for the arguments."""
    return from_pretrained("gpt2-small", dtype, device, weights_source, **kwargs)


def gpt2_medium(dtype: _Any = None, device: _Any = None, weights_source: str = "openai", **kwargs: _Any) -> _Any:
    """GPT-2 355M ("gpt2-medium"); see `from_pretrained` for the arguments."""
    return from_pretrained("gpt2-medium", dtype, device, weights_source, **kwargs)


def gpt2_large(dtype: _Any = None, device: _Any = None, weights_source: str = "openai", **kwargs: _Any) -> _Any:
    """GPT-2 774M ("gpt2-large"); see `from_pretrained` for the arguments."""
    return from_pretrained("gpt2-large", dtype, device, weights_source, **kwargs)


def gpt2_xl(dtype: _Any = None, device: _Any = None, weights_source: str = "openai", **kwargs: _Any) -> _Any:
    """GPT-2 1558M ("gpt2-xl"); see `from_pretrained` for the arguments."""
    return from_pretrained("gpt2-xl", dtype, device, weights_source, **kwargs)


def gpt2_tokenizer(name: str = "gpt2-small", weights_source: str = "openai", **kwargs: _Any) -> _Any:
    """GPT-2's tokenizer (a tiktoken Encoding) from the model's vocabulary files; kwargs go to `load_tokenizer`."""
    import gpt2hub

    return gpt2hub.load_tokenizer(name, source=weights_source, **kwargs)
