"""gpt2hub: OpenAI's GPT-2 weights as clean PyTorch models, from a verified cache, fast."""

from .__version__ import __version__
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

__all__ = [
    "CacheError", "CacheInfo", "CachedModel", "CheckpointError", "ConversionError", "DeviceError", "DownloadError",
    "GPT2HubError", "GPTModel", "GPT_CONFIG_124M", "IntegrityError", "KVCache", "LockTimeoutError", "ModelSpec",
    "NotACacheError",
    "OfflineError", "SettingError", "TFCheckpoint", "UnknownModelError",
    "__version__", "assign", "book_state_dict", "download_and_load_gpt2",
    "download_files", "from_pretrained", "generate", "generate_stream", "generate_text", "load_tokenizer",
    "load_weights_into_gpt", "model_configs", "register", "resolve", "save_pretrained", "scan_cache", "state_dict_from_hf",
    "state_dict_from_params", "state_dict_from_tf", "stream_text", "text_to_token_ids", "token_ids_to_text",
]
