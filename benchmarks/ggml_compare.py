"""Batch-1 greedy decoding, gpt2hub beside ggml's examples/gpt-2 on the same checkpoint, in alternating rounds.

ggml (github.com/ggml-org/ggml) reads OpenAI's TensorFlow checkpoint through its own converter, so both run on the
same weights: a full-size checkpoint with random weights in OpenAI's exact layout (`gpt2hub.synthetic`) and GPT-2's
real vocabulary (tests/data), converted with ggml's `examples/gpt-2/convert-ckpt-to-ggml.py` (f32, f16; TensorFlow
needed) and quantized from f32 with `gpt-2-quantize` (q8_0, q4_0). The pairs: gpt2hub float32 / ggml f32,
bfloat16 (or float16) / f16, int8 / q8_0, int4 / q4_0. A gpt2hub dtype that the installed gpt2hub does not accept
yet is skipped with a printed note (ggml's side of the pair is still measured).

What each number is (a decoding step: one new token through the whole model, with the KV cache):
- ggml: `gpt-2-backend` with `--top_k 1` (greedy) and `--ignore-eos`. Its "predict time" adds up the wall time of
  every `gpt2_eval` call (graph, compute, copying out the last logits; not sampling) and it divides that by all the
  tokens evaluated, prompt included. To leave the prompt out, each ggml measurement is two processes: `-n N` and
  `-n 1` (which evaluates the prompt alone); the time per step is their predict-time difference over N - 1.
- gpt2hub: a fresh process, `torch.set_num_threads`, `gpt2hub.from_pretrained(folder, dtype=...)`, a warm-up
  generation that pays every one-time cost (oneDNN primitives, bfloat16 packs made on a weight's 2nd use, float32
  copies on its 16th: gpt2hub.kernels.USES_BEFORE_PACK; their cost is in float32_copies.md, as ggml's loading is
  outside its figure), then `generate_stream` (greedy) timed at each new token: the time
  per step is (time of token N - time of token 1) / (N - 1), i.e. the N - 1 steps that evaluate tokens 1 .. N - 1,
  argmax and Python included: the same N - 1 forward passes as ggml's.
- tokens/s is 1 / time per step. Loading, the prompt and the first token are outside both.

Every measurement is checked: each side produced the tokens asked (ggml's count is read back from its timing line),
both tokenized the prompt to the same ids, and no rate may beat the memory: the weights a step must read (every matrix
at the format's nominal bytes per weight, the tied head included), less what the CPU's L2 and L3 caches could hold,
over the highest bandwidth measured in the same run (large copies, sums and dot products; measured once more before a
rate is called impossible). A run that breaks a check stops the benchmark with an error naming it.

    python benchmarks/ggml_compare.py --ggml-build /path/to/build --ggml-src /path/to/ggml \\
        --models gpt2-small gpt2-medium --dtypes float32 bfloat16 int8 int4 --out benchmarks/results/my-machine

`--ggml-build` is a ggml build of examples/gpt-2 (its `bin/` holds gpt-2-backend and gpt-2-quantize); `--ggml-src`
the ggml checkout it was built from (for the converter and the commit). `--work DIR` keeps the checkpoints and the
converted files for the next run (default: a temporary folder, deleted at the end). `ggml_compare.py --report
FILE.json` prints the Markdown of a saved run again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).parent))
from _report import describe, machine, save, table  # noqa: E402
from idle import OthersShare, note, wait_idle  # noqa: E402

GGML_TYPE = {"float32": "f32", "bfloat16": "f16", "float16": "f16", "int8": "q8_0", "int4": "q4_0"}
# nominal bytes per weight of each format (a lower bound: block scales only add to q8_0 and q4_0's, 34 and 18 per 32)
NOMINAL_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5,
                 "f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CONVERTER = Path("examples/gpt-2/convert-ckpt-to-ggml.py")
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class RunError(RuntimeError):
    """A measurement that failed a check (tokens missing, an impossible rate, output that cannot be read)."""


# -- ggml's output ------------------------------------------------------------------------------------------------------
@dataclass
class GgmlOutput:
    """What one `gpt-2-backend` run printed: prompt ids (its first 8), timings (ms) and the text it generated."""

    n_prompt: int
    first_ids: list[int]
    load_ms: float
    sample_ms: float  # choosing the tokens (all of them), outside the predict time
    predict_ms: float
    per_token_ms: float
    text: bytes  # the prompt's tokens and the new ones, as ggml printed them

    @property
    def evaluated(self) -> int:
        return evaluated_tokens(self.predict_ms, self.per_token_ms)


_PROMPT = re.compile(rb"number of tokens in prompt = (\d+), first 8 tokens: ([\d ]*)\n\n")
_TIME = re.compile(rb"\n\n\w+: +load time = +([\d.]+) ms\n")
_SAMPLE = re.compile(rb"\w+: +sample time = +([\d.]+) ms\n")
_PREDICT = re.compile(rb"\w+: +predict time = +([\d.]+) ms / ([\d.]+) ms per token")


def parse_ggml(stdout: bytes, run: str) -> GgmlOutput:
    """The numbers in `gpt-2-backend`'s standard output; RunError naming `run` when a line is missing."""
    prompt = _PROMPT.search(stdout)
    times = ([None] + list(_TIME.finditer(stdout)))[-1]  # the last one: the generated text could hold anything
    sample = _SAMPLE.match(stdout, times.end()) if times else None
    predict = _PREDICT.match(stdout, sample.end()) if sample else None
    if not (prompt and times and sample and predict) or times.start() < prompt.end():
        raise RunError(f"{run}: ggml's output lacks its prompt or timing lines (is it examples/gpt-2's gpt-2-backend?): "
                       f"...{stdout[-300:].decode(errors='replace')}")
    return GgmlOutput(n_prompt=int(prompt[1]), first_ids=[int(t) for t in prompt[2].split()],
                      load_ms=float(times[1]), sample_ms=float(sample[1]), predict_ms=float(predict[1]),
                      per_token_ms=float(predict[2]), text=stdout[prompt.end():times.start()])


