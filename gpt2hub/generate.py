"""Text generation: the book's `generate` semantics with top-p, batches, per-row stops and a preallocated KV cache.

Any model that maps token ids [batch, tokens] to logits [batch, tokens, vocab] works (the book's own GPTModel, a
torch.compile'd one, a wrapper); gpt2hub's GPTModel gets the KV cache, the others the book's loop.
"""

from __future__ import annotations

import codecs
import contextlib
import inspect
import itertools
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass
from typing import Any, Literal, TypeGuard, overload

import torch
import torch.nn as nn

from . import native_step
from .errors import quoted
from .model import GPTModel, KVCache

log = logging.getLogger("gpt2hub")
DECODES = ("auto", "eager", "static", "cuda_graph")
FIRST_ROOM = 256  # new-token columns allocated up front; the buffer doubles when they are used up


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]; temperature 0 is greedy, top_k 0 is off.

    Any temperature > 0 and top_p > 0 work, however small. The book's arithmetic (softmax of logits / temperature in
    float32) is kept, and with it the book's seeded samples; a row where that division overflows (NaN) is computed
    instead from each logit's distance to the row's largest, in float64, which a tiny temperature turns into the
    argmax (ties shared). top_p always keeps the most likely token.
    """
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature <= 0.0:
        return logits.float().argmax(dim=-1)  # (the same ids; bfloat16's argmax is 4x slower on CPU)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    overflow = probs.sum(dim=-1, keepdim=True).isnan()  # a NaN anywhere in a row (one reduction, no mask of it all)
    if probs.device.type != "cpu" or bool(overflow.any()):  # on an accelerator both are made: no wait for the device
        gaps = logits.double() - logits.double().amax(dim=-1, keepdim=True)  # <= 0, and 0 at the largest
        probs = torch.where(overflow, torch.softmax(gaps / temperature, dim=-1).float(), probs)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the most likely token, even where a tiny top_p
        # compares as 0 in float32)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[:, 0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_tokens(ids: torch.Tensor, vocab: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, vocab] bool: which token ids occur in each row of `ids` (only where `real` is True, if given)."""
    if real is not None:
        ids = ids.masked_fill(~real, vocab)  # padding lands in an extra column, dropped below
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: logits of `seen` ids are divided by `penalty` (multiplied where negative).

    Results stay finite (an extreme penalty saturates at the dtype's largest value), so sampling never meets inf.
    """
    big = torch.finfo(logits.dtype).max
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty).clamp(-big, big), logits)


def suppress(logits: torch.Tensor, token: int) -> torch.Tensor:
    """`logits` with `token` made impossible (-inf); unchanged if the vocabulary has no such token."""
    if token >= logits.shape[-1]:
        return logits
    out = logits.clone()
    out[:, token] = float("-inf")
    return out


# -- arguments: every public function checks them here ------------------------------------------------------------------
MAX_ID = (1 << 63) - 1  # token ids are int64
HF_POINTERS = {  # transformers' generation keywords that gpt2hub does not take, with what to do instead
    "eos_token_id": "use eos_id",
    "pad_token_id": "leave it out: finished rows are padded with eos_id",
    "min_length": "use min_new_tokens (it counts new tokens only)",
    "early_stopping": "leave it out: it is for beam search, which gpt2hub does not have",
    "num_beam_groups": "leave it out: gpt2hub has no beam search",
    "no_repeat_ngram_size": "use repetition_penalty",
    "penalty_alpha": "leave it out: gpt2hub has no contrastive search",
    "streamer": "use stream_text (or generate_stream for token ids)",
    "output_scores": "leave it out: gpt2hub returns text or token ids",
    "return_dict_in_generate": "leave it out: gpt2hub returns text or token ids",
    "max_time": "read stream_text and stop when time is up",
}


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GenerationConfig:
    """The options of `generate`, `generate_stream`, `generate_text` and `stream_text`, checked once on creation.

    Each bad value is a ValueError naming the argument, the value and what is accepted. `top_k=0` and `top_p=1.0`
    mean off (stored as None); `stop` becomes a tuple of strings.

    transformers' generation keywords are understood where gpt2hub has the feature: `do_sample` (False: greedy, that
    is temperature 0; True: sampling, at temperature 1 unless one is given), `max_length` (prompt plus new tokens,
    the prompt counted with its padding, as in transformers; in place of max_new_tokens), `min_new_tokens` (eos_id
    cannot come before that many new tokens) and `num_beams` (1 only: there is no beam search).
    """

    max_new_tokens: int | None = None
    context_size: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    generator: torch.Generator | None = None
    use_cache: bool = True
    decode: str = "auto"
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    stop: str | Sequence[str] | None = None
    min_new_tokens: int = 0
    max_length: int | None = None
    do_sample: InitVar[bool | None] = None
    num_beams: InitVar[int] = 1

    def __post_init__(self, do_sample: bool | None, num_beams: int) -> None:
        for name, value, ok, accepted in _rules(self, do_sample, num_beams):
            if not ok:
                raise ValueError(f"{name} must be {accepted}, got {quoted(value)}")
        if num_beams > 1:
            raise ValueError(f"num_beams={num_beams} asks for beam search, which gpt2hub does not have: decode greedily "
                             "(temperature 0, the default) or sample (do_sample=True or a temperature > 0), with "
                             "num_return_sequences for several texts")
        if self.max_new_tokens is not None and self.max_length is not None:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and max_length={self.max_length} were both given: "
                             "give one (max_length counts the prompt, max_new_tokens only the new tokens)")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is not None and (not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"stop must be None, a non-empty str or a list of them, got {quoted(self.stop)}")
        self.stop = tuple(stop or ())
        self.top_k = self.top_k or None
        self.top_p = None if self.top_p == 1 else self.top_p
        if do_sample is False and self.temperature > 0:
            log.warning("do_sample=False decodes greedily: temperature=%g is not used", self.temperature)
        if do_sample is not None:
            self.temperature = (self.temperature or 1.0) if do_sample else 0.0
        if self.num_return_sequences > 1 and (self.temperature == 0 or self.top_k == 1):
            log.warning("num_return_sequences=%d with greedy decoding (temperature 0%s) makes %d identical copies of "
                        "each row: sample (a temperature > 0, or do_sample=True) for different ones",
                        self.num_return_sequences, "" if self.temperature == 0 else ", or top_k 1",
                        self.num_return_sequences)

    @property
    def new_tokens(self) -> int:
        """max_new_tokens, once settled: given, or made from max_length by `fit`."""
        if self.max_new_tokens is None:
            raise ValueError("max_length becomes a number of new tokens only against a prompt (GenerationConfig.fit)")
        return self.max_new_tokens

    def fit(self, batch: int, width: int, target: _Target) -> None:
        """Settle what depends on the prompt [batch, width] and the model: max_length as a number of new tokens,
        eos_id inside the vocabulary, and as many rows and tokens as the device's memory can hold."""
        if self.max_length is not None:
            if self.max_length <= width:
                raise ValueError(f"max_length={self.max_length} leaves no room after the prompt's {width} tokens: it "
                                 "counts the prompt, as in transformers (max_new_tokens counts only new tokens)")
            self.max_new_tokens, self.max_length = self.max_length - width, None
        if self.eos_id is not None and target.vocab is not None and self.eos_id >= target.vocab:
            raise ValueError(f"eos_id must be a token id of the model's vocabulary, below {target.vocab}, got "
                             f"{quoted(self.eos_id)}")
        _check_memory(self, batch, width, target)

    def prompt(self, idx: torch.Tensor, attention_mask: Any) -> _Prompt:
        """`idx` (checked by `_checked_ids`) with its left padding, rows repeated num_return_sequences times."""
        idx, pad = idx.long(), _left_padding(idx, attention_mask)  # embeddings take int64 (the book's cat makes it so)
        n = self.num_return_sequences
        if n > 1:
            idx, pad = idx.repeat_interleave(n, dim=0), None if pad is None else pad.repeat_interleave(n)
        return _Prompt(idx, pad)


