"""Run by tests in a separate process: load gpt2-tiny64 as int8 through the hub and print a digest of its logits.

GPT2HUB_TEST_PREPARED names a file to which each quantization appends a line (counted by the tests);
GPT2HUB_TEST_SLOW_WRITE makes the quantized file's writer sleep that many seconds per tensor (to be killed mid-write).
"""

import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from factory import tiny_spec  # noqa: E402

from gpt2hub import from_pretrained, register, safetensors_file, storage  # noqa: E402

register(tiny_spec("gpt2-tiny64", "tiny64", d=64))
prepare, write = storage.Quantized.prepare, safetensors_file.SafetensorsWriter.write


def counted(self, *args, **kwargs):
    with open(os.environ["GPT2HUB_TEST_PREPARED"], "a") as f:
        f.write(f"{os.getpid()}\n")
    return prepare(self, *args, **kwargs)


def slow(self, *args, **kwargs):
    write(self, *args, **kwargs)
    self.f.flush()
    time.sleep(float(os.environ["GPT2HUB_TEST_SLOW_WRITE"]))


if os.environ.get("GPT2HUB_TEST_PREPARED"):
    storage.Quantized.prepare = counted  # type: ignore[method-assign]
if os.environ.get("GPT2HUB_TEST_SLOW_WRITE"):
    safetensors_file.SafetensorsWriter.write = slow  # type: ignore[method-assign]
with torch.no_grad():
    logits = from_pretrained("gpt2-tiny64", dtype=sys.argv[1])(torch.arange(40)[None] * 7)
print(hashlib.sha256(logits.float().numpy().tobytes()).hexdigest())
