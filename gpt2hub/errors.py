"""Exception classes: each error a user can meet has its own, and its message names the file, URL or setting."""


class GPT2HubError(Exception):
    """Base class of every gpt2hub error."""


class UnknownModelError(GPT2HubError, ValueError):
    """A model name that is not in the registry."""


class CheckpointError(GPT2HubError):
    """A TensorFlow checkpoint that is corrupt, truncated or uses a feature we do not read.

    `file` is the file at fault (the index or a data file) where it is known: only that file is fetched again.
    """

    def __init__(self, message: str, file: object = None):
        super().__init__(message)
        self.file = file


class ConversionError(GPT2HubError):
    """Weights whose names or shapes do not fit the model."""


class CacheError(GPT2HubError):
    """The cache folder is unusable (unwritable, full, locked too long)."""


class LockTimeoutError(CacheError):
    """Another process held a model's lock for longer than the timeout."""


class DownloadError(GPT2HubError):
    """A file could not be fetched."""


class IntegrityError(DownloadError):
    """A file whose size or hash is not the one expected."""


class OfflineError(GPT2HubError):
    """Network access is needed but disabled, and the cache lacks files."""


class DeviceError(GPT2HubError):
    """A device that this machine or this PyTorch build does not have."""


class SettingError(GPT2HubError, ValueError):
    """An environment variable with a value gpt2hub does not accept (its message names the variable)."""


class NotACacheError(CacheError):
    """A folder that is not a gpt2hub cache, given where one is expected: nothing in it is touched."""


def quoted(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters, for quoting a bad input in a one-line message.

    An int too long for `repr` (Python refuses more than 4300 digits) is described by its size instead.
    """
    try:
        text = repr(value)
    except ValueError:
        bits = value.bit_length() if isinstance(value, int) else 0
        return f"<an int of {bits} bits>"
    return text if len(text) <= limit else f"{text[:limit - 3]}..."
