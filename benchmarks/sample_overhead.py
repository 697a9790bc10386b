"""What safe sampling costs per decoding step on CPU: gpt2hub's sample_next against the book's arithmetic alone.

sample_next keeps the book's float32 softmax of logits / temperature and adds a check for rows where that division
overflowed (NaN), recomputed in float64 only then (on CPU; an accelerator computes both to avoid a device wait). The
competitor is the same function without the check: top-k, softmax, top-p, multinomial. Calls are interleaved (one
of each in turn, --repeats times) on GPT-2's vocabulary; the table gives min / median / max microseconds per call.

    python benchmarks/sample_overhead.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import describe, machine, save, table

from gpt2hub.bench import stats
from gpt2hub.generate import sample_next

VOCAB = 50257


def book_sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """sample_next as it was before the overflow check (gpt2hub 5112f20)."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, data = [], {"machine": machine(), "cases": [], "load_before": os.getloadavg()}
    for batch in (1, 8):
        for top_k, top_p in ((None, None), (50, 0.95)):
            logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch)) * 3
            g = torch.Generator().manual_seed(0)
            calls = {"book's arithmetic": functools.partial(book_sample, logits, 0.8, top_k, top_p, g),
                     "gpt2hub sample_next": functools.partial(sample_next, logits, 0.8, top_k, top_p, g)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    times[name].append(_time(call) * 1e6)
            for name, values in times.items():
                s = stats(values)
                rows.append((batch, f"{top_k}/{top_p}", name, f"{s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f}"))
                data["cases"].append({"batch": batch, "top_k": top_k, "top_p": top_p, "kernel": name, **s})
    data["load_after"] = os.getloadavg()
    load = " to ".join(f"{a[0]:.1f}" for a in (data["load_before"], data["load_after"]))
    lines = [f"# sample_next overhead ({describe(data['machine'])})", "",
             f"temperature 0.8, vocabulary {VOCAB}, {args.repeats} interleaved calls each; microseconds per call. "
             f"Load average (1 min) {load} on this machine's 2 cores: other work ran alongside.", "",
             *table(("batch", "top_k / top_p", "sampler", "min / median / max µs"), rows)]
    save(lines, args.out, "sample_overhead", data)


if __name__ == "__main__":
    main()