def evaluated_tokens(predict_ms: float, per_token_ms: float) -> int:
    """How many tokens ggml evaluated: its predict time over its time per token, both printed to 0.01 ms.

    RunError when no count, or more than one, fits the printed numbers.
    """
    def fits(n: int) -> bool:  # per_token_ms is predict/n rounded to 0.01; predict was itself rounded to 0.01
        return abs(predict_ms / n - per_token_ms) <= 0.005 + 0.005 / n + 1e-9

    if per_token_ms <= 0:
        raise RunError(f"ggml printed a time per token of {per_token_ms} ms: cannot count its tokens")
    guess = round(predict_ms / per_token_ms)
    fitting = [n for n in (guess - 1, guess, guess + 1) if n > 0 and fits(n)]
    if len(fitting) != 1:
        raise RunError(f"cannot tell how many tokens ggml evaluated from {predict_ms} ms / {per_token_ms} ms per token "
                       f"(fits: {fitting or 'none'}); ask for fewer new tokens")
    return fitting[0]


def ggml_step_ms(full: GgmlOutput, prompt_only: GgmlOutput, new_tokens: int, run: str) -> float:
    """ms per decoding step from a `-n new_tokens` run and a `-n 1` run; RunError if either made other tokens."""
    for out, asked in ((full, new_tokens), (prompt_only, 1)):
        produced = out.evaluated - out.n_prompt + 1  # the last new token is sampled, never evaluated
        if produced != asked:
            raise RunError(f"{run}: ggml produced {produced} new tokens, {asked} were asked (it evaluated "
                           f"{out.evaluated} with a {out.n_prompt}-token prompt)")
    return (full.predict_ms - prompt_only.predict_ms) / (new_tokens - 1)


# -- the checks ---------------------------------------------------------------------------------------------------------
def check_tokens(run: str, produced: int, asked: int) -> None:
    if produced != asked:
        raise RunError(f"{run}: produced {produced} new tokens, {asked} were asked")


def step_bytes(cfg: dict[str, int], fmt: str) -> float:
    """The least a decoding step reads: every matrix (blocks and the tied head) at `fmt`'s nominal bytes per weight."""
    d, n_layers = cfg["emb_dim"], cfg["n_layers"]
    return (12 * n_layers * d * d + cfg["vocab_size"] * d) * NOMINAL_BYTES[fmt]


