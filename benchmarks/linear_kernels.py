"""Batch-1 float32 matrix-vector products of gpt2-small on CPU: F.linear (BLAS) against oneDNN, in both layouts.

The evidence behind gpt2hub.model.linear: one decoding step's matrices (12 blocks of c_attn, c_proj, c_fc, c_proj,
then the 50257-row head), each timed as a whole pass, median of --repeats, as GB/s of weights read.

    python benchmarks/linear_kernels.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2hub.bench import machine_info, machine_label, stats

D, LAYERS, VOCAB = 768, 12, 50257


def onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _passes(fn: Callable[..., torch.Tensor], layers: list[tuple[torch.Tensor, torch.Tensor | None]],
            xs: dict[int, torch.Tensor], repeats: int) -> list[float]:
    """Seconds per pass over every layer, after one warm-up pass."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for w, b in layers:
            fn(xs[w.shape[1]], w, b)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    shapes = {"layers": [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * LAYERS, "head": [(D, VOCAB)]}
    rows = []
    with torch.no_grad():
        for part, dims in shapes.items():
            in_out = [torch.randn(i, o, generator=g) for i, o in dims]  # OpenAI's layout
            biases = [torch.randn(o, generator=g) if part == "layers" else None for _, o in dims]
            layouts = {"in_out": [w.t() for w in in_out], "out_in": [w.t().contiguous() for w in in_out]}
            xs = {i: torch.randn(1, 1, i, generator=g) for i, _ in dims}
            nbytes = sum(w.numel() * 4 for w in in_out)
            for layout, weights in layouts.items():
                for kernel, fn in (("F.linear", F.linear), ("oneDNN", onednn)):
                    s = stats(_passes(fn, list(zip(weights, biases, strict=True)), xs, args.repeats))
                    rows.append({"part": part, "layout": layout, "kernel": kernel, "median_ms": s["median"] * 1e3,
                                 "min_ms": s["min"] * 1e3, "gb_per_s": nbytes / s["median"] / 1e9})
    info = machine_info()
    lines = [f"Batch-1 float32 matrix-vector products of gpt2-small, {machine_label(info)}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, median of {args.repeats}", "",
             "| part | layout | kernel | median | min | weights read |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['layout']} | {r['kernel']} | {r['median_ms']:.2f} ms | {r['min_ms']:.2f} ms | "
              f"{r['gb_per_s']:.1f} GB/s |" for r in rows]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "linear_kernels.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        (args.out / "linear_kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
