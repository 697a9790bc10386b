"""How close batch-1 decoding's logits are to float64's: whole steps (gpt2hub.native_step), the modules on
gpt2hub.native's kernels, and the modules on PyTorch's.

gpt2-small with random weights (built as decode_step.py builds them) decodes --tokens positions one token at a time
(teacher-forced on random tokens, through the KV cache, so every product is one row) in float32, bfloat16, int8 and
int4: in whole steps (`gpt2hub.native_step`, as generation runs them; the first position through the modules, as
generation's prompt), through the modules with gpt2hub.native's kernels (`native.STEP = False`), and with PyTorch's
(`gpt2hub.native.ENABLED = False`: oneDNN on copies or packs, `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).
Each step's logits are compared with those of the same model's weights in float64 (int8, int4: the dequantized
weights), computed the same way: mean and largest |logit error|, mean KL divergence of the next-token distribution
from float64's, and how often the top token is float64's.

    python benchmarks/native_accuracy.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from _report import describe, machine, save, table
from decode_step import _model

from gpt2hub import native, native_step, quant
from gpt2hub.model import KVCache

PATHS = {"whole steps": (True, True), "modules, gpt2hub.native": (True, False), "modules, PyTorch's": (False, False)}


def _logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Each position's logits [n, vocab], decoded one token at a time through the KV cache."""
    cache = KVCache(model.cfg, 1, tokens.shape[1], model.attention_dtype, "cpu")
    out = [model(tokens[:, i:i + 1], cache, i, last_only=True)[0, -1] for i in range(tokens.shape[1])]
    return torch.stack(out).double()


def _stepped(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The same, position 0 through the modules and the others in whole steps."""
    cache = KVCache(model.cfg, 1, tokens.shape[1], model.attention_dtype, "cpu")
    out = [model(tokens[:, :1], cache, 0, last_only=True)[0, -1]]
    step = native_step.plan(model, cache)
    if step is None:
        raise SystemExit(f"whole steps do not run here ({native_step.why_not(model, cache)}; see -v)")
    for i, t in enumerate(tokens[0, 1:].tolist(), start=1):
        logits = step(t, i)
        if logits is None:
            raise SystemExit("gpt2hub.native's decode_step did not run (see -v)")
        out.append(logits[0])
    return torch.stack(out).double()


def _float64(model: Any) -> Any:
    """The model with every weight in float64 (quantized layers: their dequantized weights)."""
    exact = copy.deepcopy(model)
    for m in list(exact.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, quant.QuantLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight.data = child.dequantize(torch.float64)
                if child.bias is not None:
                    lin.bias.data = child.bias.double()
                setattr(m, child_name, lin)
    exact = exact.double()
    exact.attention_dtype = None  # (quantized models attend in float32: here in float64, as the rest)
    return exact


def measure(precision: str, positions: int) -> dict[str, Any]:
    model = _model("gpt2-small", precision).eval()
    tokens = torch.randint(0, 50257, (1, positions), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = _logits(_float64(model), tokens)
        row: dict[str, Any] = {"precision": precision}
        for path, (enabled, step) in PATHS.items():
            native.ENABLED, native.STEP = enabled, step
            got = _stepped(model, tokens) if step else _logits(model, tokens)
            err = (got - exact).abs()
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)  # KL(float64 || this), per position
            row[path] = {"mean_abs_error": err.mean().item(), "max_abs_error": err.max().item(),
                         "kl_from_float64": kl.mean().item(),
                         "top1_as_float64": (got.argmax(-1) == exact.argmax(-1)).float().mean().item()}
        native.ENABLED, native.STEP = True, True
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(p, args.tokens) for p in args.precisions]
    info = machine()
    lines = [f"Batch-1 decoding's logits against float64's, gpt2-small (random weights), {args.tokens} positions one "
             f"token at a time; {describe(info)}", ""]
    lines += table(["precision", "path", "mean abs. logit error", "largest", "KL from float64", "top-1 as float64's"],
                   [(r["precision"], k, f"{r[k]['mean_abs_error']:.2e}", f"{r[k]['max_abs_error']:.2e}",
                     f"{r[k]['kl_from_float64']:.2e}", f"{r[k]['top1_as_float64']:.1%}") for r in rows for k in PATHS])
    save(lines, args.out, "native_accuracy", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