def check_rate(run: str, tokens_per_s: float, min_bytes: float, bytes_per_s: float, cache_bytes: int) -> None:
    """RunError unless `tokens_per_s` is positive and within what `bytes_per_s` of memory bandwidth can feed a step
    reading `min_bytes`, of which `cache_bytes` may come from the CPU's caches."""
    from_memory = min_bytes - cache_bytes
    limit = bytes_per_s / from_memory if from_memory > 0 else float("inf")
    if not 0 < tokens_per_s <= limit:
        raise RunError(f"{run}: {tokens_per_s:.1f} tokens/s is impossible: a step reads at least "
                       f"{from_memory / 2**20:.0f} MiB from memory, {bytes_per_s / 1e9:.1f} GB/s allows at most "
                       f"{limit:.1f} tokens/s")


def cache_bytes() -> int:
    """Bytes the CPU's L2 and L3 caches hold together, as Linux lists them (every L2, each distinct L3); 0 elsewhere."""
    seen: dict[str, int] = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            level = (index / "level").read_text().strip()
            if level in ("2", "3"):
                size = (index / "size").read_text().strip()
                key = f"{level}:{(index / 'shared_cpu_list').read_text().strip()}"
                seen[key] = int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
    return sum(seen.values())


def bandwidth(threads: int, repeats: int = 7) -> dict[str, float]:
    """The memory's bytes per second, the best of `repeats` of each of three kernels on 512 MiB after a first pass
    that faults the pages in: torch's copy (read + write) and sum with `threads` threads, numpy's dot of an array
    with itself (read once; BLAS's own threads)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(1 << 27)
    dst = torch.empty_like(src)
    dst.copy_(src)
    array = src.numpy()

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = src.numel() * src.element_size()
    return {"copy": 2 * nbytes / best(lambda: dst.copy_(src)), "sum": nbytes / best(lambda: src.sum().item()),
            "dot": nbytes / best(lambda: np.dot(array, array))}


# -- the weights --------------------------------------------------------------------------------------------------------
def _quiet(cmd: Sequence[str | Path], what: str, **kwargs: Any) -> None:
    """Run `cmd`; RunError naming `what` and the end of its output if it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RunError(f"{what} failed ({' '.join(map(str, cmd))}): {(proc.stdout + proc.stderr)[-1500:]}")


def prepare(model: str, work: Path, ggml_src: Path, ggml_bin: Path, formats: Sequence[str], vocab: Path) -> dict[str, Path]:
    """{"openai": folder of OpenAI's files with random weights, fmt: ggml file, ...}; files already there are kept."""
    from gpt2hub.registry import resolve
    from gpt2hub.synthetic import write_openai_folder

    folder = work / model / "openai"
    if not (folder / "model.ckpt.index").exists():
        print(f"writing {folder} (random weights, GPT-2's vocabulary)", file=sys.stderr)
        write_openai_folder(folder, resolve(model), ((vocab / "encoder.json").read_bytes(), (vocab / "vocab.bpe").read_bytes()))
    paths = {"openai": folder}
    for fmt in ["f32", *(f for f in dict.fromkeys(formats) if f != "f32")]:  # the quantized ones are made from f32
        path = paths[fmt] = work / model / f"ggml-model-{fmt}.bin"
        if path.exists():
            continue
        print(f"converting {model} to ggml {fmt}", file=sys.stderr)
        if fmt in ("f32", "f16"):  # the converter writes ggml-model-<fmt>.bin beside the checkpoint
            _quiet([sys.executable, ggml_src / CONVERTER, folder, "0" if fmt == "f32" else "1"], f"ggml's converter ({fmt})")
            (folder / path.name).rename(path)
        else:
            _quiet([ggml_bin / "gpt-2-quantize", paths["f32"], path.with_suffix(".part"), fmt], f"gpt-2-quantize {fmt}")
            path.with_suffix(".part").rename(path)
    return paths


# -- one measurement each -----------------------------------------------------------------------------------------------
def run_ggml(binary: Path, model_file: Path, prompt: str, new_tokens: int, threads: int,
             run: str) -> tuple[GgmlOutput, float]:
    """ggml's output for `new_tokens` and its time per decoding step (ms), from a `-n new_tokens` and a `-n 1` run."""
    outs = []
    for n in (1, new_tokens):
        cmd = [str(binary), "-m", str(model_file), "-p", prompt, "-n", str(n), "-t", str(threads), "--top_k", "1",
               "--ignore-eos", "-s", "1"]
        proc = subprocess.run(cmd, capture_output=True, timeout=1800)
        if proc.returncode != 0:
            raise RunError(f"{run}: {' '.join(cmd)} exited with {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-1000:]}")
        outs.append(parse_ggml(proc.stdout, run))
    return outs[1], ggml_step_ms(outs[1], outs[0], new_tokens, run)


