"""Batch-1 greedy decoding on CPU, gpt2hub float32, bfloat16, int8 and int4, against a baseline checkout of gpt2hub.

Each implementation ("ours": this checkout; "baseline": the checkout given by --baseline, e.g. the commit before a
change) runs in a worker process of its own that builds every model once (random weights from
gpt2hub.synthetic.random_weights, laid out as gpt2hub loads each dtype; int8 and int4 through gpt2hub.quant, which a
baseline without it skips) and then generates when told to. Rounds alternate: every round runs each (model,
precision) on each implementation in turn, so that load from other work on the machine falls on all alike. The rate
is the bench's: new tokens after the first over the time after the first token (a call making one token is timed
just before, in the same round); the first token's time is the prompt's processing. Every call's tokens are
counted (tokens made must equal tokens asked), and float32 and bfloat16 tokens of both implementations compared.

`--profile` instead runs torch.profiler over --profile-tokens greedy tokens of each precision in each
implementation: operator calls per token, the busiest operators, and the time in linear layers.

    python benchmarks/decode_step.py --baseline /tmp/base --models gpt2-small gpt2-medium \\
        --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRECISIONS = ("float32", "bfloat16", "int8", "int4")
# bfloat16 weights with attention in float32 (GPTModel.attention_dtype); int4 in groups of 64 and 128
EXTRA = ("bfloat16-attn32", "int4-g64", "int4-g128")
LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "aten::linear")


# -- the worker: one per implementation, reading commands from stdin ---------------------------------------------------
def _model(name: str, precision: str) -> Any:
    """gpt2-<size> with random weights in `precision`, as gpt2hub loads it; None where this gpt2hub lacks it."""
    import torch

    from gpt2hub import GPTModel
    from gpt2hub.convert import config_from_hparams, openai_state_dict
    from gpt2hub.registry import resolve
    from gpt2hub.synthetic import random_weights

    hp = resolve(name).hparams()
    cfg = config_from_hparams(hp)
    weights = random_weights(hp, seed=0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bfloat16-attn32": torch.bfloat16}.get(precision)
    sd = openai_state_dict(lambda n: weights[f"model/{n}"], cfg, dtype or torch.float32)
    if dtype is not None:
        model = GPTModel.from_state_dict(cfg, sd)
        if precision == "bfloat16-attn32":
            if not hasattr(model, "attention_dtype"):
                return None
            model.attention_dtype = torch.float32
        return model
    try:
        from gpt2hub import quant
    except ImportError:  # a baseline from before gpt2hub.quant
        return None
    scheme, _, group = precision.partition("-g")  # "int4-g64": groups of 64 instead of the default
    size = int(group) if group else None
    return quant.quantized_model(cfg, quant.quantize_state_dict(sd, scheme, size), scheme, size)


def _profile(model: Any, idx: Any, tokens: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from gpt2hub import generate

    generate(model, idx, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, idx, tokens)
    events = prof.key_averages()
    calls = {e.key: e.count for e in events}
    self_us = {e.key: e.self_cpu_time_total for e in events}
    return {"calls_per_token": sum(calls.values()) / tokens,
            "linear_ms_per_token": sum(v for k, v in self_us.items() if k in LINEAR_OPS) / tokens / 1e3,
            "op_ms_per_token": sum(self_us.values()) / tokens / 1e3,
            "top": sorted(((k, calls[k] / tokens, self_us[k] / tokens / 1e3) for k in calls),
                          key=lambda r: -r[1])[:12]}


def worker(names: list[str], precisions: list[str], threads: int, plain: bool = False) -> None:
    """Build the models, say "ready", then answer each JSON command on stdin with one JSON line. `plain`: int8 and
    int4 layers dequantize and call F.linear, as on a CPU without their kernels' fast path."""
    import torch

    from gpt2hub import generate

    torch.set_num_threads(threads)
    if plain:
        from gpt2hub import quant

        quant.KERNELS = False
    models = {(n, p): m for n in names for p in precisions if (m := _model(n, p)) is not None}
    print(json.dumps({"ready": sorted(f"{m}/{p}" for m, p in models)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        model = models.get((cmd["model"], cmd["precision"]))
        if model is None:
            print(json.dumps({"missing": True}), flush=True)
            continue
        idx = torch.randint(0, 50257, (1, cmd["prompt"]), generator=torch.Generator().manual_seed(cmd["prompt"]))
        if cmd.get("profile"):
            print(json.dumps(_profile(model, idx, cmd["new_tokens"])), flush=True)
            continue
        t0 = time.perf_counter()
        generate(model, idx, 1)
        t1 = time.perf_counter()
        out = generate(model, idx, cmd["new_tokens"])
        t2 = time.perf_counter()
        print(json.dumps({"first_s": t1 - t0, "total_s": t2 - t1, "made": out.shape[1] - idx.shape[1],
                          "tokens": out[0, idx.shape[1]:].tolist()}), flush=True)


# -- the parent ----------------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, label: str, checkout: Path, names: list[str], precisions: list[str], threads: int,
                 plain: bool = False):
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        self.label = label
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--models", *names, "--precisions",
                                      *precisions, "--threads", str(threads), *(["--plain"] if plain else [])],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
        self.ready = self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.label} worker died (see its error above)")
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def run_rounds(workers: list[Worker], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rates per round, each (model, precision) on each worker in turn."""
    sys.path.insert(0, str(HERE))
    from idle import wait_idle

    cases = [(m, p) for m in args.models for p in args.precisions]
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for w in workers:  # warm-up: packs, caches, first calls
        for m, p in cases:
            w.ask(model=m, precision=p, prompt=args.prompt, new_tokens=4)
    for r in range(args.rounds):
        busy = wait_idle(args.wait_idle)
        for m, p in cases:
            for w in workers:
                got = w.ask(model=m, precision=p, prompt=args.prompt, new_tokens=args.new_tokens)
                if not got.get("missing"):
                    got["others_busy"] = busy
                    runs.setdefault((w.label, m, p), []).append(got)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for (label, m, p), got in runs.items():
        rates = [(args.new_tokens - 1) / max(g["total_s"] - g["first_s"], 1e-9) for g in got]
        rows.append({"impl": label, "model": m, "precision": p, "tokens_per_s": rates,
                     "first_token_s": [g["first_s"] for g in got],
                     "made_equals_asked": all(g["made"] == args.new_tokens for g in got),
                     "tokens": got[0]["tokens"], "same_tokens_every_round": all(g["tokens"] == got[0]["tokens"]
                                                                                 for g in got)})
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    from _report import describe, machine, table

    info = machine()
    lines = [f"Batch-1 greedy decoding (random weights), {describe(info)}; prompt {args.prompt} tokens, "
             f"{args.new_tokens} new tokens, {args.rounds} alternating rounds; tokens/s after the first token and the "
             "first token's time: median (min-max)", ""]
    by = {(r["impl"], r["model"], r["precision"]): r for r in rows}
    out = []
    for r in rows:
        base = by.get(("baseline", r["model"], r["precision"]))
        same = ratio = ""
        if base is not None and r["impl"] != "baseline":
            same = str(base["tokens"] == r["tokens"])
            ratio = f"{statistics.median(r['tokens_per_s']) / statistics.median(base['tokens_per_s']):.2f}x"
        out.append((r["model"], r["precision"], r["impl"], _spread(r["tokens_per_s"]),
                    _spread([t * 1e3 for t in r["first_token_s"]], "{:.0f}") + " ms", ratio, same,
                    r["made_equals_asked"]))
    lines += table(["model", "precision", "gpt2hub", "tokens/s", "first token", "vs baseline", "same tokens as baseline",
                    "tokens made == asked"], sorted(out))
    return lines, info


def profile(workers: list[Worker], args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    results = []
    for w in workers:
        for m in args.models:
            for p in args.precisions:
                got = w.ask(model=m, precision=p, prompt=args.prompt, new_tokens=args.profile_tokens, profile=True)
                if not got.get("missing"):
                    results.append({"impl": w.label, "model": m, "precision": p, **got})
    lines = [f"torch.profiler over {args.profile_tokens} greedy tokens (batch 1, prompt {args.prompt}), per token", ""]
    lines += __import__("_report").table(
        ["model", "precision", "gpt2hub", "operator calls", "ms in operators", "ms in linear layers", "most called"],
        [(r["model"], r["precision"], r["impl"], f"{r['calls_per_token']:.0f}", f"{r['op_ms_per_token']:.2f}",
          f"{r['linear_ms_per_token']:.2f}", ", ".join(f"{k} {n:.0f}" for k, n, _ in r["top"][:5])) for r in results])
    return lines, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS + EXTRA)
    parser.add_argument("--baseline", type=Path, default=None, help="another gpt2hub checkout to run beside this one")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", type=float, default=None, metavar="SHARE",
                        help="before each round, wait (up to 2 minutes) until other processes use under SHARE of the CPUs")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-tokens", type=int, default=64)
    parser.add_argument("--name", default=None, help="results file name (default decode_step or decode_profile)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plain", action="store_true",
                        help="int8/int4 on their plain path (dequantize + F.linear), as on CPUs without the kernels")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.models, args.precisions, args.threads, args.plain)
        return
    sys.path.insert(0, str(HERE))
    from _report import save

    workers = [Worker("ours, plain path" if args.plain else "ours", HERE.parent, args.models, args.precisions,
                      args.threads, args.plain)]
    if args.baseline is not None:
        workers.append(Worker("baseline", args.baseline, args.models, args.precisions, args.threads))
    try:
        if args.profile:
            lines, results = profile(workers, args)
            save(lines, args.out, args.name or "decode_profile", {"args": vars(args) | {"out": None, "baseline": str(
                args.baseline)}, "results": results})
        else:
            rows = run_rounds(workers, args)
            lines, info = report(rows, args)
            save(lines, args.out, args.name or "decode_step", {"machine": info, "args": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows})
    finally:
        for w in workers:
            w.close()


if __name__ == "__main__":
    main()
