"""gpt2hub: OpenAI's GPT-2 weights as clean PyTorch models, from a verified cache, fast."""

__version__ = "0.1.0"

from .book import (  # noqa: E402
    GPT_CONFIG_124M,
    assign,
    book_state_dict,
    download_and_load_gpt2,
    load_weights_into_gpt,
    model_configs,
    text_to_token_ids,
    token_ids_to_text,
)
from .convert import state_dict_from_hf, state_dict_from_params, state_dict_from_tf  # noqa: E402
from .errors import (  # noqa: E402
    CacheError,
    CheckpointError,
    ConversionError,
    DeviceError,
    DownloadError,
    GPT2HubError,
    IntegrityError,
    LockTimeoutError,
    OfflineError,
    UnknownModelError,
)
from .generate import generate, generate_stream, generate_text, stream_text  # noqa: E402
from .hub import download_files, from_pretrained, load_tokenizer  # noqa: E402
from .model import GPTModel, KVCache  # noqa: E402
from .registry import ModelSpec, register, resolve  # noqa: E402
from .tf_checkpoint import TFCheckpoint  # noqa: E402

__all__ = [
    "GPT_CONFIG_124M", "CacheError", "CheckpointError", "ConversionError", "DeviceError", "DownloadError", "GPT2HubError",
    "GPTModel", "IntegrityError", "KVCache", "LockTimeoutError", "ModelSpec", "OfflineError", "TFCheckpoint",
    "UnknownModelError", "__version__", "assign", "download_and_load_gpt2", "download_files", "from_pretrained",
    "generate", "generate_stream", "generate_text", "load_tokenizer", "load_weights_into_gpt", "model_configs",
    "register", "resolve", "state_dict_from_hf", "state_dict_from_params", "state_dict_from_tf", "stream_text",
    "text_to_token_ids", "token_ids_to_text",
    "book_state_dict",
]