def run_gpt2hub(folder: Path, dtype: str, ids: list[int], new_tokens: int, threads: int, run: str) -> dict[str, Any]:
    """The child's result: {"unsupported": reason} or {"step_ms", "ids", "load_s"}."""
    import gpt2hub

    env = {**os.environ, "GPT2HUB_IGNORE_PINS": "1",  # random weights under the published names
           "GPT2HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(gpt2hub.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    args = {"folder": str(folder), "dtype": dtype, "ids": ids, "new_tokens": new_tokens, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        raise RunError(f"{run}: the gpt2hub process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load, warm up, then time each new token of one greedy generation."""
    import torch

    import gpt2hub

    torch.set_num_threads(args["threads"])
    t0 = time.perf_counter()
    try:
        model = gpt2hub.from_pretrained(args["folder"], dtype=args["dtype"], progress=False)
    except (ValueError, TypeError) as error:
        if "dtype" not in str(error):
            raise
        return {"unsupported": str(error)}
    load_s = time.perf_counter() - t0
    idx = torch.tensor([args["ids"]])
    from gpt2hub.kernels import USES_BEFORE_PACK

    gpt2hub.generate(model, idx, max(USES_BEFORE_PACK.values()) + 1)  # warm-up: oneDNN primitives, packs, copies
    stamps, ids = [], []
    for column in gpt2hub.generate_stream(model, idx, args["new_tokens"]):
        ids.append(int(column[0]))
        stamps.append(time.perf_counter())
    step_ms = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) * 1000
    return {"step_ms": step_ms, "ids": ids, "load_s": load_s, "torch_threads": torch.get_num_threads()}


def same_prefix(ids: list[int], token_bytes: Callable[[int], bytes], text: bytes) -> int:
    """How many of `ids`, in order, spell the start of `text`."""
    at = 0
    for i, t in enumerate(ids):
        piece = token_bytes(t)
        if text[at:at + len(piece)] != piece:
            return i
        at += len(piece)
    return len(ids)


# -- rounds -------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What every run of a model shares."""

    model: str
    paths: dict[str, Path]
    binary: Path
    prompt: str
    prompt_ids: list[int]
    new_tokens: int
    threads: int
    wait_idle: float | None
    patience: float
    max_others: float | None  # a run during which other processes used more of the CPUs is made again
    retries: int
    cfg: dict[str, int]
    bandwidths: list[dict[str, float]]  # every measurement of the run so far (bytes/s per kernel)
    cache_bytes: int

    def check_rate(self, run: str, tokens_per_s: float, fmt: str) -> None:
        """`check_rate` against the highest bandwidth measured; a rate above it measures the memory once more first."""
        for again in (False, True):
            if again:
                self.bandwidths.append(bandwidth(self.threads))
            try:
                return check_rate(run, tokens_per_s, step_bytes(self.cfg, fmt),
                                  max(max(b.values()) for b in self.bandwidths), self.cache_bytes)
            except RunError:
                if again:
                    raise

    def quietly(self, fn: Callable[[], T]) -> tuple[T, dict[str, Any]]:
        """fn() after waiting for quiet (`wait_idle`), made again (up to `retries` times) while other processes used
        more than `max_others` of the CPUs during it; its result and what the machine did ("others_share": during the
        kept run, "busy_before": before it, "discarded_others_shares": during the runs made again)."""
        discarded: list[float] = []
        while True:
            busy = wait_idle(self.wait_idle, self.patience)
            started = time.time()
            with OthersShare() as others:
                result = fn()
            share = others.share
            if self.max_others is None or share is None or share <= self.max_others or len(discarded) == self.retries:
                return result, {"started": started, "busy_before": busy, "others_share": share,
                                "discarded_others_shares": discarded}
            discarded.append(share)
            print(f"  other processes used {share:.0%} of the CPUs during it: made again", file=sys.stderr)


def _ggml_side(s: Settings, pair: dict[str, Any], round_: int) -> GgmlOutput:
    fmt, run = pair["ggml"], f"{s.model} ggml {pair['ggml']} round {round_ + 1}"
    (out, step_ms), machine_use = s.quietly(lambda: run_ggml(s.binary, s.paths[fmt], s.prompt, s.new_tokens,
                                                             s.threads, run))
    if out.n_prompt != len(s.prompt_ids) or out.first_ids != s.prompt_ids[:8]:
        raise RunError(f"{run}: ggml tokenized {s.prompt!r} to {out.n_prompt} tokens starting {out.first_ids}, gpt2hub "
                       f"to {s.prompt_ids}: pick a prompt both split alike (--prompt)")
    s.check_rate(run, 1000 / step_ms, fmt)
    pair["ggml_runs"].append({"round": round_ + 1, "step_ms": step_ms, "tokens_per_s": 1000 / step_ms,
                              "ggml_ms_per_token": out.per_token_ms, "ggml_sample_ms": out.sample_ms, **machine_use})
    return out


def _gpt2hub_side(s: Settings, pair: dict[str, Any], round_: int) -> list[int] | None:
    dtype, run = pair["dtype"], f"{s.model} gpt2hub {pair['dtype']} round {round_ + 1}"
    if pair["unsupported"]:
        return None
    res, machine_use = s.quietly(lambda: run_gpt2hub(s.paths["openai"], dtype, s.prompt_ids, s.new_tokens, s.threads,
                                                     run))
    if "unsupported" in res:
        pair["unsupported"] = res["unsupported"]
        print(f"note: this gpt2hub does not accept dtype={dtype!r} ({res['unsupported']}): gpt2hub {dtype} is skipped, "
              f"ggml {pair['ggml']} is still measured", file=sys.stderr)
        return None
    check_tokens(run, len(res["ids"]), s.new_tokens)
    s.check_rate(run, 1000 / res["step_ms"], dtype)
    pair["gpt2hub_runs"].append({"round": round_ + 1, "step_ms": res["step_ms"], "tokens_per_s": 1000 / res["step_ms"],
                                 "load_s": res["load_s"], **machine_use})
    return res["ids"]


def measure(s: Settings, dtypes: Sequence[str], rounds: int, token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
    """Every pair once per round, ggml and gpt2hub in turn (ggml first in odd rounds, gpt2hub first in even ones)."""
    pairs: list[dict[str, Any]] = [{"dtype": d, "ggml": GGML_TYPE[d], "unsupported": None, "ggml_runs": [],
                                    "gpt2hub_runs": [], "same_first_tokens": []} for d in dtypes]
    for round_ in range(rounds):
        for pair in pairs:
            print(f"{s.model} round {round_ + 1}/{rounds}: {pair['dtype']} / {pair['ggml']}", file=sys.stderr)
            if round_ % 2 == 0:
                out, ids = _ggml_side(s, pair, round_), _gpt2hub_side(s, pair, round_)
            else:
                ids = _gpt2hub_side(s, pair, round_)
                out = _ggml_side(s, pair, round_)
            if ids is not None:  # ggml printed the prompt's tokens, then the new ones
                pair["same_first_tokens"].append(same_prefix(ids, token_bytes, out.text.removeprefix(s.prompt.encode())))
    return {"model": s.model, "prompt": s.prompt, "prompt_ids": s.prompt_ids,
            "step_bytes": {f: step_bytes(s.cfg, f) for d in dtypes for f in (d, GGML_TYPE[d])}, "pairs": pairs}


# -- the report ---------------------------------------------------------------------------------------------------------
def _cell(runs: list[dict[str, Any]]) -> str:
    rates = [r["tokens_per_s"] for r in runs]
    return f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})" if rates else "-"


