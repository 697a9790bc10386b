"""gpt2hub's own CPU kernels for one input row: batch-1 decoding's products, at the memory's speed.

Decoding one token reads every weight once, so its speed is how fast the linear layers stream their weights, and
how little else a step does: `decode_step` runs a whole batch-1 step of a GPTModel in one call (gpt2hub.native_step
builds its `Model` from the modules and says where it cannot). The
loops in `_native.c` read each matrix as ggml does: each thread a contiguous run of rows, one row after another,
four sums in flight along it, prefetching what comes next. Decoding gpt2-small and -medium on a 2-core EPYC, against
what PyTorch runs otherwise (oneDNN on [out, in] copies or packed weights, `_weight_int8pack_mm`): float32 1.33x and
1.14x the tokens/s, bfloat16 1.24x and 1.29x, int8 1.40x and 1.15x (benchmarks/results/cpu-epyc-2core/
native_decode.md). They compute y = x W^T + b for one row x and

- float32 weights [out, in], or stored [in, out] (OpenAI's layout, which gpt2hub maps as it is: read as stored, each
  thread summing its run of input rows into a partial output);
- bfloat16 weights [out, in] (AVX512-BF16's dot product);
- int8 codes [out, in] with a bfloat16 scale per row and bfloat16 inputs (gpt2hub.quant's int8 storage),

so batch-1 decoding needs none of the [out, in] copies and packs gpt2hub.kernels makes for PyTorch's kernels. Sums
are float32 in another order than PyTorch's: results differ from F.linear's in the last bits, as any two kernels'
do (tests/test_native.py holds them to float64; benchmarks/native_accuracy.py compares both with float64);
bfloat16 and int8 results are rounded to bfloat16 once, after the bias. The bfloat16 kernel's dot product (the
hardware's) treats subnormal inputs (below 1.2e-38) as zero: only a result that is itself subnormal shows it.

The library is compiled when gpt2hub is installed (setup.py; optional: without a C compiler the install goes on) and
runs on x86-64 Linux CPUs with AVX512F/BW/VL (bfloat16: and AVX512-BF16). Its threads are OpenMP's, the same worker
threads as PyTorch's own operators, as many as `torch.get_num_threads()`; so, like PyTorch's operators, they are not
for a child process forked (without exec) from one that had run them: GNU OpenMP's threads do not survive the fork
and the child waits forever, for PyTorch's own operators as for these (use the "spawn" start method). Everywhere
else, with `ENABLED = False`, and with `torch.backends.mkldnn.enabled = False` (which also turns oneDNN off:
F.linear everywhere), PyTorch's kernels run as before (gpt2hub.kernels, gpt2hub.quant). `status()` says which run
and why; `gpt2hub -v` logs it at the first product.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import platform
from pathlib import Path

import torch

__all__ = ["AVAILABLE", "BF16", "ENABLED", "KINDS", "STEP", "VNNI", "Layer", "Matrix", "Model", "cpu_flags", "decode_step",
           "int8_row", "linear_row", "plain", "runs", "status", "steps"]

log = logging.getLogger("gpt2hub")
# the CPU features every kernel needs; the bfloat16 one also needs avx512_bf16
NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "fma"})
ENABLED = True  # set False to run oneDNN (gpt2hub.kernels) for one-row products too
STEP = True  # set False to decode through the model's modules (each product still on these kernels) instead of
# decode_step (gpt2hub.native_step)
_p, _i64, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
# the layouts a Matrix's weights may have (_native.c's KIND_*)
KINDS = {"float32": 0, "float32 [in, out]": 1, "bfloat16": 2, "int8": 3, "int4": 4, "int8 vnni": 5}


class Matrix(ctypes.Structure):
    """_native.c's matrix_t: one weight matrix [n, k] as stored (`KINDS`), its scales and bias (see _native.c)."""

    _fields_ = [("kind", _i64), ("group", _i64), ("bias_bf16", _i64), ("n", _i64), ("k", _i64), ("rows", _i64),
                ("w", _p), ("scale", _p), ("bias", _p)]


class Layer(ctypes.Structure):
    """_native.c's layer_t: one transformer block's matrices, float32 layer norms and KV cache."""

    _fields_ = [("qkv", Matrix * 3), ("out", Matrix), ("fc", Matrix), ("proj", Matrix), ("ln1_w", _p), ("ln1_b", _p),
                ("ln2_w", _p), ("ln2_b", _p), ("eps1", _f64), ("eps2", _f64), ("kv", _p)]