def _rules(v: GenerationConfig, do_sample: Any, num_beams: Any) -> list[tuple[str, Any, bool, str]]:
    """(argument, value, whether it is acceptable, what is) for each argument of a GenerationConfig."""
    return [
        ("max_new_tokens", v.max_new_tokens, _is_int(v.max_new_tokens) and v.max_new_tokens >= 0
         or v.max_new_tokens is None and v.max_length is not None, "an int >= 0 (or max_length given instead)"),
        ("context_size", v.context_size, v.context_size is None or _is_int(v.context_size) and v.context_size > 0,
         "None or an int >= 1"),
        ("temperature", v.temperature, _is_real(v.temperature) and v.temperature >= 0, "a finite number >= 0"),
        ("top_k", v.top_k, v.top_k is None or _is_int(v.top_k) and v.top_k >= 0, "None or an int >= 0 (0: off)"),
        ("top_p", v.top_p, v.top_p is None or _is_real(v.top_p) and 0 < v.top_p <= 1,
         "None or a number in (0, 1] (1: off)"),
        ("eos_id", v.eos_id, v.eos_id is None or _is_int(v.eos_id) and 0 <= v.eos_id <= MAX_ID,
         "None or a token id from 0 to 2**63-1"),
        ("generator", v.generator, v.generator is None or isinstance(v.generator, torch.Generator),
         "None or a torch.Generator"),
        ("use_cache", v.use_cache, isinstance(v.use_cache, bool), "True or False"),
        ("decode", v.decode, v.decode in DECODES, f"one of {DECODES}"),
        ("repetition_penalty", v.repetition_penalty, _is_real(v.repetition_penalty) and v.repetition_penalty > 0,
         "a finite number > 0 (1: off)"),
        ("num_return_sequences", v.num_return_sequences, _is_int(v.num_return_sequences)
         and v.num_return_sequences >= 1, "an int >= 1"),
        ("min_new_tokens", v.min_new_tokens, _is_int(v.min_new_tokens) and v.min_new_tokens >= 0, "an int >= 0"),
        ("max_length", v.max_length, v.max_length is None or _is_int(v.max_length) and v.max_length >= 1,
         "None or an int >= 1 (prompt and new tokens)"),
        ("do_sample", do_sample, do_sample is None or isinstance(do_sample, bool), "None, True or False"),
        ("num_beams", num_beams, _is_int(num_beams) and num_beams >= 1, "1 (an int >= 1)"),
    ]


