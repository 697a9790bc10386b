"""Model names, aliases, architectures, published file lists and the hashes we know."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from .config import ModelConfig
from .errors import UnknownModelError

DATA_FILE = "model.ckpt.data-00000-of-00001"
INDEX_FILE = "model.ckpt.index"
HF_WEIGHTS = "model.safetensors"
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
OPENAI_TOKENIZER_FILES = ("encoder.json", "vocab.bpe")
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt")

SOURCES = ("openai", "hf")
SOURCE_FILES = {"openai": OPENAI_FILES, "hf": HF_FILES}  # every file a source may put in the cache


@dataclass(frozen=True)
class DType:
    """One way gpt2hub can hold a model's weights: the name users pass (`dtype=`), its other spellings, the storage
    that keeps it in the cache (storage.py registers one class per storage name) and the torch dtype of its
    floating-point tensors."""

    name: str
    storage: str  # "mapped": the published float32 file itself; "converted": a 16-bit copy; "quantized": int8/int4
    tensors: str  # the torch dtype (by name) of the model's floating-point tensors
    aliases: tuple[str, ...] = ()
    exportable: bool = True  # whether `export` / `save_pretrained` write it


# The one dtype table: every spelling, the CLI's choices, the manifests' storage kinds and the export dtypes come
# from it (no other module lists dtype names).
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", "mapped", "float32", ("fp32", "float")),
    DType("bfloat16", "converted", "bfloat16", ("bf16",)),
    DType("float16", "converted", "float16", ("fp16", "half")),
    # weights quantized by gpt2hub.quant (its tensors are bfloat16 around the int8/int4 codes); transformers has no
    # reader for them, so they are not exported
    DType("int8", "quantized", "bfloat16", ("q8",), exportable=False),
    DType("int4", "quantized", "bfloat16", ("q4",), exportable=False),
)}
DTYPE_NAMES = {alias: d.name for d in DTYPES.values() for alias in (d.name, *d.aliases)}  # spelling -> name
MAPPED_DTYPES = tuple(n for n, d in DTYPES.items() if d.storage == "mapped")


def dtype_choices(exportable: bool = False) -> list[str]:
    """The canonical dtype names (those `export` writes, with `exportable`): what the CLI offers."""
    return [n for n, d in DTYPES.items() if d.exportable or not exportable]

# tiktoken pins these (tiktoken_ext/openai_public.py); every size ships the same two files.
TOKENIZER_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
TOKENIZER_SIZES = {"encoder.json": 1042301, "vocab.bpe": 456318}


@dataclass(frozen=True)
class ModelSpec:
    """One GPT-2 size: its names, architecture and what we know of its published files."""

    name: str  # canonical name, e.g. "gpt2-small"
    size: str  # OpenAI's folder name, e.g. "124M"
    hf_repo: str  # e.g. "openai-community/gpt2"
    emb_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int = 50257
    context_length: int = 1024
    # known sha256 of published files, per source; a file not named here is checked by size and crc32c alone
    sha256: dict[str, dict[str, str]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def book_key(self) -> str:
        return f"{self.name} ({self.size})"

    @property
    def arch(self) -> ModelConfig:
        """The architecture, as `config.ModelConfig`."""
        return ModelConfig(self.vocab_size, self.context_length, self.emb_dim, self.n_heads, self.n_layers)

    @property
    def n_params(self) -> int:
        """Parameters in OpenAI's checkpoint (wte counted once: the output head is tied)."""
        return self.arch.n_params

    def config(self, drop_rate: float = 0.0) -> dict:
        """The book's config dict (GPT_CONFIG_124M with this size's dimensions)."""
        return self.arch.book(drop_rate)

    def hparams(self) -> dict:
        """The content of OpenAI's hparams.json for this size."""
        return self.arch.hparams()

    def pinned_sizes(self, source: str) -> dict[str, int]:
        """Byte sizes that come with a pin (the vocabulary files'): part of the published-file check."""
        return {n: TOKENIZER_SIZES[n] for n in self.sha256.get(source, {}) if n in TOKENIZER_SIZES}

    def expected_sha256(self, source: str, revision: str | None = None) -> dict[str, str]:
        """Pinned sha256 of this source's files; Hugging Face pins hold for the default revision only."""
        if source == "hf" and revision not in (None, "main"):
            return {}
        return self.sha256.get(source, {})