class Model(ctypes.Structure):
    """_native.c's model_t: sizes, embeddings, final norm, head and the blocks (`layers`, L of them)."""

    _fields_ = [("C", _i64), ("H", _i64), ("V", _i64), ("L", _i64), ("max_len", _i64), ("emb_bf16", _i64),
                ("cache_bf16", _i64), ("tok_emb", _p), ("pos_emb", _p), ("lnf_w", _p), ("lnf_b", _p), ("epsf", _f64),
                ("head", Matrix), ("layers", ctypes.POINTER(Layer))]


_ROW = [_p, _p, _p, _p, _i64, _i64, ctypes.c_int]
_SIGNATURES = {"gemv_bf16": _ROW, "gemv_f32": _ROW, "gemv_f32_t": _ROW, "gemv_i8": [_p, *_ROW],
               "decode_step": [ctypes.POINTER(Model), _i64, _i64, _p, ctypes.c_int]}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of this CPU as /proc/cpuinfo lists them (`cpuinfo`: its text; this machine's when None,
    read once per process; empty where there is none)."""
    if cpuinfo is None:
        return _thisplain()
    return frozenset(f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split())


@functools.cache
def _thisplain() -> frozenset[str]:
    """This machine's flags (gpt2hub.native, gpt2hub.kernels and the bench's machine record all ask at import)."""
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def _library_path() -> Path | None:
    """Where the install put the compiled `_native` library, if it did."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_native{suffix}").is_file():
            return here / f"_native{suffix}"
    return None


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") where its kernels can run here, else (None, why not)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    missing = NEEDS - cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    path = _library_path()
    if path is None:
        return None, "gpt2hub/_native was not compiled at install (no C compiler with AVX512 and OpenMP then?)"
    try:
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    except (OSError, AttributeError) as e:
        return None, f"{path} does not load ({e}): reinstall gpt2hub"
    return lib, ""


_lib, _why_not = _load()
AVAILABLE = _lib is not None
BF16 = AVAILABLE and "avx512_bf16" in cpu_flags()  # whether the bfloat16 kernel runs here too
# whether decode_step multiplies int8 weights with AVX512-VNNI (by inputs quantized to 16 bits per block of 64)
VNNI = AVAILABLE and "avx512_vnni" in cpu_flags()
_told = False
_runs = 0
_steps = 0


def runs() -> int:
    """How many products these kernels have computed in this process."""
    return _runs


def steps() -> int:
    """How many whole decoding steps (decode_step) have run in this process."""
    return _steps


def status() -> str:
    """One line: which kernels run one-row products here, and why, and which path batch-1 decoding takes."""
    if not ENABLED:
        return "gpt2hub.native.ENABLED is False: one-row products run on oneDNN"
    if not AVAILABLE:
        return f"one-row products run on oneDNN: gpt2hub's kernels are off ({_why_not})"
    kinds = "float32, bfloat16 and int8" if BF16 else "float32 and int8 (no avx512_bf16: bfloat16 runs on oneDNN)"
    steps = ("whole steps (gpt2hub.native_step" + (", int8 with AVX512-VNNI)" if VNNI else ")") if STEP else
             "the modules (gpt2hub.native.STEP is False)")
    return (f"one-row {kinds} products run on gpt2hub's AVX512 kernels, {torch.get_num_threads()} threads; "
            f"batch-1 decoding on a CPU takes {steps}")


def _tell() -> None:
    global _told
    _told = True
    log.info("gpt2hub.native: %s", status())


def _ran(y: torch.Tensor) -> torch.Tensor:
    global _runs
    _runs += 1
    return y


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    # (the device named: under `with torch.device("meta")` or set_default_device, torch.empty would not give CPU memory)
    return torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)


def _raw_keys(t: torch.Tensor) -> int:
    return torch._C._dispatch_keys(t).raw_repr()


def _plain_keys(inference: bool) -> int:
    """The dispatch keys of a new CPU tensor, made in inference mode or not."""
    with torch.inference_mode(inference):
        return _raw_keys(torch.empty(0, device="cpu"))


# the dispatch keys of a plain dense CPU tensor, made outside and inside torch.inference_mode: anything else (meta,
# sparse, mkldnn, a negative or conjugate view, a fake or other Python tensor, a vmap, jvp or functionalize wrapper)
# has other keys, and its data_ptr is not its values' memory, or its values are not what that memory holds
_PLAIN = frozenset({_plain_keys(False), _plain_keys(True)})


