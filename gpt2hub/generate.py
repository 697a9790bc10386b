"""Text generation: the book's `generate` semantics with top-p, batches, per-row stops and a preallocated KV cache."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator

import torch

from .model import GPTModel, KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]; temperature 0 is greedy."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the most likely token)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


log = logging.getLogger("gpt2hub")
DECODES = ("auto", "eager", "static", "cuda_graph")


class _StaticDecoder:
    """One token per row per call at a given position, with static shapes; optionally replayed as a CUDA graph.

    The graph is captured before the prompt is read: its warm-up writes only position 0, which prefill overwrites.
    """

    def __init__(self, model: GPTModel, cache: KVCache, batch: int, graph: bool):
        device = cache.k.device
        self.model, self.cache = model, cache
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
        return self.model(self.tok, self.cache, self.pos)[:, -1]

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate_stream(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True, decode: str = "auto") -> Iterator[torch.Tensor]:
    """Yield each new column of token ids [batch] as it is generated.

    `decode` picks how each cached step runs: "eager" (attention over the filled part of the cache), "static"
    (fixed shapes, the whole cache under a mask), "cuda_graph" (static, captured once and replayed) or "auto"
    (cuda_graph on CUDA, eager elsewhere). All give the same tokens.

    A row that produced `eos_id` is finished and gets `eos_id` from then on; the step at which every row has
    finished is not yielded (so with batch 1 the stop token is left out, as in the book). Prompts longer than
    `context_size` are cropped to its last `context_size` tokens; once the window is full, each step re-reads the
    last `context_size` tokens, exactly as without the cache.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be [batch, tokens] with at least one token, got shape {tuple(idx.shape)}")
    limit = model.cfg["context_length"]
    ctx = min(context_size or limit, limit)
    b, t = idx.shape
    seq = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=idx.device)
    seq[:, :t] = idx
    finished = torch.zeros(b, dtype=torch.bool, device=idx.device)
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    param = model.tok_emb.weight
    if decode == "auto":
        decode = "cuda_graph" if param.device.type == "cuda" else "eager"
    cache = decoder = None
    if use_cache:
        # only as many positions as this call can fill: zeroing a 1024-position cache costs more than short prompts
        cache = KVCache(model.cfg, b, min(ctx, t + max_new_tokens), param.dtype, param.device)
        if decode != "eager":
            try:
                decoder = _StaticDecoder(model, cache, b, graph=decode == "cuda_graph")
            except RuntimeError as e:  # a capture this PyTorch or driver refuses: same tokens, without the graph
                log.warning("CUDA graph capture failed (%s); decoding without it", e)
                decoder = _StaticDecoder(model, cache, b, graph=False)
    pos = min(t, ctx)  # tokens held in the cache
    logits = model(seq[:, t - pos:t], cache, 0, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished |= nxt == eos_id
            if bool(finished.all()):
                return
        n = t + step
        seq[:, n] = nxt
        yield nxt
        if step + 1 == max_new_tokens:
            return
        if cache is not None and pos < cache.max_len:
            logits = model(seq[:, n:n + 1], cache, pos)[:, -1] if decoder is None else decoder(seq[:, n:n + 1], pos)
            pos += 1
        else:
            logits = model(seq[:, max(0, n + 1 - ctx):n + 1], last_only=True)[:, -1]


def generate(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, decode: str = "auto") -> torch.Tensor:
    """The book's `generate`: `idx` [batch, tokens] with the new tokens appended (see `generate_stream`)."""
    new = list(generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                               generator, use_cache, decode))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx.clone()


def stream_text(model: GPTModel, tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> Iterator[str]:
    """Yield the continuation of `prompt` as text, piece by piece (multi-byte characters are never split)."""
    device = model.tok_emb.weight.device
    idx = torch.tensor([tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})], device=device)
    kwargs.setdefault("eos_id", tokenizer.eot_token)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for column in generate_stream(model, idx, max_new_tokens, **kwargs):
        piece = decoder.decode(tokenizer.decode_single_token_bytes(int(column[0])))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def generate_text(model: GPTModel, tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> str:
    """`prompt` followed by its generated continuation."""
    return prompt + "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