def _memory(device: torch.device) -> int | None:
    """Bytes of memory `device` has in all (a CUDA device's own, else this machine's); None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type in ("cpu", "mps") and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def _check_memory(cfg: GenerationConfig, batch: int, width: int, target: _Target) -> None:
    """Refuse rows or tokens that the least they need (each row's logits and KV cache; every token id of the result)
    would not fit in the device's memory, rather than start and fail after minutes (or allocate hundreds of GB)."""
    device, n, new = target.device, cfg.num_return_sequences, cfg.new_tokens
    if (have := _memory(device)) is None:
        return
    rows, itemsize = batch * n, target.itemsize
    per_row = (target.vocab or 0) * itemsize  # one step's logits
    if target.native and cfg.use_cache and isinstance(config := getattr(target.model, "cfg", None), dict):
        per_row += 2 * config["n_layers"] * min(target.ctx, width + new) * config["emb_dim"] * itemsize
    if rows * per_row > have:
        what = f"num_return_sequences={quoted(n)} makes" if n > 1 else "the prompt has"
        raise ValueError(f"{what} {rows:,} rows, whose logits and KV cache alone need {_gib(rows * per_row)}, more "
                         f"than the {_gib(have)} of memory of {device}: at most {have // per_row:,} rows fit")
    if rows * 8 * (width + new) > have:
        raise ValueError(f"max_new_tokens={quoted(new)} is more than memory can hold: {rows:,} row(s) of "
                         f"{width + new:,} token ids need {_gib(rows * 8 * (width + new))}, more than the {_gib(have)} "
                         f"of memory of {device}: at most {max(0, have // (8 * rows) - width):,} new tokens fit")


def _checked_ids(idx: Any, vocab: int | None) -> torch.Tensor:
    """`idx` if it is a 2-D integer tensor of token ids in [0, vocab), else a ValueError saying what it is."""
    if (not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.numel() == 0 or idx.dtype == torch.bool
            or idx.dtype.is_floating_point or idx.dtype.is_complex):
        got = f"shape {tuple(idx.shape)}, {idx.dtype}" if isinstance(idx, torch.Tensor) else quoted(idx)
        raise ValueError(f"idx must be a 2-D integer tensor [batch, tokens] with at least one token, got {got}")
    low, high = (int(x) for x in torch.aminmax(idx))
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"idx must hold token ids in [0, {vocab if vocab is not None else 'vocab'}), "
                         f"got ids from {low} to {high}")
    return idx


