"""The CPU kernels behind `gpt2hub.model.linear`: gpt2hub's own for one row, oneDNN for float32, pre-packed oneDNN
for bfloat16.

Batch-1 decoding reads every weight once per token, so its speed is how fast the linear layers read their weights.

- one row (batch-1 decoding) of float32 or bfloat16 runs on gpt2hub.native's AVX512 kernels where they run (x86-64
  Linux with AVX512; bfloat16 with AVX512-BF16; `gpt2hub.native.status()`), from the weight as it is stored
  (float32: [out, in] or OpenAI's [in, out]; bfloat16: [out, in]): 1.14-1.33x the tokens/s of oneDNN on the [out, in]
  copies and packs below, which batch-1 decoding then never makes.
- float32 inference on CPU otherwise runs on oneDNN (`torch.ops.mkldnn._linear_pointwise`) straight from the dense
  weight, except decoding from a weight stored transposed ([in, out]: OpenAI's checkpoint, mapped as it is, stores
  every block matrix so): oneDNN reads that layout at two thirds of the speed it reads [out, in] (gpt2-small's 48
  block matrices: 16 against 23 GB/s on a 2-core EPYC), so up to PACKED_MAX_ROWS rows (batched decoding, or one row
  where gpt2hub.native does not run) read a copy in [out, in] order, made once decoding has used the matrix 16
  times (below). Products of 2 or more rows are bit for bit those of the transposed weight; one row may differ in
  the last bit (oneDNN sums a single row of a transposed weight in another order). The copies cost the memory of
  the block matrices (gpt2-small 324 MiB, -medium 1.1 GiB, -large 2.6 GiB, -xl 5.5 GiB; the mapped checkpoint's pages
  they were read from stay reclaimable): `COPY_FLOAT32 = False` decodes from the mapped weights.
- bfloat16 inference of up to PACKED_MAX_ROWS rows (decoding) on a CPU that multiplies bfloat16 in hardware
  (AVX512-BF16 or AMX-BF16) runs on oneDNN with the weight reordered once into the blocked layout its kernels read
  (`torch.ops.mkldnn._reorder_linear_weight`): the pair of ops `torch.compile` emits for CPU bfloat16 linears with
  frozen weights. Without the pack, oneDNN (which F.linear calls) reorders the whole weight on every call.
- everything else (training, other dtypes and devices, CPUs without native bfloat16, code being traced by
  `torch.compile`, and `torch.backends.mkldnn.enabled = False`, which turns gpt2hub.native off too) takes F.linear.

A pack is made on a weight's second use (a float32 copy on its 16th: USES_BEFORE_PACK) and kept beside it
(`packed_bytes()` says how much memory that takes): it is dropped with the weight's storage, and made again when the
weight is changed in place (PyTorch's version counter; the fused QKV view also follows W_key's and W_value's, which
torch.load gives counters of their own), replaced, moved or converted, or stepped by a fused optimizer (`fused=True`,
whose kernels leave the counter as it was: a hook drops its parameters' packs after each step). Writes through
`.data`, to weights made under `torch.inference_mode()` (inference tensors have no counter), or to their memory from
outside PyTorch (a numpy array they view, the mapped file rewritten in place) bypass the version counter: after those,
call `forget_packs()`.
"""

from __future__ import annotations

import functools
import platform
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import native

