"""Would a hand-written AVX512 matrix-vector product read gpt2-small's weights faster than oneDNN? One core each.

The evidence behind not shipping a C kernel of gpt2hub's own: a plain AVX512 kernel (4 rows at a time, one
accumulator per row; bfloat16 through AVX512-BF16's dot product, float32 through FMA), compiled here with the
system's C compiler (`cc -O3 -march=native`) into a temporary folder and called through ctypes, against oneDNN
(`torch.ops.mkldnn._linear_pointwise`, bfloat16 on a packed weight) on the same [out, in] matrices: one pass over
the 49 matrices of a decoding step, median of --repeats, ONE thread each (the kernel has no threads of its own).
Results are checked against torch.mv in float32. Needs a C compiler and a CPU with AVX512-BF16.

    python benchmarks/handwritten_gemv.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import describe, machine, save, table

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#define ROWS4(T, LOAD, STEP, FMA)                                                                   \
    int64_t n = 0;                                                                                  \
    for (; n + 4 <= N; n += 4) {                                                                    \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
        const T *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                          \
        for (int64_t k = 0; k + STEP <= K; k += STEP) {                                             \
            a0 = FMA(a0, LOAD(w0 + k), LOAD(x + k)); a1 = FMA(a1, LOAD(w1 + k), LOAD(x + k));      \
            a2 = FMA(a2, LOAD(w2 + k), LOAD(x + k)); a3 = FMA(a3, LOAD(w3 + k), LOAD(x + k));      \
        }                                                                                           \
        y[n] = _mm512_reduce_add_ps(a0); y[n + 1] = _mm512_reduce_add_ps(a1);                       \
        y[n + 2] = _mm512_reduce_add_ps(a2); y[n + 3] = _mm512_reduce_add_ps(a3);                   \
    }
#define BF(p) ((__m512bh)_mm512_loadu_si512(p))
#define BFMA(a, w, x) _mm512_dpbf16_ps(a, w, x)
#define FFMA(a, w, x) _mm512_fmadd_ps(w, x, a)
/* N a multiple of 4, K of 32: gpt2-small's matrices are */
void bf16_gemv(const uint16_t *W, const uint16_t *x, float *y, int64_t N, int64_t K) { ROWS4(uint16_t, BF, 32, BFMA) }
void f32_gemv(const float *W, const float *x, float *y, int64_t N, int64_t K) { ROWS4(float, _mm512_loadu_ps, 16, FFMA) }
"""
D, LAYERS, VOCAB = 768, 12, 50257
SHAPES = [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)] * LAYERS + [(VOCAB - VOCAB % 4, D)]


def _library(folder: Path) -> ctypes.CDLL:
    (folder / "gemv.c").write_text(SOURCE)
    subprocess.run(["cc", "-O3", "-march=native", "-shared", "-fPIC", str(folder / "gemv.c"), "-o",
                    str(folder / "gemv.so")], check=True)
    return ctypes.CDLL(str(folder / "gemv.so"))


def _median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(lib: ctypes.CDLL, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype, kernel in ((torch.bfloat16, lib.bf16_gemv), (torch.float32, lib.f32_gemv)):
        ws = [(torch.randn(o, i, generator=g) * 0.02).to(dtype) for o, i in SHAPES]
        xs = {i: torch.randn(i, generator=g).to(dtype) for i in (D, 4 * D)}
        ys = [torch.empty(o) for o, _ in SHAPES]
        packs = [torch.ops.mkldnn._reorder_linear_weight(w) if dtype == torch.bfloat16 else w for w in ws]

        def ours(ws: list[torch.Tensor] = ws, xs: dict = xs, ys: list[torch.Tensor] = ys, kernel: Callable = kernel) -> None:
            for w, y in zip(ws, ys, strict=True):
                kernel(ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(xs[w.shape[1]].data_ptr()),
                       ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(w.shape[0]), ctypes.c_int64(w.shape[1]))

        def onednn(ws: list[torch.Tensor] = ws, xs: dict = xs, packs: list = packs) -> None:
            for w, p in zip(ws, packs, strict=True):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]][None], p, None, "none", [], "")

        ours()
        for w, y in zip(ws[:4], ys[:4], strict=True):
            torch.testing.assert_close(y, torch.mv(w.float(), xs[w.shape[1]].float()), rtol=1e-4, atol=1e-4)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        for name, fn in (("hand-written AVX512", ours), ("oneDNN", onednn)):
            t = _median(fn, repeats)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": name, "median_ms": t * 1e3,
                         "gb_per_s": nbytes / t / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(_library(Path(tmp)), args.repeats)
    info = machine()
    lines = [f"One pass over gpt2-small's 49 decoding matrices, batch 1, ONE thread; {describe(info)}; median of "
             f"{args.repeats}", ""]
    lines += table(["dtype", "kernel", "median", "weights read"],
                   [(r["dtype"], r["kernel"], f"{r['median_ms']:.2f} ms", f"{r['gb_per_s']:.1f} GB/s") for r in rows])
    save(lines, args.out, "handwritten_gemv", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
