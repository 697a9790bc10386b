"""int8 and int4 weights for GPTModel's linear layers: quantizing a state_dict, and the modules that multiply by them.

Schemes (weights only; activations, embeddings, layer norms and biases stay bfloat16):

- "int8": symmetric, one scale per output channel. Row `o` of a weight [out, in] is stored as int8 codes
  `q[o] = round(w[o] / scale[o])` in [-127, 127] with `scale[o] = max|w[o]| / 127` (bfloat16): w ~ q * scale.
- "int4": asymmetric, one scale and one offset per group of `group_size` consecutive inputs of a row, the form of
  PyTorch's int4 kernels (gpt-fast's and torchao's "tinygemm" form): codes q in [0, 15], w ~ (q - 8) * scale + zero
  (bfloat16). Each group's range is the one of a few candidates inside its min..max with the least squared error,
  refined by least squares (20% less error than min..max). DEFAULT_GROUP_SIZE is 64: 4.5 bits per weight, as ggml's
  q4_0, closer to float32 than q4_0 on the same weights, and 15% faster to decode than groups of 32 (which are
  closer still, at 5 bits); groups of 128 decode no faster (benchmarks/results/cpu-epyc-2core/quant_accuracy.md,
  decode_step.md).

Stored tensors (`quantize_state_dict`'s result, plain tensors for a safetensors file, in this order). `P` is a
quantized layer: in each block `trf_blocks.{i}.att.W_qkv` (W_query, W_key and W_value stacked into one [3d, d] layer,
as OpenAI's c_attn, so that one product makes all three), `att.out_proj`, `ff.layers.0`, `ff.layers.2`; and
`out_head` unless the head is tied.

| scheme | tensor | dtype | shape |
|---|---|---|---|
| int8 | `P.qweight` | int8 | [rows, in], rows = out rounded up to a multiple of 64 (zero weights below) |
| int8 | `P.scale` | bfloat16 | [rows] |
| int4 | `P.qweight` | uint8 | [rows, in / 2], rows as for int8 |
| int4 | `P.scale_zero` | bfloat16| [in / group_size, rows, 2]: scale, then zero, per group and row |
| both | `P.bias` | bfloat16 | [out] (layers with a bias) |
| both | every other GPTModel tensor (embeddings, norms) | bfloat16 | as in GPTModel |

int4 codes are stored two to a byte in tiles of 64 rows: for rows 64t..64t+63 and input k, 32 consecutive bytes,
byte j < 16 holding row 64t+j (low nibble) and row 64t+32+j (high nibble), byte 16+j rows 64t+16+j and 64t+48+j.
That is a fixed, documented order (any machine can read it: `unpack_int4`), and it is the order in which PyTorch's
AVX512 int4 kernel reads its weights, so there the mapped file is multiplied as it is, with no repacking at load:
repacking costs more time than a whole bfloat16 warm load, and a second copy of the weights. A probe checks at first
use that this PyTorch still reads that order; where it does not, the plain path runs.

Heads (`head=`): "tied" multiplies by the bfloat16 embedding (no extra file bytes, but on CPU its fast path keeps a
packed copy: gpt2hub.kernels); "int8" and "int4" store a quantized copy of the embedding as the head. HEADS_DEFAULT
says what each scheme uses and why.

Kernels: on a CPU where ATen runs its AVX512 kernels and bfloat16 is native (`gpt2hub.kernels.native_bf16()`),
bfloat16 inputs go to `torch.ops.aten._weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`. Everywhere else
(other CPUs, CUDA, float32 inputs, gradients, `KERNELS = False`) the plain path runs: the weight is dequantized and
multiplied with F.linear; each layer keeps its dequantized weight from the first call (the memory of a 16-bit model
there, the speed of F.linear). Each layer kind logs once (logger "gpt2hub", INFO) which path runs and why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native
from .kernels import compiling, native_bf16
from .model import GPTModel, state_dict_shapes

__all__ = ["DEFAULT_GROUP_SIZE", "FAST_CPU", "GROUP_SIZES", "HEADS", "HEADS_DEFAULT", "KERNELS", "SCHEMES",
           "Int4Linear", "Int8Linear", "QuantLinear", "int4_kernel_reads_tiles", "pack_int4", "quantize_state_dict",
           "quantized_model", "stored_layout", "unpack_int4"]

log = logging.getLogger("gpt2hub")
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
HEADS = ("tied", "int8", "int4")
# measured on gpt2-small (benchmarks/results/cpu-epyc-2core/quant_accuracy.md, linear_kernels_quant.md): an int8
# head costs int8 models nothing in accuracy and, unlike the tied head, needs no packed bfloat16 copy to be fast; an
# int4 head would be most of an int8 model's error. int4 models take an int4 head: a third of the int8 head's time per
# token, and still closer to float32 than ggml's q4_0, which quantizes its head too
HEADS_DEFAULT = {"int8": "int8", "int4": "int4"}
# rows per tile of stored int4 codes; both schemes store whole tiles. For int8 that is not tidiness: PyTorch 2.13's
# _weight_int8pack_mm reads out of bounds (SIGSEGV) on a weight whose rows are not a multiple of its block and whose
# memory is not 64-byte aligned, which a mapped file's tensors seldom are (the head's 50,257 rows)
TILE = 64
BF16 = torch.bfloat16
# the least scale quantizing gives (bfloat16's least normal number): a row or group of zeros divides by it; any smaller
# floor would turn rows of tiny weights (1e-30) into zeros
_TINY = torch.finfo(BF16).tiny
# whether ATen runs its AVX512 kernels here and bfloat16 is native: the int8/int4 kernels' fast path
FAST_CPU = (native_bf16() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))
KERNELS = FAST_CPU  # set False to run the plain path (dequantize, then F.linear) everywhere


# -- the arithmetic ----------------------------------------------------------------------------------------------------
def _by_rows(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], w: torch.Tensor,
             rows: int = 4096) -> tuple[torch.Tensor, ...]:
    """`fn` applied to blocks of rows of `w` (in float32), results concatenated: the head never needs a float32 copy."""
    parts = [fn(w[i:i + rows].float()) for i in range(0, w.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], bfloat16 scales [out]) of a weight [out, in]: symmetric, per output channel."""
    def rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.abs().amax(dim=1) / 127).to(BF16)
        q = (x / scale.float().clamp(min=_TINY)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return q, scale
    q, scale = _by_rows(rows, w)
    return q, scale


# int4 ranges tried per group: each end moved inward by these shares of the group's range (then refined): 20% less
# squared error than the plain min..max range (benchmarks/quant_accuracy.py measures what that buys). A grid of 5 x 5
# with 2 refits took 4.7x the CPU time for 0.2% less squared error (gpt2-small's int4 took 42 s to quantize)
_INWARD = (0.0, 0.03, 0.06, 0.09)
_REFITS = 3
_FLOAT32_FITS = 1e30  # the largest weight _fit_int4 fits in float32 (its sums reach 64 * 15 * 15 times the weights)


def _fit_int4(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and value of code 0 [..., 1] for groups `g` [..., group_size] (float32) with the least squared error:
    the best of a few ranges inside min..max, then least-squares refits of scale and offset to the codes."""
    low, high = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    width = high - low
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for a in _INWARD:
        for b in _INWARD:
            scale = ((1 - a - b) * width / 15).clamp(min=_TINY)
            base = low + a * width
            err = ((g - base).div_(scale).round_().clamp_(0, 15).mul_(scale).add_(base) - g).square_().sum(-1, keepdim=True)
            if best is None:
                best = (err, scale, base)
            else:
                better = err < best[0]
                best = (torch.minimum(err, best[0]), torch.where(better, scale, best[1]), torch.where(better, base, best[2]))
    assert best is not None
    _, scale, base = best
    n = g.shape[-1]
    for _ in range(_REFITS):  # least squares: g ~ q * scale + base for the codes q the current fit gives
        q = (g - base).div_(scale).round_().clamp_(0, 15)
        sq, sqq, sg, sqg = q.sum(-1, True), q.square().sum(-1, True), g.sum(-1, True), (q * g).sum(-1, True)
        det = n * sqq - sq * sq
        new_scale = (n * sqg - sq * sg) / det.clamp(min=1e-30)
        ok = (det > 0) & (new_scale > _TINY)
        scale = torch.where(ok, new_scale, scale)
        base = torch.where(ok, (sg - new_scale * sq) / n, base)
    return scale, base


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [out, in] in [0, 15], bfloat16 scale_zero [in / group_size, out, 2]) of a weight [out, in]."""
    def rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = x.view(x.shape[0], -1, group_size)
        # a group's range, or the sums of its least-squares fit, overflow float32 past about 1e33: float64 then
        g = g.double() if x.abs().amax() > _FLOAT32_FITS else g
        scale, base = _fit_int4(g)
        scale = scale.to(BF16)
        zero = (base + 8 * scale.to(g.dtype)).to(BF16)  # the kernel's form: w = (q - 8) * scale + zero
        base = zero.to(g.dtype) - 8 * scale.to(g.dtype)  # the value of code 0, as the kernel computes it
        q = (g - base).div_(scale.to(g.dtype)).round_().clamp_(0, 15).to(torch.uint8)
        return q.view(x.shape), torch.stack([scale, zero], dim=-1).squeeze(-2)
    q, sz = _by_rows(rows, w, rows=1024)
    return q, sz.transpose(0, 1).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, in / 2] in the stored tile order (see the module docstring) from codes [rows, in], rows % 64 == 0."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // TILE, 4, TILE // 4, k)
    return (c[:, :2] | (c[:, 2:] << 4)).permute(0, 3, 1, 2).contiguous().view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes [rows, in] (uint8, 0..15) of int4 weights stored in tile order: the inverse of `pack_int4`."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    b = packed.view(n // TILE, k, 2, TILE // 4).permute(0, 2, 3, 1)
    return torch.cat([b & 15, b >> 4], dim=1).reshape(n, k)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


_int4_tiles: list[bool] = []  # int4_kernel_reads_tiles' answer, once known


def int4_kernel_reads_tiles() -> bool:
    """Whether this PyTorch has the CPU int4 kernel and packs weights in the stored tile order (probed once, when the
    first Int4Linear is made: 7 ms that an int8 or bfloat16 load should not pay at import; kept in a plain list,
    which torch.compile's tracing reads, where it would run a functools.cache'd probe again)."""
    if not _int4_tiles:
        _int4_tiles.append(_probe_int4_tiles())
    return _int4_tiles[0]


def _probe_int4_tiles() -> bool:
    if not (FAST_CPU and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")):
        return False
    codes = torch.randint(0, 16, (2 * TILE, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32,
                          device="cpu")
    with contextlib.suppress(RuntimeError):
        return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), pack_int4(codes))
    return False


# -- the modules -------------------------------------------------------------------------------------------------------
_told: set[tuple[str, bool]] = set()  # the paths already said in the log


class QuantLinear(nn.Module):
    """A linear layer y = x W^T + b whose weight W [out, in] is stored quantized: buffers only, for inference.

    Subclasses hold the codes and say how to multiply by them on the kernel (`_kernel`) and how to rebuild W
    (`dequantize`); `forward` picks the path (see the module docstring) and adds the bias.
    """

    scheme = ""
    bias: torch.Tensor | None
    qweight: torch.Tensor  # the codes (each subclass registers them, and the scales)

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=BF16) if bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def dequantize(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        """The weight [out, in] the codes stand for, in `dtype`."""
        raise NotImplementedError

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _usable(self) -> bool:
        """Whether this PyTorch and CPU run this layer's kernel."""
        return FAST_CPU

    def _row(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., in] holding one row -> x W^T + b [..., out] on gpt2hub.native's kernel, or None where it has none
        for this layer."""
        return None

    def _aligned(self, name: str) -> torch.Tensor:
        """Buffer `name`, first moved to 64-byte aligned memory if it is not there: PyTorch 2.13's int8 kernel reads
        out of bounds (SIGSEGV) on codes that are not (a mapped file's tensors need not be; gpt2hub's files align
        them, so this copies only codes from elsewhere, once)."""
        t = getattr(self, name)
        if not compiling() and t.data_ptr() % 64:  # (torch.compile cannot trace data_ptr)
            t = t.clone()  # (PyTorch's CPU allocator aligns to 64 bytes)
            setattr(self, name, t)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: the kernel for bfloat16 CPU inputs on a capable CPU, else dequantize + F.linear."""
        fast = KERNELS and x.is_cpu and x.dtype == BF16 and not x.requires_grad and self._usable()
        if (self.scheme, fast) not in _told and not compiling():  # (torch.compile cannot trace logging)
            self._tell(fast, x)
        if fast and x.numel() == self.in_features:  # one row: batch-1 decoding, bias included, on gpt2hub.native
            y = self._row(x)
            if y is not None:
                return y
        flat = x.reshape(-1, x.shape[-1])
        y = self._kernel(flat.contiguous()) if fast else F.linear(flat, self._plain_weight(x.dtype))
        if y.shape[1] != self.out_features:  # int4 rows padded to a whole tile
            y = y[:, :self.out_features] if self.bias is None else y[:, :self.out_features] + self.bias
        elif self.bias is not None:
            y = y.add_(self.bias)  # (y is new: no other tensor sees the write)
        return y.view(*x.shape[:-1], self.out_features)

    def _plain_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight F.linear multiplies by on the plain path: dequantized once and kept while the codes stay as
        they are (dequantizing at every call made int4 decoding 2.8 tokens/s on gpt2-small): a layer there holds its
        weight twice, as codes and as a `dtype` copy: the memory of a 16-bit model, the speed of F.linear."""
        if compiling():
            return self.dequantize(dtype)
        q = self.qweight
        key = (q.data_ptr(), q._version, q.device, dtype, self._codes_version())
        kept = self.__dict__.get("_plain")
        if kept is None or kept[0] != key:
            kept = (key, self.dequantize(dtype))
            self.__dict__["_plain"] = kept  # (not a buffer: never saved, never moved)
        return kept[1]

    def _codes_version(self) -> tuple[int, ...]:
        """Where the other buffers `dequantize` reads (scales, offsets) are, and their versions."""
        return tuple(x for t in self.buffers(recurse=False) if t is not self.qweight for x in (t.data_ptr(), t._version))

    def _tell(self, fast: bool, x: torch.Tensor) -> None:
        _told.add((self.scheme, fast))
        if fast:
            log.info("gpt2hub.quant: %s layers multiply on PyTorch's %s kernel%s", self.scheme, self.scheme,
                     " (one row: gpt2hub.native's, where it runs)" if self.scheme == "int8" else "")
            return
        reason = ("gpt2hub.quant.KERNELS is False" if not KERNELS else
                  f"inputs are {x.dtype} on {x.device}" if not (x.is_cpu and x.dtype == BF16) else
                  "gradients are on" if x.requires_grad else
                  "this CPU or PyTorch lacks the kernel's fast path (AVX512 with native bfloat16)")
        log.info("gpt2hub.quant: %s layers dequantize their weights and run F.linear (%s)", self.scheme, reason)


class Int8Linear(QuantLinear):
    """int8 codes [out, in] and a bfloat16 scale per output channel: W = qweight * scale[:, None]."""

    scheme = "int8"
    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        rows = _round_up(out_features, TILE)
        self.register_buffer("qweight", torch.empty(rows, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(rows, dtype=BF16))

    def dequantize(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        n = self.out_features
        return self.qweight[:n].to(dtype) * self.scale[:n].to(dtype)[:, None]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_features % 16:
            # PyTorch 2.13's kernel gives wrong sums for other widths (rows of 20, 24, 40, 56 or 72 inputs), and for 20
            # reads out of bounds (SIGSEGV): the plain path then (one row still runs on gpt2hub.native's kernel)
            return F.linear(x, self._plain_weight(x.dtype))
        return torch.ops.aten._weight_int8pack_mm(x, self._aligned("qweight"), self._aligned("scale"))

    def _row(self, x: torch.Tensor) -> torch.Tensor | None:
        # (buffers read from nn.Module's table: its __getattr__ took 2 of this call's 11 microseconds, 49 calls a token)
        buffers = self._buffers
        codes, scale = buffers["qweight"], buffers["scale"]
        if codes is None or scale is None:
            return None
        return native.int8_row(x, codes, scale, buffers["bias"], self.out_features)


class Int4Linear(QuantLinear):
    """int4 codes in tile order [rows, in / 2] and per-group scale_zero [in / group_size, rows, 2] (module docstring)."""

    scheme = "int4"
    qweight: torch.Tensor
    scale_zero: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(in_features, out_features, bias)
        self.group_size, rows = group_size, _round_up(out_features, TILE)
        self.register_buffer("qweight", torch.empty(rows, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_zero", torch.empty(in_features // group_size, rows, 2, dtype=BF16))
        int4_kernel_reads_tiles()  # (now, not at the first product: that may be inside torch.compile's tracing)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def dequantize(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        codes = unpack_int4(self.qweight)[:self.out_features].view(self.out_features, -1, self.group_size)
        scale, zero = self.scale_zero[:, :self.out_features].to(dtype).transpose(0, 1).unbind(-1)
        return torch.addcmul(zero[..., None], codes.to(dtype) - 8, scale[..., None]).reshape(self.out_features, -1)

    def _usable(self) -> bool:
        return int4_kernel_reads_tiles()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._aligned("qweight"), self.group_size,
                                                           self._aligned("scale_zero"))


# -- state_dicts and models ----------------------------------------------------------------------------------------------
def _linears(cfg: Mapping, scheme: str, head: str) -> dict[str, tuple[int, int, tuple[str, ...], str]]:
    """Quantized layer -> (inputs, outputs, the GPTModel layers it is made of, its scheme)."""
    d, out = cfg["emb_dim"], {}
    for i in range(cfg["n_layers"]):
        p = f"trf_blocks.{i}."
        out[p + "att.W_qkv"] = (d, 3 * d, tuple(f"{p}att.W_{n}" for n in ("query", "key", "value")), scheme)
        out[p + "att.out_proj"] = (d, d, (p + "att.out_proj",), scheme)
        out[p + "ff.layers.0"] = (d, 4 * d, (p + "ff.layers.0",), scheme)
        out[p + "ff.layers.2"] = (4 * d, d, (p + "ff.layers.2",), scheme)
    if head != "tied":
        out["out_head"] = (d, cfg["vocab_size"], ("out_head",), head)
    return out


def _check(scheme: str, group_size: int | None, head: str | None, cfg: Mapping) -> tuple[int, str]:
    """(group size, head) after checking the arguments: each bad one is a one-line ValueError naming it."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    head = HEADS_DEFAULT[scheme] if head is None else head
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    group = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if "int4" in (scheme, head):
        if group not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} for int4, got {group_size!r}")
        if cfg["emb_dim"] % group:
            raise ValueError(f"group_size {group} does not divide the model width emb_dim={cfg['emb_dim']}; "
                             f"pick one of {[g for g in GROUP_SIZES if cfg['emb_dim'] % g == 0]}")
    return group, head