def _left_padding(idx: torch.Tensor, attention_mask: Any) -> torch.Tensor | None:
    """Per row, how many leading tokens `attention_mask` marks as padding; None when there is none."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else repr(attention_mask)
        raise ValueError(f"attention_mask must be a tensor shaped like idx {tuple(idx.shape)}, got {got}")
    mask = attention_mask.to(idx.device)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (tokens), got values {mask.unique().tolist()}")
    mask = mask.bool()
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        row = int(((mask[:, 1:] < mask[:, :-1]).any(1) | ~mask[:, -1]).nonzero()[0, 0])
        raise ValueError(f"attention_mask must be left padding (0s, then at least one 1, per row), got row {row} = "
                         f"{mask[row].int().tolist()}")
    pad = (~mask).sum(dim=1)
    return pad if bool(pad.any()) else None


# -- the model: gpt2hub's GPTModel (KV cache) or any ids -> logits module (the book's loop) ---------------------------
@dataclass
class _Prompt:
    ids: torch.Tensor  # [batch, tokens]
    pad: torch.Tensor | None  # [batch] leading padding tokens, None when there is none

    def window(self, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and key mask [batch, width] of the columns start..: positions count from each row's first
        real token inside the window, as if the row had been cropped there alone."""
        cols = torch.arange(start, start + width, device=self.ids.device)
        pad = self.ids.new_zeros(self.ids.shape[0]) if self.pad is None else self.pad
        first = pad.clamp(min=start)[:, None]
        return (cols - first).clamp(min=0), cols >= pad[:, None]


@dataclass
class _Target:
    model: Callable[..., Any]
    ctx: int  # tokens each step reads at most
    vocab: int | None
    native: bool  # gpt2hub's GPTModel: forward takes a cache, positions and a key mask
    device: torch.device  # of its first parameter (CPU for a model without any)
    itemsize: int  # bytes per element of its first floating-point parameter (4 if none)


def _named_embedding(model: Any, name: str) -> nn.Embedding | None:
    """The nn.Embedding called `name` in `model` or a submodule (a wrapper's, torch.compile's `_orig_mod`)."""
    if not isinstance(model, nn.Module):
        return None
    return next((m for path, m in model.named_modules() if path.rsplit(".", 1)[-1] == name
                 and isinstance(m, nn.Embedding)), None)


def _positive(value: Any) -> int | None:
    return int(value) if _is_int(value) and value > 0 else None


def _target(model: Any, cfg: GenerationConfig) -> _Target:
    """How to run `model`: its context length and vocabulary, where known, from gpt2hub's and the book's
    `cfg["context_length"]` / `pos_emb`, transformers' `config.n_positions` / `max_position_embeddings`, or
    `context_size`."""
    config = getattr(model, "cfg", None)
    config = config if isinstance(config, dict) else {}
    hf = getattr(model, "config", None)  # a transformers model's PretrainedConfig
    limit = _positive(config.get("context_length")) or _positive(getattr(hf, "n_positions", None)) or _positive(
        getattr(hf, "max_position_embeddings", None))
    vocab = _positive(config.get("vocab_size")) or _positive(getattr(hf, "vocab_size", None))
    if limit is None and (emb := _named_embedding(model, "pos_emb")) is not None:
        limit = emb.num_embeddings
    if vocab is None and (emb := _named_embedding(model, "tok_emb")) is not None:
        vocab = emb.num_embeddings
    if limit is None and cfg.context_size is None:
        raise ValueError(f"context_size must be given for a {type(model).__name__}: it has no cfg['context_length'], "
                         "config.n_positions or pos_emb embedding to read the context length from")
    ctx = min(n for n in (cfg.context_size, limit) if n is not None)
    weight = next((t for t in model.parameters() if t.is_floating_point()), None) if isinstance(model, nn.Module) else None
    return _Target(model, ctx, vocab, isinstance(model, GPTModel), _device(model),
                   4 if weight is None else weight.element_size())


def _device(model: Any) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None) if isinstance(model, nn.Module) else None
    return torch.device("cpu") if first is None else first.device


