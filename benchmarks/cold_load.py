"""Cold and warm loads beside the copy floor, and beside another checkout of gpt2hub (a baseline), in alternating fresh
processes.

Each round runs, for every checkout, `gpt2hub bench`'s cold stage (an empty cache, the seven files served from
127.0.0.1 by this process, `from_pretrained`'s own path up to the first logits), then the copy floor (the same bytes
fetched into fsynced files). Then each checkout fills a cache of its own and the warm stage (a fresh process, imports
excluded, until the first logits) runs in alternating rounds. Rounds alternate so that both checkouts see the same
moments of a shared machine; the report gives medians with min and max, every run, and each cold median over the
median copy. The checkpoints are full-size and random
(gpt2hub.synthetic), so the sizes' pinned sha256 values are ignored (GPT2HUB_IGNORE_PINS=1) but still computed:
gpt2-small pays for sha256 as with real weights, the other sizes (which have no pins) for crc32c only.

    python benchmarks/cold_load.py --models gpt2-small gpt2-medium --dtype float32 bfloat16 \\
        --baseline /path/to/older/checkout --out benchmarks/results/cpu-xeon-amx-2core

int8 and int4 (`--dtype int8 int4`) quantize while loading cold ("convert"); a baseline checkout that predates them
cannot load them and fails naming its tree.

The stages run with Python's bytecode cache on (PYTHONDONTWRITEBYTECODE is left out of their environment), as an
installed gpt2hub has it: otherwise every fresh process compiles the modules a load imports lazily (gpt2hub.quant
for int8 and int4: about 10 ms, which made int8's warm load look slower than bfloat16's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _report import describe, machine, save, table

HERE = str(Path(__file__).resolve().parents[1])
ENV = {"GPT2HUB_DISABLE_PROGRESS_BARS": "1", "GPT2HUB_IGNORE_PINS": "1"}


def _environ() -> dict[str, str]:
    """This process's environment with Python's bytecode cache allowed (see the module docstring)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _stage(kind: str, args: dict[str, Any], env: dict[str, str], tree: str) -> dict[str, Any]:
    """One `gpt2hub.bench` stage in a fresh process importing gpt2hub from `tree`."""
    proc = subprocess.run([sys.executable, "-m", "gpt2hub.bench", kind, json.dumps(args)], capture_output=True,
                          text=True, cwd=tree, env={**_environ(), **ENV, **env, "PYTHONPATH": tree}, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{kind} in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(model: str, dtype: str, trees: dict[str, str], repeats: int, work: Path) -> dict[str, Any]:
    """Cold loads of `model` in `dtype` for each checkout in `trees`, and the copy floor, `repeats` rounds."""
    from gpt2hub import bench
    from gpt2hub.registry import resolve

    spec, root, _ = bench.prepare(resolve(model), work / model, False)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    copies = []
    with bench.serve(root) as url:
        base = {"model": spec.name, "device": "cpu", "dtype": dtype, "spec": asdict(spec)}
        for _ in range(repeats):
            for label, tree in trees.items():
                os.sync()  # no run pays for the writes of the one before
                runs[label].append(_stage("cold", base, {"GPT2HUB_CACHE": str(work / "cache"), "GPT2HUB_OPENAI_URL": url},
                                          tree))
                shutil.rmtree(work / "cache", ignore_errors=True)
            os.sync()
            copies.append(_stage("copy", {**base, "url": url, "size": spec.size, "dest": str(work / "copy")}, {},
                                 HERE)["total_s"])
            shutil.rmtree(work / "copy", ignore_errors=True)
        warm = _warm(base, trees, repeats, work, url)
    copy = statistics.median(copies)
    result: dict[str, Any] = {"model": model, "dtype": dtype, "copy_s": copy, "copies": copies}
    for label, got in runs.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0]}
        result[label] = {**med, "over_copy": med["total_s"] / copy, "runs": got, "warm": warm[label]}
    return result


def _warm(base: dict[str, Any], trees: dict[str, str], repeats: int, work: Path, url: str) -> dict[str, Any]:
    """Warm loads (the `ours` stage) of each checkout from a cache of its own, in alternating rounds."""
    env = {label: {"GPT2HUB_CACHE": str(work / f"warm-{label}"), "GPT2HUB_OPENAI_URL": url} for label in trees}
    for label, tree in trees.items():
        _stage("cold", base, env[label], tree)  # fills this checkout's cache
    got: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    for _ in range(repeats):
        for label, tree in trees.items():
            got[label].append(_stage("ours", base, {**env[label], "GPT2HUB_OFFLINE": "1"}, tree))
    for label in trees:
        shutil.rmtree(work / f"warm-{label}", ignore_errors=True)
    return {label: {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                        "max": max(r[k] for r in runs)} for k in runs[0]} | {"runs": runs} for label, runs in got.items()}


def report(results: list[dict[str, Any]], trees: dict[str, str], info: dict[str, Any], repeats: int) -> list[str]:
    rows = []
    for r in results:
        for label in trees:
            m = r[label]
            totals = [run["total_s"] for run in m["runs"]]
            rows.append([r["model"], r["dtype"], label, _spread({"median": m["total_s"], "min": min(totals),
                                                                  "max": max(totals)}), f"{m['download_s']:.3f} s",
                         f"{m['convert_s']:.3f} s", f"{m['load_s']:.3f} s", f"{r['copy_s']:.3f} s",
                         f"**{m['over_copy']:.2f}x**", f"{m['peak_rss_delta_mib']:.0f} MiB"])
    warm = [[r["model"], r["dtype"], label, _spread(r[label]["warm"]["total_s"]),
             _spread(r[label]["warm"]["load_s"]), f"{r[label]['warm']['peak_rss_delta_mib']['median']:.0f} MiB"]
            for r in results for label in trees]
    return [f"Cold loads to first logits, {describe(info)}; medians (min-max of the totals) of {repeats} alternating rounds "
            f"({', '.join(f'{k}: {v}' for k, v in trees.items())})", "",
            *table(["model", "dtype", "checkout", "cold total", "download (with streaming)", "convert (after)", "load",
                    "copy floor", "cold / copy", "peak RSS delta"], rows), "",
            f"Warm loads (a fresh process, imports excluded) to first logits: median (min-max) of {repeats} alternating "
            "rounds", "", *table(["model", "dtype", "checkout", "warm total", "from_pretrained", "peak RSS delta"], warm)]


def _spread(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} s ({s['min']:.3f}-{s['max']:.3f})"


def parser() -> argparse.ArgumentParser:
    """The script's options; the dtypes are the registry's (`gpt2hub.registry.dtype_choices`: int8 and int4 too)."""
    from gpt2hub.registry import dtype_choices

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2-small"])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=dtype_choices())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", help="another checkout of gpt2hub, measured in the same rounds")
    ap.add_argument("--out", type=Path)
    return ap


def main() -> None:
    a = parser().parse_args()
    trees = {"this": HERE, **({"baseline": str(Path(a.baseline).resolve())} if a.baseline else {})}
    info = machine()
    with tempfile.TemporaryDirectory(prefix="gpt2hub-cold-") as tmp:
        results = [measure(m, d, trees, a.repeats, Path(tmp)) for m in a.models for d in a.dtype]
    save(report(results, trees, info, a.repeats), a.out, "cold_load", {"machine": info, "trees": trees, "results": results})


if __name__ == "__main__":
    main()
