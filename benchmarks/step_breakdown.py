"""Where a batch-1 decoding step's time goes: its linear products, the rest, and what the model adds to the products.

For each precision of gpt2-small (random weights, built as decode_step.py builds them), in one process, alternating
--rounds times:

- "whole step": greedy decoding through the model's modules (`gpt2hub.native.STEP = False`), ms per token after the
  first (as decode_step.py times it);
- "without the linears' work": the same with every linear product (gpt2hub.model.linear and the quantized layers)
  replaced by a preallocated output of the right shape: the ops between the products and the Python around them;
- "products back to back": the 49 products of one decoding step (recorded with their inputs, packs and copies as
  the model made them) replayed one after the other, with nothing between them.

whole step - (without the linears' work) - (products back to back) is what running inside the model costs the
products beyond their own time. Beside them, "native_step": the same decoding in whole C steps (gpt2hub.native_step,
what generation runs), whose time over the products back to back is what the C step adds to them.

    python benchmarks/step_breakdown.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _report import describe, machine, save, table
from decode_step import _model

import gpt2hub.model as model_module
from gpt2hub import generate, native, quant


def _per_token(model: Any, idx: torch.Tensor, tokens: int) -> float:
    """ms per new token after the first (a call making one token timed just after, as decode_step.py does)."""
    t0 = time.perf_counter()
    generate(model, idx, tokens + 1)
    t1 = time.perf_counter()
    generate(model, idx, 1)
    t2 = time.perf_counter()
    return ((t1 - t0) - (t2 - t1)) / tokens * 1e3


def _swap(linear: Callable, quantized: Callable) -> tuple[Callable, Callable]:
    """Install these as the model's linear and the quantized layers' forward; return what was there."""
    before = (model_module.linear, quant.QuantLinear.forward)
    model_module.linear, quant.QuantLinear.forward = linear, quantized
    return before


def _stubs() -> tuple[Callable, Callable]:
    """A linear and a quantized forward that return a preallocated output of the right shape."""
    outs: dict[tuple, torch.Tensor] = {}

    def out(x: torch.Tensor, n: int) -> torch.Tensor:
        key = (x.shape, n, x.dtype)
        if key not in outs:
            outs[key] = torch.zeros(*x.shape[:-1], n, dtype=x.dtype)
        return outs[key]

    return (lambda x, w, b=None, sources=(): out(x, w.shape[0])), (lambda self, x: out(x, self.out_features))


def _recorded_step(model: Any, idx: torch.Tensor) -> Callable[[], None]:
    """The 49 products of one decoding step, recorded with their inputs, as a function that replays them."""
    calls: list[Callable[[], object]] = []
    linear, forward = model_module.linear, quant.QuantLinear.forward

    def rec_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, sources: tuple = ()) -> torch.Tensor:
        x = x.clone()
        calls.append(lambda: linear(x, w, b, sources))
        return linear(x, w, b, sources)

    def rec_forward(self: quant.QuantLinear, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        calls.append(lambda: forward(self, x))
        return forward(self, x)

    before = _swap(rec_linear, rec_forward)
    try:
        generate(model, idx, 2)  # the prompt's products, then one decoding step's
    finally:
        _swap(*before)
    step = calls[-(4 * len(model.trf_blocks) + 1):]

    def replay() -> None:
        for call in step:
            call()

    return replay


def measure(precision: str, rounds: int, tokens: int) -> dict[str, Any]:
    model = _model("gpt2-small", precision).eval()
    idx = torch.randint(0, model.tok_emb.num_embeddings, (1, 16), generator=torch.Generator().manual_seed(0))
    # "step": the whole step; "rest": without the linears' work; "products": the 49 products back to back
    times: dict[str, list[float]] = {"step": [], "rest": [], "products": [], "native_step": []}
    native.STEP = False
    with torch.no_grad():
        generate(model, idx, 20)  # packs and copies made
        replay = _recorded_step(model, idx)
        stubs = _stubs()
        for _ in range(rounds):
            times["step"].append(_per_token(model, idx, tokens))
            before = _swap(*stubs)
            try:
                times["rest"].append(_per_token(model, idx, tokens))
            finally:
                _swap(*before)
            t0 = time.perf_counter()
            for _ in range(10):
                replay()
            times["products"].append((time.perf_counter() - t0) / 10 * 1e3)
            native.STEP = True
            times["native_step"].append(_per_token(model, idx, tokens))
            native.STEP = False
    native.STEP = True
    return {"precision": precision, **{k: statistics.median(v) for k, v in times.items()}, "runs_ms": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(p, args.rounds, args.new_tokens) for p in args.precisions]
    info = machine()
    lines = [f"Where a batch-1 decoding step of gpt2-small goes (random weights), {describe(info)}; ms per token, "
             f"medians of {args.rounds} alternating rounds of {args.new_tokens} tokens", ""]
    lines += table(["precision", "whole step (modules)", "without the linears' work", "products back to back",
                    "what the model adds to the products", "native_step", "native_step - products"],
                   [(r["precision"], f"{r['step']:.2f}", f"{r['rest']:.2f}", f"{r['products']:.2f}",
                     f"{r['step'] - r['rest'] - r['products']:.2f}", f"{r['native_step']:.2f}",
                     f"{r['native_step'] - r['products']:.2f}") for r in rows])
    save(lines, args.out, "step_breakdown", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