def _ratio(pair: dict[str, Any]) -> str:
    ours = {r["round"]: r["tokens_per_s"] for r in pair["gpt2hub_runs"]}
    theirs = {r["round"]: r["tokens_per_s"] for r in pair["ggml_runs"]}
    per_round = [ours[k] / theirs[k] for k in ours if k in theirs]
    if not per_round:
        return "-"
    ratio = statistics.median(ours.values()) / statistics.median(theirs.values())
    return f"{ratio:.2f} ({min(per_round):.2f}-{max(per_round):.2f})"


def _others(pair: dict[str, Any]) -> str:
    shares = [r["others_share"] for r in pair["ggml_runs"] + pair["gpt2hub_runs"] if r["others_share"] is not None]
    return f"{statistics.median(shares):.0%} ({max(shares):.0%})" if shares else "-"


def rows(result: dict[str, Any], new_tokens: int) -> list[list[str]]:
    """The table's rows for one model's result."""
    out = []
    for p in result["pairs"]:
        ours = "not accepted by this gpt2hub" if p["unsupported"] else _cell(p["gpt2hub_runs"])
        same = f"{min(p['same_first_tokens'])}/{new_tokens}" if p["same_first_tokens"] else "-"
        out.append([result["model"], p["dtype"], p["ggml"], ours, _cell(p["ggml_runs"]), _ratio(p), same, _others(p)])
    return out