_SPECS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def register(spec: ModelSpec, *aliases: str) -> ModelSpec:
    """Make a spec resolvable by its name, its size, its book key, its HF repo and any extra aliases."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.size):
        raise ValueError(f"model size {spec.size!r} must be a plain folder name (letters, digits, . _ -)")
    repo_tail = spec.hf_repo.split("/")[-1]
    keys = {_norm(a) for a in (spec.name, spec.size, spec.book_key, spec.hf_repo, repo_tail, *aliases)}
    taken = sorted(k for k in keys if _ALIASES.get(k, spec.name) != spec.name)
    if taken:
        raise ValueError(f"cannot register {spec.name}: {', '.join(taken)} already name another model")
    _SPECS[spec.name] = spec
    for key in keys:
        _ALIASES[key] = spec.name
    return spec


_OPENAI = {"openai": TOKENIZER_SHA256}
# OpenAI's 124M files: two public sources agree on the data file; `checkpoint` (77 bytes naming model.ckpt) and
# `hparams.json` (90 bytes, pretty-printed with a trailing newline) are reproducible from their known content.
_OPENAI_124M = {**TOKENIZER_SHA256,
                "checkpoint": "dd1b025d2e155283f5e300ce95bf6d5b6bc0f7fe010db73daa6975eb896ab9cb",
                "hparams.json": "d9d56e4121c427164e0c55c6f03c08e1daf9002b9b672825112d19097b680318",
                DATA_FILE: "2060c885360cc0cf41d7a6dbc4d24b5127aae20260c8b5ae521b5a6578407118",
                INDEX_FILE: "71916f763f9746f9b2a06b12d91996cf1084ae008d0424543d39391c5f2dc687",
                "model.ckpt.meta": "4668c448fa11531fd6700460487f73e82d3272960cea942252f8744bf225c77b"}
register(ModelSpec("gpt2-small", "124M", "openai-community/gpt2", 768, 12, 12, sha256={
    "openai": _OPENAI_124M, "hf": {"model.safetensors": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"}}),
    "gpt2-124M", "small")
register(ModelSpec("gpt2-medium", "355M", "openai-community/gpt2-medium", 1024, 24, 16, sha256=_OPENAI), "gpt2-355M", "medium")
register(ModelSpec("gpt2-large", "774M", "openai-community/gpt2-large", 1280, 36, 20, sha256=_OPENAI), "gpt2-774M", "large")
register(ModelSpec("gpt2-xl", "1558M", "openai-community/gpt2-xl", 1600, 48, 25, sha256=_OPENAI), "gpt2-1558M", "xl", "1.5B")


def dtype_name(dtype: object) -> str:
    """The canonical name (a key of DTYPES) of a dtype given by any spelling or as a torch.dtype; None is float32."""
    if dtype is None:
        return "float32"
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {str(dtype)[:40]!r}: use one of {', '.join(DTYPES)}")
    return DTYPE_NAMES[key]


def check_source(source: object) -> str:
    """`source` if it is one gpt2hub knows, else a ValueError naming the choices."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    return str(source)


def names() -> list[str]:
    """The canonical names of every registered model."""
    return list(_SPECS)


def _listing() -> str:
    return "; ".join(f"{s.name} = {s.size} = {s.book_key!r} = {s.hf_repo}" for s in _SPECS.values())


def resolve(name: str | ModelSpec) -> ModelSpec:
    """Turn anything a user may type ("gpt2-small", "124M", "gpt2-small (124M)", "openai-community/gpt2") into a spec."""
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, str):
        raise UnknownModelError(f"model name must be a string, got {type(name).__name__}")
    key = _norm(name)
    if key in _ALIASES:
        return _SPECS[_ALIASES[key]]
    close = difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.4)
    hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Valid names: {_listing()}"
    )


# The book's model_configs table, keyed as in the notebook.
model_configs = {
    spec.book_key: {"emb_dim": spec.emb_dim, "n_layers": spec.n_layers, "n_heads": spec.n_heads}
    for spec in _SPECS.values()
}
