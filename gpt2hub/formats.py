"""What published bytes are: OpenAI's TensorFlow checkpoint, Hugging Face's safetensors, or gpt2hub's own export.

A format knows its file list, what each file must be the moment it arrives (its structure: whether it is the file
that was *published* — sizes and pinned sha256 — is published.py's question), how to read the architecture, and how
to hand out the weights by OpenAI's variable names (views of the mapped file where it can). OpenAI's checkpoint can
also be checked, and converted, while its data file arrives (`stream_plan`): its index gives every variable's place
and crc32c.

Nothing here knows where the bytes came from (transports.py) or how the cache keeps them (cache.py, storage.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from . import names
from .config import ModelConfig
from .errors import CheckpointError, ConversionError, GPT2HubError, IntegrityError
from .registry import (
    DATA_FILE,
    HF_FILES,
    HF_TOKENIZER_FILES,
    HF_WEIGHTS,
    INDEX_FILE,
    OPENAI_FILES,
    OPENAI_TOKENIZER_FILES,
)
from .tf_checkpoint import TFCheckpoint, read_index
from .validate import (
    bad_file,
    check_checkpoint_file,
    check_index,
    check_protobuf,
    check_safetensors,
    check_vocab,
    read_json_file,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: listing and downloading need none of it
    import torch

    from .streaming import Piece

Getter = Callable[[str], Any]  # OpenAI variable name (without "model/") -> array or tensor
Paths = Mapping[str, Path]


class Format(abc.ABC):
    """One way GPT-2's files are laid out. Subclasses set the class attributes and implement `tensors`."""

    key: ClassVar[str]
    files: ClassVar[tuple[str, ...]]  # every file of a model in this format (what a download fetches)
    tokenizer_files: ClassVar[tuple[str, str]]  # (token -> id JSON, BPE merges)
    weights_file: ClassVar[str]
    config_file: ClassVar[str]

    def sizes(self, cfg: ModelConfig) -> dict[str, int]:
        """Exact byte sizes the architecture implies (OpenAI's data file)."""
        return {}

    def read_config(self, path: Path) -> ModelConfig:
        """The architecture in the config file at `path`; IntegrityError naming the file if it is not one."""
        try:
            return ModelConfig.from_hparams(read_json_file(path, self.config_file), self.config_file)
        except ConversionError as e:
            raise bad_file(self.config_file, str(e).removeprefix(self.config_file + ": ")) from None

    def check(self, name: str, path: Path, cfg: ModelConfig, paths: Paths, streamed: bool = False) -> dict:
        """Raise IntegrityError ("is not a valid NAME: why") unless `path` is a well-formed `name` of a model of
        architecture `cfg`; `paths` are the model's other files (the index, to check the data file's tensors), and
        `streamed` says every tensor was already checked while the file arrived. Returns what to add to the file's
        record (`{"tensors": "checked"}` once every tensor's own checksum passed)."""
        if name == self.config_file:
            found = self.read_config(path)
            if found != cfg:
                raise bad_file(name, f"it describes {found.hparams()}, not {cfg.hparams()}")
        elif name in self.tokenizer_files:
            check_vocab(name, path)
        return {}

    @abc.abstractmethod
    def tensors(self, paths: Paths, cfg: ModelConfig, verify: bool) -> Getter:
        """A getter of the weights by OpenAI's variable names (each tensor's checksum checked as read, if `verify`)."""

    def check_tensors(self, paths: Paths, cfg: ModelConfig, progress: Callable[[], Any] | None = None) -> dict:
        """Check every tensor against its own checksum where the format has one; returns the record fields to keep."""
        return {}

    def stream_plan(self, paths: Paths, cfg: ModelConfig) -> list[Piece] | None:
        """The variables of the weights file in file order, when it can be checked while it arrives."""
        return None

    def head(self, paths: Paths, cfg: ModelConfig) -> torch.Tensor | None:
        """An output head of its own (not tied to the embedding), if the files hold one."""
        return None

    def check_folder(self, paths: Paths) -> ModelConfig:
        """A local folder's config, with every weights file checked against it in place (nothing is fetched); an
        IntegrityError names the folder and the config file the weights were checked against."""
        folder = paths[self.config_file].parent
        try:
            cfg = self.read_config(paths[self.config_file])
            for name in self.files:
                if name in paths and name not in self.tokenizer_files and name != self.config_file:
                    self.check(name, paths[name], cfg, paths, streamed=True)
        except IntegrityError as e:
            raise IntegrityError(f"{folder}: {e} (checked against {self.config_file})") from None
        return cfg


