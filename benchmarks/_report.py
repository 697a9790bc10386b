"""What the benchmark scripts share at their end: the machine, its words in a table's heading, tables, the saved files.

torch and gpt2hub are imported only by the functions that need them, so that a script importing this module (such as
decode_memory.py, whose measuring children run the script's own file) loads nothing more than it did without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """`gpt2hub.bench.machine_info()`, whether gpt2hub.kernels uses native bfloat16 ("native_bf16"), then `extra`."""
    from gpt2hub import kernels
    from gpt2hub.bench import machine_info

    return {**machine_info(), "native_bf16": kernels.NATIVE_BF16, **extra}


def describe(info: dict[str, Any]) -> str:
    """The machine as a table's heading names it: "<CPU or GPU> (<vector flags>), torch <version>, <n> threads, native
    bfloat16: <bool>".

    `info` is what `machine()` returned; the threads are torch's now.
    """
    import torch

    from gpt2hub.bench import machine_label

    flags = f" ({' '.join(info['cpu_flags'])})" if info.get("cpu_flags") else ""
    return (f"{machine_label(info)}{flags}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"native bfloat16: {info['native_bf16']}")


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table's lines: the header `columns`, its rule, then one line per row of cells (each put as str())."""
    return [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)] + [f"| {' | '.join(map(str, row))} |" for row in rows]


def save(lines: list[str], out: Path | None, name: str, data: Any) -> None:
    """Print the report's `lines`; with `out`, also write them to `out/<name>.md` and `data` to `out/<name>.json`.

    `out` is created if missing; the JSON is indented by 2, the Markdown ends with a newline.
    """
    print("\n".join(lines))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(data, indent=2))
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