def _logits(out: Any, idx: torch.Tensor) -> torch.Tensor:
    out = getattr(out, "logits", out)  # a transformers-style output object
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != idx.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must map ids {tuple(idx.shape)} to logits [batch, tokens, vocab], got {got}")
    return out


class _Tokens:
    """Token ids [batch, n] in a buffer that doubles when full: memory follows the tokens made, not max_new_tokens."""

    def __init__(self, ids: torch.Tensor, room: int):
        b, self.n = ids.shape
        self.buf = ids.new_empty(b, self.n + min(room, FIRST_ROOM))
        self.buf[:, :self.n] = ids

    def append(self, column: torch.Tensor) -> None:
        if self.n == self.buf.shape[1]:
            bigger = self.buf.new_empty(self.buf.shape[0], 2 * self.n)
            bigger[:, :self.n] = self.buf
            self.buf = bigger
        self.buf[:, self.n] = column
        self.n += 1

    def last(self, k: int) -> tuple[int, torch.Tensor]:
        """(first column, ids) of the last `k` tokens."""
        start = max(0, self.n - k)
        return start, self.buf[:, start:self.n]


class _Window:
    """The book's loop: each step re-reads the last `ctx` tokens in full."""

    def __init__(self, target: _Target, prompt: _Prompt):
        self.target, self.prompt = target, prompt

    def __call__(self, seq: _Tokens) -> torch.Tensor:
        start, x = seq.last(self.target.ctx)
        if not self.target.native:
            return _logits(self.target.model(x), x)[:, -1]
        if self.prompt.pad is None:
            return self.target.model(x, last_only=True)[:, -1]
        positions, keys = self.prompt.window(start, x.shape[1])
        return self.target.model(x, positions=positions, key_mask=keys, last_only=True)[:, -1]

    first = next = __call__


class _StaticDecoder:
    """One token per row per call at a given position, with static shapes; optionally replayed as a CUDA graph.

    The graph is captured before the prompt is read: its warm-up writes only position 0, which prefill overwrites.
    `padding`: the cache columns' position ids and key mask [batch, max_len] of a left-padded batch.
    """

    def __init__(self, model: GPTModel, cache: KVCache, batch: int, graph: bool,
                 padding: tuple[torch.Tensor, torch.Tensor] | None = None):
        device = cache.k.device
        self.model, self.cache, self.padding = model, cache, padding
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        if graph and device.type != "cuda":
            raise ValueError(f"decode='cuda_graph' needs a model on a CUDA device, not {device}")
        if graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph, as capture requires
                    self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    def _step(self) -> torch.Tensor:
        if self.padding is None:
            return self.model(self.tok, self.cache, self.pos)[:, -1]
        positions, keys = self.padding
        return self.model(self.tok, self.cache, self.pos, positions=positions.index_select(1, self.pos.view(1)),
                          key_mask=keys)[:, -1]

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


class _Cached:
    """gpt2hub's GPTModel with a KV cache: prefill, then one position per step; past the window, the book's loop."""

    def __init__(self, model: GPTModel, target: _Target, prompt: _Prompt, cfg: GenerationConfig):
        b, t = prompt.ids.shape
        self.model, self.window = model, _Window(target, prompt)
        param = model.tok_emb.weight
        decode = cfg.decode
        if decode == "auto":
            decode = "cuda_graph" if param.device.type == "cuda" else "eager"
        self.filled = min(t, target.ctx)  # tokens held in the cache
        # only as many positions as this call can fill: zeroing a 1024-position cache costs more than short prompts
        self.cache = KVCache(model.cfg, b, min(target.ctx, t + cfg.new_tokens), model.attention_dtype, param.device)
        self.padding = None if prompt.pad is None else prompt.window(t - self.filled, self.cache.max_len)
        self.decoder = None
        # batch-1 decoding on a CPU: the whole step in one call where gpt2hub/_native.c reads every part of the model,
        # planned at the first step (a call for one token never needs it)
        self.native: native_step.DecodeStep | None = None
        self.plan_native = decode == "eager" and b == 1 and prompt.pad is None and param.device.type == "cpu"
        if decode != "eager":
            try:
                self.decoder = _StaticDecoder(model, self.cache, b, decode == "cuda_graph", self.padding)
            except RuntimeError as e:  # a capture this PyTorch or driver refuses: same tokens, without the graph
                log.warning("CUDA graph capture failed (%s); decoding without it", e)
                self.decoder = _StaticDecoder(model, self.cache, b, False, self.padding)

    def _run(self, x: torch.Tensor, start: int, **kwargs: Any) -> torch.Tensor:
        if self.padding is None:
            return self.model(x, self.cache, start, **kwargs)[:, -1]
        positions, keys = self.padding
        return self.model(x, self.cache, start, positions=positions[:, start:start + x.shape[1]], key_mask=keys,
                          **kwargs)[:, -1]

    def first(self, seq: _Tokens) -> torch.Tensor:
        return self._run(seq.last(self.filled)[1], 0, last_only=True)

    def next(self, seq: _Tokens) -> torch.Tensor:
        if self.filled == self.cache.max_len:
            return self.window(seq)
        pos, x = self.filled, seq.buf[:, seq.n - 1:seq.n]
        self.filled += 1
        if self.plan_native:
            self.native, self.plan_native = native_step.plan(self.model, self.cache), False
        if self.native is not None:
            logits = self.native(int(x), pos)
            if logits is not None:
                return logits
        return self._run(x, pos) if self.decoder is None else self.decoder(x, pos)