COLUMNS = ["model", "gpt2hub", "ggml", "gpt2hub tokens/s", "ggml tokens/s", "gpt2hub / ggml", "same first tokens",
           "others' CPU share"]


def report(data: dict[str, Any]) -> list[str]:
    """The Markdown lines: a heading naming the machine and the run, the table, what the numbers are."""
    c, info = data["config"], data["machine"]
    lines = [f"Batch-1 greedy decoding, gpt2hub beside ggml's examples/gpt-2 (gpt-2-backend, ggml commit "
             f"{info['ggml_commit']}) on the same random-weight checkpoints; {describe(info)}; CPU flags: "
             f"{' '.join(info['cpu_flags'])}; {c['rounds']} alternating rounds of {c['new_tokens']} new tokens after the "
             f"{len(data['results'][0]['prompt_ids'])}-token prompt {c['prompt']!r}, {c['threads']} threads"
             f"{note(c['wait_idle'], 'each run started')}. tokens/s: median (min-max) of 1 / time per decoding step "
             "after the first new token; gpt2hub / ggml: ratio of the medians (min-max of the rounds' ratios).", ""]
    lines += table(COLUMNS, [row for res in data["results"] for row in rows(res, c["new_tokens"])])
    bw = data["bandwidth_bytes_per_s"]
    sampling = [r["ggml_sample_ms"] / c["new_tokens"] for res in data["results"] for p in res["pairs"]
                for r in p["ggml_runs"] if "ggml_sample_ms" in r]
    sampled = (f" (ggml's sampling, greedy through `--top_k 1`, is outside: {statistics.median(sampling):.2f} ms a token)"
               if sampling else "")
    lines += ["", "- Neither figure includes loading, the prompt or the first new token. ggml: predict time (its "
              "`gpt2_eval` calls) of a `-n N` run less that of a `-n 1` run, over N - 1" + sampled + "; gpt2hub: a "
              "fresh process, a warm-up that makes every pack and copy (17 tokens), then `generate_stream` (greedy: argmax "
              "inside) timed from the first "
              "new token to the last, over N - 1.",
              "- same first tokens: how many of gpt2hub's greedy tokens ggml also chose, in order (fewest over the "
              "rounds); 16-bit and 8-/4-bit formats round differently, and random weights leave close logits.",
              "- others' CPU share: the share of the CPUs other processes used during the runs of the row, median "
              f"(max); the machine is shared with other work.{_again(data)}",
              f"- Memory bandwidth measured in the run (best): copy {max(b['copy'] for b in bw) / 1e9:.1f} GB/s "
              f"(read + write), sum {max(b['sum'] for b in bw) / 1e9:.1f} GB/s, dot {max(b['dot'] for b in bw) / 1e9:.1f}"
              f" GB/s (read); L2 + L3 caches "
              f"{data['cache_bytes'] / 2**20:.0f} MiB. Every rate was checked against them."]
    skipped = {p["dtype"]: p["unsupported"] for res in data["results"] for p in res["pairs"] if p["unsupported"]}
    lines += [f"- gpt2hub {dtype} was skipped: {reason}" for dtype, reason in skipped.items()]
    return lines