def plain(t: torch.Tensor, transposed: bool = False) -> bool:
    """Whether `t`'s values are one block of CPU memory, in order (`transposed`: `t.t()`'s are) that these kernels
    can read from its data_ptr: a plain dense CPU tensor (not meta, sparse, a negative or conjugate view, a fake or
    other Python tensor), contiguous."""
    return _raw_keys(t) in _PLAIN and (t.t().is_contiguous() if transposed else t.is_contiguous())


def _no_mode() -> bool:
    """Whether no dispatch mode (FakeTensorMode, a flop counter, ...) intercepts PyTorch's operators now: the kernels
    would write to the memory of a tensor such a mode makes up."""
    return not torch._C._len_torch_dispatch_stack()


def _bias_ok(bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> bool:
    return bias is None or (bias.dtype == dtype and bias.shape == (n,) and plain(bias))


def linear_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x W^T + b for ONE row x [..., in]: float32, W [out, in] contiguous or a transposed view of a contiguous
    [in, out] matrix; or bfloat16 (on a CPU with AVX512-BF16), W [out, in] contiguous; b of x's dtype or None. None
    where these kernels do not run it (the caller then runs its own). The caller has checked that no gradient is
    wanted."""
    lib = _lib
    dtype = x.dtype
    if (not ENABLED or lib is None or weight.dim() != 2 or x.numel() != weight.shape[1] or not x.numel()
            or not x.dim() or x.shape[-1] != weight.shape[1] or not plain(x) or not _no_mode()):
        # (no inputs: x.numel() says nothing of the rows; x [2, in / 2] or [in, 1]: F.linear's error, not a product)
        return None
    if not _told:
        _tell()
    n, k = weight.shape
    if not (weight.dtype == dtype and _raw_keys(weight) in _PLAIN and _bias_ok(bias, n, dtype)):
        return None
    if dtype == torch.float32:
        fn = lib.gemv_f32 if weight.is_contiguous() else lib.gemv_f32_t if weight.t().is_contiguous() else None
    else:
        fn = lib.gemv_bf16 if dtype == torch.bfloat16 and BF16 and weight.is_contiguous() else None
    if fn is None:
        return None
    y = _out(x, n)
    if fn(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), n, k,
          torch.get_num_threads()):
        return None  # (no memory for the kernel's buffer: the caller's kernel runs)
    return _ran(y)


def int8_row(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             n: int) -> torch.Tensor | None:
    """(x W^T + b) for ONE bfloat16 row x [..., in], W = codes[:n] * scale[:n, None] (int8 codes [>= n, in]
    contiguous, bfloat16 scales [>= n]), in bfloat16; None where these kernels do not run it."""
    lib = _lib
    if (not ENABLED or lib is None or x.dtype != torch.bfloat16 or codes.dim() != 2 or x.numel() != codes.shape[1]
            or not x.numel() or not x.dim() or x.shape[-1] != codes.shape[1] or not plain(x) or not _no_mode()):
        return None
    if not _told:
        _tell()
    if not (plain(codes) and codes.dtype == torch.int8 and codes.shape[0] >= n and plain(scale)
            and scale.dtype == torch.bfloat16 and scale.dim() == 1 and scale.shape[0] >= n
            and _bias_ok(bias, n, torch.bfloat16)):
        return None
    y = _out(x, n)
    failed = lib.gemv_i8(codes.data_ptr(), scale.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                         y.data_ptr(), n, codes.shape[1], torch.get_num_threads())
    return None if failed else _ran(y)


def decode_step(model: Model, token: int, pos: int, logits: torch.Tensor) -> bool:
    """Run `model` (a Model whose pointers the caller keeps alive and has checked: gpt2hub.native_step) for `token`
    at position `pos` into `logits` (float32 [V], contiguous), with torch.get_num_threads() threads; False where the
    kernels are off or could not allocate their buffers (nothing was written)."""
    global _steps
    lib = _lib
    if not (ENABLED and STEP) or lib is None or not _no_mode():
        return False
    if not _told:
        _tell()
    if lib.decode_step(ctypes.byref(model), token, pos, logits.data_ptr(), torch.get_num_threads()):
        return False
    _steps += 1
    return True