@torch.inference_mode()
def _columns(target: _Target, prompt: _Prompt, cfg: GenerationConfig) -> Iterator[torch.Tensor]:
    """The generation loop: one new column of ids [batch] per step (see `generate_stream`)."""
    if cfg.new_tokens == 0:
        return
    ids = prompt.ids
    seq = _Tokens(ids, cfg.new_tokens)
    model = target.model  # native exactly when it is a GPTModel (see _target)
    steps = _Cached(model, target, prompt, cfg) if isinstance(model, GPTModel) and cfg.use_cache else _Window(target, prompt)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    logits = steps.first(seq)
    seen = None
    if cfg.repetition_penalty != 1:
        real = None if prompt.pad is None else prompt.window(0, ids.shape[1])[1]
        seen = seen_tokens(ids, logits.shape[-1], real)
    for step in range(cfg.new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, cfg.repetition_penalty)
        if step < cfg.min_new_tokens and cfg.eos_id is not None:
            logits = suppress(logits, cfg.eos_id)
        nxt = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.generator)
        if cfg.eos_id is not None:
            nxt = nxt.masked_fill(finished, cfg.eos_id)
            finished |= nxt == cfg.eos_id
            if bool(finished.all()):
                return
        seq.append(nxt)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        yield nxt
        if step + 1 == cfg.new_tokens:
            return
        logits = steps.next(seq)


def _start(model: Any, idx: Any, attention_mask: Any, cfg: GenerationConfig) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """Check everything now (not at the first step): the prompt rows as generated and the column iterator."""
    target = _target(model, cfg)
    idx = _checked_ids(idx, target.vocab)
    cfg.fit(idx.shape[0], idx.shape[1], target)
    prompt = cfg.prompt(idx, attention_mask)
    if prompt.pad is not None and not target.native:
        raise ValueError(f"prompts of different lengths (attention_mask with padding) need gpt2hub's GPTModel, "
                         f"not a {type(target.model).__name__}; generate each prompt alone")
    return prompt.ids, _columns(target, prompt, cfg)