__all__ = ["COPY_FLOAT32", "NATIVE_BF16", "ONEDNN", "PACKED_MAX_ROWS", "PACKING", "USES_BEFORE_PACK", "compiling",
           "forget_packs", "linear", "native_bf16", "packed_bytes", "packs_made"]

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PACKING = ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16) and oneDNN may use it.

    `cpuinfo` is the text of /proc/cpuinfo (read when None); where there is none, PyTorch's own CPU probe decides.
    """
    if not PACKING or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    flags = native.cpu_flags(cpuinfo)
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


NATIVE_BF16 = native_bf16()
# Decoding multiplies a few rows (the batch) by each weight: reading the weight is all the work, and the pack saves
# F.linear's reorder of it. Longer inputs (prompts) are bound by arithmetic, where that reorder costs little: they
# keep F.linear. Up to 32 rows oneDNN computes with this pack bit for bit what F.linear computes with the weight
# stored [out, in] (the same blocking; on an AMX Xeon with oneDNN 3.12, for every gpt2-small, -medium and -large
# matrix; gpt2-xl's 6400-wide c_proj can differ in the last bit), so switching between them changes no token.
PACKED_MAX_ROWS = 32
# float32 weights stored transposed decode from an [out, in] copy (see the module's docstring); False: from the weight
COPY_FLOAT32 = True
# the use of a weight (at up to PACKED_MAX_ROWS rows, since it last changed) on which its pack or copy is made (see
# _packed): making the float32 copies costs as much time as 12 (gpt2-medium) to 28 (gpt2-small) decoding steps save
# on the 2-core EPYC (benchmarks/results/cpu-epyc-2core/float32_copies.md; 9 to 19 at decode_step_f32copy.md's rates)
USES_BEFORE_PACK = {torch.bfloat16: 2, torch.float32: 16}
# under torch.compile, F.linear: inductor picks (and with freezing, packs) the kernel itself; it cannot lower
# _linear_pointwise on a weight that is not a frozen constant
compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)  # whether torch.compile is tracing

# id(storage) -> (weak reference to the storage, {(offset, shape, stride, dtype): ((version(s), data_ptr), pack or uses)}):
# the packs of a weight live as long as its memory (a plain dict: torch.utils.weak's costs microseconds per lookup)
_packs: dict[int, tuple[weakref.ref, dict[tuple, tuple[tuple[object, int], torch.Tensor | int]]]] = {}
_made = 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           sources: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """F.linear, run on the fastest kernel this CPU has for inference (see the module's docstring); same results.

    `sources`: tensors whose memory `weight` also views, with version counters of their own (W_key and W_value under
    the fused QKV view of W_query, when torch.load made them separate tensors): a write to any of them also remakes
    `weight`'s copy or pack.
    """
    dtype = x.dtype  # (checks ordered and written for speed: this runs about 75 times per generated token)
    if not (x.is_cpu and dtype == weight.dtype and not torch.is_grad_enabled() and weight.dim() == 2
            and weight.shape[1] and torch.backends.mkldnn.enabled) or compiling():
        return F.linear(x, weight, bias)  # (no inputs (in = 0): oneDNN has no such product, F.linear gives the bias)
    if x.numel() == weight.shape[1]:  # one row: batch-1 decoding, on gpt2hub's own kernels where they run
        y = native.linear_row(x, weight, bias)
        if y is not None:
            return y
    if not ONEDNN:
        return F.linear(x, weight, bias)
    if dtype == torch.float32:
        if weight.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if weight.t().is_contiguous():
            pack = _packed(weight, sources) if COPY_FLOAT32 and x.numel() <= PACKED_MAX_ROWS * x.shape[-1] else None
            return torch.ops.mkldnn._linear_pointwise(x, weight if pack is None else pack, bias, "none", [], "")
    if (dtype == torch.bfloat16 and NATIVE_BF16 and (bias is None or bias.dtype == dtype)
            and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]):
        pack = _packed(weight, sources)
        if pack is not None:
            return torch.ops.mkldnn._linear_pointwise(x, pack, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _packed(weight: torch.Tensor, sources: tuple[torch.Tensor, ...] = ()) -> torch.Tensor | None:
    """`weight` [out, in] as decoding reads it fastest (bfloat16: oneDNN's blocked layout; float32: a contiguous copy),
    made on its USES_BEFORE_PACK[dtype]-th use (since it last changed) and reused until the weight changes.

    None before that: a model that runs once (one forward, one score) pays neither the pack's memory nor the time to
    make it. A bfloat16 pack costs about one product with the dense weight and saves F.linear's reorder at every
    call: it is made on the second use. A float32 copy transposes the matrix (about 1.5 GB/s) and saves a third of
    a product's time per use: it is made once that many uses have shown that decoding goes on long enough to repay
    it, so a short generation never pays its time or its memory.
    """
    global _made
    entries = _entries(weight.untyped_storage())
    key = (weight.storage_offset(), weight.shape, weight.stride(), weight.dtype)
    try:
        version = weight._version if not sources else (weight._version, *[t._version for t in sources])
    except RuntimeError:  # an inference tensor: no version counter, and no writes outside inference mode
        version = -1
    stamp = (version, weight.data_ptr())
    seen = entries.get(key)
    if seen is None or seen[0] != stamp:
        entries[key] = (stamp, 1)
        return None
    made = seen[1]
    if isinstance(made, int):  # uses so far
        if made + 1 < USES_BEFORE_PACK.get(weight.dtype, 2) or weight.numel() == 0:  # (oneDNN: no empty products)
            entries[key] = (stamp, made + 1)
            return None
        # float32: the contiguous copy itself; bfloat16: oneDNN's layout for no particular batch size (AB16b32a2b for
        # AMX): inside the model on an AMX Xeon, batch-1 steps read it faster than the layout it picks for batch size 1
        # (AB16b64a2b; see benchmarks/results/cpu-xeon-amx-2core), and prompts of any length read it without a reorder
        dense = weight.contiguous()
        made = dense if weight.dtype == torch.float32 else torch.ops.mkldnn._reorder_linear_weight(dense)
        entries[key] = (stamp, made)
        _made += 1
    return made


def _entries(storage: torch.UntypedStorage) -> dict:
    """The packs made from `storage`, dropped with it."""
    slot = _packs.get(id(storage))
    if slot is None or slot[0]() is not storage:
        slot = _packs[id(storage)] = (weakref.ref(storage, functools.partial(_drop, id(storage))), {})
    return slot[1]


def _drop(storage_id: int, ref: weakref.ref) -> None:
    slot = _packs.get(storage_id)
    if slot is not None and slot[0] is ref:
        del _packs[storage_id]


def _after_fused_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """Drop the packs made from the parameters a fused optimizer (`fused=True`) has stepped: its kernels write them
    without moving their version counters."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                _packs.pop(id(p.untyped_storage()), None)


register_optimizer_step_post_hook(_after_fused_step)


def packs_made() -> int:
    """How many weights have been packed in this process (a pack made again after a change counts again)."""
    return _made


def packed_bytes() -> int:
    """Memory held by the packs now alive: about the size of the weights decoding has read (bfloat16, or float32
    stored transposed)."""
    return sum(p.numel() * p.element_size() for _, entries in list(_packs.values()) for _, p in list(entries.values())
               if isinstance(p, torch.Tensor))


def forget_packs() -> None:
    """Drop every pack (they are made again on next use): after weights were changed through `.data`, in inference
    mode (weights made there) or outside PyTorch."""
    _packs.clear()
