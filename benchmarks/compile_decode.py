"""One batch-1 decoding step of gpt2-small on CPU: gpt2hub's eager step against `torch.compile` of the same step.

The compiled step is the static-shape one (`model(tok, cache, pos)` with `pos` a 0-dim tensor, the whole cache
under a mask; each block's QKV fusion decided once beforehand), compiled by inductor with and without freezing
(`torch._inductor.config.freezing`, which packs the weights as oneDNN/MKL constants: the kernels
gpt2hub.kernels.linear uses eagerly). Compile time (the first call) is reported apart from the step time (median
over --steps steps after --warmup, each a new position), and at how many steps each variant's most likely next
token is the eager step's (every step is fed the same token). int8 and int4 are gpt2hub.quant's models.

    python benchmarks/compile_decode.py --out benchmarks/results/cpu-xeon-amx-2core
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import describe, machine, save, table
from idle import note, wait_idle

from gpt2hub import GPTModel, quant
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.model import KVCache
from gpt2hub.registry import resolve
from gpt2hub.synthetic import random_weights

Step = Callable[[torch.Tensor, int], torch.Tensor]


def _model(name: str) -> GPTModel:
    """gpt2-small with random weights, laid out as gpt2hub loads that dtype (int8, int4: gpt2hub.quant's storage)."""
    hp = resolve("gpt2-small").hparams()
    weights = random_weights(hp, seed=0)
    cfg = config_from_hparams(hp)
    if name in quant.SCHEMES:
        sd = openai_state_dict(lambda n: weights[f"model/{n}"], cfg, torch.float32)
        return quant.quantized_model(cfg, quant.quantize_state_dict(sd, name), name)
    return GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: weights[f"model/{n}"], cfg, getattr(torch, name)))


def _eager(model: GPTModel, cache: KVCache) -> Step:
    return lambda tok, pos: model(tok, cache, pos)[:, -1]


def _static(model: GPTModel, cache: KVCache, compiled: bool, freezing: bool) -> Step:
    """The static-shape step, compiled (inductor, optionally with frozen weights) or eager."""
    position = torch.zeros((), dtype=torch.long)

    def step(tok: torch.Tensor) -> torch.Tensor:
        return model(tok, cache, position)[:, -1]

    fn = step
    if compiled:
        # the model decides whether to fuse QKV from data pointers, which dynamo cannot trace: decide once here
        for block in model.trf_blocks:
            if block.att.W_qkv is None:
                block.att.fused_qkv = (lambda fused: lambda: fused)(block.att.fused_qkv())
        import torch._inductor.config as inductor_config

        inductor_config.freezing = freezing
        fn = torch.compile(step, fullgraph=True)

    def run(tok: torch.Tensor, pos: int) -> torch.Tensor:
        position.fill_(pos)
        return fn(tok)
    return run


def _time(step: Step, tok: torch.Tensor, warmup: int, steps: int, idle: float | None) -> dict:
    """First call (compiling, if any), then per-step seconds at positions warmup.. (one token each)."""
    t0 = time.perf_counter()
    tops = [int(step(tok, 0).float().argmax())]
    first = time.perf_counter() - t0
    for pos in range(1, warmup):
        tops.append(int(step(tok, pos).float().argmax()))
    wait_idle(idle)
    times = []
    for pos in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        out = step(tok, pos)
        times.append(time.perf_counter() - t0)
        tops.append(int(out.float().argmax()))
    return {"first_call_s": first, "step_ms": statistics.median(times) * 1e3, "min_step_ms": min(times) * 1e3,
            "tokens_per_s": 1 / statistics.median(times), "top_tokens": tops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--wait-idle", type=float, default=None, metavar="SHARE",
                        help="before timing each step, wait (up to 2 minutes) until other processes use under SHARE "
                             "(0-1) of the CPUs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    tok = torch.tensor([[464]])
    with torch.no_grad():
        for name in args.dtype:
            model = _model(name)
            dtype = model.attention_dtype
            variants = {"gpt2hub eager": None, "gpt2hub eager, static step": (False, False),
                        "torch.compile": (True, False), "torch.compile, freezing": (True, True)}
            for variant, how in variants.items():
                torch._dynamo.reset()
                cache = KVCache(model.cfg, 1, args.warmup + args.steps, dtype, "cpu")
                step = _eager(model, cache) if how is None else _static(model, cache, *how)
                rows.append({"dtype": name, "variant": variant,
                             **_time(step, tok, args.warmup, args.steps, args.wait_idle)})
                print(rows[-1], flush=True)
    info = machine()
    lines = [f"Batch-1 decoding step of gpt2-small, {describe(info)}; median of {args.steps} steps"
             f"{note(args.wait_idle, 'timed')}", ""]
    eager = {r["dtype"]: r["top_tokens"] for r in rows if r["variant"] == "gpt2hub eager"}
    lines += table(["dtype", "step", "first call (compile)", "step", "fastest step", "tokens/s",
                    "most likely token as eager's"],
                   [(r["dtype"], r["variant"], f"{r['first_call_s']:.2f} s", f"{r['step_ms']:.2f} ms",
                     f"{r['min_step_ms']:.2f} ms", f"{r['tokens_per_s']:.1f}",
                     f"{sum(a == b for a, b in zip(r['top_tokens'], eager[r['dtype']], strict=True))}"
                     f"/{len(r['top_tokens'])} steps") for r in rows])
    save(lines, args.out, "compile_decode", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
