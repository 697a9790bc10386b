"""Batch-1 matrix-vector products of gpt2-small on CPU: float32 and bfloat16 on F.linear and oneDNN, int8 and int4.

The evidence behind gpt2hub.kernels.linear: one decoding step's matrices (12 blocks of c_attn, c_proj, c_fc, c_proj,
then the 50257-row head), each timed as a whole pass, as GB/s of weights read. Every kernel's passes are interleaved
(one pass of each in turn, --repeats times), so that a machine shared with other work slows them all alike; the
table gives the median and the fastest pass.

Kernels: F.linear (BLAS for float32, oneDNN's matmul for bfloat16, which reorders the weight on every call); oneDNN
on the dense weight (`torch.ops.mkldnn._linear_pointwise`); oneDNN on a weight packed once
(`torch.ops.mkldnn._reorder_linear_weight`, in the layout for batch size 1 and in the one for any size); and
gpt2hub.kernels.linear, the packed kernel behind its per-call lookup of the pack; float32, bfloat16 ([out, in]) and
int8 also on gpt2hub.native's own one-row kernels (where they run). int8 and int4 (gpt2hub.quant's storage: int8 per
output channel, int4 per group of --groups inputs, bfloat16 activations): PyTorch's kernels called directly
(`torch.ops.aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) and through gpt2hub.quant's layers (bias
included, as in the model; for int4 the head's rows padded to 50304; one-row int8 products there run on
gpt2hub.native where it runs); "weights read" counts the codes and their scales.

    python benchmarks/linear_kernels.py --out benchmarks/results/cpu-xeon-amx-2core
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import describe, machine, save, table

from gpt2hub import kernels, native, quant
from gpt2hub.bench import stats

D, LAYERS, VOCAB = 768, 12, 50257
Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # input, weight, bias


def onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _pass(fn: Callable[..., torch.Tensor], layers: list[Layer]) -> float:
    """Seconds for one product with every layer."""
    t0 = time.perf_counter()
    for x, w, b in layers:
        fn(x, w, b)
    return time.perf_counter() - t0


def _cases(part: str, dims: list[tuple[int, int]], dtype: torch.dtype,
           g: torch.Generator) -> dict[tuple[str, str], tuple[Callable[..., torch.Tensor], list[Layer]]]:
    """(layout, kernel) -> (function, layers) for one part of the model in one dtype."""
    in_out = [torch.randn(i, o, generator=g).to(dtype) for i, o in dims]  # OpenAI's layout
    biases = [torch.randn(o, generator=g).to(dtype) if part == "layers" else None for _, o in dims]
    xs = {i: torch.randn(1, 1, i, generator=g).to(dtype) for i, _ in dims}
    layouts = {"in_out": [w.t() for w in in_out], "out_in": [w.t().contiguous() for w in in_out]}
    cases = {}
    for layout, weights in layouts.items():
        layers = [(xs[w.shape[1]], w, b) for w, b in zip(weights, biases, strict=True)]
        cases[(layout, "F.linear")] = (F.linear, layers)
        cases[(layout, "oneDNN")] = (onednn, layers)
        if native.AVAILABLE and (dtype == torch.float32 or (native.BF16 and layout == "out_in")):
            cases[(layout, "gpt2hub.native")] = (native.linear_row, layers)
    if dtype == torch.bfloat16 and kernels.PACKING:
        dense = cases[("out_in", "oneDNN")][1]
        for hint in (1, None):  # the layout oneDNN picks for batch size 1, and for no particular size (gpt2hub's)
            pack = functools.partial(torch.ops.mkldnn._reorder_linear_weight, batch_size=hint)
            cases[("packed", f"oneDNN packed, batch {hint or 'any'}")] = (onednn, [(x, pack(w), b) for x, w, b in dense])
        if kernels.NATIVE_BF16:
            for _ in range(2):  # the first use reads the dense weight, the second packs it
                _pass(kernels.linear, dense)
            cases[("packed", "gpt2hub.kernels.linear")] = (kernels.linear, dense)
    return cases


def _quantized(part: str, dims: list[tuple[int, int]], scheme: str, group: int,
               g: torch.Generator) -> tuple[dict[tuple[str, str], tuple[Callable[..., torch.Tensor], list[Layer]]], int]:
    """(layout, kernel) -> (function, layers) for one part of the model stored as gpt2hub.quant stores `scheme`, and
    the bytes a pass reads (codes and scales)."""
    layers, modules, nbytes = [], [], 0
    for i, o in dims:
        x = torch.randn(1, 1, i, generator=g).to(torch.bfloat16)
        bias = part == "layers"
        if scheme == "int8":
            m: quant.QuantLinear = quant.Int8Linear(i, o, bias)
            m.qweight = torch.randint(-127, 128, (o, i), generator=g, dtype=torch.int8)
            m.scale = (torch.rand(o, generator=g) / 1000).to(torch.bfloat16)
            args = (m.qweight, m.scale)
        else:
            m = quant.Int4Linear(i, o, bias, group)
            m.qweight = torch.randint(0, 256, m.qweight.shape, generator=g, dtype=torch.int32).to(torch.uint8)
            m.scale_zero = (torch.rand(m.scale_zero.shape, generator=g) / 1000).to(torch.bfloat16)
            args = (group, m.qweight, m.scale_zero)
        if bias:
            m.bias = torch.randn(o, generator=g).to(torch.bfloat16)
        layers.append((x.view(1, i), args, None))
        modules.append((x, m, None))
        nbytes += sum(t.numel() * t.element_size() for t in m.buffers() if t is not m.bias)
    if scheme == "int8":
        def op(x: torch.Tensor, args: tuple, b: None) -> torch.Tensor:
            return torch.ops.aten._weight_int8pack_mm(x, *args)
    else:
        def op(x: torch.Tensor, args: tuple, b: None) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, args[1], args[0], args[2])
    label = scheme if scheme == "int8" else f"int4, groups of {group}"
    cases = {(label, "aten kernel"): (op, layers), (label, "gpt2hub.quant layer"): (lambda x, m, b: m(x), modules)}
    if scheme == "int8" and native.AVAILABLE:
        cases[(label, "gpt2hub.native")] = (
            lambda x, m, b: native.int8_row(x, m.qweight, m.scale, m.bias, m.out_features), modules)
    return cases, nbytes


def measure(dtypes: list[torch.dtype | str], repeats: int, groups: tuple[int, ...] = (32,)) -> list[dict]:
    """One row per dtype, part, layout and kernel."""
    g = torch.Generator().manual_seed(0)
    shapes = {"layers": [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * LAYERS, "head": [(D, VOCAB)]}
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            for part, dims in shapes.items():
                if isinstance(dtype, str):
                    cases: dict = {}
                    for group in (groups if dtype == "int4" else (0,)):
                        more, nbytes = _quantized(part, dims, dtype, group, g)
                        cases.update({k: (*v, nbytes) for k, v in more.items()})
                else:
                    bits = torch.finfo(dtype).bits
                    cases = {k: (*v, sum(i * o for i, o in dims) * bits // 8)
                             for k, v in _cases(part, dims, dtype, g).items()}
                times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
                for i in range(repeats + 1):
                    for key, (fn, layers, _) in cases.items():
                        t = _pass(fn, layers)
                        if i:  # the first pass warms up
                            times[key].append(t)
                for (layout, kernel), ts in times.items():
                    s = stats(ts)
                    rows.append({"dtype": str(dtype).removeprefix("torch."), "part": part, "layout": layout,
                                 "kernel": kernel, "median_ms": s["median"] * 1e3, "min_ms": s["min"] * 1e3,
                                 "gb_per_s": cases[(layout, kernel)][2] / s["median"] / 1e9,
                                 "runs_ms": [t * 1e3 for t in ts]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--groups", nargs="+", type=int, default=[32], help="int4 group sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch's threads (default: torch's own choice)")
    parser.add_argument("--name", default="linear_kernels", help="the results' file name (without extension)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure([d if d.startswith("int") else getattr(torch, d) for d in args.dtype], args.repeats,
                   tuple(args.groups))
    info = machine()
    lines = [f"Batch-1 matrix-vector products of gpt2-small, {describe(info)}; passes interleaved, "
             f"median and fastest of {args.repeats}", ""]
    lines += table(["dtype", "part", "layout", "kernel", "median", "fastest", "weights read (median)"],
                   [(r["dtype"], r["part"], r["layout"], r["kernel"], f"{r['median_ms']:.2f} ms", f"{r['min_ms']:.2f} ms",
                     f"{r['gb_per_s']:.1f} GB/s") for r in rows])
    save(lines, args.out, args.name, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
