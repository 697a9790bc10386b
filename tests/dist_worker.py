"""Run by torchrun in tests: each rank loads the tiny model through the hub and writes its outcome to a file.

GPT2HUB_TEST_OUT names the folder: rank{RANK}.txt holds "ok <sha256 of the logits>" or "error <type> <message>".
"""

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from factory import tiny_spec  # noqa: E402

from gpt2hub import GPT2HubError, from_pretrained, register  # noqa: E402

register(tiny_spec())
dist.init_process_group("gloo")
try:
    with torch.no_grad():
        logits = from_pretrained("gpt2-tiny")(torch.arange(10)[None])
    outcome = "ok " + hashlib.sha256(logits.numpy().tobytes()).hexdigest()
except GPT2HubError as e:
    outcome = f"error {type(e).__name__} {e}"
(Path(os.environ["GPT2HUB_TEST_OUT"]) / f"rank{dist.get_rank()}.txt").write_text(outcome)
dist.destroy_process_group()
