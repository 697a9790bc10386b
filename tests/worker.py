"""Run by tests in a separate process: load the tiny model through the hub and print a digest of its logits."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from factory import tiny_spec  # noqa: E402

from gpt2hub import from_pretrained, register  # noqa: E402
from gpt2hub.hub import download_files  # noqa: E402

register(tiny_spec())
if sys.argv[1:] == ["download"]:
    download_files("gpt2-tiny")
elif sys.argv[1:] == ["bfloat16"]:
    from_pretrained("gpt2-tiny", dtype="bfloat16")
else:
    with torch.no_grad():
        logits = from_pretrained("gpt2-tiny")(torch.arange(10)[None])
    print(hashlib.sha256(logits.numpy().tobytes()).hexdigest())