def stored_layout(cfg: Mapping, scheme: str, group_size: int | None = None,
                  head: str | None = None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every stored tensor of a model, in the stored order (see the module docstring).

    `cfg` is GPTModel's config; its `qkv_bias` (True for GPT-2's) says whether the attention layers have biases.
    """
    group, head = _check(scheme, group_size, head, cfg)
    layers = _linears(cfg, scheme, head)
    owners = {source: owner for owner, (_, _, sources, _) in layers.items() for source in sources}
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    plain = state_dict_shapes(cfg)
    for name, shape in plain.items():
        module = name.rpartition(".")[0]
        owner = owners.get(module)
        if owner is None:
            if module != "out_head":  # the tied head is the embedding
                layout[name] = (BF16, shape)
        elif f"{owner}.qweight" not in layout:  # W_key and W_value come with W_query
            n_in, n_out, _, kind = layers[owner]
            rows = _round_up(n_out, TILE)
            if kind == "int8":
                layout.update({f"{owner}.qweight": (torch.int8, (rows, n_in)), f"{owner}.scale": (BF16, (rows,))})
            else:
                layout.update({f"{owner}.qweight": (torch.uint8, (rows, n_in // 2)),
                               f"{owner}.scale_zero": (BF16, (n_in // group, rows, 2))})
            if f"{module}.bias" in plain:
                layout[f"{owner}.bias"] = (BF16, (n_out,))
    return layout


def _config_of(sd: Mapping[str, torch.Tensor]) -> dict:
    """GPTModel's config as far as the tensors of a state_dict show it (heads do not matter to storage)."""
    if "tok_emb.weight" not in sd or "pos_emb.weight" not in sd:
        raise ValueError("sd must be a GPTModel state_dict; it has no tok_emb.weight or pos_emb.weight")
    vocab, d = sd["tok_emb.weight"].shape
    n = sum(1 for k in sd if k.startswith("trf_blocks.") and k.endswith(".norm1.scale"))
    return {"vocab_size": vocab, "context_length": sd["pos_emb.weight"].shape[0], "emb_dim": d, "n_heads": 1,
            "n_layers": n, "qkv_bias": "trf_blocks.0.att.W_query.bias" in sd}


