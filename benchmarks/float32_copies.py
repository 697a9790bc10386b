"""How close batch-1 float32 decoding is to float64, decoding from the mapped weights and from gpt2hub.kernels' copies.

A float32 model loaded by gpt2hub keeps OpenAI's [in, out] layout (views of the mapped checkpoint); decoding on CPU
multiplies [out, in] copies of those matrices, which oneDNN reads faster (gpt2hub.kernels, COPY_FLOAT32). One row
multiplied by a copy is summed in another order than by the transposed view, so the last bits of the logits, and on
random weights with close logits a token now and then, differ. This script measures which of the two is closer to
the exact product: the same random model (gpt2hub.synthetic.random_weights, laid out as gpt2hub loads float32)
decodes --positions tokens one at a time with its KV cache (teacher-forced: random token ids), once each way; each
step's logits are compared with a float64 copy of the model run over the whole sequence.

It also measures what the copies cost and repay: the time to make them (one transposing copy of every block matrix),
a decoding step's time without and with them (medians of --steps steps), and so how many steps repay the copying:
the evidence behind gpt2hub.kernels.USES_BEFORE_PACK (a copy is made on a matrix's 16th decoding use).

    python benchmarks/float32_copies.py --models gpt2-small gpt2-medium --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _report import describe, machine, save, table
from decode_step import _model

from gpt2hub import kernels
from gpt2hub.model import KVCache


def _decode(model: Any, ids: torch.Tensor, copies: bool) -> torch.Tensor:
    """float64 logits [positions, vocab] of batch-1 decoding of `ids`, one token per step."""
    kernels.COPY_FLOAT32 = copies
    kernels.USES_BEFORE_PACK[torch.float32] = 2  # every step but the first from the copies
    kernels.forget_packs()
    n = ids.shape[1]
    cache = KVCache(model.cfg, 1, n, torch.float32, "cpu")
    with torch.no_grad():
        return torch.stack([model(ids[:, p:p + 1], cache, p, last_only=True)[0, -1] for p in range(n)]).double()


def measure(name: str, positions: int) -> list[dict[str, Any]]:
    default_uses = kernels.USES_BEFORE_PACK[torch.float32]
    model = _model(name, "float32")
    ids = torch.randint(0, model.cfg["vocab_size"], (1, positions), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = _model(name, "float32").double()(ids)[0]
    rows = []
    for copies in (False, True):
        logits = _decode(model, ids, copies)
        err = (logits - exact).abs()
        rows.append({"model": name, "weights": "copies" if copies else "mapped", "positions": positions,
                     "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                     "top1_as_float64": int((logits.argmax(-1) == exact.argmax(-1)).sum())})
    kernels.COPY_FLOAT32, kernels.USES_BEFORE_PACK[torch.float32] = True, default_uses
    return rows


def _step_ms(model: Any, steps: int) -> float:
    """Median milliseconds of a batch-1 decoding step (one token, a KV cache of 16 + steps positions)."""
    cache = KVCache(model.cfg, 1, 16 + steps, torch.float32, "cpu")
    ids = torch.randint(0, model.cfg["vocab_size"], (1, 16 + steps), generator=torch.Generator().manual_seed(5))
    times = []
    with torch.no_grad():
        model(ids[:, :16], cache, 0, last_only=True)
        for p in range(16, 16 + steps):
            t0 = time.perf_counter()
            model(ids[:, p:p + 1], cache, p, last_only=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def repay(name: str, steps: int) -> dict[str, Any]:
    """Seconds to copy the block matrices, step times without and with the copies, and the steps that repay them."""
    model = _model(name, "float32")
    mats = [m for b in model.trf_blocks for m in ((b.att.fused_qkv() or (b.att.W_query.weight,))[0],
                                                   b.att.out_proj.weight, b.ff.layers[0].weight, b.ff.layers[2].weight)]
    assert all(m.t().is_contiguous() for m in mats)
    t0 = time.perf_counter()
    copies = [m.contiguous() for m in mats]
    copy_s = time.perf_counter() - t0
    del copies
    kernels.COPY_FLOAT32 = False
    without = _step_ms(model, steps)
    kernels.COPY_FLOAT32 = True
    kernels.forget_packs()
    _step_ms(model, kernels.USES_BEFORE_PACK[torch.float32] + 2)  # makes the copies
    with_copies = _step_ms(model, steps)
    return {"model": name, "copy_s": copy_s, "copy_mib": sum(m.numel() for m in mats) * 4 / 2 ** 20,
            "step_ms_mapped": without, "step_ms_copies": with_copies,
            "steps_to_repay": copy_s * 1e3 / (without - with_copies) if without > with_copies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [r for name in args.models for r in measure(name, args.positions)]
    info = machine()
    lines = [f"Batch-1 float32 decoding against float64, teacher-forced over {args.positions} random tokens, random "
             f"weights; {describe(info)}", ""]
    lines += table(["model", "decoding from", "max abs logit error", "mean abs logit error", "top-1 as float64's"],
                   [(r["model"], r["weights"], f"{r['max_abs_error']:.2e}", f"{r['mean_abs_error']:.2e}",
                     f"{r['top1_as_float64']}/{r['positions']}") for r in results])
    lines += ["", "- mapped: the transposed views of the checkpoint (`gpt2hub.kernels.COPY_FLOAT32 = False`); copies: "
              "[out, in] copies (the default). Random weights give large logits (normal(0, 0.2) weights), hence the "
              "absolute errors."]
    costs = [repay(name, args.steps) for name in args.models]
    lines += ["", "What the copies cost and repay (one copy of every block matrix; decoding steps: medians of "
              f"{args.steps}):", ""]
    lines += table(["model", "copies", "time to make them", "step from mapped weights", "step from copies",
                    "steps that repay the copying"],
                   [(c["model"], f"{c['copy_mib']:.0f} MiB", f"{c['copy_s']:.2f} s", f"{c['step_ms_mapped']:.1f} ms",
                     f"{c['step_ms_copies']:.1f} ms",
                     "never" if c["steps_to_repay"] is None else f"{c['steps_to_repay']:.0f}") for c in costs])
    save(lines, args.out, "float32_copies", {"machine": info, "results": results, "costs": costs})


if __name__ == "__main__":
    main()