# -- the public functions ------------------------------------------------------------------------------------------------
def generate_stream(model: Any, idx: torch.Tensor, max_new_tokens: int | None = None, context_size: int | None = None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True, decode: str = "auto", *, attention_mask: torch.Tensor | None = None,
                    repetition_penalty: float = 1.0, num_return_sequences: int = 1, min_new_tokens: int = 0,
                    max_length: int | None = None, do_sample: bool | None = None,
                    num_beams: int = 1) -> Iterator[torch.Tensor]:
    """Yield each new column of token ids [batch] as it is generated.

    `model` is gpt2hub's GPTModel (KV cache) or any module mapping ids [batch, tokens] to logits [batch, tokens,
    vocab], or to an object with `.logits` (the book's loop: crop to the context, full forward, last logits). The
    context length is `context_size`, capped by the model's (cfg["context_length"], a `pos_emb` embedding's size,
    or a transformers model's `config.n_positions`); a model with none of these needs it.

    `decode` picks how each cached step runs: "eager" (attention over the filled part of the cache), "static"
    (fixed shapes, the whole cache under a mask), "cuda_graph" (static, captured once and replayed) or "auto"
    (cuda_graph on CUDA, eager elsewhere). All give the same tokens.

    `attention_mask` [batch, tokens] (1: token, 0: left padding) lets prompts of different lengths share a batch:
    each row is generated as it would be alone (GPTModel only). `num_return_sequences` repeats each row (row i
    becomes rows i*n..i*n+n-1), each sampled on its own; `repetition_penalty` is transformers' (every id already in
    the row, prompt included, has its logit divided by it, or multiplied where negative); `top_k=0` and `top_p=1.0`
    are off. transformers' `do_sample`, `max_length`, `min_new_tokens` and `num_beams` (1) are understood (see
    GenerationConfig). Bad arguments raise ValueError at the call, naming the argument, as do more rows or tokens
    than the device's memory could hold.

    A row that produced `eos_id` is finished and gets `eos_id` from then on; the step at which every row has
    finished is not yielded (so with batch 1 the stop token is left out, as in the book). Prompts longer than
    the context are cropped to its last tokens; once the window is full, each step re-reads the last context's
    worth of tokens, exactly as without the cache.
    """
    cfg = GenerationConfig(max_new_tokens, context_size, temperature, top_k, top_p, eos_id, generator, use_cache,
                           decode, repetition_penalty, num_return_sequences, None, min_new_tokens, max_length,
                           do_sample, num_beams)
    return _start(model, idx, attention_mask, cfg)[1]


def generate(model: Any, idx: torch.Tensor, max_new_tokens: int | None = None, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, decode: str = "auto", *, attention_mask: torch.Tensor | None = None,
             repetition_penalty: float = 1.0, num_return_sequences: int = 1, min_new_tokens: int = 0,
             max_length: int | None = None, do_sample: bool | None = None, num_beams: int = 1) -> torch.Tensor:
    """The book's `generate`: `idx` [batch, tokens] with the new tokens appended (see `generate_stream`).

    With `num_return_sequences` n the result has batch * n rows (each prompt row repeated n times, in order);
    left padding stays in the result.
    """
    columns = generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, generator,
                              use_cache, decode, attention_mask=attention_mask, repetition_penalty=repetition_penalty,
                              num_return_sequences=num_return_sequences, min_new_tokens=min_new_tokens,
                              max_length=max_length, do_sample=do_sample, num_beams=num_beams)
    ids = idx.long().repeat_interleave(num_return_sequences, dim=0)  # the rows as generated (checked by now)
    new = list(columns)
    return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids


# -- text ----------------------------------------------------------------------------------------------------------------
class _TextRow:
    """One row's continuation as text: bytes in, whole characters out, cut before the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops, self.held, self.done = stops, "", False

    def feed(self, data: bytes, final: bool = False) -> str:
        """The text now certain to be output; a suffix that may begin a stop string is held back."""
        text = self.held + self.decoder.decode(data, final=final)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.done, self.held = True, ""
            return text[:cut]
        keep = 0 if final else max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        self.done = final
        return text[:len(text) - keep]


def _text_pieces(model: Any, tokenizer: Any, prompts: list[str], cfg: GenerationConfig) -> Iterator[tuple[int, str]]:
    """(row, text) pieces of each prompt's continuation, rows as `generate` orders them; ends when every row has.

    Everything is checked at the call; generation runs as the pieces are read."""
    encoded = [tokenizer.encode(p, allowed_special={"<|endoftext|>"}) for p in prompts]
    if not all(encoded):
        raise ValueError(f"prompt must encode to at least one token, got {quoted(prompts[encoded.index([])])}")
    width = max(len(e) for e in encoded)
    device = _device(model)
    idx = torch.tensor([[0] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    _, columns = _start(model, idx, mask, cfg)
    return _pieces(tokenizer, columns, [_TextRow(cfg.stop or ()) for _ in range(len(prompts) * cfg.num_return_sequences)],
                   cfg.eos_id)


def _pieces(tokenizer: Any, columns: Iterator[torch.Tensor], rows: list[_TextRow],
            eos_id: int | None) -> Iterator[tuple[int, str]]:
    for column in columns:
        for i, tok in enumerate(column.tolist()):
            if rows[i].done:
                continue
            eos = tok == eos_id
            piece = rows[i].feed(b"" if eos else tokenizer.decode_single_token_bytes(tok), final=eos)
            if piece:
                yield i, piece
        if all(row.done for row in rows):
            return
    for i, row in enumerate(rows):
        piece = "" if row.done else row.feed(b"", final=True)
        if piece:
            yield i, piece


_TEXT_OPTIONS = frozenset(inspect.signature(GenerationConfig).parameters) - {"max_new_tokens", "stop"}


def _text_config(function: str, tokenizer: Any, max_new_tokens: int | None, stop: str | Sequence[str] | None,
                 kwargs: dict[str, Any]) -> GenerationConfig:
    """The text functions' options: `generate`'s (an unknown keyword is a TypeError saying what to use instead), eos_id
    the tokenizer's end-of-text token unless given, 50 new tokens unless max_new_tokens or max_length is given."""
    if unknown := sorted(set(kwargs) - _TEXT_OPTIONS):
        hint = HF_POINTERS.get(unknown[0], "the options are " + ", ".join(sorted(_TEXT_OPTIONS | {"stop"})))
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}: {hint}")
    kwargs.setdefault("eos_id", tokenizer.eot_token)
    if max_new_tokens is None and kwargs.get("max_length") is None:
        max_new_tokens = 50
    return GenerationConfig(max_new_tokens=max_new_tokens, stop=stop, **kwargs)


