"""Which kernels a call ran (from the profiler), and the switch that turns oneDNN off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ONEDNN_OP = "mkldnn::_linear_pointwise"
PACK_OP = "mkldnn::_reorder_linear_weight"


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """The switch users have: torch.backends.mkldnn.enabled = False."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def ops(fn: Callable[[], Any]) -> tuple[set[str], Any]:
    """The names of the operators `fn` ran, and what it returned."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return {e.key for e in prof.key_averages()}, out