def _again(data: dict[str, Any]) -> str:
    """The words on runs made again because other processes were busy (--max-others)."""
    limit = data["config"]["max_others"]
    if limit is None:
        return ""
    runs = [r for res in data["results"] for p in res["pairs"] for r in p["ggml_runs"] + p["gpt2hub_runs"]]
    again = sum(len(r["discarded_others_shares"]) for r in runs)
    return (f" A run during which they used more than {limit:.0%} was made again (up to {data['config']['retries']} "
            f"times; then kept): {again} runs were made again for the {len(runs)} kept.")


# -- the whole run ------------------------------------------------------------------------------------------------------
def ggml_commit(src: Path) -> str:
    proc = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix flags (AVX2, FMA, F16C, AVX-512, AMX) from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f in ("avx2", "fma", "f16c", "avx_vnni") or f.startswith(("avx512", "amx")))
    return []


@contextlib.contextmanager
def work_folder(path: Path | None) -> Iterator[Path]:
    """`path` (kept), or a temporary folder deleted at the end."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="ggml-compare-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ggml-build", type=Path, required=True, help="a ggml build of examples/gpt-2 (bin/gpt-2-backend)")
    parser.add_argument("--ggml-src", type=Path, required=True, help="the ggml checkout it was built from")
    parser.add_argument("--models", nargs="+", default=["gpt2-small"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8", "int4"], choices=list(GGML_TYPE))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--wait-idle", type=float, default=None, metavar="SHARE",
                        help="before each run, wait (up to --patience seconds) until other processes use under SHARE "
                             "(0-1) of the CPUs: for machines shared with other work")
    parser.add_argument("--patience", type=float, default=120.0)
    parser.add_argument("--max-others", type=float, default=None, metavar="SHARE",
                        help="make a run again (up to --retries times) when other processes used more than SHARE (0-1) "
                             "of the CPUs during it")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the checkpoints and converted files here")
    parser.add_argument("--vocab", type=Path, default=REPO / "tests" / "data", help="folder of encoder.json and vocab.bpe")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    binary = args.ggml_build / "bin" / "gpt-2-backend"
    problems = [f"{binary} is missing (--ggml-build: a ggml build of examples/gpt-2)" for _ in [0] if not binary.is_file()]
    problems += [f"{args.ggml_src / CONVERTER} is missing (--ggml-src: the ggml checkout)"
                 for _ in [0] if not (args.ggml_src / CONVERTER).is_file()]
    problems += ["--new-tokens must be at least 2" for _ in [0] if args.new_tokens < 2]
    problems += ["--rounds and --threads must be at least 1" for _ in [0] if min(args.rounds, args.threads) < 1]
    if problems:
        parser.error("; ".join(problems))
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # a measurement in a fresh process
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--report":  # the Markdown again from a saved ggml_compare.json
        print("\n".join(report(json.loads(Path(sys.argv[2]).read_text()))))
        return
    args = _arguments()
    import gpt2hub
    from gpt2hub.registry import resolve

    bw: list[dict[str, float]] = []
    results: list[dict[str, Any]] = []
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    info = machine(ggml_commit=ggml_commit(args.ggml_src), cpu_flags=cpu_flags())
    data: dict[str, Any] = {"machine": info, "config": config, "bandwidth_bytes_per_s": bw,
                            "cache_bytes": cache_bytes(), "results": results}
    try:
        with work_folder(args.work) as work:
            for model in args.models:
                paths = prepare(model, work, args.ggml_src, args.ggml_build / "bin",
                                [GGML_TYPE[d] for d in args.dtypes], args.vocab)
                tokenizer = gpt2hub.load_tokenizer(str(paths["openai"]))
                wait_idle(args.wait_idle, args.patience)
                bw.append(bandwidth(args.threads))
                s = Settings(model, paths, args.ggml_build / "bin" / "gpt-2-backend", args.prompt,
                             tokenizer.encode(args.prompt), args.new_tokens, args.threads, args.wait_idle, args.patience,
                             args.max_others, args.retries, resolve(model).config(), bw, data["cache_bytes"])
                results.append(measure(s, args.dtypes, args.rounds, tokenizer.decode_single_token_bytes))
                if args.out:  # what a long run on a shared machine has measured so far
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / "ggml_compare.partial.json").write_text(json.dumps(data, indent=2))
    except RunError as error:
        sys.exit(f"error: {error}")
    save(report(data), args.out, "ggml_compare", data)
    if args.out:
        (args.out / "ggml_compare.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