def stream_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int | None = None, *,
                stop: str | Sequence[str] | None = None, **kwargs: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` as text, piece by piece (multi-byte characters are never split).

    Generation ends at the tokenizer's end-of-text token (`eos_id`, by default) or once the text contains one of
    the `stop` strings; nothing from the stop string on is yielded. `max_new_tokens` is 50 unless it or `max_length`
    is given; `kwargs` are `generate`'s, checked at the call.
    """
    cfg = _text_config("stream_text", tokenizer, max_new_tokens, stop, kwargs)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str (generate_text takes a list), got {type(prompt).__name__}")
    if cfg.num_return_sequences != 1:
        raise ValueError(f"num_return_sequences must be 1 in stream_text (use generate_text for more), "
                         f"got {quoted(cfg.num_return_sequences)}")
    return (piece for _, piece in _text_pieces(model, tokenizer, [prompt], cfg))


@overload
def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int | None = None, *,
                  stop: str | Sequence[str] | None = None, num_return_sequences: Literal[1] = 1,
                  **kwargs: Any) -> str: ...
@overload
def generate_text(model: Any, tokenizer: Any, prompt: list[str] | tuple[str, ...], max_new_tokens: int | None = None,
                  *, stop: str | Sequence[str] | None = None, num_return_sequences: int = 1,
                  **kwargs: Any) -> list[str]: ...
@overload
def generate_text(model: Any, tokenizer: Any, prompt: str | Sequence[str], max_new_tokens: int | None = None, *,
                  stop: str | Sequence[str] | None = None, num_return_sequences: int = 1,
                  **kwargs: Any) -> str | list[str]: ...
def generate_text(model: Any, tokenizer: Any, prompt: str | Sequence[str], max_new_tokens: int | None = None, *,
                  stop: str | Sequence[str] | None = None, num_return_sequences: int = 1,
                  **kwargs: Any) -> str | list[str]:
    """`prompt` followed by its generated continuation, cut before the first `stop` string (see `stream_text`).

    A list of prompts is generated as one left-padded batch, each as it would be alone, and gives a list; so does
    `num_return_sequences` n > 1 (n texts per prompt, in order). A single str otherwise gives a str (type checkers
    see `str` for a str prompt, `list[str]` for a list).
    """
    cfg = _text_config("generate_text", tokenizer, max_new_tokens, stop,
                       {**kwargs, "num_return_sequences": num_return_sequences})
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {quoted(prompt)}")
    pieces = _text_pieces(model, tokenizer, list(prompts), cfg)  # checks rows and tokens against memory first
    n = cfg.num_return_sequences
    parts: list[list[str]] = [[prompts[i // n]] for i in range(len(prompts) * n)]
    for i, piece in pieces:
        parts[i].append(piece)
    texts = ["".join(p) for p in parts]
    return texts[0] if isinstance(prompt, str) and n == 1 else texts
