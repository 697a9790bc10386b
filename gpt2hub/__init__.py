"""gpt2hub: OpenAI's GPT-2 weights as clean PyTorch models, from a verified cache, fast.

Every public name is imported on first use (PEP 562), so `import gpt2hub` and the command line's `--help`,
`cache list` and `download` do not pay for PyTorch's import. `from gpt2hub import from_pretrained` works as
before; type checkers read the imports under TYPE_CHECKING below.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from .__version__ import __version__

if TYPE_CHECKING:
    from .book import (
        GPT_CONFIG_124M,
        assign,
        book_state_dict,
        download_and_load_gpt2,
        load_weights_into_gpt,
        model_configs,
        text_to_token_ids,
        token_ids_to_text,
    )
    from .convert import state_dict_from_hf, state_dict_from_params, state_dict_from_tf
    from .errors import (
        CacheError,
        CheckpointError,
        ConversionError,
        DeviceError,
        DownloadError,
        GPT2HubError,
        IntegrityError,
        LockTimeoutError,
        NotACacheError,
        OfflineError,
        SettingError,
        UnknownModelError,
    )
    from .export import save_pretrained
    from .generate import generate, generate_stream, generate_text, stream_text
    from .hub import download_files, from_pretrained, load_tokenizer
    from .inventory import CachedModel, CacheInfo, scan_cache
    from .model import GPTModel, KVCache
    from .registry import ModelSpec, register, resolve
    from .tf_checkpoint import TFCheckpoint

# public name -> the submodule that defines it
_WHERE = {
    **dict.fromkeys(["GPT_CONFIG_124M", "assign", "book_state_dict", "download_and_load_gpt2", "load_weights_into_gpt",
                     "model_configs", "text_to_token_ids", "token_ids_to_text"], "book"),
    **dict.fromkeys(["state_dict_from_hf", "state_dict_from_params", "state_dict_from_tf"], "convert"),
    **dict.fromkeys(["CacheError", "CheckpointError", "ConversionError", "DeviceError", "DownloadError", "GPT2HubError",
                     "IntegrityError", "LockTimeoutError", "NotACacheError", "OfflineError", "SettingError",
                     "UnknownModelError"], "errors"),
    "save_pretrained": "export",
    **dict.fromkeys(["generate", "generate_stream", "generate_text", "stream_text"], "generate"),
    **dict.fromkeys(["download_files", "from_pretrained", "load_tokenizer"], "hub"),
    **dict.fromkeys(["CachedModel", "CacheInfo", "scan_cache"], "inventory"),
    **dict.fromkeys(["GPTModel", "KVCache"], "model"),
    **dict.fromkeys(["ModelSpec", "register", "resolve"], "registry"),
    "TFCheckpoint": "tf_checkpoint",
}

__all__ = [  # a literal list, as type checkers read it; test_cli_startup checks it against _WHERE
    "CacheError", "CacheInfo", "CachedModel", "CheckpointError", "ConversionError", "DeviceError", "DownloadError",
    "GPT2HubError", "GPTModel", "GPT_CONFIG_124M", "IntegrityError", "KVCache", "LockTimeoutError", "ModelSpec",
    "NotACacheError",
    "OfflineError", "SettingError", "TFCheckpoint", "UnknownModelError",
    "__version__", "assign", "book_state_dict", "download_and_load_gpt2",
    "download_files", "from_pretrained", "generate", "generate_stream", "generate_text", "load_tokenizer",
    "load_weights_into_gpt", "model_configs", "register", "resolve", "save_pretrained", "scan_cache", "state_dict_from_hf",
    "state_dict_from_params", "state_dict_from_tf", "stream_text", "text_to_token_ids", "token_ids_to_text",
]

if not TYPE_CHECKING:  # at run time only: type checkers see the imports above, and a typo stays an error for them

    def __getattr__(name: str) -> Any:
        """A public name, imported from its submodule on first use; else a submodule (`gpt2hub.storage`) by name."""
        if name in _WHERE:
            value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
            if name != "generate":  # the function `generate` lives beside the submodule `generate`: see _Package
                globals()[name] = value
            return value
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # what `import gpt2hub` gave when it was eager
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *_WHERE})


class _Package(types.ModuleType):
    """`gpt2hub.generate` is the function even after the submodule `gpt2hub.generate` is imported.

    Importing a submodule binds it as an attribute of its package; the eager `from .generate import generate` used to
    bind the function over it. A property on the package's class takes precedence over that binding, so the function
    wins however the submodule gets imported; anything else assigned (a test's monkeypatch) is kept and returned.
    """

    @property
    def generate(self) -> Any:
        return self.__dict__.get("_generate_override") or importlib.import_module(".generate", __name__).generate

    @generate.setter
    def generate(self, value: Any) -> None:
        if not (isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.generate"):
            self.__dict__["_generate_override"] = value


sys.modules[__name__].__class__ = _Package
