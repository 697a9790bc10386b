"""How long the command line takes to start, beside another checkout of gpt2hub (a baseline), hyperfine-like.

Each round runs every command once per checkout, in turn, each in a fresh process (`python -m gpt2hub ...` with
PYTHONPATH at the checkout), and times it from start to exit; rounds alternate so that both checkouts see the same
moments of a shared machine. Reported: median (min-max) wall time per command and checkout, and whether the command
imported torch (`python -X importtime`, once per command and checkout). The commands:

- `--help`;
- `cache list` on a cache holding one model (gpt2-small's files);
- `download gpt2-small` with every file already cached (the usual case after the first: nothing to fetch).

The cache is filled once from a full-size random-weight gpt2-small checkpoint (gpt2hub.synthetic) served from
127.0.0.1, under GPT2HUB_IGNORE_PINS=1 (the weights are not the published ones); 1 GB of temporary disk, removed.

    git archive 5112f20 | (mkdir -p /tmp/gpt2hub-5112f20 && tar -x -C /tmp/gpt2hub-5112f20)
    python benchmarks/cli_startup.py --baseline /tmp/gpt2hub-5112f20 --rounds 15 --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import describe, machine, save, table
from idle import note, wait_idle

HERE = str(Path(__file__).resolve().parents[1])
COMMANDS = {"--help": ["--help"], "cache list": ["cache", "list"], "download (cached)": ["download", "gpt2-small"]}


def _env(tree: str, cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": tree, "GPT2HUB_CACHE": str(cache), "GPT2HUB_IGNORE_PINS": "1",
            "GPT2HUB_OFFLINE": "1", "GPT2HUB_DISABLE_PROGRESS_BARS": "1"}


def wall(argv: list[str], tree: str, cache: Path) -> float:
    """Seconds from starting `python -m gpt2hub ARGV` to its exit (it must succeed)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpt2hub", *argv], env=_env(tree, cache), cwd=tree,
                          capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"gpt2hub {' '.join(argv)} in {tree} failed:\n{proc.stderr[-2000:]}")
    return took


def imports_torch(argv: list[str], tree: str, cache: Path) -> bool:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gpt2hub", *argv], env=_env(tree, cache), cwd=tree,
                          capture_output=True, text=True, timeout=300)
    return any(re.search(r"\|\s*torch$", line.rstrip()) for line in proc.stderr.splitlines())


def fill_cache(cache: Path, work: Path) -> None:
    """gpt2-small's seven files in `cache`, downloaded once by this checkout from random weights served locally."""
    from gpt2hub import bench
    from gpt2hub.registry import resolve
    from gpt2hub.synthetic import write_openai_folder

    spec = resolve("gpt2-small")
    write_openai_folder(work / "served" / spec.size, spec)
    with bench.serve(work / "served") as url:
        env = {**_env(HERE, cache), "GPT2HUB_OPENAI_URL": url, "GPT2HUB_OFFLINE": "0"}
        subprocess.run([sys.executable, "-m", "gpt2hub", "download", "gpt2-small"], env=env, check=True,
                       capture_output=True, timeout=900)
    shutil.rmtree(work / "served")


def measure(trees: dict[str, str], rounds: int, cache: Path, idle: float | None = None) -> dict[str, Any]:
    for tree in trees.values():  # once each, untimed: the files' first read and Python's bytecode caches
        for argv in COMMANDS.values():
            wall(argv, tree, cache)
    times: dict[str, dict[str, list[float]]] = {c: {t: [] for t in trees} for c in COMMANDS}
    others, load = [], [os.getloadavg()[0]]
    for _ in range(rounds):
        others.append(wait_idle(idle))
        for command, argv in COMMANDS.items():
            for label, tree in trees.items():
                times[command][label].append(wall(argv, tree, cache))
    load.append(os.getloadavg()[0])
    return {"others_busy": others, "load_average": load,
            **{command: {label: {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs,
                                 "imports_torch": imports_torch(COMMANDS[command], trees[label], cache)}
                         for label, runs in per.items()}
               for command, per in times.items()}}


def report(results: dict[str, Any], trees: dict[str, str], info: dict[str, Any], rounds: int,
           idle: float | None) -> list[str]:
    rows = []
    for command in COMMANDS:
        per = results[command]
        base = per.get("baseline", {}).get("median")
        for label, m in per.items():
            ratio = f"{base / m['median']:.2f}x" if base and label != "baseline" else ""
            rows.append([f"`gpt2hub {COMMANDS[command][0] if command == '--help' else command}`", label,
                         f"**{m['median']:.3f} s** ({m['min']:.3f}-{m['max']:.3f})", "yes" if m["imports_torch"] else "no",
                         ratio])
    return [f"CLI start-up to exit, fresh processes, {describe(info)}, {os.cpu_count()} CPUs; median (min-max) of "
            f"{rounds} alternating rounds{note(idle)} ({', '.join(f'{k}: {v}' for k, v in trees.items())}); the "
            f"1-minute load average was {results['load_average'][0]:.1f} at the start and "
            f"{results['load_average'][1]:.1f} at the end (other work shared the machine)", "",
            *table(["command", "checkout", "wall time", "imports torch", "baseline's time / this one's"], rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="another checkout of gpt2hub (e.g. the branch point) to time beside this one")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, help="folder for cli_startup.json and cli_startup.md")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="SHARE",
                    help="before each round, wait until other processes use under SHARE of the CPUs (see idle.py)")
    args = ap.parse_args()
    trees = {"this checkout": HERE, **({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})}
    work = Path(tempfile.mkdtemp(prefix="gpt2hub-cli-startup-"))
    try:
        fill_cache(work / "cache", work)
        results = measure(trees, args.rounds, work / "cache", args.wait_idle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    save(report(results, trees, info, args.rounds, args.wait_idle), args.out, "cli_startup",
         {"machine": info, "trees": trees, "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