def quantize_state_dict(sd: Mapping[str, torch.Tensor], scheme: str, group_size: int | None = None,
                        head: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors to store for a quantized GPTModel (see the module docstring), from a GPTModel state_dict.

    `sd` holds float32, bfloat16 or float16 tensors in any memory layout (a tied model may omit out_head.weight).
    `group_size` (int4 only) defaults to DEFAULT_GROUP_SIZE, `head` to HEADS_DEFAULT[scheme].
    """
    cfg = _config_of(sd)
    group, head = _check(scheme, group_size, head, cfg)
    for name, shape in state_dict_shapes(cfg).items():
        got = sd.get(name, sd.get("tok_emb.weight") if name == "out_head.weight" else None)
        if got is None or tuple(got.shape) != shape or not got.is_floating_point():
            shown = "missing" if got is None else f"{got.dtype} {tuple(got.shape)}"
            raise ValueError(f"sd[{name!r}] is {shown}, expected a floating-point tensor {shape}")
        if not torch.isfinite(got).all():  # one NaN or inf would take its whole row's (or group's) scale with it
            raise ValueError(f"sd[{name!r}] holds NaN or infinite values, which cannot be quantized; load these "
                             "weights as float32 to inspect them")
    layers = _linears(cfg, scheme, head)
    out: dict[str, torch.Tensor] = {}
    for name in stored_layout(cfg, scheme, group, head):
        owner, _, kind = name.rpartition(".")
        if name in out:
            continue
        if owner not in layers:
            out[name] = sd[name].detach().to(BF16).contiguous()
        elif kind == "bias":
            out[name] = torch.cat([sd[f"{s}.bias"].detach() for s in layers[owner][2]]).to(BF16)
        else:
            sources = [sd.get(f"{s}.weight", sd["tok_emb.weight"]) for s in layers[owner][2]]
            out.update(_quantize_layer(owner, torch.cat(sources).detach(), layers[owner][3], group))
    return out


def _quantize_layer(owner: str, w: torch.Tensor, scheme: str, group: int) -> dict[str, torch.Tensor]:
    rows = _round_up(w.shape[0], TILE)
    if rows != w.shape[0]:
        w = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    if scheme == "int8":
        q, scale = quantize_int8(w)
        return {f"{owner}.qweight": q, f"{owner}.scale": scale}
    codes, scale_zero = quantize_int4(w, group)
    return {f"{owner}.qweight": pack_int4(codes), f"{owner}.scale_zero": scale_zero}


def quantized_model(cfg: Mapping, stored: Mapping[str, torch.Tensor], scheme: str, group_size: int | None = None,
                    head: str | None = None) -> GPTModel:
    """A GPTModel in eval mode whose linear layers are quantized modules holding the `stored` tensors themselves.

    Built on the meta device and handed the tensors (no random init, no copy: mapped tensors stay mapped).
    `stored` must be exactly `stored_layout(cfg, scheme, group_size, head)`: a missing, unexpected or misshapen
    tensor is a one-line ValueError naming it. With head="tied" the head multiplies by the embedding.
    """
    layout = stored_layout(cfg, scheme, group_size, head)
    group, head = _check(scheme, group_size, head, cfg)
    for name, (dtype, shape) in layout.items():
        t = stored.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            shown = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(f"stored[{name!r}] is {shown}, expected {dtype} {shape} for scheme {scheme!r}, "
                             f"group_size {group}, head {head!r}")
    extra = sorted(set(stored) - set(layout))
    if extra:
        raise ValueError(f"stored has {extra[0]!r}, which a {scheme!r} model with head {head!r} does not hold")
    layers = _linears(cfg, scheme, head)

    def quantize_modules(model: GPTModel) -> None:
        for owner, (n_in, n_out, sources, kind) in layers.items():
            bias = f"{owner}.bias" in layout
            layer = Int8Linear(n_in, n_out, bias) if kind == "int8" else Int4Linear(n_in, n_out, bias, group)
            if len(sources) > 1:  # W_query, W_key and W_value give way to W_qkv
                for source in sources:
                    parent, _, child = source.rpartition(".")
                    delattr(model.get_submodule(parent), child)
            parent, _, child = owner.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)

    # the kernels read memory as dense: a strided tensor (never a mapped file's) is copied, not misread
    dense = {k: v if v.is_contiguous() else v.contiguous() for k, v in stored.items()}
    model = GPTModel.from_state_dict(dict(cfg), dense, tie_weights=head == "tied", modules=quantize_modules)
    model.attention_dtype = torch.float32  # PyTorch's CPU attention reads a float32 KV cache far faster than bfloat16
    return model
