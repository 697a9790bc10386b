"""Batch-1 greedy decoding of gpt2-small on CPU, interleaved: gpt2hub float32 and bfloat16 against transformers.

`gpt2hub bench` times each implementation in its own block; on a machine shared with other work, load that comes and
goes then favours whichever ran in a quiet moment. Here every round runs each implementation once, in turn, on the
same random weights (laid out as gpt2hub loads each dtype), and reports the median over rounds of each rate and of
each round's ratios. The rate is the bench's: new tokens after the first over the time after the first token.
"F.linear" is the bfloat16 path before packing (and still on CPUs without native bfloat16): gpt2hub.kernels with
NATIVE_BF16 off. It also checks that packed bfloat16 generates the same tokens as that path, and as F.linear with
oneDNN off altogether (`torch.backends.mkldnn.enabled = False`, a different summation order).

    python benchmarks/bf16_decode.py --prompt-lengths 16 512 --out benchmarks/results/cpu-xeon-amx-2core
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _report import describe, machine, save, table
from idle import note, wait_idle

from gpt2hub import GPTModel, generate, kernels
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.registry import resolve
from gpt2hub.synthetic import hf_config, hf_tensors, random_weights

Gen = Callable[[torch.Tensor, int], torch.Tensor]
PLAIN = "gpt2hub bfloat16, F.linear"
RATIOS = {"bf16 / own float32": ("gpt2hub bfloat16", "gpt2hub float32"),
          "bf16 / transformers bf16": ("gpt2hub bfloat16", "transformers bfloat16"),
          "bf16 packed / F.linear": ("gpt2hub bfloat16", PLAIN)}


@contextlib.contextmanager
def _switch(owner: Any, name: str, value: bool) -> Iterator[None]:
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def _implementations(transformers: bool) -> dict[str, Gen]:
    hp = resolve("gpt2-small").hparams()
    cfg = config_from_hparams(hp)
    weights = random_weights(hp, seed=0)
    ours = {dt: GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: weights[f"model/{n}"], cfg, dt))
            for dt in (torch.float32, torch.bfloat16)}

    def plain(idx: torch.Tensor, n: int) -> torch.Tensor:
        with _switch(kernels, "NATIVE_BF16", False):
            return generate(ours[torch.bfloat16], idx, n)

    impls: dict[str, Gen] = {"gpt2hub float32": lambda idx, n: generate(ours[torch.float32], idx, n),
                             "gpt2hub bfloat16": lambda idx, n: generate(ours[torch.bfloat16], idx, n), PLAIN: plain}
    if transformers:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(**hf_config(hp))).eval()
        sd = {k: torch.from_numpy(v) for k, v in hf_tensors(weights).items() if not k.endswith("attn.bias")}
        hf.transformer.load_state_dict(sd, strict=False)
        hf.tie_weights()
        hf = hf.to(torch.bfloat16)

        def reference(idx: torch.Tensor, n: int) -> torch.Tensor:
            return hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(idx))
        impls["transformers bfloat16"] = reference
    return impls


def _rate(gen: Gen, idx: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    gen(idx, 1)
    t1 = time.perf_counter()
    gen(idx, new_tokens)
    t2 = time.perf_counter()
    return (new_tokens - 1) / max(t2 - t1 - (t1 - t0), 1e-9)


def measure(prompt: int, rounds: int, new_tokens: int, impls: dict[str, Gen], idle: float | None) -> dict[str, Any]:
    """Rates per round for one prompt length, each implementation once per round, in turn."""
    idx = torch.randint(0, 50257, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    for gen in impls.values():
        gen(idx, 2)  # warm-up (and, for packed bfloat16, the packs)
    packed = impls["gpt2hub bfloat16"](idx, new_tokens)
    same = torch.equal(packed, impls[PLAIN](idx, new_tokens))
    with _switch(torch.backends.mkldnn, "enabled", False):
        same_without_onednn = torch.equal(packed, impls["gpt2hub bfloat16"](idx, new_tokens))
    runs: dict[str, list[float]] = {name: [] for name in impls}
    others = []
    for _ in range(rounds):
        others.append(wait_idle(idle))
        for name, gen in impls.items():
            runs[name].append(_rate(gen, idx, new_tokens))
    ratios = {label: statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))
              for label, (a, b) in RATIOS.items() if a in runs and b in runs}
    return {"prompt": prompt, "others_busy_before_rounds": others, "tokens_identical": same,
            "tokens_identical_without_onednn": same_without_onednn, "runs": runs,
            "median": {k: statistics.median(v) for k, v in runs.items()}, "ratios": ratios}


def _checks(result: dict[str, Any]) -> list[tuple[object, str, object]]:
    """The rows of the ratio table for one prompt length: its ratios, then whether the tokens agreed."""
    prompt = result["prompt"]
    return [(prompt, k, f"{v:.2f}x") for k, v in result["ratios"].items()] + [
        (prompt, "packed bf16 tokens == F.linear bf16 tokens", result["tokens_identical"]),
        (prompt, "... == F.linear without oneDNN", result["tokens_identical_without_onednn"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[16, 512])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--wait-idle", type=float, default=None, metavar="SHARE",
                        help="before each round, wait (up to 2 minutes) until other processes use under SHARE (0-1) "
                             "of the CPUs: for machines shared with other work")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    impls = _implementations(not args.no_transformers)
    with torch.no_grad():
        results = [measure(p, args.rounds, args.new_tokens, impls, args.wait_idle) for p in args.prompt_lengths]
    info = machine(packed_mib=kernels.packed_bytes() / 2**20)
    lines = [f"Batch-1 greedy decoding of gpt2-small (random weights), {describe(info)}; {args.rounds} interleaved "
             f"rounds of {args.new_tokens} new tokens{note(args.wait_idle)}; tokens/s after the first token, "
             "median (fastest round)", ""]
    lines += table(["prompt", "implementation", "tokens/s"],
                   [(r["prompt"], k, f"{v:.1f} ({max(r['runs'][k]):.1f})") for r in results for k, v in r["median"].items()])
    lines += [""] + table(["prompt", "ratio (median of rounds)", "value"], [row for r in results for row in _checks(r)])
    save(lines, args.out, "bf16_decode", {"machine": info, "results": results})


if __name__ == "__main__":
    main()
