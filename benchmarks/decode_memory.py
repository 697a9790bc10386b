"""Memory that greedy decoding adds to a loaded gpt2-small, with and without packed bfloat16 weights.

Each variant runs in a fresh process: the model is built (random weights, laid out as gpt2hub loads that dtype), the
peak resident memory is reset, then `generate` runs (prompt 16, 32 new tokens, batch 1) and the growth of peak
(VmHWM) and current (VmRSS) resident memory is reported, beside the bytes held by packs (gpt2hub.kernels) and the
model's own weights. "F.linear" is bfloat16 without packs (gpt2hub.kernels.NATIVE_BF16 off, as on CPUs without
native bfloat16). Linux only (/proc).

    python benchmarks/decode_memory.py --out benchmarks/results/cpu-xeon-amx-2core
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _report import save, table

VARIANTS = [("float32", "oneDNN"), ("bfloat16", "packed"), ("bfloat16", "F.linear")]


def _mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(dtype_name: str, path: str) -> dict:
    """One variant, in this process."""
    import torch

    from gpt2hub import generate, kernels
    from gpt2hub.convert import config_from_hparams, openai_state_dict
    from gpt2hub.model import GPTModel
    from gpt2hub.registry import resolve
    from gpt2hub.synthetic import random_weights

    dtype = getattr(torch, dtype_name)
    hp = resolve("gpt2-small").hparams()
    cfg = config_from_hparams(hp)
    weights = random_weights(hp, seed=0)
    model = GPTModel.from_state_dict(cfg, openai_state_dict(lambda n: weights[f"model/{n}"], cfg, dtype))
    if dtype != torch.float32:  # float32 views OpenAI's arrays: keep them
        del weights
    kernels.NATIVE_BF16 = kernels.NATIVE_BF16 and path != "F.linear"
    idx = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # peak := current
    rss0 = _mib("VmRSS")
    generate(model, idx, 32)
    return {"dtype": dtype_name, "path": path, "peak_growth_mib": _mib("VmHWM") - rss0,
            "rss_growth_mib": _mib("VmRSS") - rss0, "packed_mib": kernels.packed_bytes() / 2**20,
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for dtype, path in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", dtype, path], capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    lines = ["Memory added by greedy decoding (prompt 16, 32 new tokens, batch 1) to a loaded gpt2-small, fresh process "
             "per row", ""]
    lines += table(["dtype", "linears", "weights", "packs", "peak RSS growth", "RSS growth after"],
                   [(r["dtype"], r["path"], f"{r['weights_mib']:.0f} MiB", f"{r['packed_mib']:.0f} MiB",
                     f"{r['peak_growth_mib']:.0f} MiB", f"{r['rss_growth_mib']:.0f} MiB") for r in rows])
    save(lines, args.out, "decode_memory", rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