class TFCheckpointFormat(Format):
    """OpenAI's seven published files: a TensorFlow checkpoint (index + one data file) with hparams and vocabulary."""

    key = "openai"
    files = OPENAI_FILES
    tokenizer_files = OPENAI_TOKENIZER_FILES
    weights_file = DATA_FILE
    config_file = "hparams.json"

    def sizes(self, cfg: ModelConfig) -> dict[str, int]:
        return {DATA_FILE: 4 * cfg.n_params}  # float32 tensors back to back

    def check(self, name: str, path: Path, cfg: ModelConfig, paths: Paths, streamed: bool = False) -> dict:
        if name == "checkpoint":
            check_checkpoint_file(path)
        elif name == INDEX_FILE:
            data = paths.get(DATA_FILE)
            check_index(path, cfg.book(), data.stat().st_size if data is not None and data.exists()
                        else self.sizes(cfg)[DATA_FILE])
        elif name == "model.ckpt.meta":
            check_protobuf(path, name)
        elif name == DATA_FILE:
            if streamed:
                return {"tensors": "checked"}
            if INDEX_FILE in paths and paths[INDEX_FILE].exists():
                try:
                    return self.check_tensors({**paths, DATA_FILE: path}, cfg)
                except (CheckpointError, ConversionError) as e:
                    raise bad_file(name, str(e).replace(f"{path}: ", "").replace(str(path), "the file")) from None
            return {}
        return super().check(name, path, cfg, paths, streamed)

    def tensors(self, paths: Paths, cfg: ModelConfig, verify: bool) -> Getter:
        ckpt = _Checkpoint(paths[INDEX_FILE], paths[DATA_FILE])

        def get(name: str) -> Any:
            if f"model/{name}" not in ckpt.entries:
                raise KeyError(name)
            return ckpt.read(f"model/{name}", verify)

        return get

    def check_tensors(self, paths: Paths, cfg: ModelConfig, progress: Callable[[], Any] | None = None) -> dict:
        """Read every variable, checking its crc32c (CheckpointError names the file at fault)."""
        get = self.tensors(paths, cfg, verify=True)
        for name in names.openai_names(cfg.n_layers):
            get(name)
            if progress is not None:
                progress()
        return {"tensors": "checked"}

    def stream_plan(self, paths: Paths, cfg: ModelConfig) -> list[Piece] | None:
        from .streaming import plan

        try:
            entries, shards = read_index(paths[INDEX_FILE])
        except (GPT2HubError, OSError, ValueError):  # the arrival check says what is wrong with it
            return None
        return plan(entries, cfg.book()) if shards == 1 else None


class _Checkpoint(TFCheckpoint):
    """OpenAI's checkpoint read from its index and a data file of any name (one arriving under a temporary name;
    never a prefix read from disk)."""

    def __init__(self, index: Path, data: Path):
        super().__init__(index)
        self.data = data

    def data_path(self, shard: int) -> Path:
        return self.data


