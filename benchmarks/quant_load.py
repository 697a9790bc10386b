"""Warm loads of int8 and int4 gpt2-small against bfloat16: time to first logits and peak memory, from files.

Each storage is written once as the cache would hold it (a safetensors file by gpt2hub's writer: bfloat16 as the
converter lays it out, int8 and int4 as gpt2hub.quant.quantize_state_dict gives them). Each load is a fresh process
(imports excluded from the clock, as `gpt2hub bench`'s warm stage does): map the file (safetensors' loader for
bfloat16 as gpt2hub loads it today; both loaders for the quantized files), build the model, logits of an 8-token
prompt. Rounds alternate between storages; medians with min-max. Peak memory is the process's peak resident set
minus what it held before the load, against the file's size (the goal: at most 1.2x the quantized file).

    python benchmarks/quant_load.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {"bfloat16": ("bfloat16", "load"), "int8": ("int8", "load"), "int8, one mapping": ("int8", "map"),
         "int4": ("int4", "load"), "int4, one mapping": ("int4", "map")}


def write_files(folder: Path) -> dict[str, Path]:
    """The three storages of gpt2-small (random weights) as safetensors files in `folder`."""
    import torch

    from gpt2hub import quant
    from gpt2hub.convert import config_from_hparams, openai_state_dict
    from gpt2hub.registry import resolve
    from gpt2hub.safetensors_file import save_state_dict
    from gpt2hub.synthetic import random_weights

    hp = resolve("gpt2-small").hparams()
    cfg = config_from_hparams(hp)
    w = random_weights(hp, seed=0)
    paths = {}
    for storage in ("bfloat16", "int8", "int4"):
        if storage == "bfloat16":
            sd = openai_state_dict(lambda n: w[f"model/{n}"], cfg, torch.bfloat16)
        else:
            sd = quant.quantize_state_dict(openai_state_dict(lambda n: w[f"model/{n}"], cfg, torch.float32), storage)
        paths[storage] = folder / f"{storage}.safetensors"
        save_state_dict(sd, paths[storage])
    return paths


def child(storage: str, loader: str, path: str) -> None:
    """One warm load in this (fresh) process; prints seconds and peak memory growth as JSON."""
    import gc

    import torch

    from gpt2hub import GPTModel, quant
    from gpt2hub.convert import config_from_hparams
    from gpt2hub.registry import resolve
    from gpt2hub.safetensors_file import load_safetensors, map_safetensors

    torch.set_num_threads(2)
    cfg = config_from_hparams(resolve("gpt2-small").hparams())
    idx = torch.tensor([[464, 3290, 318, 257, 922, 1110, 13, 383]])
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tensors = (map_safetensors if loader == "map" else load_safetensors)(Path(path))
    if storage == "bfloat16":
        model = GPTModel.from_state_dict(cfg, tensors)
    else:
        model = quant.quantized_model(cfg, tensors, storage)
    with torch.inference_mode():
        logits = model(idx)
    seconds = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"seconds": seconds, "peak_growth": grown, "finite": bool(torch.isfinite(logits).all())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(HERE))
    from _report import describe, machine, save, table

    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(Path(tmp))
        sizes = {storage: p.stat().st_size for storage, p in paths.items()}
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        for _ in range(args.rounds):
            for name, (storage, loader) in CASES.items():
                out = subprocess.run([sys.executable, __file__, "--child", storage, loader, str(paths[storage])],
                                     capture_output=True, text=True, env=env, check=True).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
    info = machine()
    rows = []
    for name, got in runs.items():
        storage = CASES[name][0]
        secs = [g["seconds"] * 1e3 for g in got]
        peak = statistics.median(g["peak_growth"] for g in got)
        rows.append((name, f"{sizes[storage] / 2**20:.1f} MiB", f"{statistics.median(secs):.1f} ({min(secs):.1f}-"
                     f"{max(secs):.1f}) ms", f"{peak / 2**20:.1f} MiB", f"{peak / sizes[storage]:.2f}x",
                     all(g["finite"] for g in got)))
    lines = [f"Warm loads of gpt2-small (random weights) from safetensors files, {describe(info)}; fresh processes, "
             f"{args.rounds} alternating rounds; map + build + logits of 8 tokens: median (min-max)", ""]
    lines += table(["storage", "file", "to first logits", "peak memory growth", "growth / file", "finite logits"], rows)
    save(lines, args.out, "quant_load", {"machine": info, "file_bytes": sizes, "runs": runs})


if __name__ == "__main__":
    main()