class HFSafetensorsFormat(Format):
    """`openai-community/gpt2*` on the Hugging Face Hub: config.json, model.safetensors, vocab.json, merges.txt."""

    key = "hf"
    files = HF_FILES
    tokenizer_files = HF_TOKENIZER_FILES
    weights_file = HF_WEIGHTS
    config_file = "config.json"

    def check(self, name: str, path: Path, cfg: ModelConfig, paths: Paths, streamed: bool = False) -> dict:
        if name == HF_WEIGHTS:
            check_safetensors(path, cfg.book())
            return {}
        return super().check(name, path, cfg, paths, streamed)

    def tensors(self, paths: Paths, cfg: ModelConfig, verify: bool) -> Getter:
        return hf_getter(paths[HF_WEIGHTS])

    def head(self, paths: Paths, cfg: ModelConfig) -> torch.Tensor | None:
        """lm_head.weight when config.json sets tie_word_embeddings false (transformers and gpt2hub's export write a
        head of its own that way); ConversionError if the weights then lack it or hold it in the wrong shape."""
        config, weights = paths[self.config_file], paths[HF_WEIGHTS]
        if read_json_file(config, config.name).get("tie_word_embeddings", True) is not False:
            return None
        from .safetensors_file import load_safetensors

        head = load_safetensors(weights).get(names.HF_HEAD)
        want = (cfg.vocab_size, cfg.emb_dim)
        if head is None or tuple(head.shape) != want:
            raise ConversionError(f"{config} sets tie_word_embeddings false, but {weights} holds no {names.HF_HEAD} of "
                                  f"shape {list(want)} (found {None if head is None else list(head.shape)}): "
                                  "add the head, or set tie_word_embeddings true")
        return head


def hf_getter(path: Path) -> Getter:
    """OpenAI variable name -> tensor of a Hugging Face model.safetensors (mapped, not read)."""
    import safetensors.torch

    by_name = {}
    for key, value in safetensors.torch.load_file(str(path)).items():
        try:
            name = names.openai_name(key)
        except KeyError:
            raise ConversionError(f"{path} holds {key[:80]!r}, which is not a GPT-2 tensor") from None
        if name is not None:
            by_name[name] = value
    return by_name.__getitem__


class OwnFormat(Format):
    """gpt2hub's own export (`export --format safetensors`): GPTModel's state_dict and its config, in a folder."""

    key = "gpt2hub"
    files = ("gpt2hub.json", "gpt2hub.safetensors", *OPENAI_TOKENIZER_FILES)
    tokenizer_files = OPENAI_TOKENIZER_FILES
    weights_file = "gpt2hub.safetensors"
    config_file = "gpt2hub.json"

    def check(self, name: str, path: Path, cfg: ModelConfig, paths: Paths, streamed: bool = False) -> dict:
        if name == self.weights_file:
            self._state_dict(path, cfg)
            return {}
        return super().check(name, path, cfg, paths, streamed)

    def _state_dict(self, path: Path, cfg: ModelConfig) -> dict:
        import safetensors

        from .safetensors_file import load_safetensors

        try:
            sd = load_safetensors(path)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise bad_file(self.weights_file, f"not a safetensors file ({str(e)[:80]})") from None
        want = {t for _, targets, _ in names.entries(cfg.n_layers) for t in targets}
        missing = sorted(want - set(sd))[:3]
        if missing:
            raise bad_file(self.weights_file, f"it lacks {missing} for n_layer={cfg.n_layers}")
        return sd

    def tensors(self, paths: Paths, cfg: ModelConfig, verify: bool) -> Getter:
        from .convert import openai_variables

        return openai_variables(self._state_dict(paths[self.weights_file], cfg), cfg.book()).__getitem__

    def head(self, paths: Paths, cfg: ModelConfig) -> torch.Tensor | None:
        return self._state_dict(paths[self.weights_file], cfg).get("out_head.weight")


FORMATS: dict[str, Format] = {f.key: f for f in (TFCheckpointFormat(), HFSafetensorsFormat(), OwnFormat())}


def for_folder(folder: Path) -> Format | None:
    """The format of a local folder's files, by its config file: hparams.json, gpt2hub.json, then config.json."""
    for key in ("openai", "gpt2hub", "hf"):
        if (folder / FORMATS[key].config_file).exists():
            return FORMATS[key]
    return None
